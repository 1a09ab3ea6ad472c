"""Train the activity classifier on generated windows (data.py) and save
``activity.safetensors`` beside the model file.

    python -m webtorch.examples.activity.train [--windows 24000] [--epochs 4]

Held-out wearers (another seed) measure it; one CPU core trains it in about a minute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from webtorch.examples.activity.data import windows
from webtorch.serve.model import import_model_file

HERE = Path(__file__).resolve().parent


def accuracy(net: torch.nn.Module, count: int, seed: int) -> float:
    right = 0
    with torch.inference_mode():
        for x, y in windows(count, 50, seed):
            right += int((net(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    return right / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=24000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "activity.safetensors")
    args = parser.parse_args()
    torch.manual_seed(0)
    factory = import_model_file(HERE / "activity.py").network
    net = factory if isinstance(factory, torch.nn.Module) else factory()
    data = list(windows(args.windows, 50, seed=1))
    x = torch.from_numpy(np.concatenate([b[0] for b in data]))
    y = torch.from_numpy(np.concatenate([b[1] for b in data]))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            batch = order[i : i + 128]
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        net.eval()
        print(f"epoch {epoch + 1}: held-out accuracy {accuracy(net, 2000, seed=99):.3f}")
        net.train()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
