"""Row-wise argmax of logits, for greedy sampling at small batches: torch's reduction takes one
block per row (26 us for one 128,256-wide row on the H100, 0.4% of a Llama-3-8B batch-1 step;
docs/PERF.md run 12). Here each row is cut into chunks, one program a chunk, and the last program of
a row to finish (an arrival counter) picks the winner: the largest value, the first index among
equals, as torch.argmax does (rows are assumed free of NaN). With many rows there are no chunks to
spread and a program walks a whole row: slower than torch, so kernels.argmax keeps torch there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_launch import arrival_counters, num_sms, pdl_launch, pdl_supported, wait_previous

_BLOCK = 2048


@triton.jit
def _argmax_kernel(x_ptr, val_ws, idx_ws, counters, out_ptr, V, stride_x, chunk,
                   SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_previous(PDL)
    row, part = tl.program_id(0), tl.program_id(1)
    start = part * chunk
    end = tl.minimum(start + chunk, V)
    cols = tl.arange(0, BLOCK)
    best_val = tl.full([], float("-inf"), tl.float32)
    best_idx = start
    for b in range(start, end, BLOCK):
        v = tl.load(x_ptr + row.to(tl.int64) * stride_x + b + cols, mask=b + cols < end,
                    other=float("-inf")).to(tl.float32)
        m = tl.max(v, 0)
        better = m > best_val   # strict: an earlier block keeps a tie
        best_idx = tl.where(better, b + tl.argmax(v, 0), best_idx)
        best_val = tl.maximum(best_val, m)
    tl.store(val_ws + row * SPLITS + part, best_val)
    tl.store(idx_ws + row * SPLITS + part, best_idx)
    tl.debug_barrier()   # the candidate is written before the release below
    if tl.atomic_add(counters + row, 1) == SPLITS - 1:   # acq_rel, gpu scope
        parts = tl.arange(0, SPLITS)
        vals = tl.load(val_ws + row * SPLITS + parts, cache_modifier=".cg")
        idxs = tl.load(idx_ws + row * SPLITS + parts, cache_modifier=".cg")
        top = tl.max(vals, 0)
        tl.store(out_ptr + row, tl.min(tl.where(vals == top, idxs, V), 0).to(tl.int64))
        tl.atomic_xchg(counters + row, 0)   # re-armed for the next launch (graph replays)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the index of each row's largest value (first among equals) of logits [B, V]."""
    logits = logits.contiguous()
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    splits = 1
    sms = num_sms(logits.device, interpreter=4)
    while B * splits < 2 * sms and splits < 64 and splits * _BLOCK < V:   # ~2 programs per SM
        splits *= 2
    chunk = triton.cdiv(triton.cdiv(V, splits), _BLOCK) * _BLOCK
    counters = arrival_counters(logits.device, B)
    vals = torch.empty(B * splits, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(B * splits, dtype=torch.int32, device=logits.device)
    pdl = pdl_supported(logits.device)
    _argmax_kernel[(B, splits)](logits, vals, idxs, counters, out, V, logits.stride(0), chunk,
                                SPLITS=splits, BLOCK=_BLOCK, PDL=pdl, num_warps=4,
                                **(pdl_launch(logits.device) if pdl else {}))
    return out
