"""``webtorch demo``: a client that teaches the XOR example over HTTP (see :mod:`.demo`).

Tooling, not runtime: ``webtorch serve`` never imports it; its progress bar needs the ``demo``
extra (tqdm)."""
