"""The Home Assistant add-on: manifest, options, run.sh, image recipe, discovery, health check."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from aiohttp import web
from packaging.requirements import Requirement

from helpers import ServerThread

from wyoming_qwen3tts import __version__
from wyoming_qwen3tts.addon.discovery import announce
from wyoming_qwen3tts.addon.options import WYOMING_PORT
from wyoming_qwen3tts.addon.healthcheck import describe
from wyoming_qwen3tts.clone_voices import read_voices_file
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions
from wyoming_qwen3tts.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())
TRANSLATIONS = yaml.safe_load((ROOT / "translations" / "en.yaml").read_text())


# The Supervisor's option types (supervisor/addons/options.py): a name, an optional range,
# list(a|b) choices, match(regex), a trailing "?" for optional; lists and dicts nest.
SCHEMA_ELEMENT = re.compile(
    r"^(?:bool|email|url|port"
    r"|str(?:\((?P<s_min>\d+)?,(?P<s_max>\d+)?\))?"
    r"|password(?:\((?P<p_min>\d+)?,(?P<p_max>\d+)?\))?"
    r"|int(?:\((?P<i_min>\d+)?,(?P<i_max>\d+)?\))?"
    r"|float(?:\((?P<f_min>[\d.]+)?,(?P<f_max>[\d.]+)?\))?"
    r"|match\((?P<match>.*)\)"
    r"|list\((?P<list>.+)\))\??$"
)


def check_value(schema, value, where: str) -> None:
    if isinstance(schema, list):
        assert isinstance(value, list), f"{where}: expected a list"
        for index, item in enumerate(value):
            check_value(schema[0], item, f"{where}[{index}]")
        return
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: expected a mapping"
        check_options(schema, value, where)
        return
    match = SCHEMA_ELEMENT.match(schema)
    assert match, f"{where}: unknown type {schema!r}"
    assert value is not None, f"{where}: required"
    kind = schema.split("(")[0].rstrip("?")
    if kind in ("str", "password", "email", "url"):
        assert isinstance(value, str), f"{where}: expected a string"
    elif kind in ("int", "port"):
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an int"
        if kind == "port":
            assert 1 <= value <= 65535
    elif kind == "float":
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "bool":
        assert isinstance(value, bool), f"{where}: expected a bool"
    elif kind == "list":
        assert str(value) in match.group("list").split("|"), f"{where}: {value!r} not in {schema}"
    elif kind == "match":
        assert re.fullmatch(match.group("match"), str(value)), f"{where}: {value!r} !~ {schema}"


def check_options(schema: dict, options: dict, where: str = "options") -> None:
    for key, value in options.items():
        assert key in schema, f"{where}.{key} has no schema entry"
        check_value(schema[key], value, f"{where}.{key}")
    for key, kind in schema.items():
        if key not in options:
            element = kind[0] if isinstance(kind, list) else kind
            assert isinstance(element, str) and element.endswith("?"), f"{where}.{key} is required but has no default"


def test_config_yaml_validates_against_the_add_on_linter_schema():
    schema = json.loads((ROOT / "tests" / "data" / "addon-config.schema.json").read_text())
    jsonschema.validate(CONFIG, schema)
    assert CONFIG["slug"] == "qwen3_tts"
    assert CONFIG["discovery"] == ["wyoming"]
    assert CONFIG["ports"] == {"10200/tcp": 10200, "10201/tcp": None}
    assert set(CONFIG["ports_description"]) == set(CONFIG["ports"])
    assert set(CONFIG["arch"]) == {"amd64", "aarch64"}
    assert any(m.get("type") == "share" for m in CONFIG["map"] if isinstance(m, dict))
    assert "models" in CONFIG["backup_exclude"]


def test_every_option_has_a_schema_entry_a_translation_and_a_valid_default():
    options, schema = CONFIG["options"], CONFIG["schema"]
    assert set(options) == set(schema)
    check_options(schema, options)
    for key in schema:
        entry = TRANSLATIONS["configuration"].get(key)
        assert entry and entry.get("name") and entry.get("description"), f"no translation for {key}"
    assert set(TRANSLATIONS["network"]) == set(CONFIG["ports"])


def test_the_option_checker_rejects_what_the_supervisor_rejects():
    schema = CONFIG["schema"]
    with pytest.raises(AssertionError):
        check_options(schema, {**CONFIG["options"], "device": "tpu"})
    with pytest.raises(AssertionError):
        check_options(schema, {**CONFIG["options"], "voices": [{"name": "x"}]})
    with pytest.raises(AssertionError):
        check_options(schema, {k: v for k, v in CONFIG["options"].items() if k != "streaming"})
    check_options(schema, {**CONFIG["options"], "voices": [{"name": "Grandma", "audio": "g.wav"}]})


def test_package_version_equals_the_add_on_version():
    assert CONFIG["version"] == __version__


def test_repository_yaml_names_the_store_entry():
    repository = yaml.safe_load((ROOT / "repository.yaml").read_text())
    assert {"name", "url", "maintainer"} <= set(repository)


def test_no_other_config_file_is_committed():
    # The Supervisor reads every config.* outside dot-folders and rootfs/ as an add-on manifest.
    # Tracked files and files that would be committed (untracked, not ignored).
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    if listed.returncode == 0:
        files = [Path(line) for line in listed.stdout.splitlines()]
    else:
        files = [p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file()]
    manifests = [
        f for f in files
        if f.name.split(".")[0] == "config" and not any(part.startswith(".") or part == "rootfs" for part in f.parts)
    ]
    assert manifests == [Path("config.yaml")]


def test_add_on_images_are_pngs():
    for name in ("icon.png", "logo.png"):
        assert (ROOT / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_sh(tmp_path, options: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options))
    env = {k: v for k, v in os.environ.items() if k not in ("SUPERVISOR_TOKEN",)}
    env.update(ADDON_OPTIONS=str(path), RUN_SH_EXEC=r"printf %s\n")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["bash", str(ROOT / "run.sh")], capture_output=True, text=True, env=env, timeout=120)


def test_run_sh_turns_default_options_into_the_command_line(tmp_path):
    result = run_sh(tmp_path, CONFIG["options"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "--uri", "tcp://0.0.0.0:10200",
        "--supervisor-discovery", "http://supervisor",
        "--data-dir", "/data",
        "--model", "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice",
        "--clone-model", "Qwen/Qwen3-TTS-12Hz-0.6B-Base",
        "--voices", str(tmp_path / "options.json"),
        "--voices-dir", "/share/qwen3tts",
        "--device", "auto",
        "--dtype", "auto",
        "--quantize", "auto",
        "--codec-precision", "auto",
        "--log-level", "info",
        "--max-batch", "0",
        "--stream-text-by", "words",
    ]


def test_run_sh_passes_custom_models_and_switches(tmp_path):
    options = {
        **CONFIG["options"],
        "model": "custom",
        "custom_model": "/share/qwen3tts/models/my model",
        "clone_model": "Qwen/Qwen3-TTS-12Hz-1.7B-Base",
        "device": "cuda",
        "dtype": "bfloat16",
        "quantize": "int4",
        "codec_precision": "bfloat16",
        "default_voice": "Grandma",
        "streaming": False,
        "stream_text_by": "sentences",
        "zeroconf_name": "kitchen-tts",
        "log_level": "debug",
        "voices": [{"name": "Grandma", "audio": "grandma.wav", "transcript": "Hello dear."}],
        "http_api": True,
        "http_api_key": "s3cret key",
        "http_clones": True,
        "compile": True,
    }
    result = run_sh(tmp_path, options)
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()

    def value(flag):
        return args[args.index(flag) + 1]

    assert value("--model") == "/share/qwen3tts/models/my model", "a path with a space stays one argument"
    assert value("--clone-model") == "Qwen/Qwen3-TTS-12Hz-1.7B-Base"
    assert value("--device") == "cuda" and value("--dtype") == "bfloat16" and value("--log-level") == "debug"
    assert value("--codec-precision") == "bfloat16"
    assert value("--voice") == "Grandma" and value("--zeroconf") == "kitchen-tts"
    assert "--no-streaming" in args
    # The server gets these very arguments, and reads the clone voices from options.json.
    settings = Settings.from_args(args, {})
    assert settings.voices.voices_file == tmp_path / "options.json" and not settings.wyoming.streaming
    assert settings.requests.stream_text_by == "sentences"
    assert settings.engine.model == "/share/qwen3tts/models/my model" and settings.engine.load.device == "cuda"
    assert settings.wyoming.zeroconf_name == "kitchen-tts" and settings.log_level == "debug"
    assert (settings.http.port, settings.http.host, settings.http.api_key) == (10201, "0.0.0.0", "s3cret key")
    assert settings.http.clones and settings.engine.load.compile and settings.engine.load.quantize == "int4"
    entries = read_voices_file(settings.voices.voices_file, settings.samples_dir)
    assert [(e.name, e.audio, e.transcript) for e in entries] == [
        ("Grandma", Path("/share/qwen3tts/grandma.wav"), "Hello dear.")
    ]


def test_run_sh_passes_a_remote_engine_with_its_replicas(tmp_path):
    options = {**CONFIG["options"], "engine": "remote", "remote_urls": ["http://gpu-a:8091", "http://gpu-b:8091"], "remote_api_key": "k"}
    result = run_sh(tmp_path, options)
    assert result.returncode == 0, result.stderr
    settings = Settings.from_args(result.stdout.splitlines(), {})
    assert settings.remote.urls == ("http://gpu-a:8091", "http://gpu-b:8091") and settings.remote.api_key == "k"
    empty = run_sh(tmp_path, {**CONFIG["options"], "engine": "remote"})
    assert empty.returncode != 0 and "'remote_urls' is empty" in empty.stderr


def test_run_sh_stops_with_a_clear_message_for_an_empty_custom_model(tmp_path):
    result = run_sh(tmp_path, {**CONFIG["options"], "model": "custom", "custom_model": ""})
    assert result.returncode != 0
    assert "'model' is 'custom' but 'custom_model' is empty" in result.stderr
    assert result.stdout == ""


def requirement_lines(path: Path) -> list[Requirement]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def test_one_file_names_the_torch_version_and_every_install_takes_it_from_there():
    (torch,) = requirement_lines(ROOT / "requirements" / "torch.txt")
    assert torch.name == "torch" and str(torch.specifier).startswith("==")
    declared = next(Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if r.startswith("torch"))
    assert declared.specifier.contains(next(iter(torch.specifier)).version)

    dockerfile = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "script" / "setup").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    build = yaml.safe_load((ROOT / "build.yaml").read_text())
    assert 'pip install --index-url "${TORCH_INDEX}" -r requirements/torch.txt' in dockerfile
    assert "-r requirements/torch.txt" in setup and "script/setup" in ci
    # The add-on's builds, on both architectures, take PyTorch's CPU wheels.
    assert set(build["build_from"]) == set(CONFIG["arch"])
    assert build["args"]["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert re.search(r"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu$", dockerfile, re.M)
    for name, text in (("Dockerfile", dockerfile), ("script/setup", setup), (".ci/run", ci), ("build.yaml", yaml.safe_dump(build))):
        assert not re.search(r"torch\s*[=<>~]=", text), f"{name} names a torch version of its own"


def test_the_image_installs_the_lock_without_a_resolver_and_in_an_order_that_cannot_conflict():
    lock = requirement_lines(ROOT / "requirements" / "image.lock")
    pinned = {r.name.lower().replace("_", "-"): next(iter(r.specifier)).version for r in lock}
    assert all(str(r.specifier).startswith("==") for r in lock), "every package at one exact version"
    assert not {"torch", "qwen-tts", "wyoming-qwen3tts"} & pinned.keys()
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(requirement)
        name = requirement.name.lower().replace("_", "-")
        if name == "torch":
            continue
        assert name in pinned, f"{name} is not in the lock: run script/lock"
        assert requirement.specifier.contains(pinned[name]), f"the lock's {name} {pinned[name]} is outside {requirement.specifier}"
    assert (ROOT / "requirements" / "no-deps.txt").read_text().count("qwen-tts==") == 1

    dockerfile = (ROOT / "Dockerfile").read_text()
    steps = [
        "pip install --no-deps -r requirements/image.lock",
        'pip install --index-url "${TORCH_INDEX}" -r requirements/torch.txt',
        "pip install --no-deps -r requirements/no-deps.txt",
        "pip install --no-deps .",
    ]
    positions = [dockerfile.index(step) for step in steps]
    assert positions == sorted(positions), "lock, torch, then what must not bring its dependencies"
    assert len(re.findall(r"pip install", dockerfile)) == len(steps), "nothing else resolves at build time"
    assert "HEALTHCHECK" in dockerfile and "wyoming_qwen3tts.addon healthcheck" in dockerfile
    assert "HF_HUB_DISABLE_PROGRESS_BARS=1" in dockerfile, "download progress as log lines, not bars"


def test_the_gpu_machine_kit_takes_the_image_versions_of_what_the_package_needs():
    """script/device-check runs on the device tool's image with the kit's wheels in front: they
    must be the versions the image (and the tests) run, and cover the versions qwen-tts pins."""
    pins = {
        r.name.lower().replace("_", "-"): next(iter(r.specifier)).version
        for path in ("image.lock", "no-deps.txt")
        for r in requirement_lines(ROOT / "requirements" / path)
    }
    kit = requirement_lines(ROOT / "requirements" / "device-kit.txt")
    names = [r.name.lower().replace("_", "-") for r in kit]
    assert len(names) == len(set(names)), "one version of each: two stop the whole install"
    for requirement, name in zip(kit, names):
        assert name in pins, f"{name} is in the kit but not in the image's lock"
        assert str(requirement.specifier) == f"=={pins[name]}", f"the kit's {requirement} is not the image's {pins[name]}"
    # The device image holds transformers 5 and huggingface_hub 1, which qwen-tts does not run with.
    assert {"qwen-tts", "transformers", "huggingface-hub", "tokenizers", "wyoming", "soundfile"} <= set(names)
    assert "torch" not in names, "the device image's own CUDA build of PyTorch is the one to measure"
    check = (ROOT / "script" / "device-check").read_text()
    assert "--no-index --no-deps" in check and ".device-kit" in check
    assert "requirements/device-kit.txt" in (ROOT / "script" / "device-kit").read_text()


def test_the_watchdog_watches_the_wyoming_port():
    assert CONFIG["watchdog"] == f"tcp://[HOST]:[PORT:{WYOMING_PORT}]"
    assert f"{WYOMING_PORT}/tcp" in CONFIG["ports"]


@pytest.fixture(scope="module")
def wyoming_server(checkpoints):
    engine = SpeechEngine.load(EngineOptions(model=str(checkpoints["custom_voice"])))
    server = ServerThread(Settings(), engine)
    yield server
    server.stop()
    engine.close()


async def test_healthcheck_answers_true_only_when_the_server_describes_itself(wyoming_server):
    from helpers import free_port

    assert await describe("127.0.0.1", wyoming_server.port)
    assert not await describe("127.0.0.1", free_port(), timeout=2)


class FakeSupervisor:
    """The Supervisor's discovery endpoint on loopback, refusing the first ``refusals`` posts."""

    def __init__(self, refusals: int = 0) -> None:
        self.refusals = refusals
        self.received: list[tuple[str | None, dict]] = []

    async def __aenter__(self) -> "FakeSupervisor":
        async def discovery(request: web.Request) -> web.Response:
            self.received.append((request.headers.get("Authorization"), await request.json()))
            if len(self.received) <= self.refusals:
                return web.json_response({"result": "error", "message": "Supervisor is restarting"}, status=503)
            return web.json_response({"result": "ok", "data": {"uuid": "x"}})

        app = web.Application()
        app.router.add_post("/discovery", discovery)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


