"""The package's layers: edges without torch, no import cycles, the engine importing no edge."""

from __future__ import annotations

import ast
import asyncio
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from wyoming.info import Describe
from wyoming.tts import Synthesize, SynthesizeVoice

from helpers import free_port, read_until
from vllm_omni_double import VllmOmniDouble

PACKAGE = Path(__file__).resolve().parents[1] / "wyoming_qwen3tts"
EDGES = ("server", "http_api", "remote", "addon", "serve", "settings", "__main__")


def test_importing_the_edges_and_the_remote_engine_does_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        import wyoming_qwen3tts.__main__, wyoming_qwen3tts.serve, wyoming_qwen3tts.settings
        import wyoming_qwen3tts.server.handler, wyoming_qwen3tts.http_api.app, wyoming_qwen3tts.remote.engine
        import wyoming_qwen3tts.engine.options, wyoming_qwen3tts.request, wyoming_qwen3tts.speech
        print(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch.")))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_a_remote_front_serves_without_ever_loading_torch():
    double = VllmOmniDouble(free_port())
    double.start()
    port = free_port()
    # The front's own report, printed as it exits, of whether torch was ever imported.
    code = textwrap.dedent(
        f"""
        import atexit, runpy, sys
        atexit.register(lambda: print("TORCH_LOADED", "torch" in sys.modules, flush=True))
        sys.argv = ["wyoming_qwen3tts", "--engine", "remote", "--remote-url", "{double.url}/v1", "--uri", "tcp://127.0.0.1:{port}"]
        runpy.run_module("wyoming_qwen3tts", run_name="__main__")
        """
    )
    front = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        from wyoming.client import AsyncTcpClient

        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            info = await read_until(client, "info", timeout=10)
            await client.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice(name="ryan")).event())
            cycle = await read_until(client, "audio-stop", timeout=30)
        assert info.types == ["info"] and cycle.types[-1] == "audio-stop" and len(cycle.audio) > 0
    finally:
        front.send_signal(signal.SIGTERM)
        out, err = front.communicate(timeout=30)
        double.stop()
    assert front.returncode == 0, err
    assert "TORCH_LOADED False" in out, out + err


def _imports(path: Path) -> set[str]:
    """Package modules that ``path`` imports (relative and absolute), as dotted names."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("wyoming_qwen3tts"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("wyoming_qwen3tts"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    return {name: {dep for dep in _imports(path) if dep in modules and dep != name} for name, path in modules.items()}


def test_the_engine_imports_no_edge_and_no_module_imports_in_a_cycle():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("wyoming_qwen3tts.engine"):
            edges = [d for d in deps if d.split(".")[1] in EDGES]
            assert not edges, f"{name} imports {edges}"
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
