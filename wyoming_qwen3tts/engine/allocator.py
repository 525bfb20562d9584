"""Which memory allocator serves this process, and the advice when it is the C library's.

On a CPU the codec allocates and frees activations of tens of megabytes for every chunk. glibc
hands blocks that large to the kernel and takes fresh pages back on the next call: with several
streams decoding, a fifth of the codec's time went to page faults. tcmalloc keeps them: 8 int8
streams made 1.2x the frames per second of the same server on glibc, one stream the same
(BENCHMARKS.md, "How to read": allocator). An allocator can only be chosen before the process
starts (`LD_PRELOAD`), so the image sets it and the server says which one it got.

tcmalloc keeps the pages a program frees for its next allocations (and glibc part of them);
quantizing frees gigabytes (the float weights that int8 replaces), so it hands them back:
without that the int8 0.6B process kept 5.0 GB on tcmalloc instead of 3.0 GB.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

# Library file names as they appear in /proc/self/maps, and the name we report.
KNOWN = (("libtcmalloc", "tcmalloc"), ("libjemalloc", "jemalloc"), ("libmimalloc", "mimalloc"))
ADVICE = (
    "on a CPU, tcmalloc makes several streams up to 1.2x faster: install it (Debian: "
    "libtcmalloc-minimal4) and start the server with "
    f"LD_PRELOAD=/usr/lib/{platform.machine()}-linux-gnu/libtcmalloc_minimal.so.4 (the image does this)"
)


def memory_allocator(maps: Path = Path("/proc/self/maps")) -> str:
    """"tcmalloc", "jemalloc" or "mimalloc" when one is loaded, else "the C library's"."""
    try:
        mapped = maps.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    for library, name in KNOWN:
        if library in mapped:
            return name
    return "the C library's"


def release_free_memory() -> str | None:
    """Return memory the allocator holds but nothing uses to the system; says how, or None."""
    process = ctypes.CDLL(None)  # every library loaded into this process, preloaded ones too
    for function, call in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
        release = getattr(process, function, None)
        if release is not None:
            release(*call)
            return function
    return None
