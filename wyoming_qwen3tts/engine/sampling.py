"""Choosing the next code from logits, as the stock `generate` call chooses it.

The official package samples through Hugging Face `generate`; these functions apply the same
processors in the same order (repetition penalty, minimum length, suppressed ids, temperature,
top-k, top-p), so that greedy decoding picks the very same codes and seeded sampling draws the
same random numbers.
"""

from __future__ import annotations

import torch

from ..speech import SamplingOptions

__all__ = [
    "ExponentialNoise",
    "SamplingOptions",
    "apply_repetition_penalty",
    "candidate_probabilities",
    "choose",
    "choose_with_noise",
    "filtered_probabilities",
    "noise_width",
]


def noise_width(vocab: int, top_k: int, stock_stream: bool) -> int:
    """How many random numbers one sampled choice among ``vocab`` ids consumes.

    The stock stream draws one per id, as `torch.multinomial` does. Otherwise only the top-k
    candidates are drawn for, since no other id can win: with the checkpoints' top-k of 50 out
    of 2048 codes, 40 times fewer numbers, and every operation after the top-k works on 50
    candidates instead of the vocabulary. Each row pays this, alone or in a batch.
    """
    if stock_stream or not top_k:
        return vocab
    return min(top_k, vocab)


class ExponentialNoise:
    """The random numbers one request's sampling consumes, drawn from its own generator.

    Sampling picks argmax(probs / noise) with noise ~ Exp(1) per candidate: exactly what
    `torch.multinomial` does for one sample. With ``stock_stream`` (a request with a seed) the
    draws are `exponential_`'s, the very numbers the stock path draws, so a seeded request
    repeats the stock codes. Without one, the same distribution comes from uniform draws through
    -log(1 - u), five times faster on a CPU, and only for the top-k candidates (`noise_width`):
    this is per-row work that batching cannot share.
    """

    def __init__(self, generator: torch.Generator, stock_stream: bool) -> None:
        self.generator = generator
        self.stock_stream = stock_stream

    def fill(self, buffer: torch.Tensor) -> torch.Tensor:
        """Fill ``buffer`` with Exp(1) draws, in place; returns it."""
        if self.stock_stream:
            return buffer.exponential_(generator=self.generator)
        # Never exactly 0: a zero would turn a suppressed candidate's 0 / 0 into NaN, which argmax picks.
        return buffer.uniform_(generator=self.generator).neg_().log1p_().neg_().clamp_min_(torch.finfo(buffer.dtype).tiny)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty over the ids marked in ``seen`` (a bool mask)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def choose(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    noise: list[ExponentialNoise | None],
) -> torch.Tensor:
    """Pick one id per row of ``logits`` (float32, already penalised and masked); row i draws from ``noise[i]``."""
    drawn = None
    if do_sample:
        # One width for the batch: a seeded row among them makes every row draw for each id.
        width = max(noise_width(logits.shape[-1], top_k, source.stock_stream) for source in noise)
        drawn = logits.new_empty((logits.shape[0], width))
        for row, source in zip(drawn, noise):
            source.fill(row)
    return choose_with_noise(logits, drawn, temperature, top_k, top_p)


def choose_with_noise(
    logits: torch.Tensor, noise: torch.Tensor | None, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """`choose` with the random numbers drawn beforehand: greedy when ``noise`` is None.

    ``noise`` holds the exponential draws that `torch.multinomial` makes for one sample (it picks
    the argmax of probs / noise), so seeded runs pick the stock codes. Drawing a whole frame's
    noise in one call yields the same numbers from a CPU generator as one draw per step, and a
    compiled or captured frame loop needs no generator inside.

    ``noise`` narrower than the vocabulary holds draws for the top-k candidates only
    (`noise_width`): the choice is then made among them, from the same distribution.
    """
    if noise is None:
        return torch.argmax(logits, dim=-1)
    if noise.shape[-1] < logits.shape[-1]:
        values, ids = torch.topk(logits, noise.shape[-1])
        probs = candidate_probabilities(values, temperature, top_p)
        return ids.gather(-1, torch.argmax(probs / noise, dim=-1, keepdim=True)).squeeze(-1)
    probs = filtered_probabilities(logits, temperature, top_k, top_p)
    return torch.argmax(probs / noise, dim=-1)


def candidate_probabilities(values: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """`filtered_probabilities` of the top-k candidates alone, from their logits in descending order.

    The other ids' probabilities are 0 there, so this is the same distribution (but for a tie at
    the k-th logit, which Hugging Face keeps and this drops).
    """
    if temperature != 1.0:
        values = values / temperature
    if top_p < 1.0:
        # Hugging Face sums the probabilities from the least likely up; the most likely always stays.
        cumulative = values.softmax(dim=-1).flip(-1).cumsum(dim=-1).flip(-1)
        remove = cumulative <= (1 - top_p)
        remove[..., :1] = False
        values = values.masked_fill(remove, -float("inf"))
    return torch.softmax(values, dim=-1)


def filtered_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Hugging Face's temperature, top-k and top-p warpers, then softmax."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, -float("inf"))
    return torch.softmax(logits, dim=-1)
