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
    "choose",
    "choose_with_noise",
    "filtered_probabilities",
]


class ExponentialNoise:
    """The random numbers one request's sampling consumes, drawn from its own generator.

    Sampling picks argmax(probs / noise) with noise ~ Exp(1) per candidate: exactly what
    `torch.multinomial` does for one sample. With ``stock_stream`` (a request with a seed) the
    draws are `exponential_`'s, the very numbers the stock path draws, so a seeded request
    repeats the stock codes. Without one, the same distribution comes from uniform draws through
    -log(1 - u), five times faster on a CPU: this is per-row work that batching cannot share.
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
        drawn = torch.empty_like(logits)
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
    """
    if noise is None:
        return torch.argmax(logits, dim=-1)
    probs = filtered_probabilities(logits, temperature, top_k, top_p)
    return torch.argmax(probs / noise, dim=-1)


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