async def test_discovery_is_retried_until_the_supervisor_accepts_it(caplog):
    caplog.set_level("INFO")
    async with FakeSupervisor(refusals=2) as supervisor:
        await asyncio.wait_for(
            announce(supervisor.url, "secret-token", 10200, host="addon-host", first_pause=0.05), timeout=10
        )
    expected = ("Bearer secret-token", {"service": "wyoming", "config": {"uri": "tcp://addon-host:10200"}})
    assert supervisor.received == [expected] * 3
    assert "trying again" in caplog.text and "Told Home Assistant where this server is" in caplog.text


async def test_the_add_on_server_announces_itself_once_it_listens(wyoming_server, monkeypatch):
    monkeypatch.setenv("SUPERVISOR_TOKEN", "add-on-token")
    async with FakeSupervisor() as supervisor:
        settings = Settings.from_args(["--supervisor-discovery", supervisor.url], {})
        server = ServerThread(settings, wyoming_server.engine)
        try:
            for _ in range(100):
                if supervisor.received:
                    break
                await asyncio.sleep(0.05)
        finally:
            server.stop()
    assert supervisor.received == [
        ("Bearer add-on-token", {"service": "wyoming", "config": {"uri": f"tcp://{socket.gethostname()}:{server.port}"}})
    ]


def test_run_sh_leaves_no_process_behind_it():
    """Discovery runs in the server's own process: run.sh starts nothing in the background."""
    script = (ROOT / "run.sh").read_text()
    commands = [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert not any(re.search(r"&\s*$", line) for line in commands)
    assert commands[-1].startswith("exec ")
