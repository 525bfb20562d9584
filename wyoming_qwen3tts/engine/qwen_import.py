"""Import the official `qwen_tts` package on machines without its 25 Hz extras.

`qwen_tts/__init__` always imports the 25 Hz tokenizer, which imports `torchaudio`, `sox` and
`onnxruntime` at module level. The 12 Hz models we serve never call them, and on a CPU machine
the `torchaudio` that pip resolves is often a CUDA build that fails to import next to a CPU
torch. So before importing `qwen_tts` we import each of them once; any that is missing or broken
is replaced by a placeholder module that raises a clear error if anything actually uses it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import io
import logging
import sys
import types
from typing import Any

_LOGGER = logging.getLogger(__name__)

# Module names the 25 Hz tokenizer imports, parents before children.
OPTIONAL_25HZ_MODULES = (
    "sox",
    "onnxruntime",
    "torchaudio",
    "torchaudio.compliance",
    "torchaudio.compliance.kaldi",
)


class MissingOptionalModule(types.ModuleType):
    """Stands in for a module only the unused 25 Hz tokenizer needs."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name)
        self.__reason = reason
        # Code that probes with importlib.util.find_spec() needs a spec to look at.
        self.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        self.__path__: list[str] = []

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        raise ImportError(
            f"'{self.__name__}' is not available ({self.__reason}); only the 25 Hz Qwen3-TTS "
            "tokenizer needs it, and this server uses the 12 Hz models."
        )


def _placeholders_for_broken_modules() -> dict[str, types.ModuleType]:
    failures: dict[str, str] = {}
    for name in OPTIONAL_25HZ_MODULES:
        root = name.split(".")[0]
        if root in failures:
            failures[name] = failures[root]
            continue
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a broken build can raise anything
            failures[name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]

    for root in {name.split(".")[0] for name in failures}:
        # A failed import can leave half-initialised submodules behind.
        for loaded in [m for m in sys.modules if m == root or m.startswith(root + ".")]:
            del sys.modules[loaded]

    placeholders: dict[str, types.ModuleType] = {}
    for name, reason in failures.items():
        placeholders[name] = MissingOptionalModule(name, reason)
        parent, _, child = name.rpartition(".")
        if parent:
            # `import a.b.c as x` looks the child up as an attribute of its parent.
            setattr(placeholders[parent], child, placeholders[name])
        _LOGGER.debug("Placeholder for %s (%s)", name, reason)
    return placeholders


def import_qwen_tts() -> types.ModuleType:
    """Return the `qwen_tts` package, importable whether or not its 25 Hz extras work."""
    if "qwen_tts" in sys.modules:
        return sys.modules["qwen_tts"]
    # transformers probes for torchaudio when it is first imported; let it see the real state.
    importlib.import_module("transformers")
    placeholders = _placeholders_for_broken_modules()
    sys.modules.update(placeholders)
    try:
        # The 25 Hz tokenizer prints a flash-attn warning that does not concern the 12 Hz models;
        # the loader logs the attention choice that actually applies.
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module("qwen_tts")
    finally:
        # Only qwen_tts's own module-level imports should ever see the placeholders.
        for name in placeholders:
            sys.modules.pop(name, None)
