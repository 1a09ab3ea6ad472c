from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from webtorch.train import checkpoint as ckpt

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
OPTIMIZERS: dict[str, MakeOptimizer] = {
    "sgd-momentum": lambda net: torch.optim.SGD(
        net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": lambda net: torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.8, 0.95)),
}


def make_network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # BatchNorm brings buffers, including an int64 one, into the state dict.
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)


def train_step(
    net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()


def trained(make_optimizer: MakeOptimizer, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = make_network(seed=0)
    opt = make_optimizer(net)
    data = batches(seed=1)
    for _ in range(steps):
        train_step(net, opt, *next(data))
    return net, opt


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_restored_training_continues_bit_for_bit(tmp_path: Path, name: str) -> None:
    net, opt = trained(OPTIMIZERS[name], steps=3)
    path = ckpt.write_checkpoint(tmp_path, 3, ckpt.snapshot(net, opt), {"model": "mlp"})
    assert path.name == "checkpoint-0000000000000003.safetensors"

    loaded = ckpt.load_latest(tmp_path)
    assert loaded is not None
    assert (loaded.step, loaded.path, loaded.extra) == (3, path, {"model": "mlp"})
    restored = make_network(seed=42)
    restored_opt = OPTIMIZERS[name](restored)
    ckpt.apply(loaded, restored, restored_opt)
    assert_same_state(net, restored)
    assert restored_opt.param_groups[0].keys() == opt.param_groups[0].keys()
    for key, value in opt.param_groups[0].items():
        if key != "params":
            assert restored_opt.param_groups[0][key] == value, key
            assert type(restored_opt.param_groups[0][key]) is type(value), key

    x, y = next(batches(seed=7))
    for _ in range(2):
        train_step(net, opt, x, y)
        train_step(restored, restored_opt, x, y)
    assert_same_state(net, restored)


def test_snapshot_is_unaffected_by_later_steps(tmp_path: Path) -> None:
    net, opt = trained(OPTIMIZERS["adam"], steps=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    snap = ckpt.snapshot(net, opt)
    train_step(net, opt, *next(batches(seed=3)))  # training goes on before the write
    ckpt.write_checkpoint(tmp_path, 2, snap)

    loaded = ckpt.load_latest(tmp_path)
    assert loaded is not None
    assert loaded.model_state.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(loaded.model_state[key], value), key
    assert loaded.optimizer_state["state"][0]["step"].item() == 2


def test_unsupported_optimizer_state_is_refused() -> None:
    net = make_network(seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.param_groups[0]["schedule"] = {"warmup": object()}
    with pytest.raises(TypeError, match=r"optimizer param_groups\[0\]\.schedule\.warmup"):
        ckpt.snapshot(net, opt)


def test_reserved_extra_keys_are_refused(tmp_path: Path) -> None:
    net = make_network(seed=0)
    snap = ckpt.snapshot(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="reserved"):
        ckpt.write_checkpoint(tmp_path, 1, snap, {"step": "9"})


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    shared = torch.zeros(3)
    snap = ckpt.Snapshot({"model.a": shared, "model.b": shared}, "{}")  # safetensors refuses this
    with pytest.raises(RuntimeError):
        ckpt.write_checkpoint(tmp_path, 1, snap)
    assert list(tmp_path.iterdir()) == []


def test_damaged_newest_checkpoints_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net, opt = trained(OPTIMIZERS["sgd-momentum"], steps=1)
    for step in (1, 2, 3, 4):
        ckpt.write_checkpoint(tmp_path, step, ckpt.snapshot(net, opt))
    (tmp_path / ".checkpoint-crashed.tmp").write_bytes(b"half a checkpoint")
    newest = tmp_path / "checkpoint-0000000000000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    third = tmp_path / "checkpoint-0000000000000003.safetensors"
    third.write_bytes(b"\x00" * 64)  # garbage
    # A valid file under the wrong name is not trusted either: its step is the WAL position.
    (tmp_path / "checkpoint-0000000000000002.safetensors").rename(
        tmp_path / "checkpoint-0000000000000005.safetensors"
    )

    with caplog.at_level(logging.WARNING, logger="webtorch.train.checkpoint"):
        loaded = ckpt.load_latest(tmp_path)
    assert loaded is not None and loaded.step == 1
    for bad in (5, 4, 3):
        assert f"checkpoint-{bad:016d}.safetensors" in caplog.text
    assert "crashed" not in caplog.text


def test_no_checkpoint(tmp_path: Path) -> None:
    assert ckpt.load_latest(tmp_path / "missing") is None
    assert ckpt.load_latest(tmp_path) is None


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    net = make_network(seed=0)
    snap = ckpt.snapshot(net, torch.optim.SGD(net.parameters(), lr=0.1))
    for step in (9, 10, 11, 100):
        ckpt.write_checkpoint(tmp_path, step, snap)
    (tmp_path / ".checkpoint-crashed.tmp").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not ours")

    deleted = ckpt.prune(tmp_path, keep=2)

    assert sorted(p.name for p in deleted) == [
        ".checkpoint-crashed.tmp",
        "checkpoint-0000000000000009.safetensors",
        "checkpoint-0000000000000010.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-0000000000000011.safetensors",
        "checkpoint-0000000000000100.safetensors",
        "notes.txt",
    ]
    assert ckpt.prune(tmp_path, keep=2) == []
    with pytest.raises(ValueError):
        ckpt.prune(tmp_path, keep=0)


def test_a_flipped_bit_in_tensor_data_loses_to_an_older_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net, opt = trained(OPTIMIZERS["adam"], steps=1)
    for step in (1, 2):
        ckpt.write_checkpoint(tmp_path, step, ckpt.snapshot(net, opt))
    newest = tmp_path / "checkpoint-0000000000000002.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x10  # the last bytes are tensor data: the header still parses
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="webtorch.train.checkpoint"):
        loaded = ckpt.load_latest(tmp_path)
    assert loaded is not None and loaded.step == 1
    assert "checksum" in caplog.text
