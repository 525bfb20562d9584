"""A measurement in a process of its own: the child prints one RESULT line, the parent reads it.

Each setting gets a fresh process so that what one loaded (memory, compiled kernels, huge pages)
cannot change what the next measures.
"""

from __future__ import annotations

import json
import subprocess

PREFIX = "RESULT "


def print_result(result: dict) -> None:
    """In the child: hand ``result`` to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def result_of(output: str) -> dict:
    """The result a child printed among its other output."""
    return json.loads(next(line for line in output.splitlines() if line.startswith(PREFIX))[len(PREFIX):])


def run_child(command: list[str]) -> dict:
    """Run ``command`` and return the result it printed; its error output if it failed."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return result_of(done.stdout)
