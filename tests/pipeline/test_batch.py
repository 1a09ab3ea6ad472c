"""Records <-> columns, concatenation and splitting of batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from webtorch.pipeline.batch import (
    Joined,
    StageError,
    concat,
    rejections,
    rows_of,
    split,
    to_columns,
    to_records,
)
from webtorch.pipeline.spec import Reject


def test_records_of_dicts_stack_into_columns_and_back() -> None:
    records = [{"x": np.array([1.0, 2.0]), "n": 3}, {"x": np.array([3.0, 4.0]), "n": 5}]
    columns = to_columns(records)
    assert columns["x"].shape == (2, 2) and columns["n"].tolist() == [3, 5]
    back = to_records(columns)
    assert [r["n"] for r in back] == [3, 5]
    assert np.array_equal(back[1]["x"], [3.0, 4.0])


def test_plain_records_travel_as_the_data_column() -> None:
    columns = to_columns(["a", "bb"])
    assert list(columns) == ["data"] and columns["data"].dtype == object
    assert to_records(columns) == ["a", "bb"]


def test_tensors_stack_with_torch() -> None:
    columns = to_columns([{"t": torch.ones(2)}, {"t": torch.zeros(2)}])
    assert isinstance(columns["t"], torch.Tensor) and columns["t"].shape == (2, 2)


def test_records_with_different_keys_are_named() -> None:
    with pytest.raises(StageError, match="record 1 is not a dict with the keys"):
        to_columns([{"a": 1}, {"b": 2}], "feat")


def test_concat_then_split_gives_each_request_its_rows() -> None:
    pieces = [{"x": np.arange(2)}, {"x": np.arange(3) + 10}]
    merged = concat(pieces, "tensors")
    assert merged["x"].tolist() == [0, 1, 10, 11, 12]
    first, second = split(merged, [2, 3])
    assert first["x"].tolist() == [0, 1] and second["x"].tolist() == [10, 11, 12]
    records = concat([["a"], ["b", "c"]], "records")
    assert split(records, [1, 2]) == [["a"], ["b", "c"]]
    # Lists into a stage that takes tensors: converted once, after merging.
    assert concat([[{"n": 1}], [{"n": 2}]], "tensors")["n"].tolist() == [1, 2]


def test_joined_batches_merge_and_split_per_input() -> None:
    a = Joined({"left": ["x"], "right": {"v": np.array([1])}})
    b = Joined({"left": ["y"], "right": {"v": np.array([2])}})
    merged = concat([a, b], "records")
    assert merged["left"] == ["x", "y"]
    assert [r["v"] for r in merged["right"]] == [1, 2]
    assert rows_of(merged) == 2
    one, two = split(merged, [1, 1])
    assert one["left"] == ["x"] and two["left"] == ["y"]


def test_rows_of_refuses_what_is_not_a_batch() -> None:
    with pytest.raises(StageError, match="returned a str"):
        rows_of("nope", "s")
    with pytest.raises(StageError, match="different numbers of rows"):
        rows_of({"a": np.zeros(2), "b": np.zeros(3)}, "s")


def test_rejections_are_found_in_lists_only() -> None:
    assert rejections(["a", Reject("bad"), "c"]) == [(1, Reject("bad"))]
    assert rejections({"a": np.zeros(2)}) == []
