"""Train the bundled XOR network offline and save ``xor.safetensors`` beside ``xor.py``."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from webtorch.serve.model import import_model_file


def main() -> None:
    here = Path(__file__).parent
    spec = import_model_file(here / "xor.py")
    torch.manual_seed(0)
    assert not isinstance(spec.network, torch.nn.Module)
    net = spec.network()
    assert spec.optimizer is not None and spec.loss is not None
    opt = spec.optimizer(net.parameters())
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    for _ in range(3000):
        opt.zero_grad()
        loss = spec.loss({"y": net(x)}, {"y": y}).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    print(f"final loss {loss.item():.5f}; predictions {net(x).detach().flatten().tolist()}")
    save_file(net.state_dict(), str(here / "xor.safetensors"))


if __name__ == "__main__":
    main()
