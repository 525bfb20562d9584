"""The server reports which allocator it runs on; the image runs it on tcmalloc."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wyoming_qwen3tts.engine.allocator import memory_allocator

ROOT = Path(__file__).resolve().parents[1]
PROBE = "from wyoming_qwen3tts.engine.allocator import memory_allocator; print(memory_allocator())"


def allocator_of_a_process(preload: str | None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_a_process_without_a_preloaded_allocator_reports_the_c_library_s():
    assert allocator_of_a_process(None) == "the C library's"


def test_a_process_started_with_tcmalloc_preloaded_reports_tcmalloc():
    library = ctypes.util.find_library("tcmalloc_minimal")  # a name the dynamic loader resolves
    if library is None:
        pytest.skip("tcmalloc is not installed here (Debian: libtcmalloc-minimal4)")
    assert allocator_of_a_process(library) == "tcmalloc"


def test_the_allocator_is_read_from_the_process_memory_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert memory_allocator(maps) == "jemalloc"
    assert memory_allocator(tmp_path / "absent") == "unknown"


def test_the_image_preloads_tcmalloc_after_every_build_step():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    preload = next(i for i, line in enumerate(lines) if line.startswith("ENV LD_PRELOAD="))
    library = lines[preload].split("=", 1)[1]
    assert any(f"{library}" in line for line in lines[:preload]), "the preloaded path is created by the build"
    assert "libtcmalloc-minimal4" in "\n".join(lines[:preload])
    assert not any(line.startswith("RUN") for line in lines[preload:]), "pip and the compilers run without it"


RELEASE = """
import torch
from wyoming_qwen3tts.engine.allocator import release_free_memory

def rss_mib():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024

blocks = [torch.ones(1 << 20) for _ in range(150)]  # 600 MiB in 4 MiB blocks, then freed
del blocks
before = rss_mib()
how = release_free_memory()
print(how, before - rss_mib())
"""


def test_memory_freed_after_loading_goes_back_to_the_system_on_tcmalloc():
    library = ctypes.util.find_library("tcmalloc_minimal")
    if library is None:
        pytest.skip("tcmalloc is not installed here (Debian: libtcmalloc-minimal4)")
    env = dict(os.environ, LD_PRELOAD=library)
    done = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, timeout=120, check=True)
    how, returned = done.stdout.split()
    assert how == "MallocExtension_ReleaseFreeMemory"
    assert float(returned) > 300, f"tcmalloc kept the freed blocks ({returned} MiB returned)"


def test_releasing_free_memory_on_glibc_falls_back_to_malloc_trim():
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split()[0] == "malloc_trim"
