"""The command line, environment variables, and the zeroconf announcement.

Zeroconf tests run the real server in a private network namespace that has only loopback, so
no multicast ever leaves through a real network card.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from wyoming_qwen3tts import __version__
from wyoming_qwen3tts.settings import Settings


def namespace_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(
    not namespace_available(), reason="needs `unshare -n` (root) so multicast stays inside a private namespace"
)

CLIENT = textwrap.dedent(
    """
    import asyncio, sys, time
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    async def describe(port):
        deadline = time.monotonic() + 120
        while True:
            try:
                async with AsyncTcpClient("127.0.0.1", port) as client:
                    await client.write_event(Describe().event())
                    return Info.from_event(await client.read_event())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    def browse(name):
        from zeroconf import ServiceBrowser, ServiceListener, Zeroconf
        found = []
        class Listener(ServiceListener):
            def add_service(self, zc, type_, name):
                found.append(name)
            def update_service(self, zc, type_, name):
                pass
            def remove_service(self, zc, type_, name):
                pass
        zc = Zeroconf(interfaces=["127.0.0.1"])
        ServiceBrowser(zc, "_wyoming._tcp.local.", Listener())
        deadline = time.monotonic() + 10
        while name not in found and time.monotonic() < deadline:
            time.sleep(0.1)
        info = zc.get_service_info("_wyoming._tcp.local.", name, timeout=3000) if name in found else None
        zc.close()
        return info

    port = int(sys.argv[1])
    info = asyncio.run(describe(port))
    print("PROGRAM", info.tts[0].name)
    if len(sys.argv) > 2:
        service = browse(sys.argv[2] + "._wyoming._tcp.local.")
        print("SERVICE", service and service.parsed_addresses(), service and service.port)
    """
)


def run_in_namespace(tmp_path, server_args: list[str], client_args: list[str], multicast_route: bool) -> str:
    (tmp_path / "client.py").write_text(CLIENT)
    setup = "ip link set lo up"
    if multicast_route:
        setup += " && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo"
    server = " ".join([sys.executable, "-m", "wyoming_qwen3tts", *server_args])
    client = " ".join([sys.executable, str(tmp_path / "client.py"), *client_args])
    log = tmp_path / "server.log"
    script = f"{setup} && {{ {server} > {log} 2>&1 & }} && SERVER=$! && {client}; kill $SERVER; wait $SERVER; cat {log}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN3TTS_", "HF_"))}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=300, env=env)
    return result.stdout + result.stderr


@needs_namespace
def test_zeroconf_announcement_is_found_by_a_browser_on_loopback(checkpoints, tmp_path):
    output = run_in_namespace(
        tmp_path,
        ["--uri", "tcp://0.0.0.0:10200", "--zeroconf", "qwen-test", "--zeroconf-host", "127.0.0.1",
         "--model", str(checkpoints["custom_voice"]), "--data-dir", str(tmp_path / "data")],
        ["10200", "qwen-test"],
        multicast_route=True,
    )
    assert "PROGRAM qwen3-tts" in output, output
    assert "SERVICE ['127.0.0.1'] 10200" in output, output


@needs_namespace
def test_a_failed_announcement_is_a_warning_and_the_server_still_serves(checkpoints, tmp_path):
    # Bound to all interfaces with no --zeroconf-host and no multicast route: no LAN address.
    output = run_in_namespace(
        tmp_path,
        ["--uri", "tcp://0.0.0.0:10201", "--zeroconf", "--model", str(checkpoints["custom_voice"]),
         "--data-dir", str(tmp_path / "data")],
        ["10201"],
        multicast_route=False,
    )
    assert "PROGRAM qwen3-tts" in output, output
    assert "Zeroconf announcement failed" in output and "--zeroconf-host" in output, output
    assert "0.0.0.0" not in output.split("Zeroconf announcement failed")[1].split("\n")[0]


def test_flags_can_come_from_the_environment_and_the_command_line_wins():
    environ = {
        "QWEN3TTS_MODEL": "/models/custom",
        "QWEN3TTS_CLONE_MODEL": "/models/base",
        "QWEN3TTS_DEVICE": "cpu",
        "QWEN3TTS_NO_STREAMING": "true",
        "QWEN3TTS_ZEROCONF": "kitchen",
        "QWEN3TTS_VOICE": "Ryan",
        "QWEN3TTS_MAX_TEXT_LENGTH": "500",
        "QWEN3TTS_COMPILE": "1",
    }
    settings = Settings.from_args(["--voice", "Vivian"], environ)
    assert settings.engine.model == "/models/custom" and settings.engine.clone_model == "/models/base"
    assert settings.engine.load.device == "cpu"
    assert settings.wyoming.streaming is False
    assert settings.wyoming.zeroconf_name == "kitchen"
    assert settings.voices.default_voice == "Vivian"
    assert settings.requests.max_text_chars == 500
    assert settings.engine.models_dir == settings.data_dir / "models"
    assert settings.engine.load.compile is True
    assert settings.engine.compile_cache_dir == settings.data_dir / "compile-cache"


def test_remote_replicas_come_from_repeated_flags_or_a_comma_separated_variable():
    flags = Settings.from_args(["--engine", "remote", "--remote-url", "http://a:1", "--remote-url", "http://b:2"], {})
    env = Settings.from_args([], {"QWEN3TTS_ENGINE": "remote", "QWEN3TTS_REMOTE_URL": "http://a:1, http://b:2"})
    assert flags.remote.urls == env.remote.urls == ("http://a:1", "http://b:2")
    assert Settings.from_args([], {}).remote is None


def test_defaults_listen_on_10200_with_streaming_and_no_zeroconf():
    settings = Settings.from_args([], {})
    assert settings.wyoming.uri == "tcp://0.0.0.0:10200"
    assert settings.wyoming.streaming and settings.wyoming.zeroconf_name is None
    assert settings.engine.load.compile is False
    assert Settings.from_args(["--zeroconf"], {}).wyoming.zeroconf_name == "qwen3-tts"


def test_streams_per_step_suit_the_device_unless_set():
    automatic = Settings.from_args([], {}).engine
    assert (automatic.batch_size("cpu"), automatic.batch_size("cuda")) == (8, 16)
    assert Settings.from_args(["--max-batch", "3"], {}).engine.batch_size("cuda") == 3
    assert Settings.from_args([], {"QWEN3TTS_MAX_BATCH": "2"}).engine.batch_size("cpu") == 2


def test_audio_decodes_on_threads_unless_a_codec_process_is_asked_for():
    assert Settings.from_args([], {}).engine.codec_process is False
    assert Settings.from_args(["--codec-process"], {}).engine.codec_process is True
    assert Settings.from_args([], {"QWEN3TTS_CODEC_PROCESS": "true"}).engine.codec_process is True


def test_batch_attention_is_chosen_by_flag_or_environment_and_is_automatic_otherwise():
    assert Settings.from_args([], {}).engine.batch_attention == "auto"
    assert Settings.from_args(["--batch-attention", "padded"], {}).engine.padded_attention("cpu")
    assert not Settings.from_args([], {"QWEN3TTS_BATCH_ATTENTION": "rows"}).engine.padded_attention("cuda")


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--device", "tpu"], {}, "invalid choice: 'tpu'"),
        ([], {"QWEN3TTS_DEVICE": "tpu"}, "device must be one of"),
        (["--first-chunk-frames", "0"], {}, "first_frames"),
        (["--max-text-length", "0"], {}, "at least 1 character"),
        (["--uri", "http://x:1"], {}, "must start with tcp:// or unix://"),
        (["--threads", "-1"], {}, "threads must be 0 (automatic) or more"),
        ([], {"QWEN3TTS_CODEC_THREADS": "-1"}, "codec_threads must be 0 (automatic) or more"),
        (["--max-batch", "-2"], {}, "max_batch must be 0 (automatic) or more"),
        ([], {"QWEN3TTS_BATCH_ATTENTION": "masked"}, "batch_attention must be one of auto, rows, padded"),
        (["--engine", "remote"], {}, "needs at least one --remote-url"),
        (["--engine", "remote", "--remote-url", "gpu-box:8091"], {}, "must start with http://"),
    ],
)
def test_wrong_options_exit_with_a_message(argv, environ, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        Settings.from_args(argv, environ)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_version_flag_prints_the_package_version():
    result = subprocess.run([sys.executable, "-m", "wyoming_qwen3tts", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == __version__
