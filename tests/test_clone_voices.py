"""Voices: presets from the checkpoint, clone voices from configuration, the prompt cache."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import soundfile
import torch
import yaml
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from helpers import ServerThread, is_one_audio_cycle, loudest_sample, read_until, voice_like_sample

from wyoming_qwen3tts.engine.clone_cache import ClonePromptCache, checkpoint_identity
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, StopRules
from wyoming_qwen3tts.request import RequestLayerOptions
from wyoming_qwen3tts.speech import ClonePrompt, RequestOptions, SamplingOptions
from wyoming_qwen3tts.voices import VoiceOptions
from wyoming_qwen3tts.reference_audio import ReferenceAudioError, read_reference
from wyoming_qwen3tts.serve import prepare
from wyoming_qwen3tts.settings import Settings
from wyoming_qwen3tts.voices import preset_voices

STOP = StopRules(base_frames=4, frames_per_token=0.25, max_frames=40)
GREEDY = RequestOptions(sampling=SamplingOptions().greedy())


def write_sample(path, fmt: str, rate: int, channels: int = 1, seconds: float = 4.0, scale: float = 1.0):
    mono = voice_like_sample(seconds, rate) * scale
    audio = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    soundfile.write(path, audio, rate, format=fmt)
    return path


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("share")
    write_sample(folder / "grandma.wav", "WAV", 16000, channels=2)
    write_sample(folder / "uncle.flac", "FLAC", 44100)
    write_sample(folder / "robot.ogg", "OGG", 48000, channels=2)
    write_sample(folder / "pirate.mp3", "MP3", 22050)
    return folder


def settings_for(checkpoints, tmp_path, voices, samples_dir, **extra) -> Settings:
    voices_file = tmp_path / "voices.yaml"
    voices_file.write_text(yaml.safe_dump({"voices": voices}))
    return Settings(
        engine=EngineOptions(model=str(checkpoints["custom_voice"]), clone_model=str(checkpoints["base"]), data_dir=tmp_path / "data", stop=STOP),
        voices=VoiceOptions(voices_file=voices_file, voices_dir=samples_dir),
        requests=RequestLayerOptions(defaults=GREEDY),
        **extra,
    )


GOOD_VOICES = [
    {"name": "Grandma", "audio": "grandma.wav", "transcript": "Hello dear, come in and sit down.", "language": "english"},
    {"name": "Uncle Bob", "audio": "uncle.flac", "transcript": "Well hello there."},
    {"name": "Robot", "audio": "robot.ogg", "language": "de"},
    {"name": "Pirate", "audio": "pirate.mp3", "transcript": "Ahoy, matey."},
]


def test_presets_come_from_the_checkpoint_speaker_table(checkpoints, tmp_path, cpu_placement):
    folder = tmp_path / "custom"
    shutil.copytree(checkpoints["custom_voice"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["talker_config"]["spk_id"] = {"alice": 3000, "zed": 3001}
    config["talker_config"]["spk_is_dialect"] = {"alice": False, "zed": "sichuan_dialect"}
    (folder / "config.json").write_text(json.dumps(config))
    engine = SpeechEngine.load(EngineOptions(model=str(folder), data_dir=tmp_path))
    try:
        voices = {v.name: v for v in preset_voices(engine)}
    finally:
        engine.close()
    assert set(voices) == {"Alice", "Zed"}
    assert voices["Zed"].description == "Zed — Sichuan dialect" and voices["Zed"].languages[0] == "zh"
    assert voices["Alice"].description == "Alice — multilingual"


async def test_clone_voices_in_several_formats_are_advertised_and_spoken(checkpoints, tmp_path, samples_dir, caplog):
    caplog.set_level(logging.INFO)
    settings = settings_for(checkpoints, tmp_path, GOOD_VOICES, samples_dir)
    requests = await prepare(settings)
    engine, catalog = requests.backend, requests.catalog
    server = ServerThread(settings, engine, catalog)
    try:
        async with server.client() as client:
            from wyoming.info import Describe, Info

            await client.write_event(Describe().event())
            info = Info.from_event((await read_until(client, "info", timeout=10)).events[-1])
        voices = {v.name: v for v in info.tts[0].voices}
        assert {"Grandma", "Uncle Bob", "Robot", "Pirate", "Ryan"} <= set(voices)
        assert voices["Grandma"].description == "Grandma — voice clone, English"
        assert voices["Grandma"].languages[0] == "en" and voices["Robot"].languages[0] == "de"
        assert "x-vector" in caplog.text and "'Robot'" in caplog.text

        audios = {}
        for name in ("grandma", "Pirate", "ROBOT"):
            async with server.client() as client:
                await client.write_event(Synthesize(text="Dinner is ready.", voice=SynthesizeVoice(name=name)).event())
                cycle = await read_until(client, "audio-stop")
            assert is_one_audio_cycle(cycle.types) and len(cycle.audio) > 0, name
            audios[name] = cycle.audio
        assert audios["grandma"] != audios["Pirate"]

        async with server.client() as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="Uncle Bob")).event())
            await client.write_event(SynthesizeChunk(text="The lights are off. Good night.").event())
            await client.write_event(SynthesizeStop().event())
            cycle = await read_until(client, "synthesize-stopped")
        assert is_one_audio_cycle(cycle.types[:-1]) and len(cycle.audio) > 0
    finally:
        server.stop()
        engine.close()
    assert engine.can_clone


async def test_no_clone_voices_means_no_base_model(checkpoints, tmp_path):
    settings = Settings(engine=EngineOptions(model=str(checkpoints["custom_voice"]), clone_model=str(checkpoints["base"]), data_dir=tmp_path))
    requests = await prepare(settings)
    engine, catalog = requests.backend, requests.catalog
    engine.close()
    assert not engine.can_clone and set(engine.runtimes) == {"custom_voice"}
    assert len(catalog.voices) == 9


async def start_computing(settings):
    """The catalog of a fresh start, and how many clone prompts that start had to compute."""
    requests = await prepare(settings)
    requests.backend.close()
    return requests.catalog, requests.backend.clones_computed


async def test_prompts_are_cached_across_starts_and_rebuilt_when_corrupt(checkpoints, tmp_path, samples_dir, caplog):
    settings = settings_for(checkpoints, tmp_path, GOOD_VOICES[:2], samples_dir)
    cache_dir = settings.engine.clone_cache_dir

    first, computed = await start_computing(settings)
    assert computed == 2
    cached = sorted(cache_dir.glob("*.pt"))
    assert len(cached) == 2

    second, computed = await start_computing(settings)  # a restart: same files, same checkpoint
    assert computed == 0, "the second start must not recompute any prompt"
    for name in ("Grandma", "Uncle Bob"):
        a, b = first.find(name).spec, second.find(name).spec
        assert torch.equal(a.speaker_embedding, b.speaker_embedding)
        assert torch.equal(a.ref_codes, b.ref_codes) and a.ref_text == b.ref_text

    cached[0].write_bytes(b"not a torch file")
    caplog.set_level(logging.WARNING)
    third, computed = await start_computing(settings)
    assert computed == 1, "only the corrupt entry is computed again"
    assert "unreadable" in caplog.text
    assert {"Grandma", "Uncle Bob"} <= set(third.names)

    write_sample(samples_dir / "grandma2.wav", "WAV", 24000, seconds=5.0)
    settings.voices.voices_file.write_text(yaml.safe_dump({"voices": [{**GOOD_VOICES[0], "audio": "grandma2.wav"}]}))
    _catalog, computed = await start_computing(settings)
    assert computed == 1, "a changed sample gets a new entry"
    assert len(list(cache_dir.glob("*.pt"))) == 3


def test_the_cache_key_follows_the_checkpoint_weights(checkpoints, tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(checkpoints["base"], copy)
    assert checkpoint_identity(copy) == checkpoint_identity(checkpoints["base"])
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(-100, 2)
        handle.write(b"\x01" * 50)
    assert checkpoint_identity(copy) != checkpoint_identity(checkpoints["base"])


async def test_each_kind_of_broken_entry_is_skipped_with_its_reason(checkpoints, tmp_path, samples_dir, caplog):
    write_sample(samples_dir / "silent.wav", "WAV", 16000, scale=0.0)
    write_sample(samples_dir / "clipped.wav", "WAV", 16000, scale=40.0)
    write_sample(samples_dir / "short.wav", "WAV", 16000, seconds=0.5)
    write_sample(samples_dir / "long.wav", "WAV", 8000, seconds=31.0)
    (samples_dir / "notaudio.wav").write_text("this is not audio")
    voices = [
        GOOD_VOICES[0],
        {"name": "Ghost", "audio": "missing.wav"},
        {"name": "Broken", "audio": "notaudio.wav"},
        {"name": "grandma", "audio": "uncle.flac"},
        {"name": "ryan", "audio": "uncle.flac"},
        {"name": "Quiet", "audio": "silent.wav"},
        {"name": "Loud", "audio": "clipped.wav"},
        {"name": "Brief", "audio": "short.wav"},
        {"name": "Endless", "audio": "long.wav"},
        {"name": "Klingon", "audio": "uncle.flac", "language": "klingon"},
        {"name": "Nameless"},
        "just a string",
    ]
    caplog.set_level(logging.INFO)
    requests = await prepare(settings_for(checkpoints, tmp_path, voices, samples_dir))
    requests.backend.close()
    catalog = requests.catalog
    clones = [v.name for v in catalog.voices if isinstance(v.spec, ClonePrompt)]
    assert clones == ["Grandma"]
    log = caplog.text
    for expected in [
        "'Ghost' skipped: the sample",
        "does not exist",
        "'Broken' skipped",
        "cannot read the audio",
        "'grandma' skipped: the name is already used by another clone voice",
        "'ryan' skipped: the name is already used by a preset speaker",
        "'Quiet' skipped",
        "silent",
        "'Loud' skipped",
        "clipped",
        "'Brief' skipped",
        "between 1 and 30 s",
        "'Endless' skipped",
        "'Klingon' skipped: unknown language 'klingon'",
        "needs a 'name' and an 'audio'",
        "expected a mapping",
        "A good sample is",
    ]:
        assert expected in log, expected


def test_a_sample_outside_3_to_15_seconds_is_accepted_with_a_warning(tmp_path, caplog):
    path = write_sample(tmp_path / "brief.wav", "WAV", 24000, seconds=2.0)
    audio = read_reference(path, "Voice 'Brief'")
    assert abs(audio.seconds - 2.0) < 0.01
    assert "best from 3-15 s" in caplog.text


def test_samples_are_mixed_down_and_resampled_to_24khz(tmp_path):
    path = write_sample(tmp_path / "stereo.ogg", "OGG", 48000, channels=2, seconds=4.0)
    audio = read_reference(path, "stereo")
    assert audio.source_rate == 48000 and audio.source_channels == 2
    assert audio.samples.ndim == 1 and abs(len(audio.samples) - 4 * 24000) <= 1
    with pytest.raises(ReferenceAudioError, match="cannot read"):
        read_reference(b"RIFF....garbage", "junk")


async def test_identical_speech_tokenizers_are_loaded_once(checkpoints, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(checkpoints["base"], base)
    shutil.rmtree(base / "speech_tokenizer")
    shutil.copytree(checkpoints["custom_voice"] / "speech_tokenizer", base / "speech_tokenizer")
    shared = SpeechEngine.load(
        EngineOptions(model=str(checkpoints["custom_voice"]), clone_model=str(base), data_dir=tmp_path)
    )
    separate = SpeechEngine.load(
        EngineOptions(model=str(checkpoints["custom_voice"]), clone_model=str(checkpoints["base"]), data_dir=tmp_path)
    )
    shared.close()
    separate.close()
    assert shared.runtimes["base"].decoder is shared.runtimes["custom_voice"].decoder
    assert shared.runtimes["base"].wrapper.model.speech_tokenizer is shared.runtimes["custom_voice"].wrapper.model.speech_tokenizer
    assert separate.runtimes["base"].decoder is not separate.runtimes["custom_voice"].decoder


def test_the_prompt_cache_keeps_the_most_recently_used_entries(tmp_path):
    import os
    import time as clock

    cache = ClonePromptCache(tmp_path, max_entries=3)
    prompt = ClonePrompt(speaker_embedding=torch.ones(4))
    for index, key in enumerate("abcd"):
        cache.store(key, prompt)
        os.utime(tmp_path / f"{key}.pt", (clock.time() - 100 + index, clock.time() - 100 + index))
        if key == "c":
            assert cache.load("a") is not None  # "a" is used again: "b" is now the oldest
    assert sorted(p.stem for p in tmp_path.glob("*.pt")) == ["a", "c", "d"]


async def test_a_clone_speaks_with_a_bfloat16_codec(checkpoints, tmp_path, samples_dir, monkeypatch):
    from dataclasses import replace

    from wyoming_qwen3tts.engine import loader
    from wyoming_qwen3tts.engine.options import LoadOptions

    monkeypatch.setattr(loader, "cpu_computes_bfloat16", lambda: True)  # the speed, not whether it runs, depends on it
    settings = settings_for(checkpoints, tmp_path, GOOD_VOICES[:1], samples_dir)
    settings = replace(settings, engine=replace(settings.engine, load=LoadOptions(device="cpu", codec_precision="bfloat16")))
    requests = await prepare(settings)
    engine = requests.backend
    server = ServerThread(settings, engine, requests.catalog)
    try:
        for role in ("custom_voice", "base"):
            decoder = engine.runtimes[role].wrapper.model.speech_tokenizer.model.decoder
            assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}, role
        async with server.client() as client:
            # Its first chunk decodes the reference sample's codes too, in the clone model's codec.
            await client.write_event(Synthesize(text="Dinner is ready.", voice=SynthesizeVoice(name="Grandma")).event())
            cycle = await read_until(client, "audio-stop")
    finally:
        server.stop()
        engine.close()
    assert is_one_audio_cycle(cycle.types) and len(cycle.audio) > 0
    assert loudest_sample(cycle.audio) > 100
