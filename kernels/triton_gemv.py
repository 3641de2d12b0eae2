"""Decode-time linears for a few rows of x: y = x W^T on CUDA cores, with the neighbours fused in.

At batch 1-4 a linear is a weight stream: cuBLAS runs it as a GEMM with 64-row tiles, which leaves
half the SMs idle on 4096-row weights and costs 5-6 us for Qwen3-0.6B's 4-12 MB matrices (docs/PERF.md,
run 12). Here a program owns BLOCK_N output rows and one K split, keeps the next weight tile in
flight while it multiplies the current one, and reduces split-K partials inside the same launch (the
last program to arrive sums them in a fixed order: deterministic, no memset, CUDA-graph safe).

What it fuses, so that a decoder layer's decode step is four of these plus attention:
- before: residual add + RMSNorm of x (each program recomputes the row's 1/rms from L2; program 0
  writes the new residual), rounded exactly as `rms_norm` rounds;
- after: bias, and silu(gate) * up for a gate_up weight (rows [0, N) gate, [N, 2N) up);
- programmatic dependent launch (triton_launch.py): in a CUDA graph the kernel may start while the
  previous one finishes, and requests its first weight tiles before it waits for that kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import GEMV_MAX_ROWS
from .triton_launch import arrival_counters, num_sms, pdl_launch, pdl_supported, wait_previous


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16      # output rows per program (gate_up: gate and up rows each)
    block_k: int = 256     # K elements per tile
    split_k: int = 1       # K splits (programs per output tile)
    num_warps: int = 4
    pdl: bool = True       # programmatic dependent launch where supported (triton_launch.py)


@triton.jit
def _x_tile(x_ptr, r_ptr, nw_ptr, rows, k, mask, k_ok, rstd, stride_xm, stride_rm,
            NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    """x[rows, k] as the linear's input, in fp32: after the residual add and RMSNorm when fused
    (rounded to the model dtype at the same points as `rms_norm`)."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)
    if NORM:
        if RESIDUAL:
            r = tl.load(r_ptr + rows[:, None] * stride_rm + k[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        g = tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        x = ((x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * g[None, :]).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _rstd(x_ptr, r_ptr, r_out_ptr, rows, mask_m, K, eps, stride_xm, stride_rm, write_residual,
          ROWS: tl.constexpr, BLOCK_K: tl.constexpr, RESIDUAL: tl.constexpr):
    """1/rms of each row of x (+ residual) over all K; one program also stores x + residual."""
    kk = tl.arange(0, BLOCK_K)
    ss = tl.zeros([ROWS, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        mask = mask_m[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)
        if RESIDUAL:
            r = tl.load(r_ptr + rows[:, None] * stride_rm + k[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            if write_residual:
                tl.store(r_out_ptr + rows[:, None] * K + k[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        ss += xf * xf
    return tl.rsqrt(tl.sum(ss, 1) / K + eps)


@triton.jit
def _store_y(yg, yu, rows, offs_n, mask_m, mask_n, N, b_ptr, y_ptr, stride_ym,
             SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr):
    dt: tl.constexpr = y_ptr.dtype.element_ty
    if HAS_BIAS:
        yg += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:
        if HAS_BIAS:
            yu += tl.load(b_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        # As the unfused path rounds: gate_up output, silu in fp32, then the product.
        g = yg.to(dt).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        yg = act * yu.to(dt).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], yg.to(dt),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "k_tiles", "split_k"])
def _gemv_kernel(x_ptr, r_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, r_out_ptr, ws_ptr, lock_ptr,
                 M, N, K, eps, k_tiles, split_k, stride_xm, stride_rm, stride_ym, stride_wn,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM: tl.constexpr, RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, SPLITS: tl.constexpr,
                 PDL: tl.constexpr):
    """Grid (N tiles, K splits): y[:M, tile] = act(sum over the split's K of x' W^T)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, ROWS)
    mask_m = rows < M
    kk = tl.arange(0, BLOCK_K)
    # Split bounds are whole tiles (and K a multiple of 16 in practice): the compiler then sees each
    # 8-element run of a mask as one value and loads 16 bytes at a time.
    k_start = pid_k * k_tiles * BLOCK_K
    k_end = tl.minimum(k_start + k_tiles * BLOCK_K, K)
    w_gate = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    w_up = w_gate + N * stride_wn
    # The weights do not depend on the previous kernel: ask for the first tiles before waiting on it.
    wmask = mask_n[:, None] & (k_start + kk < k_end)[None, :]
    wg = tl.load(w_gate + (k_start + kk)[None, :], mask=wmask, other=0.0)
    wu = wg
    if SILU_MUL:
        wu = tl.load(w_up + (k_start + kk)[None, :], mask=wmask, other=0.0)
    wait_previous(PDL)
    rstd = tl.zeros([ROWS], tl.float32)
    if NORM:
        rstd = _rstd(x_ptr, r_ptr, r_out_ptr, rows, mask_m, K, eps, stride_xm, stride_rm,
                     (pid_n == 0) & (pid_k == 0), ROWS, BLOCK_K, RESIDUAL)
    acc_g = tl.zeros([ROWS, BLOCK_N, BLOCK_K], tl.float32)
    acc_u = acc_g
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + kk
        k_ok = k < k_end
        nxt = k + BLOCK_K
        nmask = mask_n[:, None] & (nxt < k_end)[None, :]
        wg_next = tl.load(w_gate + nxt[None, :], mask=nmask, other=0.0)   # in flight meanwhile
        if SILU_MUL:
            wu_next = tl.load(w_up + nxt[None, :], mask=nmask, other=0.0)
        x = _x_tile(x_ptr, r_ptr, nw_ptr, rows, k, mask_m[:, None] & k_ok[None, :], k_ok, rstd,
                    stride_xm, stride_rm, NORM, RESIDUAL)
        acc_g += wg.to(tl.float32)[None, :, :] * x[:, None, :]
        wg = wg_next
        if SILU_MUL:
            acc_u += wu.to(tl.float32)[None, :, :] * x[:, None, :]
            wu = wu_next
    yg = tl.sum(acc_g, 2)
    yu = yg
    if SILU_MUL:
        yu = tl.sum(acc_u, 2)
    _finish(yg, yu, rows, offs_n, mask_m, mask_n, N, b_ptr, y_ptr, stride_ym, ws_ptr, lock_ptr,
            pid_n, pid_k, split_k, ROWS, SILU_MUL, HAS_BIAS, USE_SPLIT, SPLITS)


@triton.jit
def _reduce_splits(yg, yu, rows, offs_n, mask_m, mask_n, N, ws_ptr, lock_ptr, pid_n, pid_k, split_k,
                   ROWS: tl.constexpr, SILU_MUL: tl.constexpr, USE_SPLIT: tl.constexpr,
                   SPLITS: tl.constexpr):
    """(yg, yu, whether this program stores the tile): a program's fp32 sums [ROWS, BLOCK_N] (gate
    and up for SILU_MUL), or with split-K, for the last program of the tile to arrive, the sums of
    all the partials (SPLITS: split_k rounded up to a power of two). It loads them all at once: one
    at a time, each would wait for L2 in turn."""
    stores = True
    if USE_SPLIT:
        n_out = 2 * N if SILU_MUL else N
        part = ws_ptr + rows[:, None] * n_out + offs_n[None, :]
        pmask = mask_m[:, None] & mask_n[None, :]
        tl.store(part + pid_k * ROWS * n_out, yg, mask=pmask)
        if SILU_MUL:
            tl.store(part + pid_k * ROWS * n_out + N, yu, mask=pmask)
        tl.debug_barrier()   # every thread's partial is written before the release below
        arrived = tl.atomic_add(lock_ptr + pid_n, 1)   # acq_rel, gpu scope
        stores = arrived == split_k - 1
        if stores:
            sp = tl.arange(0, SPLITS)[:, None, None]
            parts = part[None, :, :] + sp * ROWS * n_out
            smask = (sp < split_k) & pmask[None, :, :]
            # a fixed tree over the splits: deterministic
            yg = tl.sum(tl.load(parts, mask=smask, other=0.0, cache_modifier=".cg"), 0)
            if SILU_MUL:
                yu = tl.sum(tl.load(parts + N, mask=smask, other=0.0, cache_modifier=".cg"), 0)
            tl.atomic_xchg(lock_ptr + pid_n, 0)   # re-armed for the next launch (graph replays)
    return yg, yu, stores


@triton.jit
def _finish(yg, yu, rows, offs_n, mask_m, mask_n, N, b_ptr, y_ptr, stride_ym, ws_ptr, lock_ptr,
            pid_n, pid_k, split_k, ROWS: tl.constexpr, SILU_MUL: tl.constexpr,
            HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, SPLITS: tl.constexpr):
    """Store the rows' sums, split-K reduced in-launch (_reduce_splits)."""
    yg, yu, stores = _reduce_splits(yg, yu, rows, offs_n, mask_m, mask_n, N, ws_ptr, lock_ptr, pid_n,
                                    pid_k, split_k, ROWS, SILU_MUL, USE_SPLIT, SPLITS)
    if stores:
        _store_y(yg, yu, rows, offs_n, mask_m, mask_n, N, b_ptr, y_ptr, stride_ym, SILU_MUL, HAS_BIAS)


def default_config(M: int, N: int, K: int, silu_mul: bool, device: torch.device) -> GemvConfig:
    """Tiles from the H100 sweeps at M=1 inside CUDA graphs, checked end to end (docs/PERF.md, run 12).
    A plain linear with 2048 <= K <= 3072 (Qwen3-0.6B's o and down) takes 4 rows by 2048 K a
    program, unsplit (2.6 and 3.5 us, from 4.5 and 5.7 with 8 x 512 tiles), above that 4 by 1024
    (Llama-3-8B's qkv, o and down: 19.1, 12.5 and 40.2 us, from 20.8, 12.6 and 41.0): a program's
    weights come in a few large loads, the first before it waits on the previous kernel. Otherwise
    (smaller K, gate_up's two weights, M > 1): `split_tiles`."""
    if M == 1 and not silu_mul and K >= 2048:
        return GemvConfig(4, 2048 if K <= 3072 else 1024, 1)
    return split_tiles(M, N, K, silu_mul, device)


def split_tiles(M: int, N: int, K: int, silu_mul: bool, device: torch.device) -> GemvConfig:
    """8 rows by 16 KB of weights (512 K, or 256 K of gate and of up), K split in powers of two only
    while there are fewer than 2 programs per SM (the first rule of run 12, still the best below
    K = 2048 and for gate_up)."""
    block_k = 256 if silu_mul or M > 1 else 512
    while block_k > 64 and K % block_k and K < 4 * block_k:   # small K: less padding
        block_k //= 2
    tiles, steps, split = triton.cdiv(N, 8), triton.cdiv(K, block_k), 1
    while tiles * split < 2 * num_sms(device, interpreter=4) and 2 * split <= steps:
        split *= 2
    return GemvConfig(8, block_k, split)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                 residual: torch.Tensor | None = None, silu_mul: bool = False,
                 config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, residual_out) for x [M <= GEMV_MAX_ROWS, K] (docs/CONTRACTS.md, "fused_linear")."""
    M, K = x.shape
    rows_out = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    assert M <= GEMV_MAX_ROWS and weight.shape[1] == K and x.stride(-1) == 1
    assert weight.stride(-1) == 1
    assert weight.dtype == x.dtype and (norm_weight is None or norm_weight.dtype == x.dtype)
    cfg = config or default_config(M, rows_out, K, silu_mul, x.device)
    y = torch.empty(M, rows_out, dtype=x.dtype, device=x.device)
    norm = norm_weight is not None
    r = residual if residual is not None else x
    r_out = None   # rms_norm's residual out: x + residual, or x itself without a residual
    if norm:
        r_out = torch.empty(M, K, dtype=x.dtype, device=x.device) if residual is not None else x
    grid = (triton.cdiv(rows_out, cfg.block_n), cfg.split_k)
    counters, ws = arrival_counters(x.device, grid[0] if cfg.split_k > 1 else 0), y
    if cfg.split_k > 1:
        ws = torch.empty(cfg.split_k * triton.next_power_of_2(M) * rows_out * (2 if silu_mul else 1),
                         dtype=torch.float32, device=x.device)
    k_tiles = triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k)
    pdl = pdl_supported(x.device) if cfg.pdl else 0
    _gemv_kernel[grid](
        x, r, norm_weight if norm else x, weight, bias if bias is not None else x, y,
        r_out if r_out is not None else x, ws, counters, M, rows_out, K, eps,
        k_tiles, cfg.split_k, x.stride(0), r.stride(0), y.stride(0), weight.stride(0),
        ROWS=triton.next_power_of_2(M), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NORM=norm,
        RESIDUAL=norm and residual is not None, SILU_MUL=silu_mul, HAS_BIAS=bias is not None,
        USE_SPLIT=cfg.split_k > 1, SPLITS=triton.next_power_of_2(cfg.split_k), PDL=pdl,
        num_warps=cfg.num_warps,
        **(pdl_launch(x.device) if pdl else {}))
    return y, r_out
