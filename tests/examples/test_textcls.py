"""examples/textcls: the generator is deterministic and dirty, cleaning undoes each kind of dirt,
the features are stable across processes, the post stage answers labels with scores."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from webtorch.examples.textcls import data, stages


def test_generator_is_deterministic_and_sized() -> None:
    first = [d.text for d in data.documents(6, seed=3, size=data.SMALL)]
    assert first == [d.text for d in data.documents(6, seed=3, size=data.SMALL)]
    assert first != [d.text for d in data.documents(6, seed=4, size=data.SMALL)]
    assert [d.label for d in data.documents(6, seed=3)] == [*data.CLASSES, data.CLASSES[0]]
    for doc in first:
        assert data.SMALL <= len(doc.encode()) < 2 * data.SMALL
    for doc in data.documents(2, seed=3, size=data.LARGE):
        assert data.LARGE <= len(doc.text.encode()) < data.LARGE + 8192


def test_generated_pages_are_dirty() -> None:
    pages = "".join(d.text for d in data.documents(40, seed=0))
    for dirt in ("<script", "<style", "cookie-banner", "<nav", "<footer", "&nbsp;", "&amp;",
                 "\u00a0", "\u200b", "\u00c3", "\u0301", "\uff41"):  # fmt: skip
        assert dirt in pages, dirt


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (
            "<p>Foot\u200bball &amp; ten\u00adnis</p>",
            "football & tennis",
        ),  # zero-width, soft hyphen
        ("\uff26\uff4f\uff4f\uff54\uff42\uff41\uff4c\uff4c", "football"),  # full-width
        ("cafe\u0301 cr\u00e8me", "cafe creme"),  # combining mark, precomposed accent
        (
            "caf\u00c3\u00a9 br\u00c3\u00bbl\u00c3\u00a9e don\u00e2\u20ac\u2122t",
            "cafe brulee don't",
        ),
        ("a\u00a0&nbsp;b\r\n\tc", "a b c"),  # no-break spaces, CRLF, tabs
        ("<script>var x='finance'</script><style>.a{}</style>match", "match"),
        (
            "<nav><a>Finance</a></nav><div class='cookie-banner'><p>We use cookies</p></div>goal",
            "goal",
        ),
        ("<aside class=related><ul><li>stock</li></ul></aside><footer>(c)</footer>oven", "oven"),
        ("<p>one</p><p>two</p>three<br>four", "one two three four"),  # blocks do not glue words
        ("<b>unclosed <i>tags", "unclosed tags"),
        ("\ufeffSOUFFL\u00c9\u00a0x", "souffle x"),  # a real É before a no-break space stays É
        ("<script>only script</script>", ""),
    ],
)
def test_cleaning_undoes_the_dirt(raw: str, clean: str) -> None:
    assert stages.clean_one(raw) == clean


def test_cleaning_takes_records_as_users_have_them() -> None:
    assert stages.clean(["<p>a</p>", b"<p>b\xc3\xa9</p>", {"text": "c"}, b"\xff"]) == [
        "a",
        "be",
        "c",
        "\ufffd",  # undecodable bytes: the replacement character, never an exception
    ]
    with pytest.raises(TypeError, match="not int"):
        stages.clean([3])


def test_clean_text_keeps_the_class_words() -> None:
    for doc in data.documents(10, seed=1):
        text = stages.clean_one(doc.text)
        hits = {
            c: sum(w in text.split() for w in map(stages.clean_one, data.TOPICS[c]))
            for c in data.CLASSES
        }
        assert max(hits, key=hits.__getitem__) == doc.label
        assert "cookies" not in text and "dataLayer".lower() not in text


def test_features_are_padded_ids_stable_across_processes() -> None:
    ids = stages.featurize(["match goal striker", "", "x " * 1000])["ids"]
    assert ids.shape == (3, stages.LENGTH) and ids.dtype == np.int64
    assert list(ids[0][:6] > 0) == [True] * 5 + [False]  # 3 unigrams + 2 bigrams, then padding
    assert not ids[1].any() and ids[2].all()
    assert ids.max() < stages.BUCKETS
    # crc32, not Python's salted hash(): another process computes the same ids.
    code = (
        "from webtorch.examples.textcls import stages; "
        "print(stages.featurize(['match goal'])['ids'][0][:3].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(ids[0][:3].tolist())


def test_network_and_labels() -> None:
    torch.manual_seed(0)
    net = stages.TextNet().eval()
    logits = net(torch.from_numpy(stages.featurize(["match", ""])["ids"]))
    assert logits.shape == (2, len(data.CLASSES))
    answers = stages.label({"logits": logits.detach()})
    assert [set(a) for a in answers] == [{"label", "score", "scores"}] * 2
    assert all(a["label"] in data.CLASSES for a in answers)
    assert sum(answers[0]["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert stages.label(np.array([[0.0, 5.0, 0.0, 0.0, 0.0]]))[0]["label"] == "finance"
