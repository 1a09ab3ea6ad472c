"""What the benign site's users type and send: search queries, names, comments, files.

Mostly ordinary, with the hard cases that naive filters flag on purpose: apostrophes in names,
SQL and HTML words in text, punctuation-heavy passwords, non-Latin scripts and emoji, long
pasted queries.
"""

from __future__ import annotations

import random
import re
import string

CATEGORIES = ("audio", "phones", "laptops", "books", "kitchen", "garden", "toys", "sports", "home")
NEWS_SECTIONS = ("national", "politics", "business", "entertainment", "science", "world", "sport")
SLUGS = (
    "choosing-headphones-2024",
    "how-we-test-laptops",
    "kitchen-knife-care",
    "garden-in-a-weekend",
    "best-books-for-programmers",
    "union-jack-collection-is-back",
    "select-the-right-running-shoe",
    "drop-test-results",
    "summer-sale-faq",
    "o-brien-family-recipes",
    "cafe-creme-at-home",
    "script-writing-kits-reviewed",
)
QUERIES = (
    "wireless headphones",
    "usb-c cable 2m",
    "running shoes size 42",
    "coffee grinder",
    "laptop stand",
    "kids bike",
    "garden hose 30m",
    "iphone 16 case",
    "noise cancelling",
    "cast iron pan",
    "board games",
    "yoga mat",
    "4k monitor",
    "mechanical keyboard",
    "rain jacket",
    "led strip",
)
# Benign text that naive filters flag: SQL and HTML words, quotes, operators, paths.
HARD_QUERIES = (
    "select a union rep",
    "union jack flag",
    "drop shipping",
    "o'brien",
    "rock & roll t-shirt",
    "<3 mug",
    "50% off",
    "c++ primer",
    "c# in depth",
    "1=1 scale model",
    "how to use SELECT * FROM in sql",
    "script writing kit",
    "alert bracelet",
    "order by price",
    "--help book",
    "delete key replacement",
    "what's new",
    '"exact phrase" search',
    "tom & jerry dvd",
    "and/or gate kit",
    "../ keycap",
    "where is my order",
    "<b>bold</b> sign",
    "table; chairs",
    "ping pong table",
    "cat /etc/hosts poster",
    "1' drill bit",
)
UNICODE_QUERIES = (
    "café crème",
    "naïve art print",
    "日本語の本",
    "наушники",
    "سماعات لاسلكية",
    "🎧 headphones",
    "straße schild",
    "Zoë's garden",
    "ñandú peluche",
    "ελληνικά βιβλία",
    "蓝牙耳机",
    "😀 emoji stickers",
    "São Paulo mapa",
    "İstanbul magnet",
)
NAMES = (
    "Alice Smith",
    "Bob Jones",
    "Priya Patel",
    "Sean O'Brien",
    "Máire O'Neill-Smith",
    "Luca D'Angelo",
    "Aminata N'Diaye",
    "Nguyễn Văn An",
    "José Ñúñez",
    "Zoë Kravitz",
    "Björk Guðmundsdóttir",
    "王小明",
    "Søren Kierkegaard",
    "Jean-Luc Picard",
    "Mary-Kate O'Connor",
    "Renée Zellweger",
    "D'Arcy Carden",
    "Anna-Lena Müller",
    "Ólafur Arnalds",
    "Владимир Иванов",
    "محمد علي",
)
SENTENCES = (
    "Works great, arrived a day early.",
    "I select this over the union brand every time.",
    "Dropped it from 2m and it survived; 10/10 would drop again.",
    "Works with Windows & Linux; update: still good after a year.",
    "Best purchase this year <3",
    "If (size > 42) then order one size up.",
    "Use 'single quotes' around the name when you engrave it.",
    "Setup: cd ../downloads then run ./install.sh and it just works.",
    "The box says <b>waterproof</b> but it is not.",
    "ORDER BY price DESC would be a nice sorting option on this page.",
    "Where's my order? -- John",
    "Email me at first.last+shop@example.org if you have questions.",
    "Review: 4/5 -- the script on the lid rubs off.",
    "My kid (age 7) loves it; my wife & I less so.",
    "Battery: ~10h; charging: 2h; weight: 250g.",
    "Tried it with 1=1 ratio of water and coffee, perfect.",
    "Je l'ai acheté pour mon frère, il adore.",
    "Muy buena calidad, llegó rápido.",
    "とても良い商品です。また買います。",
    "Отличный товар, рекомендую!",
    "Great for my D&D nights; 5 stars.",
    "Price was $19.99 -> now $24.99? Not happy.",
    "See https://www.youtube.com/watch?v=dQw4w9WgXcQ for my unboxing.",
    "Third one I've bought; the first two were gifts.",
    "It's the O'Reilly edition, not the cheap reprint.",
    "Don't drop it in water. Or do, it's fine 🙂",
    "Null and void? No: the warranty covers it.",
    "10% off with code SUMMER; worked on 2024-07-01.",
)
FILES = (
    "invoices/2024-11-0042.pdf",
    "manuals/headphones-x200.pdf",
    "catalog-2025.pdf",
    "returns-form.docx",
    "size-guide.png",
    "press/kit v2.zip",
    "manuals/café-machine_fr.pdf",
)
OUTBOUND = (
    "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
    "https://partner.example.com/deals?ref=shop",
    "https://en.wikipedia.org/wiki/Union_Jack",
    "https://maps.google.com/?q=shop",
    "/products/17",
    "/blog/summer-sale-faq",
)
EXTERNAL_REFERERS = (
    "https://www.google.com/",
    "https://www.bing.com/",
    "https://duckduckgo.com/",
    "https://t.co/",
    "https://www.facebook.com/",
    "https://www.reddit.com/r/deals/",
    "https://news.ycombinator.com/",
)
STREETS = ("Main St", "Rue de l'Église", "Hauptstraße", "O'Connell St", "Elm St.", "Kings Rd")
ROBOTS_DISALLOW = ("/account", "/cart", "/checkout", "/api/", "/login", "/download", "/go")


def password(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "!@#$%^&*()-_=+[]{};:'\",.<>/?`~|\\"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 20)))


def email_for(rng: random.Random, name: str) -> str:
    local = re.sub(r"[^a-z0-9.'+-]", "", name.lower().replace(" ", "."))
    local = local or "user" + str(rng.randint(1, 9999))
    dom = rng.choice(("gmail.com", "outlook.com", "yahoo.co.uk", "web.de", "icloud.com"))
    return f"{local}{rng.choice(('', str(rng.randint(1, 99))))}@{dom}"


def sentences(rng: random.Random, lo: int = 1, hi: int = 4) -> str:
    return " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(lo, hi)))


def long_text(rng: random.Random) -> str:
    return "\n\n".join(sentences(rng, 4, 8) for _ in range(rng.randint(3, 10)))


def search_query(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        return rng.choice(QUERIES)
    if r < 0.78:
        return rng.choice(HARD_QUERIES)
    if r < 0.93:
        return rng.choice(UNICODE_QUERIES)
    words = [w for s in rng.sample(SENTENCES, 4) for w in s.split()]
    return " ".join(words[: rng.randint(20, 60)])  # a pasted description


def image_bytes(rng: random.Random, ext: str) -> bytes:
    magic = {
        "png": b"\x89PNG\r\n\x1a\n",
        "jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
        "gif": b"GIF89a",
        "pdf": b"%PDF-1.7\n",
    }
    return magic.get(ext, b"") + rng.randbytes(rng.randint(512, 16384))
