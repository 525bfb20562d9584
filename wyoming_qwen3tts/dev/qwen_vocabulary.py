"""Qwen's own text vocabulary, for real-size checkpoints whose prompts are as long as the real ones.

The published Qwen3-TTS checkpoints carry Qwen2's byte-level BPE (151,643 merged tokens, the
same ranks as Qwen 1's ``qwen.tiktoken``). No model download reaches our machines, but Alibaba's
DashScope SDK on PyPI ships that ranks file (``dashscope/resources/qwen.tiktoken``). Without it
a random checkpoint tokenizes English into about 2.3 times as many tokens as the real model
(the benchmark sentence: 73 against 31), and a prompt that holds the whole sentence costs a
prefill twice as long as a real one.

    python -m wyoming_qwen3tts.dev.qwen_vocabulary DEST   # downloads the wheel, writes DEST

Only the data file is taken; the SDK is never installed (it pulls a web framework).
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DASHSCOPE_REQUIREMENT = "dashscope==2.0.2"
RANKS_IN_WHEEL = "dashscope/resources/qwen.tiktoken"
DEFAULT_LOCATION = Path(".cache") / "qwen.tiktoken"


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one base64 token and its rank per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as error:
                raise ValueError(f"{path}:{number} is not a tiktoken ranks line ({error})") from None
    return ranks


def extract_from_wheel(wheel: Path, dest: Path) -> Path:
    """Copy the ranks file out of a downloaded DashScope wheel."""
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(RANKS_IN_WHEEL)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def download(dest: Path = DEFAULT_LOCATION) -> Path:
    """Fetch the DashScope wheel with pip (no dependencies) and keep only its ranks file."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", folder,
             DASHSCOPE_REQUIREMENT],
            check=True,
        )
        (wheel,) = Path(folder).glob("dashscope-*.whl")
        return extract_from_wheel(wheel, dest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, nargs="?", default=DEFAULT_LOCATION, help="where to write qwen.tiktoken")
    args = parser.parse_args(argv)
    path = download(args.dest)
    print(f"{path}: {len(read_ranks(path))} tokens")


if __name__ == "__main__":
    main()
