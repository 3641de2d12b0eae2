"""y = x @ dequant(W)^T (+ bias) on the int4 format of int4.py: which kernel (int4_kernels.py) runs how.

Four paths, picked by M (rows of x) in `default_config`:

- "fma" (decode, M <= FMA_MAX_M): CUDA cores. A program owns BLOCK_N output rows and a K split; it
  loads [BLOCK_N, BLOCK_K/8] tiles of packed words (contiguous along K: 16-byte cp.async loads) and
  walks the 8 nibble planes. Codes become floats by the magic-number trick: one LOP3 ORs the nibble
  into the mantissa of 2^23 (no int->float conversion, which runs at 1/8 of the FMA rate on sm_90),
  one fma with the scale takes 2^23 s off exactly, one fma accumulates; nibble j stays in place and x
  is pre-scaled by 16^-j instead of shifting each weight. The zero term is z * sum_j x_j, once a word.
- "dot" (small M; medium M with groups other than 128): tensor cores. Each nibble plane j of a
  [BLOCK_K/8, BLOCK_N] word tile is one `tl.dot` against the matching x columns 8c + j (contiguous:
  a small first launch permutes x to plane order and sums it per group). With `fold`, the dot takes
  exact codes (magic-number bf16/fp16 values MAGIC + code) and the group's scale and zero are
  applied once to the tile's fp32 result: s * dot(x, MAGIC + c) + (z - MAGIC s) * sum(x) =
  dot(x, c s + z).
- "gemm" (medium M, group 128): tensor cores, one K step a group. The step's words become a
  [BLOCK_N, 128] tile of weights dequantized to x.dtype in registers (nibbles unpacked in x's K
  order by nested interleaves, so x needs no permutation), one wgmma with x as it is, accumulating
  in the MMA (fold=False); each weight is decoded once per row tile, and with 64- or 128-row tiles
  once for all of a decode batch. fold=True keeps exact codes through the MMA as the dot path does.
- "dense" (prefill, M >= DENSE_MIN_M): dequantize to x.dtype in chunks of rows (a Triton kernel
  into a scratch buffer) and let cuBLAS multiply; at large M the matmul dominates and cuBLAS wins.

Split-K partials (fma, dot and gemm) are reduced inside the same launch: each program stores its fp32
partial, the last one to arrive at the tile (an atomic counter) sums them in a fixed order, adds the
bias, writes y and re-arms the counter. One launch, deterministic, no host sync, nothing to zero
per call: safe inside CUDA graphs on one stream (two streams must not run split launches at once).

Results equal `int4_matmul_reference` up to fp32 rounding: the reference rounds each weight to
x.dtype (so does the gemm path's default, fold=False), the fma path and folded dots never round the
weight at all. On the CPU this runs only under TRITON_INTERPRET=1 (tests do, at small sizes, with
fp32 or fp16 x: the interpreter cannot dot bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from pagedeploy.kernels.triton_launch import arrival_counters, num_sms

from .int4 import Int4Weight
from .int4_kernels import (_int4_dequant_kernel, _int4_dot_kernel, _int4_fma_kernel, _int4_gemm_kernel,
                           _x_prep_kernel)

FMA_MAX_M = 2          # rows of x up to which CUDA cores beat tensor cores (GPU sweeps, PERF.md)
DOT_MAX_M = 32         # rows up to which the dot kernel's one 32-row tile beats the gemm kernel's 64
DENSE_MIN_M = 192      # rows of x from which dequantize + cuBLAS beats the fused GEMM
DENSE_CHUNK_BYTES = 64 << 20   # dense path: scratch for the dequantized weight, a chunk of rows at a time


@dataclass(frozen=True)
class KernelConfig:
    kind: str                 # "fma", "dot", "gemm" or "dense"
    block_m: int = 16         # fma: 1 or 2 (>= M); dot, gemm: >= 16
    block_n: int = 64
    block_k: int = 128        # dot: >= 128 (each plane's dot needs K >= 16)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False     # dot: W tile as the MMA's A operand, the M rows as its N
    fold: bool = True         # dot, gemm: scale/zero after each group's dot (dot: group % block_k == 0)
    unroll: int = 1           # fma: sub-tiles of block_k per loop step
    group_m: int = 8          # dot: row tiles that walk the column tiles together (L2 reuse)


# ---- launch -------------------------------------------------------------------------------------

def _split(tiles: int, steps: int, sms: int, waves: float) -> int:
    """K splits (a power of two, each >= one K step) until there are `waves` programs per SM."""
    split = 1
    while tiles * split < waves * sms and 2 * split <= steps:
        split *= 2
    return split


def default_config(M: int, N: int, K: int, group: int, device: torch.device) -> KernelConfig:
    """Launch shapes by (M, N, K) class, fixed ahead of time from the GPU sweeps of PERF.md (issue 6, P3)
    rather than autotuned at run time. Per M: fma for 1-2 rows, the dot GEMV (16-row tile, W as the
    MMA's A operand) up to 16, the dot GEMM (32-row tiles) up to DOT_MAX_M, the gemm kernel (64- or
    128-row tiles; the dot GEMM for groups other than 128) below DENSE_MIN_M, then dequantize +
    cuBLAS. The gemm shapes and splits are the H200 sweep's best per Llama-3-8B linear at M = 64
    and 128 (docs/PERF.md, run 16)."""
    sms = num_sms(device, interpreter=4)
    steps = triton.cdiv(K, 128)
    if M >= DENSE_MIN_M:
        return KernelConfig("dense")
    if M <= FMA_MAX_M:
        if N >= 16384:   # gate_up class: enough row tiles; narrow 2-warp programs (M=1), wide ones (M=2)
            if M == 1:
                return KernelConfig("fma", 1, 64, 128, _split(N // 64, steps, sms, 4), num_warps=2, num_stages=2,
                                    unroll=2)
            return KernelConfig("fma", 2, 256, 128, _split(N // 256, steps, sms, 1), num_warps=4, num_stages=3)
        split = _split(triton.cdiv(N, 128), steps, sms, 2 if M == 1 else 1.5)
        return KernelConfig("fma", M, 128, 128, split, num_warps=4, num_stages=2)
    if M <= 16:
        split = _split(triton.cdiv(N, 128), steps, sms, 1.5)
        return KernelConfig("dot", 16, 128, 128, split, num_warps=4, num_stages=3, swap_ab=True)
    if M <= DOT_MAX_M or group != 128:
        split = _split(triton.cdiv(M, 32) * triton.cdiv(N, 128), steps, sms, 1.5)
        return KernelConfig("dot", 32, 128, 128, split, num_warps=4, num_stages=3)
    if M <= 64:   # one row tile: each weight dequantized once; wide tiles where there are many
        block_n, warps = (128, 8) if N >= 16384 or K >= 8192 else (64, 4)
        split = _split(triton.cdiv(N, block_n), steps, sms, 1.5)
        return KernelConfig("gemm", 64, block_n, 128, split, num_warps=warps, num_stages=3, fold=False)
    split = _split(triton.cdiv(M, 128) * triton.cdiv(N, 128), steps, sms, 0.7)
    return KernelConfig("gemm", 128, 128, 128, split, num_warps=8, num_stages=3, fold=False)


def int4_matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None,
                config: KernelConfig | None = None) -> torch.Tensor:
    """y = x @ dequant(w)^T (+ bias), x `[..., in]` on w's device, y `[..., out]` in x.dtype."""
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"int4_matmul: x has {x.shape[-1]} features, the weight expects {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    cfg = config or default_config(x2.shape[0], N, K, w.group_size, x.device)
    launch = {"fma": _launch_fma, "dot": _launch_dot, "gemm": _launch_gemm, "dense": _dense_matmul}[cfg.kind]
    return launch(x2, w, bias, cfg).reshape(*x.shape[:-1], N)


