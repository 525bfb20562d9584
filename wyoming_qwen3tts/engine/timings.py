"""Where a frame's time goes: seconds and frames per stage, summed since load (or a reset)."""

from __future__ import annotations

import threading
from collections import defaultdict


class StageTimings:
    """Accumulated wall seconds and frames per named stage (talker, predictor, codec)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.frames: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()  # decode threads add at the same time

    def add(self, stage: str, seconds: float, frames: int = 1) -> None:
        with self._lock:
            self.seconds[stage] += seconds
            self.frames[stage] += frames

    def per_frame(self, stage: str) -> float | None:
        frames = self.frames.get(stage, 0)
        return self.seconds[stage] / frames if frames else None

    def reset(self) -> None:
        self.seconds.clear()
        self.frames.clear()
