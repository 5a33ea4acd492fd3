"""Keep what follows the optimizer in step with the updates that were actually applied.

A skipped step leaves the parameters unchanged, but code after ``scaler.step`` does not know:
an LR scheduler still advances (and torch warns that ``lr_scheduler.step()`` ran before
``optimizer.step()`` when the very first step is skipped), and an EMA of the weights still decays
toward parameters that did not move. Two tools, one per kind of consumer:

* :class:`SkipAwareScheduler` wraps any ``torch.optim.lr_scheduler`` and steps it only after an
  applied step, so ``scheduler.last_epoch`` counts optimizer updates. The LR lives on the host,
  so this needs the skip flag on the host: free when ``scaler.step`` already read it (optimizers
  that are not fused), one host read per step otherwise.
* :func:`ema_update_` updates an EMA on the device with the decay turned off on skipped steps,
  reading ``scaler.step_was_skipped`` as a tensor: no host sync, CUDA-graph safe.

Typical loop::

    scaler.step(optimizer)
    scaler.update()
    scheduler.step()                     # scheduler = SkipAwareScheduler(lr_scheduler, scaler)
    ema_update_(ema_params, model.parameters(), 0.999, scaler.step_was_skipped)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Protocol

import torch

__all__ = ["SkipAwareScheduler", "ema_update_"]


class _SkipSource(Protocol):
    def last_step_skipped(self) -> bool: ...


class SkipAwareScheduler:
    """An LR scheduler that advances only after steps the scaler applied.

    Call ``step()`` once per iteration after ``scaler.update()``. Other attributes and methods
    (``get_last_lr``, ``last_epoch``, ``state_dict``, ...) are the wrapped scheduler's, so it
    checkpoints exactly as the scheduler does. ``num_skipped`` counts the steps it held back.
    """

    def __init__(self, scheduler: Any, scaler: _SkipSource) -> None:
        if not callable(getattr(scheduler, "step", None)):
            raise TypeError(
                f"scheduler must be an LR scheduler with a step() method, got {type(scheduler).__name__}."
            )
        if not callable(getattr(scaler, "last_step_skipped", None)):
            raise TypeError(
                f"scaler must be a distscale.GradScaler (it needs last_step_skipped()), got "
                f"{type(scaler).__name__}."
            )
        self.scheduler = scheduler
        self.scaler = scaler
        self.num_skipped = 0

    def step(self) -> bool:
        """Advance the scheduler unless the last step was skipped; return whether it advanced.

        Host sync: see :meth:`distscale.GradScaler.last_step_skipped`.
        """
        if self.scaler.last_step_skipped():
            self.num_skipped += 1
            return False
        self.scheduler.step()
        return True

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on the wrapper: the scheduler's API passes through.
        if name in ("scheduler", "scaler"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.scheduler, name)


def ema_update_(
    ema: Iterable[torch.Tensor],
    params: Iterable[torch.Tensor],
    decay: float,
    skipped: torch.Tensor | bool = False,
) -> None:
    """``ema = decay * ema + (1 - decay) * param`` in place, unless ``skipped``.

    ``skipped``: ``scaler.step_was_skipped`` (a 0-dim bool tensor: no host sync, the weight is
    zeroed on the device) or a bool. One foreach lerp per (device, dtype) group, as
    ``torch.optim.swa_utils.get_ema_multi_avg_fn``. A skipped step leaves ``ema`` bitwise unchanged.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}.")
    ema, params = list(ema), list(params)
    if len(ema) != len(params):
        raise ValueError(f"ema and params must have the same length, got {len(ema)} and {len(params)}.")
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]]
    groups = defaultdict(lambda: ([], []))
    for e, p in zip(ema, params, strict=True):
        groups[(e.device, e.dtype)][0].append(e)
        groups[(e.device, e.dtype)][1].append(p.detach())
    with torch.no_grad():
        for (device, _), (targets, sources) in groups.items():
            if isinstance(skipped, torch.Tensor):
                applied = (~skipped.to(device=device, dtype=torch.bool)).float()
                # A 0-dim tensor weight: the op takes it (no sync); torch's type stubs lack the overload.
                torch._foreach_lerp_(targets, sources, applied * (1.0 - decay))  # type: ignore[call-overload]
            elif not skipped:
                torch._foreach_lerp_(targets, sources, 1.0 - decay)
