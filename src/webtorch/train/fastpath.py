"""The trainer's shortcuts through torch: an optimizer step without torch.optim's hook and
profiler wrapper when there is nothing for it to do, the autograd engine's backward entry point,
and a cheap check that gradients are finite (see :meth:`Trainer._optimizer_step` and
:meth:`Trainer._gradients` for what each saves). Each is looked up once, at import, and is None
where this torch keeps it elsewhere; the trainer then takes torch's public path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, cast

import torch
from torch.nn.utils import get_total_norm
from torch.optim import optimizer as optim_base

# torch.optim's registries of hooks for every optimizer's step (see Trainer._optimizer_step);
# None if this torch keeps them elsewhere, and then there is no bare step (bare_step).
GLOBAL_PRE_HOOKS: Final[dict[Any, Any] | None] = getattr(
    optim_base, "_global_optimizer_pre_hooks", None
)
GLOBAL_POST_HOOKS: Final[dict[Any, Any] | None] = getattr(
    optim_base, "_global_optimizer_post_hooks", None
)
profiler_enabled: Final = torch._C._autograd._profiler_enabled

# The autograd engine's entry point, which torch.autograd.grad and backward end in (see
# Trainer._gradients); None if this torch has it elsewhere, and then torch.autograd.grad runs.
RUN_BACKWARD: Final[Callable[..., tuple[torch.Tensor | None, ...]] | None] = getattr(
    getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None
)
NUMPY_FLOATS: Final = (torch.float32, torch.float64)


def bare_step(optimizer: torch.optim.Optimizer) -> Callable[[torch.optim.Optimizer], Any] | None:
    """The optimizer class's own ``step``, under the profiling and hook wrapper torch.optim puts
    on it (``Optimizer.profile_hook_step``, marked ``hooked``); None where there is no such
    wrapper to leave out, or no registry of global hooks to check before leaving it out."""
    step = getattr(type(optimizer), "step", None)
    if GLOBAL_PRE_HOOKS is None or GLOBAL_POST_HOOKS is None:
        return None
    if not getattr(step, "hooked", False):
        return None
    return cast(Callable[[torch.optim.Optimizer], Any] | None, getattr(step, "__wrapped__", None))


def finite(grads: list[torch.Tensor], cpu: bool) -> bool:
    """Whether every gradient is finite. On CPU, one sum per tensor (a sum of finite values is
    finite unless it overflows, and gradients near 1e38 are no better than infinite ones):
    ~2 us a tensor, where ``get_total_norm``'s foreach machinery costs ~28 us for a small
    model. Elsewhere one norm, read back once (a read per tensor would sync the device each
    time)."""
    if cpu and all(g.layout == torch.strided for g in grads):
        return all(math.isfinite(float(g.sum())) for g in grads)
    return bool(torch.isfinite(get_total_norm(grads)))
