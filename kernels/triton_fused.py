"""Fused Triton kernels of the decoder layer's small steps (docs/CONTRACTS.md).

- `qk_norm_rope_store`: reads the qkv projection's output in place and does, in one launch, what
  the unfused path does in up to six (two reshape copies, q/k RMSNorm, rotary, store_kv).
- `silu_and_mul`: the MLP's `silu(gate) * up` in one launch instead of two.

Both round to the model dtype at the same points as the unfused kernels (triton_norm.py,
triton_rotary.py) and HF do, so results differ from the torch references only by the order of
fp32 sums and by fused multiply-adds, i.e. by an occasional last-bit flip after rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_launch
from .triton_launch import pdl_launch, pdl_supported, wait_previous


@triton.jit
def _norm_rope(src, w_ptr, cos, sin, eps, heads, dims, mask,
               HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rotated halves [heads, dims] of the heads at `src` (HEAD_DIM apart), optionally after a
    per-head RMSNorm; returned in the model dtype."""
    first = src + heads[:, None] * HEAD_DIM + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    if HAS_NORM:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / HEAD_DIM + eps)
        dim_mask = dims < HALF
        w1 = tl.load(w_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + dims, mask=dim_mask, other=0.0).to(tl.float32)
        # As triton_norm.py and HF: normalize in fp32, round to the model dtype, scale, round.
        x1 = ((a * rstd[:, None]).to(x1.dtype).to(tl.float32) * w1[None, :]).to(x1.dtype)
        x2 = ((b * rstd[:, None]).to(x2.dtype).to(tl.float32) * w2[None, :]).to(x2.dtype)
    # As triton_rotary.py: rotate the (normed, rounded) halves in fp32, round once.
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    out1 = (a * cos[None, :] - b * sin[None, :]).to(x1.dtype)
    out2 = (b * cos[None, :] + a * sin[None, :]).to(x1.dtype)
    return out1, out2


@triton.jit
def _qk_norm_rope_store_kernel(
        qkv_ptr, q_w_ptr, k_w_ptr, positions, cache_ptr, q_out_ptr, k_cache, v_cache,
        slot_mapping, eps, stride_qkv, stride_c, stride_cb, stride_cs, stride_ch,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
        HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr, PDL: tl.constexpr,
        EARLY: tl.constexpr = False):
    wait_previous(PDL, EARLY)   # qkv comes from the projection just before
    token = tl.program_id(0).to(tl.int64)
    row = qkv_ptr + token * stride_qkv          # [q heads | k heads | v heads] of this token
    dims = tl.arange(0, BLOCK_HALF)
    pos = tl.load(positions + token)
    cos = tl.load(cache_ptr + pos * stride_c + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + dims, mask=dims < HALF, other=0.0)

    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HALF)
    q1, q2 = _norm_rope(row, q_w_ptr, cos, sin, eps, heads, dims, mask,
                        HEAD_DIM, HALF, HAS_Q_NORM)
    q_dst = q_out_ptr + token * (NUM_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + dims[None, :]
    tl.store(q_dst, q1, mask=mask)
    tl.store(q_dst + HALF, q2, mask=mask)

    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot >= 0:  # slot < 0: a padding token (e.g. a CUDA-graph batch filler), nothing to store
        # New names: a variable reassigned inside a Triton `if` must keep its type (shape).
        kv_heads = tl.arange(0, BLOCK_KH)
        kv_mask = (kv_heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HALF)
        k1, k2 = _norm_rope(row + NUM_HEADS * HEAD_DIM, k_w_ptr, cos, sin, eps, kv_heads, dims,
                            kv_mask, HEAD_DIM, HALF, HAS_K_NORM)
        dst = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
               + kv_heads[:, None] * stride_ch + dims[None, :])
        tl.store(k_cache + dst, k1.to(k_cache.dtype.element_ty), mask=kv_mask)
        tl.store(k_cache + dst + HALF, k2.to(k_cache.dtype.element_ty), mask=kv_mask)
        v_src = (row + (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM
                 + kv_heads[:, None] * HEAD_DIM + dims[None, :])
        v1 = tl.load(v_src, mask=kv_mask)
        v2 = tl.load(v_src + HALF, mask=kv_mask)
        tl.store(v_cache + dst, v1.to(v_cache.dtype.element_ty), mask=kv_mask)
        tl.store(v_cache + dst + HALF, v2.to(v_cache.dtype.element_ty), mask=kv_mask)


def qk_norm_rope_store(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None,
                       k_norm_weight: torch.Tensor | None, eps: float, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                       head_dim: int, early_launch: bool = False) -> torch.Tensor:
    """q [T, H, D] (new, contiguous) from qkv [T, (H + 2 KH) D] (any row stride): optional
    per-head RMSNorm of q and k, rotary, and k, v stored into the caches at slot_mapping.
    early_launch: under PDL, let attention launch before this waits (if triton_launch.EARLY_ROPE)."""
    num_tokens, width = qkv.shape
    half = head_dim // 2
    assert width == (num_heads + 2 * num_kv_heads) * head_dim and head_dim == 2 * half, qkv.shape
    assert qkv.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    assert cos_sin_cache.shape[-1] == head_dim, cos_sin_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), k_cache.shape
    for w in (q_norm_weight, k_norm_weight):
        # The kernel rounds to qkv's dtype: the unfused path rounds to promote(qkv, weight).
        assert w is None or (w.dtype == qkv.dtype and w.is_contiguous()), "norm weight dtype"
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    block_h, block_half = triton.next_power_of_2(num_heads), triton.next_power_of_2(half)
    pdl = pdl_supported(qkv.device)
    _qk_norm_rope_store_kernel[(num_tokens,)](
        qkv, q_norm_weight if q_norm_weight is not None else qkv,
        k_norm_weight if k_norm_weight is not None else qkv,
        positions, cos_sin_cache, q, k_cache, v_cache, slot_mapping, eps,
        qkv.stride(0), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_H=block_h,
        BLOCK_KH=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=block_half,
        HAS_Q_NORM=q_norm_weight is not None, HAS_K_NORM=k_norm_weight is not None, PDL=pdl,
        EARLY=early_launch and triton_launch.EARLY_ROPE,
        num_warps=min(8, max(1, block_h * block_half // 256)),
        **(pdl_launch(qkv.device) if pdl else {}))
    return q


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # As torch: silu in fp32 rounded to the model dtype, then the product rounded again.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * INTER + cols, out.to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x [..., 2 I] = cat(gate, up) -> [..., I] (rows of any stride)."""
    inter = x.shape[-1] // 2
    assert x.shape[-1] == 2 * inter, x.shape
    x2 = x.reshape(-1, x.shape[-1])
    assert x2.stride(-1) == 1
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] and inter:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), INTER=inter, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], inter)
