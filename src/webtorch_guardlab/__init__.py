"""The guard's tooling: the labelled corpus (``corpus/``), the rule-based baseline
(``baselines/``), the datasets and evaluation behind ``webtorch guard train|eval`` and the live
flood harness (``live*.py``).

The guard that runs in the server is :mod:`webtorch.guard`; this package builds and measures its
detector and is imported only by ``webtorch guard`` (and its tests), never by ``webtorch serve``.
"""
