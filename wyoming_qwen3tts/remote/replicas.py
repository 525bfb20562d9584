"""Which remote server takes the next request: the least busy healthy one.

A replica that fails or times out is marked down and left alone for a while (longer after each
failure in a row); after that it gets requests again, and a success clears its record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..speech import BackendUnavailableError

_LOGGER = logging.getLogger(__name__)


class NoReplicaError(BackendUnavailableError):
    """Every replica is down (or was already tried for this request)."""


@dataclass(eq=False)
class Replica:
    url: str
    active: int = 0
    failures: int = 0
    down_until: float = 0.0
    uploaded: dict[str, str] = field(default_factory=dict)  # clone key -> voice name there
    accepts_uploads: bool | None = None  # None until we have tried

    def healthy(self, now: float) -> bool:
        return now >= self.down_until


class ReplicaPool:
    def __init__(self, urls: list[str], retry_after: float = 10.0, max_retry_after: float = 120.0) -> None:
        if not urls:
            raise ValueError("the remote engine needs at least one URL")
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after

    def pick(self, exclude: set[Replica] = frozenset()) -> Replica:
        """The least busy healthy replica; if every one is down, the one that may be back first."""
        now = time.monotonic()
        untried = [r for r in self.replicas if r not in exclude]
        if not untried:
            raise NoReplicaError("no remote speech server is available: " + ", ".join(r.url for r in self.replicas))
        healthy = [r for r in untried if r.healthy(now)]
        if healthy:
            return min(healthy, key=lambda r: (r.active, r.failures))
        return min(untried, key=lambda r: r.down_until)

    def mark_down(self, replica: Replica, reason: str, quiet: bool = False) -> None:
        replica.failures += 1
        pause = min(self.max_retry_after, self.retry_after * 2 ** (replica.failures - 1))
        replica.down_until = time.monotonic() + pause
        _LOGGER.log(logging.DEBUG if quiet else logging.WARNING, "Remote %s marked down for %.0f s: %s", replica.url, pause, reason)

    def mark_up(self, replica: Replica) -> None:
        if replica.failures:
            _LOGGER.info("Remote %s is back", replica.url)
        replica.failures = 0
        replica.down_until = 0.0
