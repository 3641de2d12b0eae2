"""x for the batch-1 int4 kernels: the residual added, RMSNorm applied (rounded as `rms_norm`
rounds, so x holds what the unfused path feeds the linear) and x packed into the fp16 pairs the
kernels multiply codes with, with the sums they need.

Two forms: int4_gemv.py's (four int32 planes of pairs and each word's sum of x) and, with mma,
int4_mma.py's (the pairs as two int64 planes, an MMA's B operand each, and two constants per group).
bf16 to fp16 is exact for |x| < 65504, which decoder activations stay well under.

`pack_words` and `row_rstd` do the work. `pack_x` runs them in a small launch before the GEMV (the
packed-fp16 GEMV's way: packing inside its loop cost more than the launch, docs/PERF.md run 14);
the tensor-core GEMV runs them itself by default, each program its split's words before its loop
(int4_mma.py's PACK: run 21).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedeploy.kernels.triton_gemv import _rstd, _x_tile
from pagedeploy.kernels.triton_launch import pdl_launch, pdl_supported, wait_previous

# pack_x lets the GEMV after it launch before its own wait (wait_previous's EARLY), so the GEMV's
# first weights load while pack_x waits and runs: 2.4% faster batch-1 int4 decode (docs/PERF.md, run 18).
EARLY_LAUNCH = True


@triton.jit
def _pair(lo, hi, F16X2: tl.constexpr):
    """int32 holding fp16(hi) << 16 | fp16(lo), from fp32 values."""
    if F16X2:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi],
                                         dtype=tl.int32, is_pure=True, pack=1)
    lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo16 | (hi16 << 16)


@triton.jit
def _pack_x_kernel(x_ptr, r_ptr, nw_ptr, r_out_ptr, xp_ptr, xw_ptr, K, eps,
                   NORM: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr,
                   RSTD_BLOCK: tl.constexpr, F16X2: tl.constexpr, PDL: tl.constexpr,
                   ODD_OVER_16: tl.constexpr = False, MMA: tl.constexpr = False,
                   EARLY: tl.constexpr = False):
    """Grid (words / BLOCK_C): BLOCK_C words of x each (pack_words). EARLY: the GEMV after may
    launch at once and ask for its first weights while this waits."""
    wait_previous(PDL, EARLY)
    rstd = row_rstd(x_ptr, r_ptr, r_out_ptr, K, eps, tl.program_id(0) == 0, NORM, RESIDUAL, RSTD_BLOCK)
    pack_words(x_ptr, r_ptr, nw_ptr, xp_ptr, xw_ptr, tl.program_id(0) * BLOCK_C, K // 8, rstd, K,
               BLOCK_C, NORM, RESIDUAL, F16X2, ODD_OVER_16, MMA)


@triton.jit
def row_rstd(x_ptr, r_ptr, r_out_ptr, K, eps, write_residual, NORM: tl.constexpr,
             RESIDUAL: tl.constexpr, RSTD_BLOCK: tl.constexpr):
    """1/rms of x (+ residual) [1] when NORM (the whole row, from L2, RSTD_BLOCK wide loads);
    `write_residual` (one program) also stores x + residual."""
    rows = tl.arange(0, 1)
    rstd = tl.zeros([1], tl.float32)
    if NORM:
        rstd = _rstd(x_ptr, r_ptr, r_out_ptr, rows, rows < 1, K, eps, K, K, write_residual,
                     1, RSTD_BLOCK, RESIDUAL)
    return rstd


@triton.jit
def pack_words(x_ptr, r_ptr, nw_ptr, xp_ptr, xw_ptr, c0, c_stop, rstd, K, BLOCK_C: tl.constexpr,
               NORM: tl.constexpr, RESIDUAL: tl.constexpr, F16X2: tl.constexpr,
               ODD_OVER_16: tl.constexpr, MMA: tl.constexpr):
    """Words [c0, min(c0 + BLOCK_C, c_stop)) of x (after residual add + RMSNorm by rstd) as the
    GEMV's fp16 pairs, xp[j, c] = (x[8c + j], x[8c + j + 4]) for j < 4, and word sums xw[c] (fp32).
    ODD_OVER_16: pairs 1 and 3 divided by 16 (a decode that leaves those codes times 16:
    int4_mma.py), exact but for |x| < 2^-10, whose sixteenths are fp16 subnormals. MMA (with
    ODD_OVER_16; int4_mma.py; c0 and c_stop whole groups of 16 words): the pairs as int64 (pair 0 |
    pair 2 << 32, pair 1 | pair 3 << 32) at xp[0, c] and xp[1, c], an MMA's B operand each, and
    instead of word sums, per 128 K, 1024 * the sum of the pairs as packed at xw[g] and the sum of
    x at xw[groups + g] (the constants int4_mma takes off)."""
    rows = tl.arange(0, 1)
    k = c0 * 8 + tl.arange(0, BLOCK_C * 8)
    k_ok = k < c_stop * 8
    x = _x_tile(x_ptr, r_ptr, nw_ptr, rows, k, k_ok[None, :], k_ok, rstd, K, K, NORM, RESIDUAL)
    x = tl.reshape(x, [BLOCK_C, 2, 4])              # [c, j // 4, j % 4]
    lo, hi = tl.split(tl.permute(x, [0, 2, 1]))     # [c, j] for j < 4 and j + 4
    c = c0 + tl.arange(0, BLOCK_C)
    xw = tl.sum(lo + hi, 1, keep_dims=True)
    if ODD_OVER_16:
        odd = tl.where(tl.arange(0, 4) % 2 == 1, 1.0 / 16, 1.0)[None, :]
        lo, hi = lo * odd, hi * odd
    if MMA:
        _store_mma_x(lo, hi, xw, xp_ptr, xw_ptr, c, c0, c_stop, K, BLOCK_C, F16X2)
    else:
        ok = (c < c_stop)[:, None]
        tl.store(xp_ptr + c[:, None] + tl.arange(0, 4)[None, :] * (K // 8), _pair(lo, hi, F16X2), mask=ok)
        tl.store(xw_ptr + c[:, None], xw, mask=ok)


@triton.jit
def _store_mma_x(lo, hi, xw, xp_ptr, xg_ptr, c, c0, c_stop, K, BLOCK_C: tl.constexpr,
                 F16X2: tl.constexpr):
    """pack_words' int4_mma form: xp [2, K / 8] int64 and xg [2, K / 128] (pack_words' MMA)."""
    pairs = _pair(lo, hi, F16X2).to(tl.int64) & 0xFFFFFFFF     # [c, j]
    even, odd = tl.split(tl.reshape(pairs, [BLOCK_C, 2, 2]))  # j = 0, 2 and j = 1, 3
    lo_hi = tl.arange(0, 2)[None, :] * 32
    tl.store(xp_ptr + c, tl.sum(even << lo_hi, 1), mask=c < c_stop)
    tl.store(xp_ptr + K // 8 + c, tl.sum(odd << lo_hi, 1), mask=c < c_stop)
    packed = lo.to(tl.float16).to(tl.float32) + hi.to(tl.float16).to(tl.float32)
    g = c0 // 16 + tl.arange(0, BLOCK_C // 16)
    g_ok = g < c_stop // 16
    tl.store(xg_ptr + g, 1024.0 * tl.sum(tl.reshape(tl.sum(packed, 1), [BLOCK_C // 16, 16]), 1), mask=g_ok)
    tl.store(xg_ptr + K // 128 + g, tl.sum(tl.reshape(tl.sum(xw, 1), [BLOCK_C // 16, 16]), 1), mask=g_ok)


def pack_buffers(x: torch.Tensor, norm: bool, residual: torch.Tensor | None, mma: bool):
    """(xp, xw, residual out) for x [1, K], as pack_x fills them (the tensor-core GEMV also fills
    them itself, int4_mma.py's PACK): residual out is rms_norm's, x + residual, or x itself without
    a residual, None without a norm."""
    K = x.shape[1]
    r_out = None
    if norm:
        r_out = torch.empty_like(x) if residual is not None else x
    xp = torch.empty(2 if mma else 4, K // 8, dtype=torch.int64 if mma else torch.int32, device=x.device)
    xw = torch.empty(2, K // 128, dtype=torch.float32, device=x.device) if mma else \
        torch.empty(K // 8, dtype=torch.float32, device=x.device)
    return xp, xw, r_out


def rstd_block(K: int) -> int:
    """Width of row_rstd's loads: the whole row up to 4096."""
    return min(4096, triton.next_power_of_2(K))


def pack_x(x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           residual: torch.Tensor | None = None, odd_over_16: bool = False, mma: bool = False,
           words: int = 64):
    """(xp, xw, residual out): x [1, K], after the residual add and RMSNorm when norm_weight is given,
    as the GEMV's fp16 pairs [4, K / 8] (int32) and word sums [K / 8] (fp32); mma (int4_mma.py):
    pairs 1 and 3 over 16, as xp [2, K / 8] int64 and, instead of xw, [2, K / 128]: per 128 K 1024 *
    the sum of the pairs as packed, and the sum of x. `words`: a program's words (a power of two,
    >= 16 with mma), as the tensor-core GEMV's pack_words chunks (tests compare the two)."""
    K = x.shape[1]
    norm = norm_weight is not None
    xp, xw, r_out = pack_buffers(x, norm, residual, mma)
    pdl = pdl_supported(x.device)
    _pack_x_kernel[(triton.cdiv(K // 8, words),)](
        x, residual if residual is not None else x, norm_weight if norm else x,
        r_out if r_out is not None else x, xp, xw, K, eps, NORM=norm,
        RESIDUAL=norm and residual is not None, BLOCK_C=words, RSTD_BLOCK=rstd_block(K),
        F16X2=x.is_cuda, PDL=pdl, ODD_OVER_16=odd_over_16 or mma, MMA=mma, EARLY=EARLY_LAUNCH, num_warps=4,
        **(pdl_launch(x.device) if pdl else {}))
    return xp, xw, r_out
