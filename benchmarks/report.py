"""BENCHMARKS.md: one section per run, rewritten in place, the others kept."""

from __future__ import annotations

import time
from pathlib import Path


def write_report(path: Path, label: str, report: str) -> None:
    """Replace (or add) this run's section in BENCHMARKS.md, keeping the others."""
    header = "# Benchmarks\n\nWritten by `benchmarks/bench.py` and `benchmarks/soak.py`; every ratio compares numbers measured in one run.\n"
    sections: dict[str, str] = {}
    if path.exists():
        current, body = None, []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("## "):
                if current:
                    sections[current] = "\n".join(body).strip()
                current, body = line[3:].strip(), []
            elif current:
                body.append(line)
        if current:
            sections[current] = "\n".join(body).strip()
    sections[label] = f"_{time.strftime('%Y-%m-%d')}_\n\n{report}"
    text = header + "".join(f"\n## {name}\n\n{body}\n" for name, body in sections.items())
    path.write_text(text, encoding="utf-8")


def publish(path: Path, label: str, lines: list[str]) -> None:
    """Print a run's report and write it as its section of BENCHMARKS.md."""
    report = "\n".join(lines)
    print(report)
    write_report(path, label, report)
