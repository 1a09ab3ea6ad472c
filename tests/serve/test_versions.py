"""serve/versions.py: a trained model's weights between processes as numbered versions, through
a seqlock in a shared file. A reader holds one whole version at a time: never a copy that a
write overlapped, never a layout that is not its model's."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from webtorch.serve.versions import _HEADER, NO_VERSION, Publisher, Subscriber, weights_path


def net(size: int = 4096) -> nn.Module:
    model = nn.Sequential(nn.Linear(size, 2), nn.BatchNorm1d(2))  # parameters and buffers
    return model


def fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(value)


def values(model: nn.Module) -> set[float]:
    return {
        float(v)
        for t in model.state_dict().values()
        if t.is_floating_point()
        for v in t.flatten().unique()
    }


def test_a_version_reaches_the_reader_whole_and_numbered(tmp_path: Path) -> None:
    path = weights_path(tmp_path, "m")
    writer_net, reader_net = net(), net()
    reader = Subscriber(path, reader_net)
    assert not reader.refresh()  # nothing published: no version to answer with
    assert reader.version == NO_VERSION
    writer = Publisher(path, writer_net)
    fill(writer_net, 3.0)
    writer.publish(7)
    assert reader.refresh() and reader.version == 7
    assert values(reader_net) == {3.0}
    mine, theirs = writer_net.state_dict().values(), reader_net.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    fill(writer_net, 4.0)
    writer.publish(9)
    assert reader.refresh() and reader.version == 9 and reader.lag_steps == 2
    assert values(reader_net) == {4.0}


def test_a_write_in_progress_or_a_writer_that_died_in_one_is_not_taken(tmp_path: Path) -> None:
    path = weights_path(tmp_path, "m")
    writer_net, reader_net = net(), net()
    writer = Publisher(path, writer_net)
    reader = Subscriber(path, reader_net)
    fill(writer_net, 1.0)
    writer.publish(1)
    assert reader.refresh() and values(reader_net) == {1.0}
    # The writer dies half way through version 2: the counter stays odd.
    seq, _, _, fingerprint = _HEADER.unpack_from(writer.memory, 0)
    _HEADER.pack_into(writer.memory, 0, seq + 1, NO_VERSION, 0.0, fingerprint)
    fill(writer_net, 2.0)
    writer._pairs[0][1].copy_(writer_net.state_dict()["0.weight"])  # half the tensors
    assert reader.refresh() and reader.version == 1 and values(reader_net) == {1.0}
    # The trainer started again publishes: the reader takes that.
    again = Publisher(path, writer_net)
    again.publish(2)
    assert _HEADER.unpack_from(again.memory, 0)[0] % 2 == 0
    assert reader.refresh() and reader.version == 2 and values(reader_net) == {2.0}


def test_a_reader_racing_a_writer_only_ever_holds_whole_versions(tmp_path: Path) -> None:
    path = weights_path(tmp_path, "m")
    writer_net, reader_net = net(65536), net(65536)
    writer = Publisher(path, writer_net)
    reader = Subscriber(path, reader_net)
    fill(writer_net, 0.0)
    writer.publish(0)
    assert reader.refresh()
    done = threading.Event()

    def write() -> None:
        version = 0
        while not done.is_set():
            version += 1
            fill(writer_net, float(version))
            writer.publish(version)

    thread = threading.Thread(target=write)
    thread.start()
    held: list[int] = []
    try:
        for _ in range(300):
            assert reader.refresh()
            seen = values(reader_net)
            assert seen == {float(reader.version)}, (reader.version, sorted(seen)[:4])
            held.append(reader.version)
    finally:
        done.set()
        thread.join()
    assert held == sorted(held)


def test_weights_of_another_layout_are_refused(tmp_path: Path) -> None:
    path = weights_path(tmp_path, "m")
    writer = Publisher(path, nn.Sequential(nn.Linear(4, 4)))
    writer.publish(1)
    bigger = Subscriber(path, nn.Sequential(nn.Linear(4, 5)))
    assert not bigger.refresh()
    # The same size is no proof of the same model: the names and shapes are compared too.
    renamed = Subscriber(path, nn.Sequential(nn.Identity(), nn.Linear(4, 4)))
    assert renamed.layout.size == writer.layout.size
    assert not renamed.refresh()
