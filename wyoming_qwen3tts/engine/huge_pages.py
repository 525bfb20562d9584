"""Moving the loaded weights into 2 MiB pages (Linux's transparent huge pages).

On a CPU every frame reads all the weights of the talker and the code predictor: 1.5 GB a frame
in int8 at 0.6B (the predictor's 15 times over). In 4 KiB pages that is about 400,000 pages a
frame, far more than the TLB holds, so nearly each costs a walk through the page tables, and in a
virtual machine through two sets of them. In 2 MiB pages there are 512 times fewer. The kernel's
default (`/sys/kernel/mm/transparent_hugepage/enabled` = madvise on many distributions) gives
huge pages only to memory that asks for them before it is touched, and the weights come from
PyTorch's, fbgemm's and the allocator's own allocations, none of which ask. So once the models
are loaded, the server asks the kernel to move them (`MADV_COLLAPSE`, Linux 6.1): an int8 step
took 5-10 % less time on our 2-core VM, a frame through the server about 4 % less; float32 showed
no change (BENCHMARKS.md, "huge pages").

Only blocks of a huge page's size (2 MiB on x86) that are wholly in memory are moved, so the
process grows by nothing (a block with holes would be filled up). Where the kernel cannot (older
than 6.1, huge pages compiled out, no free huge page of physical memory), the memory stays as it
was and the log says so.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

MADV_COLLAPSE = 25  # <linux/mman.h>, Linux 6.1
# The size of the kernel's huge pages: 2 MiB with 4 KiB pages (x86, most Arm kernels); 32 MiB with
# the 16 KiB pages of Raspberry Pi OS's Pi 5 kernel. Absent where huge pages are compiled out.
PMD_SIZE_FILE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")


def huge_page_size(source: Path = PMD_SIZE_FILE) -> int | None:
    """Bytes in one of the kernel's transparent huge pages, or None where it has none."""
    try:
        return int(source.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class HugePageReport:
    """What one pass over the process's memory did."""

    moved_bytes: int  # memory the kernel now holds in huge pages (already huge included)
    refused: int  # blocks of one huge page it could not move (no free huge page, in use, ...)
    seconds: float
    unavailable: str | None = None  # why nothing could be moved at all
    huge_page: int = 2 << 20

    def describe(self) -> str:
        if self.unavailable:
            return f"the weights stay in small pages: {self.unavailable}"
        size = f"{self.huge_page >> 20} MiB"
        text = f"{self.moved_bytes / 2**20:.0f} MiB of memory, the loaded weights most of it, in {size} pages ({self.seconds:.1f} s)"
        if self.refused:
            text += f"; {self.refused} blocks of {size} stayed in small pages (the kernel had no free huge page or the block was busy)"
        return text


class _Libc:
    """The two system calls, through the C library (the standard library wraps neither for any
    memory but its own `mmap` objects)."""

    def __init__(self, huge_page: int) -> None:
        self.huge_page = huge_page
        libc = ctypes.CDLL(None, use_errno=True)
        self._madvise = libc.madvise
        self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._mincore = libc.mincore
        self._mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._vector = (ctypes.c_ubyte * (huge_page // mmap.PAGESIZE))()

    def collapse(self, address: int) -> int:
        """0, or the errno of the kernel's refusal to move the block at ``address``."""
        return 0 if self._madvise(address, self.huge_page, MADV_COLLAPSE) == 0 else ctypes.get_errno()

    def resident(self, address: int) -> bool:
        """Whether every page of the block at ``address`` is in memory."""
        if self._mincore(address, self.huge_page, self._vector) != 0:
            return False
        return all(byte & 1 for byte in self._vector)


def private_anonymous_blocks(huge_page: int, maps: Path = Path("/proc/self/maps")) -> Iterator[int]:
    """The addresses of the ``huge_page``-aligned blocks of the process's private, writable memory
    that belongs to no file (where the allocators put the weights)."""
    for line in maps.read_text(encoding="ascii", errors="replace").splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        if len(fields) > 5 and fields[5] != "[heap]":  # files, stacks, vdso and the like
            continue
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        first = -(-start // huge_page) * huge_page
        yield from range(first, end - huge_page + 1, huge_page)


def collapse_resident_memory(
    blocks: Iterable[int] | None = None, time_budget: float = 30.0, libc: _Libc | None = None
) -> HugePageReport:
    """Ask the kernel to move each wholly resident one of ``blocks`` (addresses aligned to a huge
    page; default: every block of the process's anonymous memory) into a huge page. Stops after
    ``time_budget`` seconds (the kernel may compact memory to find huge pages on a crowded machine)."""
    started = time.monotonic()
    if not sys.platform.startswith("linux"):
        return HugePageReport(0, 0, 0.0, "transparent huge pages are a Linux feature")
    huge_page = libc.huge_page if libc else huge_page_size()
    if huge_page is None:
        return HugePageReport(0, 0, 0.0, "this kernel has no transparent huge pages")
    try:
        libc = libc or _Libc(huge_page)
        blocks = list(private_anonymous_blocks(huge_page) if blocks is None else blocks)
    except (OSError, AttributeError) as err:
        return HugePageReport(0, 0, 0.0, f"cannot read this process's memory map ({err})")
    outcomes: Counter[int] = Counter()
    for address in blocks:
        if time.monotonic() - started > time_budget:
            _LOGGER.info("Huge pages: stopped after %.0f s, the rest stays in small pages", time_budget)
            break
        if not libc.resident(address):
            continue
        outcome = libc.collapse(address)
        outcomes[outcome] += 1
        if outcome == errno.EINVAL and not outcomes[0] and outcomes[errno.EINVAL] >= 3:
            break  # the kernel has no MADV_COLLAPSE (or no huge pages): asking on is futile
    seconds = time.monotonic() - started
    if not outcomes[0] and outcomes[errno.EINVAL]:
        return HugePageReport(
            0, 0, seconds, "this kernel cannot move memory into huge pages (it needs Linux 6.1 or newer, built with them)"
        )
    refused = sum(count for outcome, count in outcomes.items() if outcome != 0)
    return HugePageReport(outcomes[0] * huge_page, refused, seconds, huge_page=huge_page)


def move_weights_to_huge_pages() -> HugePageReport:
    """`collapse_resident_memory`, logged: call once the models are loaded on a CPU."""
    report = collapse_resident_memory()
    _LOGGER.info("Huge pages: %s", report.describe())
    return report

