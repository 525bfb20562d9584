"""Counting the PyTorch operators a piece of work dispatches: the host work of a step on a GPU.

On a GPU every operator costs Python and dispatch time, and those that compute launch a kernel
whatever their size, so for a small model the count says more about a step's time than its
arithmetic does. The count hardly depends on the device, so a CPU can take it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched while active (``with OperatorCount() as count:``), by the
    stage named in ``stage`` at the time; `staged` names the stage of a function's calls."""

    def __init__(self) -> None:
        super().__init__()
        self.by_stage: Counter[str] = Counter()
        self.stage = "other"

    @property
    def calls(self) -> int:
        return sum(self.by_stage.values())

    def staged(self, stage: str, function: Callable) -> Callable:
        """``function``, counting the operators of its calls under ``stage``."""

        def counted(*args, **kwargs):
            outer, self.stage = self.stage, stage
            try:
                return function(*args, **kwargs)
            finally:
                self.stage = outer

        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_stage[self.stage] += 1
        return func(*args, **(kwargs or {}))
