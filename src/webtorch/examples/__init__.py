"""Bundled examples; ``xor.py`` is the embedded default that ``webtorch serve`` runs."""
