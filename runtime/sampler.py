"""Sampler: float32 logits [N, vocab] -> one token per row, with vLLM's semantics.

Order: penalties (repetition on prompt + output tokens, presence/frequency on output tokens),
then greedy rows take the exact argmax; the others apply temperature, top_k, top_p, min_p and draw
with the exponential-race trick (argmax(p / q), q ~ Exp(1)), which lets a seeded row draw its noise
from its own torch.Generator while the rest of the batch shares one draw. Logprobs are those of the
raw model distribution (log_softmax of the unprocessed logits), as vLLM returns by default.

`sample` only queues device work and starts the copy of the results to the host; `resolve` waits
for them. In between the host is free to prepare the next step (async scheduling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedeploy.kernels import argmax

from .outputs import TokenLogprob
from .sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class SampledTokens:
    """One step's sampled tokens while they may still be on the device.

    `token_ids` stays on the device so the next step can read its input ids from it without a
    host round trip; `row_of` maps a sequence id to its row. The host copies arrive on their own.
    """
    seqs: list[Sequence]
    token_ids: torch.Tensor                    # int64 [N], on the logits' device
    row_of: dict[int, int]
    _host: list[torch.Tensor]                  # token ids, then chosen/top logprobs if asked
    _ready: torch.cuda.Event | None

    def resolve(self) -> SamplerOutput:
        if self._ready is not None:
            self._ready.synchronize()
        chosen = self._host[0].tolist()
        if len(self._host) == 1:
            return SamplerOutput(chosen, [None] * len(chosen))
        chosen_lp, top_vals, top_ids = (t.tolist() for t in self._host[1:])
        logprobs: list[TokenLogprob | None] = []
        for i, seq in enumerate(self.seqs):
            k = seq.params.logprobs
            top = list(zip(top_ids[i][:k], top_vals[i][:k])) if k else []
            logprobs.append(None if k is None else TokenLogprob(chosen[i], chosen_lp[i], top))
        return SamplerOutput(chosen, logprobs)


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.sample(logits, seqs).resolve()

    @staticmethod
    def argmax_only(seqs: list[Sequence]) -> bool:
        """Greedy rows without penalties or logprobs need nothing but the argmax, which is the same
        in the model's dtype as in float32 (the runner may then skip the float32 copy of the logits)."""
        return all(s.params.greedy and not s.params.has_penalties and s.params.logprobs is None
                   for s in seqs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), "one logits row per sequence"
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        if self.argmax_only(seqs):
            token_ids = argmax(logits)
        else:
            logits = logits.float()
            logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
            token_ids = _sample(_apply_penalties(logits, seqs), seqs)
        results = [token_ids] + (_logprob_tensors(logprobs, token_ids, seqs) if want_logprobs else [])
        host, ready = _copy_to_host(results)
        return SampledTokens(seqs, token_ids, {s.seq_id: i for i, s in enumerate(seqs)}, host, ready)


def _copy_to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Start non-blocking copies into pinned memory; the event marks their arrival."""
    if not tensors[0].is_cuda:
        return tensors, None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    greedy = torch.tensor([s.params.greedy for s in seqs])
    out = argmax(logits)
    if bool(greedy.all()):
        return out
    rows = (~greedy).nonzero().flatten()
    random_seqs = [seqs[i] for i in rows.tolist()]
    rows = rows.to(logits.device)
    probs = _processed_probs(logits[rows], random_seqs)
    out[rows] = _race(probs, random_seqs)
    return out


def _processed_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=logits.device)
    logits = logits / temps.unsqueeze(1)
    if any(s.params.top_k_enabled or s.params.top_p < 1.0 for s in seqs):
        logits = _top_k_top_p(logits, seqs)
    probs = logits.softmax(dim=-1)
    if any(s.params.min_p > 0 for s in seqs):
        min_p = torch.tensor([s.params.min_p for s in seqs], dtype=torch.float32, device=logits.device)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _top_k_top_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    vocab = logits.shape[1]
    device = logits.device
    top_k = torch.tensor([s.params.top_k if s.params.top_k_enabled else vocab for s in seqs], device=device)
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
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
    """argmax(p / q) with q ~ Exp(1) draws from p; seeded rows use their own generator. Their
    noise is drawn on the host (the generators are CPU ones), so a seed gives the same draw on
    every device."""
    q = torch.empty_like(probs).exponential_()
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            q[i] = torch.empty(probs.shape[1]).exponential_(generator=seq.generator)
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
    device = row.device
    output = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
    counts = (torch.bincount(output, minlength=vocab)[:vocab].float() if len(output)
              else torch.zeros(vocab, device=device))
    if p.repetition_penalty != 1.0:
        seen = counts > 0
        prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.long, device=device)
        seen[prompt[prompt < vocab]] = True
        penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row = torch.where(seen, penalized, row)
    row = row - p.frequency_penalty * counts
    row = row - p.presence_penalty * (counts > 0).float()
    return row


def _logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor,
                     seqs: list[Sequence]) -> list[torch.Tensor]:
    """[chosen token's logprob [N], top-k values [N, k], top-k ids [N, k]] for k = the largest asked."""
    k_max = max(s.params.logprobs or 0 for s in seqs)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_vals, top_ids = logprobs.topk(k_max, dim=-1)
    return [chosen, top_vals, top_ids]
