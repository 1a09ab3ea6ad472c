"""The train answers' encoding: a step's answers encoded together are the same bytes."""

from __future__ import annotations

import math

import orjson

from webtorch.train.forms import TrainForms, encode_short_batch


def test_a_steps_answers_encoded_together_match_one_by_one() -> None:
    losses = [0.6931471824645996, 1.0, 0.0, 1e-300, 5e-324, 1.7976931348623157e308, 123456.75]
    losses.append(math.nan)  # not sent (a non-finite loss is refused), but encoded alike: null
    together = encode_short_batch(losses, 42)
    alone = [TrainForms.encode_short(loss, 42) for loss in losses]
    assert [r.body for r in together] == [r.body for r in alone]
    assert all(
        r.status == 200 and r.content_type == a.content_type
        for r, a in zip(together, alone, strict=True)
    )
    assert orjson.loads(together[0].body) == {"loss": 0.6931471824645996, "step": 42}
    assert [r.body for r in encode_short_batch([0.5], 7)] == [b'{"loss":0.5,"step":7}']
