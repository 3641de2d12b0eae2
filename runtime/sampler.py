"""Sampler: float32 logits [N, vocab] -> one token per row, with vLLM's semantics.

Order: penalties (repetition on prompt + output tokens, presence/frequency on output tokens),
then greedy rows take the exact argmax; the others apply temperature, top_k, top_p, min_p and draw
with the exponential-race trick (argmax(p / q), q ~ Exp(1)), which lets a seeded row draw its noise
from its own torch.Generator while the rest of the batch shares one draw. Logprobs are those of the
raw model distribution (log_softmax of the unprocessed logits), as vLLM returns by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .outputs import TokenLogprob
from .sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), "one logits row per sequence"
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        logits = _apply_penalties(logits, seqs)
        token_ids = _sample(logits, seqs)
        chosen = token_ids.tolist()
        return SamplerOutput(chosen, _gather_logprobs(logprobs, seqs, chosen))


def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    greedy = torch.tensor([s.params.greedy for s in seqs])
    out = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return out
    rows = (~greedy).nonzero().flatten()
    random_seqs = [seqs[i] for i in rows.tolist()]
    probs = _processed_probs(logits[rows], random_seqs)
    out[rows] = _race(probs, random_seqs)
    return out


def _processed_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32)
    logits = logits / temps.unsqueeze(1)
    if any(s.params.top_k_enabled or s.params.top_p < 1.0 for s in seqs):
        logits = _top_k_top_p(logits, seqs)
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([s.params.min_p for s in seqs], dtype=torch.float32)
    if bool((min_p > 0).any()):
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _top_k_top_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    vocab = logits.shape[1]
    top_k = torch.tensor([s.params.top_k if s.params.top_k_enabled else vocab for s in seqs])
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab).unsqueeze(0)
    drop = ranks >= top_k.clamp(max=vocab).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the best token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _race(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """argmax(p / q) with q ~ Exp(1) draws from p; seeded rows use their own generator."""
    q = torch.empty_like(probs).exponential_()
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            q[i].exponential_(generator=seq.generator)
    return (probs / q).argmax(dim=-1)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    for i in rows:                      # few rows ask for penalties; each is vectorized over vocab
        logits[i] = _penalize_row(logits[i], seqs[i], vocab)
    return logits


def _penalize_row(row: torch.Tensor, seq: Sequence, vocab: int) -> torch.Tensor:
    p = seq.params
    output = torch.tensor(seq.output_token_ids, dtype=torch.long)
    counts = torch.bincount(output, minlength=vocab)[:vocab].float() if len(output) else torch.zeros(vocab)
    if p.repetition_penalty != 1.0:
        seen = counts > 0
        prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.long)
        seen[prompt[prompt < vocab]] = True
        penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row = torch.where(seen, penalized, row)
    row = row - p.frequency_penalty * counts
    row = row - p.presence_penalty * (counts > 0).float()
    return row


def _gather_logprobs(logprobs: torch.Tensor | None, seqs: list[Sequence],
                     chosen: list[int]) -> list[TokenLogprob | None]:
    if logprobs is None:
        return [None] * len(seqs)
    k_max = max(s.params.logprobs or 0 for s in seqs)
    top_vals, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
    out: list[TokenLogprob | None] = []
    for i, seq in enumerate(seqs):
        k = seq.params.logprobs
        if k is None:
            out.append(None)
            continue
        top = list(zip(top_ids[i, :k].tolist(), top_vals[i, :k].tolist())) if k else []
        out.append(TokenLogprob(chosen[i], float(logprobs[i, chosen[i]]), top))
    return out
