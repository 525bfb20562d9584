"""Loading checkpoints: local folders, hub ids with and without network, broken optional extras."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wyoming_qwen3tts.engine.loader import LoadOptions, ModelUnavailableError, codec_threads, resolve_checkpoint, resolve_placement

HUB_ID = "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"
# Nothing listens on the discard port: a download attempt fails at once, on loopback.
NO_NETWORK = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}

SPEAK_ONE_SENTENCE = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from wyoming_qwen3tts.engine.engine import SpeechEngine
    from wyoming_qwen3tts.engine.loader import ModelUnavailableError
    from wyoming_qwen3tts.engine.options import EngineOptions
    from wyoming_qwen3tts.speech import PresetSpeaker

    async def main():
        try:
            engine = SpeechEngine.load(EngineOptions(model=sys.argv[1], data_dir=Path(sys.argv[2])))
        except ModelUnavailableError as err:
            print("UNAVAILABLE:", err)
            sys.exit(3)
        chunks = [c async for c in engine.synthesize(["Hello."], PresetSpeaker("ryan"))]
        engine.close()
        print("CHUNKS", len(chunks), sum(len(c.pcm) for c in chunks))
        print("TORCHAUDIO_LOADED", "torchaudio" in sys.modules)

    asyncio.run(main())
    """
)


