"""A first start's model download, as a log line every few seconds.

huggingface_hub draws progress bars, which the add-on's log (and any log file) turns into
noise; the image switches them off. Instead a thread looks at how much of the download is on
disk and logs it against the repository's size.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

_LOGGER = logging.getLogger(__name__)


def repository_bytes(model: str) -> int | None:
    """The size of a hub repository's files, or None when the hub cannot tell."""
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(model, files_metadata=True)
        return sum(sibling.size or 0 for sibling in info.siblings or []) or None
    except Exception:  # noqa: BLE001 - offline, rate-limited: progress without a total
        return None


def bytes_on_disk(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                try:
                    total += path.stat().st_size
                except OSError:  # renamed while we looked
                    pass
    return total


class DownloadProgress:
    """While open, logs every ``interval`` seconds how much of ``model`` has reached ``folder``."""

    def __init__(self, model: str, folder: Path, total: int | None, interval: float = 15.0) -> None:
        self.model, self.folder, self.total, self.interval = model, folder, total, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)

    def __enter__(self) -> "DownloadProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def line(self) -> str:
        done = bytes_on_disk(self.folder) / 2**20
        if self.total:
            share = min(100.0, 100.0 * done * 2**20 / self.total)
            return f"Downloading {self.model}: {done:,.0f} of {self.total / 2**20:,.0f} MiB ({share:.0f} %)"
        return f"Downloading {self.model}: {done:,.0f} MiB so far"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            _LOGGER.info("%s", self.line())