def _split_args(x, N: int, cfg: KernelConfig, tiles: int, step_words: int):
    """(words per split, workspace, locks) for a launch of `tiles` output tiles."""
    M, K = x.shape
    steps = triton.cdiv(K // 8, step_words)
    words_per_split = triton.cdiv(steps, cfg.split_k) * step_words
    if cfg.split_k == 1:
        return words_per_split, x, x
    ws = torch.empty((cfg.split_k, M, N), device=x.device, dtype=torch.float32)
    return words_per_split, ws, arrival_counters(x.device, tiles)


def _launch_fma(x, w: Int4Weight, bias, cfg: KernelConfig) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    if M > cfg.block_m or cfg.block_m not in (1, 2):
        raise ValueError(f"int4_matmul: fma block_m={cfg.block_m} must be 1 or 2 and >= M={M}")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    per_split, ws, locks = _split_args(x, N, cfg, grid[0], cfg.block_k // 8 * cfg.unroll)
    _int4_fma_kernel[grid](
        x, w.packed, w.scales, w.zeros, x if bias is None else bias, y, ws, locks, M, N, K // 8,
        K // w.group_size, per_split, cfg.split_k, x.stride(0), y.stride(0), 0x4B000000, GROUP=w.group_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UNROLL=cfg.unroll,
        NUM_STAGES=cfg.num_stages, USE_SPLIT=cfg.split_k > 1, HAS_BIAS=bias is not None,
        EVEN=N % cfg.block_n == 0 and per_split * cfg.split_k == K // 8,
        num_warps=cfg.num_warps)
    return y


def _launch_dot(x, w: Int4Weight, bias, cfg: KernelConfig) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    if cfg.block_k < 128 or cfg.block_m < 16:
        raise ValueError("int4_matmul: dot needs block_k >= 128 and block_m >= 16")
    fold = cfg.fold and w.group_size % cfg.block_k == 0
    # One small launch first: x in plane order (contiguous x tiles) and its per-group sums (fold's zero term).
    xp = torch.empty_like(x)
    xs = torch.empty((M, K // w.group_size), device=x.device, dtype=torch.float32)
    _x_prep_kernel[(M, K // w.group_size)](x, xp, xs, K // 8, K // w.group_size, x.stride(0), GROUP=w.group_size,
                                           num_warps=1)
    x = xp
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    per_split, ws, locks = _split_args(x, N, cfg, tiles, cfg.block_k // 8)
    _int4_dot_kernel[(tiles, cfg.split_k)](
        x, xs, w.packed, w.scales, w.zeros, x if bias is None else bias, y, ws, locks, M, N, K // 8,
        K // w.group_size, per_split, cfg.split_k, x.stride(0), y.stride(0), GROUP=w.group_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, FOLD=fold,
        USE_SPLIT=cfg.split_k > 1, HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",   # tf32 is ignored for bf16/fp16
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def _launch_gemm(x, w: Int4Weight, bias, cfg: KernelConfig) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    if w.group_size != 128:
        raise ValueError(f"int4_matmul: gemm needs group 128, the weight has {w.group_size}")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    per_split, ws, locks = _split_args(x, N, cfg, tiles, 16)
    _int4_gemm_kernel[(tiles, cfg.split_k)](
        x, w.packed, w.scales, w.zeros, x if bias is None else bias, y, ws, locks, M, N, K // 8,
        K // w.group_size, per_split, cfg.split_k, x.stride(0), y.stride(0), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages, USE_SPLIT=cfg.split_k > 1,
        HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        FOLD=cfg.fold, num_warps=cfg.num_warps)
    return y


def dequantize_rows(w: Int4Weight, start: int, stop: int, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of the dense weight in `dtype`, on w's device (Triton)."""
    N, K = stop - start, w.shape[1]
    groups = K // w.group_size
    out = torch.empty((N, K), device=w.device, dtype=dtype) if out is None else out
    per_program = 4
    grid = (triton.cdiv(N, 64), triton.cdiv(groups, per_program))
    _int4_dequant_kernel[grid](w.packed[start:stop], w.scales[start:stop], w.zeros[start:stop], out, N, K // 8,
                               groups, GROUP=w.group_size, BLOCK_N=64, GROUPS_PER_PROGRAM=per_program, num_warps=4)
    return out


def _dense_matmul(x, w: Int4Weight, bias, cfg: KernelConfig) -> torch.Tensor:
    """Dequantize a chunk of rows at a time into scratch and multiply with cuBLAS, straight into y."""
    M, K = x.shape
    N = w.shape[0]
    rows = max(64, DENSE_CHUNK_BYTES // (K * x.element_size()) // 64 * 64)
    if rows >= N:
        wd = dequantize_rows(w, 0, N, x.dtype)
        return torch.nn.functional.linear(x, wd, None if bias is None else bias.to(x.dtype))
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    scratch = torch.empty((rows, K), device=x.device, dtype=x.dtype)
    for n0 in range(0, N, rows):
        n1 = min(n0 + rows, N)
        wd = dequantize_rows(w, n0, n1, x.dtype, scratch[: n1 - n0])
        if bias is None:
            torch.mm(x, wd.t(), out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1].to(x.dtype), x, wd.t(), out=y[:, n0:n1])
    return y
