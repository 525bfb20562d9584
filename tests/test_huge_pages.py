"""Loaded weights moved into 2 MiB pages: contents kept, memory not grown, refusals logged."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap

import numpy as np
import pytest

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.huge_pages import collapse_resident_memory, huge_page_size, private_anonymous_blocks
from wyoming_qwen3tts.engine.options import EngineOptions, StopRules

# The kernel's huge page where it has them (2 MiB on x86); the fakes below use 2 MiB.
HUGE_PAGE = huge_page_size() or 2 << 20
REGION = 8 * HUGE_PAGE


def private_region(size: int = REGION + HUGE_PAGE) -> tuple[mmap.mmap, int]:
    """Fresh private anonymous memory (nothing in it touched yet) and its address."""
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return region, ctypes.addressof(ctypes.c_char.from_buffer(region))


def aligned_blocks(address: int, size: int = REGION) -> list[int]:
    first = -(-address // HUGE_PAGE) * HUGE_PAGE
    return list(range(first, first + size, HUGE_PAGE))


def mapping_fields(address: int) -> dict[str, int]:
    """The kB fields of /proc/self/smaps for the mapping that holds ``address``."""
    fields: dict[str, int] | None = None
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                if fields is not None:
                    break
                start, end = (int(bound, 16) for bound in head.split("-"))
                if start <= address < end:
                    fields = {}
            elif fields is not None and line.rstrip().endswith("kB"):
                name, value = line.split()[:2]
                fields[name.rstrip(":")] = int(value)
    assert fields is not None, f"no mapping holds {address:#x}"
    return fields


def kernel_moves_memory() -> bool:
    """Whether this kernel can: asked directly, not through the code under test."""
    if huge_page_size() is None:
        return False
    region, address = private_region(2 * HUGE_PAGE)
    values = np.frombuffer(region, dtype=np.uint8)
    values[:] = 1
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    moved = madvise(aligned_blocks(address, HUGE_PAGE)[0], HUGE_PAGE, 25) == 0  # MADV_COLLAPSE
    del values
    region.close()
    return moved


needs_collapse = pytest.mark.skipif(
    not kernel_moves_memory(), reason="this kernel does not move memory into huge pages (MADV_COLLAPSE: Linux 6.1)"
)


@needs_collapse
def test_resident_memory_moves_into_huge_pages_and_keeps_its_contents():
    region, address = private_region()
    values = np.frombuffer(region, dtype=np.uint8)
    values[:] = np.random.default_rng(0).integers(0, 256, values.size, dtype=np.uint8)
    expected = values.copy()
    assert mapping_fields(address)["AnonHugePages"] == 0

    report = collapse_resident_memory(aligned_blocks(address))

    # Every block was asked; one the kernel found no free huge page for counts as refused.
    assert report.unavailable is None and report.moved_bytes > 0
    assert report.moved_bytes + report.refused * HUGE_PAGE == REGION
    assert mapping_fields(address)["AnonHugePages"] * 1024 >= report.moved_bytes
    assert np.array_equal(values, expected)
    del values
    region.close()


@needs_collapse
def test_memory_with_holes_is_left_alone_so_the_process_does_not_grow():
    region, address = private_region()
    values = np.frombuffer(region, dtype=np.uint8)
    for block in aligned_blocks(address):
        values[block - address] = 1  # one page of each block in memory, 511 not
    resident_before = mapping_fields(address)["Rss"]

    report = collapse_resident_memory(aligned_blocks(address))

    assert report.moved_bytes == 0 and report.refused == 0
    fields = mapping_fields(address)
    assert fields["AnonHugePages"] == 0
    assert fields["Rss"] == resident_before
    del values
    region.close()


class FakeLibc:
    """Every block resident; the kernel answers each collapse with the next of ``answers``."""

    huge_page = 2 << 20

    def __init__(self, answers: list[int]) -> None:
        self.answers = list(answers)
        self.asked: list[int] = []

    def resident(self, address: int) -> bool:
        return True

    def collapse(self, address: int) -> int:
        self.asked.append(address)
        return self.answers.pop(0) if self.answers else 0


def test_a_kernel_without_collapse_is_reported_and_nothing_more_is_asked():
    libc = FakeLibc([errno.EINVAL] * 10)
    blocks = [FakeLibc.huge_page * i for i in range(1, 11)]

    report = collapse_resident_memory(blocks, libc=libc)

    assert report.moved_bytes == 0
    assert "Linux 6.1" in report.describe() and "stay in small pages" in report.describe()
    assert len(libc.asked) == 3


def test_blocks_the_kernel_refuses_are_counted_and_the_rest_moved():
    libc = FakeLibc([0, errno.EAGAIN, 0, errno.ENOMEM, 0])
    report = collapse_resident_memory([FakeLibc.huge_page * i for i in range(1, 6)], libc=libc)

    assert report.unavailable is None
    assert report.moved_bytes == 3 * FakeLibc.huge_page and report.refused == 2
    assert "2 blocks of 2 MiB stayed in small pages" in report.describe()


def test_a_kernel_without_huge_pages_has_no_size_to_give(tmp_path):
    assert huge_page_size(tmp_path / "hpage_pmd_size") is None
    (tmp_path / "hpage_pmd_size").write_text("33554432\n")
    assert huge_page_size(tmp_path / "hpage_pmd_size") == 32 << 20


def test_only_private_writable_memory_of_no_file_is_considered(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "\n".join(
            [
                "00400000-00a00000 rw-p 00000000 08:01 123   /usr/lib/libtorch_cpu.so",  # a library's data
                "01000000-01600000 rw-p 00000000 00:00 0     [heap]",
                "7f0000100000-7f0000700000 rw-p 00000000 00:00 0",  # anonymous, unaligned start
                "7f1000000000-7f1000400000 rw-s 00000000 00:01 9     /dev/zero (deleted)",  # shared
                "7f2000000000-7f2000400000 r--p 00000000 00:00 0",  # read-only
                "7f3000000000-7f3000400000 rw-p 00000000 00:00 0     [stack]",
                "7f4000000000-7f4000100000 rw-p 00000000 00:00 0",  # smaller than a block
            ]
        )
        + "\n"
    )
    assert list(private_anonymous_blocks(2 << 20, maps)) == [
        0x01000000,
        0x01200000,
        0x01400000,
        0x7F0000200000,
        0x7F0000400000,
    ]


@needs_collapse
def test_the_server_moves_its_weights_into_huge_pages_when_it_loads(checkpoints, caplog):
    caplog.set_level(logging.INFO, logger="wyoming_qwen3tts.engine.huge_pages")
    engine = SpeechEngine.load(
        EngineOptions(model=str(checkpoints["custom_voice"]), stop=StopRules(base_frames=4, frames_per_token=0, max_frames=4))
    )
    try:
        lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Huge pages:")]
        assert len(lines) == 1, lines
        moved = float(lines[0].split("Huge pages: ")[1].split(" MiB")[0])
        assert moved > 0
    finally:
        engine.close()
