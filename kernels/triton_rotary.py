"""Triton neox-style (rotate-half) rotary embedding, in place on q and k (docs/CONTRACTS.md)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(ptr, stride_t, stride_h, token, cos, sin,
            NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    mask = heads[:, None] < NUM_HEADS
    first = ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(first, (a * cos[None, :] - b * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(first + HALF, (b * cos[None, :] + a * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_c, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr):
    token = tl.program_id(0)
    pos = tl.load(positions + token)
    dims = tl.arange(0, HALF)
    cos = tl.load(cache_ptr + pos * stride_c + dims)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + dims)
    _rotate(q_ptr, stride_qt, stride_qh, token, cos, sin, NUM_HEADS, HALF, BLOCK_H)
    _rotate(k_ptr, stride_kt, stride_kh, token, cos, sin, NUM_KV_HEADS, HALF, BLOCK_KH)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KH, D] in place (views of a fused qkv buffer are fine)."""
    num_tokens, num_heads, head_dim = q.shape
    half = cos_sin_cache.shape[-1] // 2
    assert cos_sin_cache.shape[-1] == head_dim and half & (half - 1) == 0, cos_sin_cache.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1], HALF=half,
            BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_KH=triton.next_power_of_2(k.shape[1]), num_warps=4)
    return q, k
