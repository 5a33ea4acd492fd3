"""Exceptions raised by distscale."""

from __future__ import annotations


class ScalerUsageError(RuntimeError, AssertionError):
    """A call made out of order (e.g. ``step()`` before ``scale()``).

    torch.amp.GradScaler raises ``AssertionError`` for some of these and ``RuntimeError`` for
    others; this type is both, so code written against either keeps working.
    """


class MinScaleError(RuntimeError):
    """An overflow found the scale already at ``min_scale`` and ``on_min_scale="raise"``.

    Raised on every rank at the same ``update()``: all ranks hold the same state.
    """


class InconsistentStateError(RuntimeError):
    """The consistency check found ranks whose scale state differs from the others'."""


class ReplicationError(ValueError):
    """The norm needs to know which ranks hold copies of a parameter, and nobody said.

    Raised on every rank of the scaler's group at the same call (the first norm after the
    parameter list changed), naming each rank's parameters; see :mod:`distscale.layout`.
    """


class FaultError(RuntimeError):
    """A suspected fault (see :mod:`distscale.rules`) with ``on_fault="raise"``.

    Raised on every rank at the same ``update()``, after the step was skipped and the state
    updated, so every rank can checkpoint the same state before stopping. ``report``: the
    :class:`~distscale.diagnostics.FaultReport` (rank, host, device, parameters).
    """

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report
