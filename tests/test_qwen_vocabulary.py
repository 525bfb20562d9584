"""Real-size checkpoints can carry Qwen's own vocabulary, so their prompts are as long as the real ones."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import pytest

from wyoming_qwen3tts.dev.qwen_vocabulary import DEFAULT_LOCATION, read_ranks
from wyoming_qwen3tts.dev.text_tokenizer import QWEN_SPECIAL_IDS, bpe_from_ranks
from wyoming_qwen3tts.dev.tiny_checkpoint import build_checkpoint
from wyoming_qwen3tts.engine.qwen_import import import_qwen_tts

REPO = Path(__file__).resolve().parent.parent
BENCHMARK_SENTENCE = (
    "Good evening, the living room lights are dimmed, the front door is locked and the "
    "heating will keep the house at twenty one degrees until tomorrow morning."
)
# What tiktoken itself gives for that sentence with Qwen's ranks and split pattern (tiktoken
# 0.14.0, run once by hand: it is not a dependency of ours).
TIKTOKEN_IDS = [15216, 11458, 11, 279, 5382, 3054, 12711, 525, 5103, 2061, 11, 279, 4065, 6006, 374, 16061,
                323, 279, 23579, 686, 2506, 279, 3753, 518, 17073, 825, 12348, 3080, 16577, 6556, 13]


def rank_order_bpe(word: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's rule, written plainly: join the adjacent pair whose joined bytes rank lowest."""
    parts = [bytes([b]) for b in word]
    while True:
        candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks]
        if not candidates:
            return [ranks[p] for p in parts]
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def test_a_bpe_rebuilt_from_ranks_splits_words_as_tiktoken_s_rule_does():
    """Random ranks over a four-letter alphabet: many tokens have several splits into ranked halves."""
    rng = random.Random(7)
    ranks = {bytes([b]): b for b in range(256)}
    tokens = [bytes([b]) for b in b"abcd"]
    while len(ranks) < 256 + 300:
        joined = rng.choice(tokens) + rng.choice(tokens)
        if len(joined) <= 8 and joined not in ranks:
            ranks[joined] = len(ranks)
            tokens.append(joined)
    tokenizer = bpe_from_ranks(ranks)
    for _ in range(400):
        word = bytes(rng.choice(b"abcd") for _ in range(rng.randint(1, 16)))
        assert tokenizer.encode(word.decode()).ids == rank_order_bpe(word, ranks), word


def test_ranks_file_errors_name_the_line(tmp_path):
    ranks = tmp_path / "broken.tiktoken"
    ranks.write_bytes(base64.b64encode(b"a") + b" 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="broken.tiktoken:2"):
        read_ranks(ranks)


@pytest.fixture(scope="module")
def qwen_ranks_file() -> Path:
    path = Path(os.environ.get("QWEN_VOCABULARY", REPO / DEFAULT_LOCATION))
    if not path.is_file():
        message = f"{path} is missing: python -m wyoming_qwen3tts.dev.qwen_vocabulary fetches it"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI fetches it (.ci/run): a skip there would hide the test
        pytest.skip(message)
    return path


def test_a_checkpoint_with_qwen_s_vocabulary_tokenizes_as_the_published_model(qwen_ranks_file, tmp_path):
    folder = build_checkpoint(tmp_path / "qwen-vocab", size="tiny", text_vocabulary=qwen_ranks_file)
    config = json.loads((folder / "config.json").read_text())
    # The ids the published config.json names.
    assert config["assistant_token_id"] == 77091
    assert config["im_start_token_id"] == QWEN_SPECIAL_IDS["<|im_start|>"] == 151644
    assert (config["tts_pad_token_id"], config["tts_bos_token_id"], config["tts_eos_token_id"]) == (151671, 151672, 151673)

    import_qwen_tts()
    from qwen_tts import Qwen3TTSModel

    model = Qwen3TTSModel.from_pretrained(str(folder), device_map="cpu")
    tokenizer = model.processor.tokenizer
    assert len(tokenizer) == 151676
    assert tokenizer(BENCHMARK_SENTENCE)["input_ids"] == TIKTOKEN_IDS
    assert tokenizer.decode(TIKTOKEN_IDS) == BENCHMARK_SENTENCE
