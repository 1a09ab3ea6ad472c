"""The guard's labelled traffic corpus: benign sessions of a small site and attack payloads from
packages (PyPI fray; Debian sqlmap, wapiti, wfuzz, dirb) injected into otherwise benign requests,
split by source and family. SOURCES.md lists the sources and how to install them.

Public API::

    from webtorch_guardlab.corpus import build_corpus, read_jsonl, Sample

    manifest = build_corpus(Path("corpus"), seed=0)   # train.jsonl, test.jsonl, manifest.json
    for sample in read_jsonl(Path("corpus/train.jsonl")):
        sample.to_http(), sample.label, sample.family

Command line: ``python -m webtorch_guardlab.corpus build OUT_DIR [--seed N]``.
"""

from webtorch_guardlab.corpus.build import HOLDOUT, Sizes, Sources, build_corpus, load_sources
from webtorch_guardlab.corpus.payloads import FAMILIES, MissingSource, Payload
from webtorch_guardlab.corpus.records import Sample, read_jsonl, write_jsonl

__all__ = [
    "FAMILIES",
    "HOLDOUT",
    "MissingSource",
    "Payload",
    "Sample",
    "Sizes",
    "Sources",
    "build_corpus",
    "load_sources",
    "read_jsonl",
    "write_jsonl",
]
