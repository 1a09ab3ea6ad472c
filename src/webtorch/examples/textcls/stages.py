"""The text classifier's stages as plain batch functions: a list of rows in, one result per row
out (or a dict of arrays with one row per input row). Nothing here knows WebTorch: the pipeline
file wires them, and the benchmark's baselines call the very same functions.

    clean      raw page (str | bytes | {"text": ...}) -> clean text (str)
    featurize  clean texts -> {"ids": int64 [rows, LENGTH]} hashed unigram and bigram ids, 0-padded
    TextNet    ids -> logits [rows, classes] (an EmbeddingBag and a linear layer)
    label      logits -> {"label", "score", "scores"} per row
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Sequence
from html.parser import HTMLParser
from typing import Any

import numpy as np
import torch
from torch import nn

from webtorch.examples.textcls.data import CLASSES, words

LENGTH = 256  # ids per document: the first unigrams and bigrams of the clean text
BUCKETS = 1 << 15  # hash buckets; id 0 is padding
DIM = 32
MAX_RECORD = 1 << 20  # characters of one raw page that cleaning reads at most

# Elements whose content is never the document's text.
SKIP = frozenset(
    words(
        "script style nav header footer aside noscript template svg iframe form button select head"
    )
)
# ... and any element whose class or id says it is chrome.
CHROME = re.compile(r"cookie|consent|banner|newsletter|subscribe|related|share|promo|advert")
# Elements after which words must not run together.
BLOCKS = frozenset(
    words(
        "p div br li ul ol h1 h2 h3 h4 h5 h6 tr td th article section blockquote pre hr table "
        "title dd dt"
    )
)
VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "source", "wbr", "area", "base"})
# A run that reads like UTF-8 decoded as Windows-1252: a lead byte's character, then
# continuation bytes' characters (0x80-0xBF in cp1252). Leads are the ones Latin text makes
# (Â Ã Ä Å for U+0080-U+017F, â for punctuation such as U+2019 and U+2014): a real "É" before
# a no-break space would otherwise read as a valid two-byte sequence and be "repaired".
MOJIBAKE = re.compile(
    "[\u00c2-\u00c5\u00e2][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6"
    "\u02dc\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]{1,3}"
)
WORD = re.compile(r"\w+")
# Typographic quotes and dashes to ASCII (NFKD keeps them): curly and straight quotes match.
PUNCT = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"}
)
# Combining marks (the blocks Latin, Greek, Cyrillic and Hebrew text use), format characters
# (soft hyphen, zero-width space/non-joiner/joiner, direction marks, word joiner, BOM) and C0/C1
# controls other than tab and newline.
DROP = re.compile(
    "[\u0300-\u036f\u0483-\u0489\u0591-\u05bd\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff"
    "\ufe20-\ufe2f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff"
    "\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


class _Text(HTMLParser):
    """The visible text of a page, without scripts, styles and the site's chrome."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities decoded, also in broken markup
        self.parts: list[str] = []
        self.skip_tag: str | None = None  # the element being skipped, and how deep in it
        self.skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID:
            if tag in BLOCKS:
                self.parts.append("\n")
            return
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth += 1
            return
        if tag in SKIP or any(
            k in ("class", "id") and v is not None and CHROME.search(v.lower()) for k, v in attrs
        ):
            self.skip_tag, self.skip_depth = tag, 1
        elif tag in BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is None:
            self.parts.append(data)


def _unmojibake(match: re.Match[str]) -> str:
    run = match.group(0)
    try:
        return run.encode("cp1252").decode("utf-8")
    except UnicodeError:
        return run  # not mojibake after all: leave it as written


def _fold(text: str) -> str:
    # NFKD: full-width letters to ASCII, ligatures apart, accents off their letters (as marks);
    # then the marks, format characters (zero-width space/joiner, soft hyphen, BOM) and controls
    # go; casefold; every run of whitespace (no-break spaces included) is one space. A regex of
    # the ranges rather than unicodedata.category per character: 20x faster on a 50 KB page.
    decomposed = DROP.sub("", unicodedata.normalize("NFKD", text)).translate(PUNCT)
    return " ".join(decomposed.casefold().split())


def clean_one(record: Any) -> str:
    """One raw page to its clean text ("" when nothing is left)."""
    if isinstance(record, dict):
        record = record.get("text", "")
    if isinstance(record, bytes | bytearray | memoryview):
        record = bytes(record).decode("utf-8", errors="replace")
    if not isinstance(record, str):
        raise TypeError(
            f"a document is text, bytes or {{'text': ...}}, not {type(record).__name__}"
        )
    parser = _Text()
    parser.feed(record[:MAX_RECORD])
    parser.close()
    text = MOJIBAKE.sub(_unmojibake, "".join(parser.parts))
    return _fold(text)


def clean(records: Sequence[Any]) -> list[str]:
    """A batch of raw pages to clean texts."""
    return [clean_one(r) for r in records]


def _bucket(token: str) -> int:
    # crc32: stable across processes and runs (Python's hash() is salted per process).
    return zlib.crc32(token.encode("utf-8")) % (BUCKETS - 1) + 1


def featurize_one(text: str, out: np.ndarray) -> None:
    """Hashed ids of ``text``'s unigrams and bigrams into ``out`` (zeros stay padding)."""
    n, prev = 0, ""
    for match in WORD.finditer(text):
        if n >= LENGTH:
            break
        token = match.group(0)
        out[n] = _bucket(token)
        n += 1
        if prev and n < LENGTH:
            out[n] = _bucket(prev + " " + token)
            n += 1
        prev = token


def featurize(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """A batch of clean texts to ``{"ids": int64 [rows, LENGTH]}``."""
    ids = np.zeros((len(texts), LENGTH), dtype=np.int64)
    for row, text in zip(ids, texts, strict=True):
        featurize_one(text, row)
    return {"ids": ids}


class TextNet(nn.Module):
    """Mean of the ids' embeddings (padding ignored), then a linear layer to the classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(BUCKETS, DIM, mode="mean", padding_idx=0)
        self.out = nn.Linear(DIM, len(CLASSES))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids))  # type: ignore[no-any-return]


def label(logits: Any) -> list[dict[str, Any]]:
    """Logits [rows, classes] (tensor, array, or {"logits": ...}) to one answer per row."""
    if isinstance(logits, dict):
        logits = logits["logits"]
    scores = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1).tolist()
    answers = []
    for row in scores:
        best = max(range(len(row)), key=row.__getitem__)
        answers.append(
            {
                "label": CLASSES[best],
                "score": round(row[best], 6),
                "scores": {c: round(p, 6) for c, p in zip(CLASSES, row, strict=True)},
            }
        )
    return answers
