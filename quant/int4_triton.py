"""Triton kernels for y = x @ dequant(W)^T (+ bias) on the int4 format of int4.py.

Both kernels dequantize W^T tiles in registers right before `tl.dot`, so the weight crosses memory
once, at 4 bits:

- `_int4_gemv_kernel`, for M <= 16 (decode): the M rows ride in one 16-row dot tile and the grid is
  output-column tiles × K splits, so that even a narrow layer (k/v projections) puts enough programs
  on the GPU to stream the weight at full bandwidth. Each packed word is loaded once; its 8 nibble
  planes make 8 dots of K = BLOCK_K / 8 against strided columns of x. Split partials are summed in
  fp32 by torch (deterministic, unlike atomics).
- `_int4_gemm_kernel`, for larger M (prefill, big batches): a classic tiled GEMM with grouped tile
  ordering so that neighbouring programs share weight tiles in L2; its `[BLOCK_K, BLOCK_N]` tile
  gathers word k // 8 for each k (the re-reads hit L1 and are amortized over BLOCK_M rows).

Math: codes * scale + zero in fp32, rounded to x.dtype for the dot (bf16/fp16 tensor cores), fp32
accumulation; exactly what `int4_matmul_reference` computes. On the CPU this runs only under
TRITON_INTERPRET=1 (tests do, at small sizes, with fp32 x).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .int4 import Int4Weight

GEMV_MAX_M = 16


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1          # GEMV only
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _dequant_tile(w_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, K, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """W^T tile [BLOCK_K, BLOCK_N] in fp32. Word k // 8 of row n holds column k in nibble k % 8."""
    words = tl.load(w_ptr + offs_n[None, :] * (K // 8) + offs_k[:, None] // 8, mask=mask_n[None, :], other=0)
    codes = ((words >> ((offs_k[:, None] % 8) * 4)) & 0xF).to(tl.float32)
    groups = K // GROUP
    if GROUP % BLOCK_K == 0:   # the tile lies in one group: one scale and zero per column
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * groups + g, mask=mask_n, other=0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * groups + g, mask=mask_n, other=0).to(tl.float32)
        return codes * s[None, :] + z[None, :]
    g_ptrs = offs_n[None, :] * groups + offs_k[:, None] // GROUP
    s = tl.load(s_ptr + g_ptrs, mask=mask_n[None, :], other=0).to(tl.float32)
    z = tl.load(z_ptr + g_ptrs, mask=mask_n[None, :], other=0).to(tl.float32)
    return codes * s + z


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, k_per_split,
                      stride_xm, stride_ym, stride_ys,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Loads each int32 word once, as a [BLOCK_K / 8, BLOCK_N] tile (contiguous along K, so the loads
    vectorize), and multiplies it nibble plane by nibble plane: plane j holds columns 8c + j, which
    meet the matching strided columns of x. No reshape, no repeated weight loads; K may be ragged."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K // 8)
    mask_m, mask_n = offs_m < M, offs_n < N
    groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        c = k0 // 8 + offs_c
        mask_c = c < K // 8
        words = tl.load(w_ptr + offs_n[None, :] * (K // 8) + c[:, None],
                        mask=mask_c[:, None] & mask_n[None, :], other=0)
        if GROUP % BLOCK_K == 0:   # one group per tile: a scale and a zero per column
            s = tl.load(s_ptr + offs_n * groups + k0 // GROUP, mask=mask_n, other=0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + offs_n * groups + k0 // GROUP, mask=mask_n, other=0).to(tl.float32)[None, :]
        for j in tl.static_range(8):
            k = c * 8 + j
            if GROUP % BLOCK_K != 0:
                g = offs_n[None, :] * groups + k[:, None] // GROUP
                gmask = mask_c[:, None] & mask_n[None, :]
                s = tl.load(s_ptr + g, mask=gmask, other=0).to(tl.float32)
                z = tl.load(z_ptr + g, mask=gmask, other=0).to(tl.float32)
            w = ((words >> (4 * j)) & 0xF).to(tl.float32) * s + z
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                        mask=mask_m[:, None] & mask_c[None, :], other=0.0)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:   # fp32 partials [SPLIT_K, M, N]; the wrapper sums them
        y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc, mask=mask)


@triton.jit
def _int4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles walk the column tiles together, reusing W tiles from L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, K, GROUP, BLOCK_K)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---- launch -------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_k(K: int, want: int) -> int:
    """Largest power of two <= want that divides K (tiles never run past the row)."""
    bk = want
    while K % bk:
        bk //= 2
    return bk


def default_config(M: int, N: int, K: int, group: int, device: torch.device) -> KernelConfig:
    """Heuristic launch shapes (untuned here: the GPU pass tunes these numbers)."""
    if M <= GEMV_MAX_M:
        bk = 256 if K >= 2048 else 128     # the dot's K is bk / 8: at least 16 on tensor cores
        tiles = triton.cdiv(N, 32)
        sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
        split = 1
        # More K splits until there are ~2 programs per SM, keeping >= 4 K tiles per split.
        while tiles * split < 2 * sms and triton.cdiv(K, bk) >= 8 * split:
            split *= 2
        return KernelConfig(16, 32, bk, split, num_warps=4, num_stages=3)
    bm = 64 if M <= 64 else 128
    return KernelConfig(bm, 128, _block_k(K, 64), 1, num_warps=4 if bm == 64 else 8, num_stages=3)


def int4_matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None,
                config: KernelConfig | None = None) -> torch.Tensor:
    """y = x @ dequant(w)^T (+ bias), x `[..., in]` on w's device, y `[..., out]` in x.dtype."""
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"int4_matmul: x has {x.shape[-1]} features, the weight expects {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    cfg = config or default_config(M, N, K, w.group_size, x.device)
    if M > GEMV_MAX_M and K % cfg.block_k:
        raise ValueError(f"int4_matmul: GEMM block_k={cfg.block_k} must divide K={K}")
    y = _launch_gemv(x2, w, bias, cfg) if M <= GEMV_MAX_M else _launch_gemm(x2, w, bias, cfg)
    return y.reshape(*x.shape[:-1], N)


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"   # tf32 is ignored for bf16/fp16 dots


def _launch_gemv(x, w: Int4Weight, bias, cfg: KernelConfig) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    if cfg.block_m < M:
        raise ValueError(f"int4_matmul: GEMV block_m={cfg.block_m} < M={M}")
    split = cfg.split_k
    out = torch.empty((M, N) if split == 1 else (split, M, N), device=x.device,
                      dtype=x.dtype if split == 1 else torch.float32)
    grid = (triton.cdiv(N, cfg.block_n), split)
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.block_k), split) * cfg.block_k
    _int4_gemv_kernel[grid](
        x, w.packed, w.scales, w.zeros, bias if bias is not None else x, out, M, N, K, k_per_split,
        x.stride(0), out.stride(-2), out.stride(0) if split > 1 else 0,
        GROUP=w.group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=split, HAS_BIAS=bias is not None, PRECISION=_precision(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split == 1:
        return out
    y = out.sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def _launch_gemm(x, w: Int4Weight, bias, cfg: KernelConfig) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _int4_gemm_kernel[grid](
        x, w.packed, w.scales, w.zeros, bias if bias is not None else x, out, M, N, K,
        x.stride(0), out.stride(0),
        GROUP=w.group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=8, HAS_BIAS=bias is not None, PRECISION=_precision(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
