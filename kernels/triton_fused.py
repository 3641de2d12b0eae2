"""Fused Triton kernels of the decoder layer's small steps (docs/CONTRACTS.md).

- `qk_norm_rope_store`: reads the qkv projection's output in place and does, in one launch, what
  the unfused path does in up to six (two reshape copies, q/k RMSNorm, rotary, store_kv).
- `silu_and_mul`: the MLP's `silu(gate) * up` in one launch instead of two.
- `RopeStore` and the jit helpers after it: the same rotary and store as the epilogue of a batch-1
  qkv GEMV (quant/int4_gemv.py), which then needs no launch after it before attention.

Both round to the model dtype at the same points as the unfused kernels (triton_norm.py,
triton_rotary.py) and HF do, so results differ from the torch references only by the order of
fp32 sums and by fused multiply-adds, i.e. by an occasional last-bit flip after rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class RopeStore:
    """Where a batch-1 qkv projection that rotates and stores in its epilogue puts its output:
    q [1, H, D] into `q`, k and v into the caches at slot_mapping[0] (nothing when it is < 0),
    rotated at positions[0]; qk_norm_rope_store's results for a model without q/k norms."""
    q: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def rows(self) -> int:
        """The qkv projection's output rows: (H + 2 KH) D."""
        return (self.q.shape[1] + 2 * self.k_cache.shape[2]) * self.head_dim

    def fits(self, block_n: int) -> bool:
        """Whether tiles of block_n rows can rotate in their epilogue: each a whole part of a head."""
        d = self.head_dim
        return d % block_n == 0 and block_n % 2 == 0 and self.cos_sin_cache.shape[-1] == d

    def args(self) -> tuple:
        """The kernel arguments rope_state takes, in order."""
        heads, kv_heads, d = self.q.shape[1], self.k_cache.shape[2], self.head_dim
        kc = self.k_cache
        assert self.q.is_contiguous() and kc.stride() == self.v_cache.stride() and kc.stride(-1) == 1
        assert kc.shape[2:] == (kv_heads, d) and self.cos_sin_cache.stride(-1) == 1
        return (self.q, self.positions, self.cos_sin_cache, kc, self.v_cache, self.slot_mapping,
                self.cos_sin_cache.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
                heads * d, kv_heads * d, kc.shape[1])

    @staticmethod
    def unused(y: torch.Tensor) -> tuple:
        """Placeholder arguments for a launch that does not rotate (its kernel never reads them)."""
        return (y, y, y, y, y, y, 0, 0, 0, 0, 0, 0, 1)


@triton.jit
def rope_tile_rows(pid_n, BLOCK_N: tl.constexpr, ROPE_DIM: tl.constexpr):
    """The output rows of tile pid_n. ROPE_DIM 0: BLOCK_N rows in order. ROPE_DIM (the head dim, a
    multiple of BLOCK_N): BLOCK_N / 2 dims of one head's first half and their partners ROPE_DIM / 2
    on, so that the two halves of each rotated pair are in one program."""
    i = tl.arange(0, BLOCK_N)
    if ROPE_DIM == 0:
        rows = pid_n * BLOCK_N + i
    else:
        HALF_N: tl.constexpr = BLOCK_N // 2
        TILES: tl.constexpr = ROPE_DIM // BLOCK_N   # tiles a head
        rows = ((pid_n // TILES) * ROPE_DIM + (i // HALF_N) * (ROPE_DIM // 2)
                + (pid_n % TILES) * HALF_N + i % HALF_N)
    return rows


@triton.jit
def rope_state(rows, rq_ptr, rpos_ptr, rcs_ptr, rkc_ptr, rvc_ptr, rslot_ptr, r_stride_c, r_stride_cb,
               r_stride_cs, r_stride_ch, r_q_rows, r_kv_rows, r_block_size, ROPE_DIM: tl.constexpr):
    """rope_store_tile's `rope` from a kernel's RopeStore.args, with cos of the rows of a head's
    first half and sin of the second's loaded now: cos_sin_cache's row holds cat(cos, sin) over the
    half dims, so a row's dim within its head indexes it. Positions are a CUDA graph's inputs,
    copied before it runs: safe to read before wait_previous."""
    cs = 0.0
    if ROPE_DIM:
        cs = tl.load(rcs_ptr + tl.load(rpos_ptr) * r_stride_c + rows % ROPE_DIM)
    return (rq_ptr, rkc_ptr, rvc_ptr, rslot_ptr, r_stride_cb, r_stride_cs, r_stride_ch, r_q_rows, r_kv_rows,
            r_block_size, cs)


@triton.jit
def _halves(v, BLOCK_N: tl.constexpr):
    """(v[:BLOCK_N // 2], v[BLOCK_N // 2:]) of a [BLOCK_N] vector."""
    return tl.split(tl.permute(tl.reshape(v, [2, BLOCK_N // 2]), [1, 0]))


@triton.jit
def _store_halves(ptr, base, rows_a, rows_b, out_a, out_b, stride_h, ROPE_DIM: tl.constexpr):
    """Rows of one cache's section (numbered from its first) at a slot's base: head, then dim (out_a
    and out_b in the model dtype, converted to the cache's as store_kv does)."""
    tl.store(ptr + base + (rows_a // ROPE_DIM) * stride_h + rows_a % ROPE_DIM, out_a.to(ptr.dtype.element_ty))
    tl.store(ptr + base + (rows_b // ROPE_DIM) * stride_h + rows_b % ROPE_DIM, out_b.to(ptr.dtype.element_ty))


@triton.jit
def rope_store_tile(y, rows, pid_n, b_ptr, rope, HAS_BIAS: tl.constexpr, ROPE_DIM: tl.constexpr):
    """A GEMV tile's fp32 sums y [1, BLOCK_N] of rows `rope_tile_rows` (rope: their rope_state) as
    qk_norm_rope_store writes them: bias added, rounded to the model dtype, q and k rotated in fp32
    and rounded again, q into q_ptr [H * D], k and v into their caches at the token's slot."""
    BLOCK_N: tl.constexpr = y.shape[1]
    q_ptr, kc_ptr, vc_ptr, slot_ptr, stride_cb, stride_cs, stride_ch, q_rows, kv_rows, block_size, cs = rope
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)[None, :]
    dt: tl.constexpr = q_ptr.dtype.element_ty
    a, b = _halves(tl.reshape(y, [BLOCK_N]).to(dt).to(tl.float32), BLOCK_N)
    cos, sin = _halves(cs.to(tl.float32), BLOCK_N)
    rows_a, rows_b = _halves(rows, BLOCK_N)
    first = (pid_n // (ROPE_DIM // BLOCK_N)) * ROPE_DIM   # the tile's head's first row
    rotated = first < q_rows + kv_rows   # q or k (v is stored as it is)
    if rotated:
        out_a = (a * cos - b * sin).to(dt)
        out_b = (b * cos + a * sin).to(dt)
    else:
        out_a = a.to(dt)
        out_b = b.to(dt)
    if first < q_rows:
        tl.store(q_ptr + rows_a, out_a)
        tl.store(q_ptr + rows_b, out_b)
    else:
        slot = tl.load(slot_ptr).to(tl.int64)
        if slot >= 0:   # < 0: a padding token, nothing to store
            base = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
            if rotated:   # k
                _store_halves(kc_ptr, base, rows_a - q_rows, rows_b - q_rows, out_a, out_b, stride_ch,
                              ROPE_DIM)
            else:
                v0 = q_rows + kv_rows
                _store_halves(vc_ptr, base, rows_a - v0, rows_b - v0, out_a, out_b, stride_ch, ROPE_DIM)


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