def run_python(code: str, *args: str, env: dict[str, str] | None = None, path: list[Path] = ()) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(env or {})
    if path:
        full_env["PYTHONPATH"] = os.pathsep.join([str(p) for p in path] + [full_env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_local_folder_loads_and_speaks_with_hf_hub_offline(checkpoints, tmp_path):
    result = run_python(
        SPEAK_ONE_SENTENCE, str(checkpoints["custom_voice"]), str(tmp_path), env={"HF_HUB_OFFLINE": "1", **NO_NETWORK}
    )
    assert result.returncode == 0, result.stderr
    assert "CHUNKS" in result.stdout
    chunks, pcm_bytes = result.stdout.split("CHUNKS")[1].split()[:2]
    assert int(chunks) > 1 and int(pcm_bytes) > 0


@pytest.mark.parametrize("env", [NO_NETWORK, {"HF_HUB_OFFLINE": "1"}], ids=["no-network", "hf-hub-offline"])
def test_hub_id_that_cannot_be_fetched_gives_one_clear_error(tmp_path, env):
    started = time.monotonic()
    result = run_python(SPEAK_ONE_SENTENCE, HUB_ID, str(tmp_path / "models"), env=env)
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stdout.split("UNAVAILABLE:")[1]
    assert HUB_ID in message
    assert str(tmp_path / "models") in message
    assert "--local-dir" in message and "folder" in message
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 120


def test_in_the_add_on_the_advice_points_to_the_share_folder_and_the_custom_option(tmp_path):
    result = run_python(SPEAK_ONE_SENTENCE, HUB_ID, str(tmp_path / "models"), env={**NO_NETWORK, "SUPERVISOR_TOKEN": "t"})
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stdout.split("UNAVAILABLE:")[1]
    name = HUB_ID.split("/")[1]
    assert f"/share/qwen3tts/models/{name}" in message
    assert "Model option to 'custom'" in message and "Custom model" in message
    assert "copy the folder here" not in message


def test_a_download_reports_its_progress_against_the_repository_size(tmp_path, caplog):
    from wyoming_qwen3tts.engine.download_progress import DownloadProgress

    folder = tmp_path / "models--Qwen--X"
    (folder / "blobs").mkdir(parents=True)
    progress = DownloadProgress("Qwen/X", folder, total=4 * 2**20, interval=0.05)
    (folder / "blobs" / "a.incomplete").write_bytes(b"\0" * 2**20)
    assert progress.line() == "Downloading Qwen/X: 1 of 4 MiB (25 %)"
    caplog.set_level("INFO")
    with progress:
        (folder / "blobs" / "b").write_bytes(b"\0" * 2**21)
        time.sleep(0.3)
    assert "Downloading Qwen/X: 3 of 4 MiB (75 %)" in caplog.text
    assert DownloadProgress("Qwen/X", folder, total=None).line() == "Downloading Qwen/X: 3 MiB so far"


def test_a_downloaded_hub_id_loads_from_the_data_folder_without_network(checkpoints, tmp_path, monkeypatch):
    # The layout huggingface_hub leaves behind after a completed download.
    repo = tmp_path / "models" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoints["custom_voice"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    assert resolve_checkpoint(HUB_ID, tmp_path / "models", offline=True) == snapshot
    assert resolve_checkpoint(HUB_ID, tmp_path / "models", offline=False) == snapshot


def test_an_incomplete_model_folder_is_named_with_what_is_missing(checkpoints, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(checkpoints["custom_voice"], folder)
    shutil.rmtree(folder / "speech_tokenizer")
    with pytest.raises(ModelUnavailableError, match="speech_tokenizer/config.json"):
        resolve_checkpoint(str(folder), tmp_path)


def test_a_name_that_is_neither_folder_nor_hub_id_is_rejected(tmp_path):
    with pytest.raises(ModelUnavailableError, match="neither an existing folder"):
        resolve_checkpoint("/no/such/folder", tmp_path)


def test_auto_placement_on_a_cpu_machine_is_float32_sdpa(caplog):
    caplog.set_level("INFO")
    placement = resolve_placement(LoadOptions())
    assert placement.device.type == "cpu"
    assert str(placement.dtype) == "torch.float32"
    assert placement.attention == "sdpa"
    assert "Attention: sdpa" in caplog.text


def test_automatic_threads_leave_one_core_for_the_server_unless_the_model_is_16_bit(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert resolve_placement(LoadOptions()).threads == 3
    assert resolve_placement(LoadOptions(threads=2)).threads == 2
    assert resolve_placement(LoadOptions(dtype="bfloat16")).threads == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert resolve_placement(LoadOptions()).threads == 1


def test_automatic_codec_threads_take_the_cores_the_model_leaves(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert codec_threads(LoadOptions(), model_threads=3) == 1
    assert codec_threads(LoadOptions(), model_threads=2) == 2
    assert codec_threads(LoadOptions(), model_threads=4) == 1, "at least one, beside a 16-bit model on every core"
    assert codec_threads(LoadOptions(codec_threads=6), model_threads=3) == 6


@pytest.mark.parametrize("field,value", [("device", "tpu"), ("dtype", "int4"), ("attention", "magic"), ("codec_precision", "int8")])
def test_wrong_load_options_are_refused_with_the_valid_choices(field, value):
    with pytest.raises(ValueError, match="must be one of"):
        LoadOptions(**{field: value})


def test_the_package_works_where_torchaudio_sox_and_onnxruntime_are_broken(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    failures = {
        "torchaudio": "raise OSError('libtorchaudio.so: undefined symbol: _ZN3c10')",
        "sox": "raise ImportError('SoX could not be found!')",
        "onnxruntime": "raise RuntimeError('onnxruntime was built for another CPU')",
    }
    for name, body in failures.items():
        (broken / name).mkdir(parents=True)
        (broken / name / "__init__.py").write_text(body + "\n")
    result = run_python(
        SPEAK_ONE_SENTENCE + "\ntry:\n    import torchaudio\nexcept OSError as e:\n    print('REAL_ERROR', e)\n",
        str(checkpoints["custom_voice"]),
        str(tmp_path / "models"),
        env={"HF_HUB_OFFLINE": "1"},
        path=[broken],
    )
    assert result.returncode == 0, result.stderr
    assert "CHUNKS" in result.stdout
    # The placeholders lived only while qwen_tts imported: everyone else sees the real state.
    assert "TORCHAUDIO_LOADED False" in result.stdout
    assert "REAL_ERROR libtorchaudio.so" in result.stdout


def test_the_text_embedding_can_live_in_cpu_memory_without_changing_the_codes(checkpoints, cpu_placement):
    from helpers import greedy_frames

    from wyoming_qwen3tts.engine.loader import CpuEmbedding, load_model

    import torch

    plain = load_model(checkpoints["custom_voice"], cpu_placement)
    offloaded = load_model(checkpoints["custom_voice"], cpu_placement, text_embedding_on_cpu=True)
    embedding = offloaded.model.talker.get_text_embeddings()
    assert isinstance(embedding, CpuEmbedding) and embedding.weight.device.type == "cpu"
    assert torch.equal(greedy_frames(plain, 12), greedy_frames(offloaded, 12))
    # The official path reads the embedding through the same accessor.
    wavs, _sr = offloaded.generate_custom_voice("Hi.", speaker="ryan", language="english", max_new_tokens=4)
    assert len(wavs[0]) == 3 * 1920
