"""Dirty labelled web pages, made here: seeded, deterministic, no downloads.

Each document is the HTML a crawler brings back: a head with scripts and styles, a navigation
bar and a cookie banner, an article whose paragraphs carry the class's words, a sidebar of
"related" headlines from OTHER classes, a footer. The text is dirty the way scraped text is:
HTML entities, no-break spaces, zero-width characters and soft hyphens inside words, full-width
letters, accents written as combining marks, UTF-8 read as Windows-1252 (mojibake), CRLF. The
boilerplate and the sidebar carry words of every class, so a classifier that does not clean sees
noise; a word broken by a zero-width space or spelled in full-width letters hashes to a
different token unless it is cleaned. Sizes: ``size`` bytes of UTF-8 at least (``SMALL`` ~2 KB,
``LARGE`` ~50 KB, both as the benchmark sends them).

    python -m webtorch.examples.textcls.data --count 4 --size 2048 > docs.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

SMALL = 2048
LARGE = 50 * 1024


def words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


CLASSES = ("sports", "finance", "technology", "health", "cooking")

# Words that mark each class; some carry accents (written several ways in the dirty text).
TOPICS: dict[str, tuple[str, ...]] = {
    "sports": words(
        "match goal striker league season coach stadium penalty referee tournament "
        "champion midfield defender score football tennis relay marathon sprint medal "
        "olympic transfer derby playoff équipe goalkeeper offside trophy athlete "
        "training"
    ),
    "finance": words(
        "market stock shares investor dividend earnings inflation bond yield interest "
        "bank portfolio hedge fund currency exchange revenue profit quarterly merger "
        "acquisition ipo trader regulator crédit liquidity valuation recession budget "
        "tariff"
    ),
    "technology": words(
        "software chip processor cloud server startup algorithm network smartphone "
        "update developer code data encryption browser kernel robot satellite battery "
        "app platform open source security patch compiler database gpu bandwidth "
        "firmware"
    ),
    "health": words(
        "patient doctor hospital vaccine clinical trial symptom therapy disease nurse "
        "diagnosis treatment virus immune diet sleep exercise heart cancer study "
        "médecin surgery prescription mental wellbeing infection antibiotic blood "
        "pressure outbreak"
    ),
    "cooking": words(
        "recipe oven flour butter garlic simmer bake roast sauce dough pastry chef "
        "kitchen spice onion crème brûlée sauté café purée soufflé whisk tablespoon "
        "minutes dessert broth caramel vinaigrette skillet herbs"
    ),
}

COMMON = words(
    "the a of and to in is was for on that with as it by at from this be are which new "
    "after more year week said people first last also about could would their there "
    "when what over into most some many other than then now report today city local "
    "team group plan time day next early late public national officials according "
    "several while during"
)

NAV = ("Home", "Sports", "Finance", "Technology", "Health", "Cooking", "Opinion", "Video")

COOKIE = (
    "We use cookies to improve your experience, personalise content and analyse traffic. "
    "By clicking Accept all cookies you agree to the storing of cookies on your device. "
    "Manage preferences &middot; Reject non-essential cookies"
)

FOOTER = (
    "&copy; 2024 Example Media Group. All rights reserved. Privacy policy &bull; Terms of use "
    "&bull; Cookie settings &bull; Contact us &bull; Advertise &bull; Subscribe to our newsletter"
)

ENTITIES = {"&": "&amp;", '"': "&quot;", "'": "&#39;", "é": "&eacute;", "-": "&#8209;"}


@dataclass(frozen=True)
class Document:
    text: str  # the raw HTML
    label: str


def _full_width(word: str) -> str:
    # ASCII letters and digits to their full-width forms (U+FF01..): NFKC maps them back.
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in word)


def _combining(word: str) -> str:
    # Precomposed accents as base letter + combining mark (NFD): NFC/NFKC compose them again.
    import unicodedata

    return unicodedata.normalize("NFD", word)


def _mojibake(word: str) -> str:
    # UTF-8 bytes read as Windows-1252: "café" -> "cafÃ©". Undefined cp1252 bytes stay as they
    # were read by Latin-1, which is what browsers and many scrapers do.
    raw = word.encode("utf-8")
    return "".join(
        bytes([b]).decode("cp1252") if b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D) else chr(b)
        for b in raw
    )


def _dirty_word(rng: random.Random, word: str) -> str:
    roll = rng.random()
    if roll < 0.05:
        return _full_width(word)
    if roll < 0.09 and len(word) > 3:
        cut = rng.randrange(1, len(word) - 1)
        return word[:cut] + rng.choice(("\u200b", "\u00ad", "\u200d", "\ufeff")) + word[cut:]
    if roll < 0.13 and not word.isascii():
        return _mojibake(word)
    if roll < 0.17 and not word.isascii():
        return _combining(word)
    if roll < 0.20:
        return word.capitalize()
    if roll < 0.22:
        return word.upper()
    return word


def _escape(text: str, rng: random.Random) -> str:
    out = []
    for c in text:
        if c in ENTITIES and (c in "&" or rng.random() < 0.5):
            out.append(ENTITIES[c])
        else:
            out.append(c)
    return "".join(out)


def _sentence(rng: random.Random, label: str, others: list[str]) -> str:
    words = []
    for _ in range(rng.randint(8, 18)):
        roll = rng.random()
        if roll < 0.22:
            words.append(rng.choice(TOPICS[label]))
        elif roll < 0.26:
            words.append(rng.choice(TOPICS[rng.choice(others)]))  # a word from elsewhere
        else:
            words.append(rng.choice(COMMON))
    words = [_dirty_word(rng, w) for w in words]
    seps = [rng.choice((" ", " ", " ", " ", "\u00a0", "&nbsp;", "  ", "\t")) for _ in words]
    text = "".join(w + s for w, s in zip(words, seps, strict=True)).strip()
    text = text[0].upper() + text[1:] + rng.choice((".", ".", "!", "?", " &mdash; really."))
    if rng.random() < 0.3:
        quote = rng.choice(TOPICS[label])
        text += f" &#8220;{quote} &amp; more&#8221; said the {rng.choice(COMMON)} desk's editor."
    return _escape_inline(rng, text)


def _escape_inline(rng: random.Random, text: str) -> str:
    # Inline markup inside paragraphs: links, bold, spans that split nothing but add tags.
    words = text.split(" ")
    for _ in range(rng.randint(0, 3)):
        i = rng.randrange(len(words))
        tag = rng.choice(("b", "i", "em", "strong", "span"))
        if tag == "span":
            words[i] = f'<span class="hl" data-x="{rng.randint(0, 99)}">{words[i]}</span>'
        else:
            words[i] = f"<{tag}>{words[i]}</{tag}>"
    if rng.random() < 0.4:
        i = rng.randrange(len(words))
        words[i] = f'<a href="/story/{rng.randint(1000, 9999)}?ref=inline&amp;x=1">{words[i]}</a>'
    return " ".join(words)


def _head(rng: random.Random, others: list[str]) -> str:
    # Scripts and styles that name other classes: a classifier reading them learns noise.
    topics = json.dumps(others)
    return (
        '<!DOCTYPE html>\r\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Example Media &ndash; {rng.choice(NAV)}</title>"
        "<style>.cookie-banner{position:fixed;bottom:0} .nav a{color:#333} "
        f".{others[0]}-promo{{display:none}}</style>"
        "<script>window.dataLayer=window.dataLayer||[];"
        f"var topics={topics};function track(e){{dataLayer.push({{event:e,"
        f"section:'{others[1]}'}})}}</script>"
        '<script type="application/ld+json">{"@type":"NewsArticle","keywords":'
        f'"{" ".join(TOPICS[others[0]][:6])}"}}</script>'
        "</head>\r\n"
    )


def _chrome_top(rng: random.Random) -> str:
    links = "".join(f'<li><a href="/{n.lower()}">{n}</a></li>' for n in NAV)
    return (
        f'<body><header class="site-header"><nav class="nav"><ul>{links}</ul></nav></header>\r\n'
        f'<div id="cookie-consent" class="cookie-banner"><p>{COOKIE}</p>'
        "<button>Accept all cookies</button></div>\r\n"
        "<!-- ad slot: leaderboard 728x90 -->\r\n"
    )


def _aside(rng: random.Random, others: list[str]) -> str:
    items = []
    for _ in range(rng.randint(3, 6)):
        other = rng.choice(others)
        words = " ".join(rng.choice(TOPICS[other]) for _ in range(5))
        items.append(f'<li><a href="/related/{rng.randint(1, 999)}">{words}</a></li>')
    return f'<aside class="related"><h3>Related stories</h3><ul>{"".join(items)}</ul></aside>\r\n'


def _footer() -> str:
    return (
        f'<footer class="site-footer"><p>{FOOTER}</p></footer>'
        '<noscript><img src="/pixel.gif" alt=""></noscript></body></html>\r\n'
    )


def document(rng: random.Random, label: str, size: int = SMALL) -> str:
    """One dirty page of class ``label``, at least ``size`` bytes of UTF-8."""
    others = [c for c in CLASSES if c != label]
    rng.shuffle(others)
    head, top, foot = _head(rng, others), _chrome_top(rng), _footer()
    title = " ".join(rng.choice(TOPICS[label]) for _ in range(4)).title()
    parts = [f"<article><h1>{_escape(title, rng)}</h1>\r\n"]
    budget = size - len((head + top + foot).encode("utf-8")) - 400
    used = len(parts[0])
    while True:
        para = " ".join(_sentence(rng, label, others) for _ in range(rng.randint(2, 5)))
        block = f"<p>{para}</p>\r\n"
        parts.append(block)
        used += len(block.encode("utf-8"))
        if rng.random() < 0.08:
            parts.append(_aside(rng, others))  # sidebars between paragraphs in long pages
        if used >= budget:
            break
    parts.append("</article>\r\n")
    parts.append(_aside(rng, others))
    text = head + top + "".join(parts) + foot
    if rng.random() < 0.2:
        text = "\ufeff" + text  # a byte-order mark that survived decoding
    return text


def documents(count: int, seed: int = 0, size: int = SMALL) -> Iterator[Document]:
    """``count`` documents, classes in turn, the same for the same ``seed`` and ``size``."""
    rng = random.Random(f"textcls:{seed}:{size}")
    for i in range(count):
        label = CLASSES[i % len(CLASSES)]
        yield Document(document(rng, label, size), label)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=SMALL, help="bytes per document at least")
    args = parser.parse_args(argv)
    for doc in documents(args.count, args.seed, args.size):
        sys.stdout.write(json.dumps({"text": doc.text, "label": doc.label}) + "\n")


if __name__ == "__main__":
    main()
