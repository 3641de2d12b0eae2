"""Batch-1 decode linears on int4 weights: y = x W^T for one row of x, with its fusions.

`int4_gemv` is the entry. On CUDA with group 128 (`default_config`) it launches int4_mma.py's
tensor-core kernel, which packs x itself (`pack_in_kernel`; or, as an option, on x packed by
`pack_x(mma=True)`); other groups, and the CPU interpreter, take this module's kernel in packed
half precision, described below.

The fma kernel (int4_kernels.py) decodes each weight into fp32 and spends about 4.5 instructions
per weight (SASS, docs/PERF.md): issue-bound at 1.9 TB/s, below HBM. Here each int32 word of 8
codes becomes four half2 registers holding codes (j, j + 4), one shift and one LOP3 each (the code
ORed into the mantissa of fp16 1024); one fma.rn.f16x2 turns (1024 + code) into code * scale,
exactly rounded, and one more multiplies by the matching pair of x and accumulates: 2.7
instructions per weight in the SASS, with the loads (run 14). Each accumulator sums at most 16
products (four groups) in fp16 before they go into fp32; the zero's term (zero * the word's sum of
x) is added in fp32.

x comes as those pairs of fp16 (and each word's x sum, fp32), written by a small first launch
(int4_pack.py's `pack_x`), after the residual add and RMSNorm when the linear has them in front.

Also fused, as in kernels/triton_gemv.py: bias, silu(gate) * up for gate_up weights, split-K
reduced in-launch, programmatic dependent launch (the first block of weights loads before the wait).
Under TRITON_INTERPRET=1 (CPU tests) inline PTX cannot run: the same kernels compute in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedeploy.kernels.triton_fused import RopeStore, rope_state, rope_store_tile, rope_tile_rows
from pagedeploy.kernels.triton_gemv import _reduce_splits, _store_y
from pagedeploy.kernels.triton_launch import (arrival_counters, num_sms, pdl_launch, pdl_supported,
                                              wait_previous)

from .int4 import Int4Weight
from .int4_pack import pack_buffers, pack_x, rstd_block


@dataclass(frozen=True)
class Int4GemvConfig:
    block_n: int = 64      # output rows per program (gate_up: gate and up rows each)
    split_k: int = 1
    num_warps: int = 4
    mma: bool = False      # tensor cores fed from registers (int4_mma.py): group 128, whole tiles
    ahead: int = 1         # mma: blocks of weights in flight while one is summed (1 or 2)
    pack_in_kernel: bool = False   # mma: x packed by the GEMV's programs, no pack_x launch
    pack_words: int = 512  # pack_in_kernel: words packed at a time (a power of two, >= 16)
    rstd_block: int = 4096   # pack_in_kernel: width of the norm's loads (a power of two)


# ---- device helpers -------------------------------------------------------------------------------

@triton.jit
def _half(p, HIGH: tl.constexpr):
    """fp32 of one fp16 half of an int32 pair (the interpreter's path)."""
    bits = (p >> 16) if HIGH else p
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _half2(v):
    """fp16 v in both halves of an int32 (a scale as the f16x2 operand)."""
    bits = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def _x_pairs(xp_ptr, xw_ptr, c, ok, KW):
    """The four x pairs (x[8c + j], x[8c + j + 4]) and the sums of x at words c, from
    _pack_x_kernel's output (a thread's words are consecutive: one 16-byte load per pair)."""
    return (tl.load(xp_ptr + c, mask=ok, other=0), tl.load(xp_ptr + KW + c, mask=ok, other=0),
            tl.load(xp_ptr + 2 * KW + c, mask=ok, other=0), tl.load(xp_ptr + 3 * KW + c, mask=ok, other=0),
            tl.load(xw_ptr + c, mask=ok, other=0.0))


# The codes of a word as four half2 (1024 + code j, 1024 + code j + 4), then code * scale and the
# products with x's pairs; the decode is the part the two forms differ in.
_DECODE = """
        lop3.b32 t0, $1, 0x000f000f, 0x64006400, 0xea;
        shr.u32 v, $1, 4;
        lop3.b32 t1, v, 0x000f000f, 0x64006400, 0xea;
        shr.u32 v, $1, 8;
        lop3.b32 t2, v, 0x000f000f, 0x64006400, 0xea;
        shr.u32 v, $1, 12;
        lop3.b32 t3, v, 0x000f000f, 0x64006400, 0xea;"""
# Codes 1, 5 and 3, 7 masked in place (1024 + 16 code): one shift a word, not three; the fma then
# gives 16 code s (exact: a power of two times the rounded c s), for pairs 1 and 3 of x over 16
# (pack_x(odd_over_16=True)). int4_mma decodes this way; here it is an option that
# scripts/gpu_int4_pipe.py times.
_DECODE_SHIFT_FREE = """
        lop3.b32 t0, $1, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 t1, $1, 0x00f000f0, 0x64006400, 0xea;
        shr.u32 v, $1, 8;
        lop3.b32 t2, v, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 t3, v, 0x00f000f0, 0x64006400, 0xea;"""
_TIMES_X = """
        fma.rn.f16x2 t0, t0, $2, $3;
        fma.rn.f16x2 t1, t1, $2, $3;
        fma.rn.f16x2 t2, t2, $2, $3;
        fma.rn.f16x2 t3, t3, $2, $3;
        fma.rn.f16x2 $0, t0, $4, $8;
        fma.rn.f16x2 $0, t1, $5, $0;
        fma.rn.f16x2 $0, t2, $6, $0;
        fma.rn.f16x2 $0, t3, $7, $0;
        }"""
_CODES_TIMES_X = tl.constexpr("{\n        .reg .b32 t0, t1, t2, t3, v;" + _DECODE + _TIMES_X)
_CODES_TIMES_X_SHIFT_FREE = tl.constexpr("{\n        .reg .b32 t0, t1, t2, t3, v;" + _DECODE_SHIFT_FREE + _TIMES_X)


@triton.jit
def _codes_times_x(words, s2, m2, p0, p1, p2, p3, acc16, SHIFT_FREE: tl.constexpr = False):
    """acc16 (half2) += sum over j < 4 of (code j, code j + 4) * scale * x pair j, in fp16."""
    if SHIFT_FREE:
        return tl.inline_asm_elementwise(_CODES_TIMES_X_SHIFT_FREE, "=r,r,r,r,r,r,r,r,r",
                                         [words, s2, m2, p0, p1, p2, p3, acc16], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_CODES_TIMES_X, "=r,r,r,r,r,r,r,r,r", [words, s2, m2, p0, p1, p2, p3, acc16],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _flush(acc16, acc32):
    """acc32 + the two fp16 halves of acc16."""
    return tl.inline_asm_elementwise(
        """{
        .reg .f16 l, h;
        .reg .f32 a, b;
        mov.b32 {l, h}, $1;
        cvt.f32.f16 a, l;
        cvt.f32.f16 b, h;
        add.f32 a, a, b;
        add.f32 $0, $2, a;
        }""",
        "=f,r,f", [acc16, acc32], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _codes_times_x_f32(words, s, p0, p1, p2, p3, acc32):
    """The fp32 form of _codes_times_x (the interpreter's path)."""
    acc32 = _pair_times_x_f32(words, 0, s, p0, acc32)
    acc32 = _pair_times_x_f32(words, 1, s, p1, acc32)
    acc32 = _pair_times_x_f32(words, 2, s, p2, acc32)
    return _pair_times_x_f32(words, 3, s, p3, acc32)


@triton.jit
def _pair_times_x_f32(words, j: tl.constexpr, s, p, acc32):
    lo = ((words >> (4 * j)) & 0xF).to(tl.float32)
    hi = ((words >> (4 * j + 16)) & 0xF).to(tl.float32)
    return acc32 + (lo * s) * _half(p, False) + (hi * s) * _half(p, True)


# ---- kernels --------------------------------------------------------------------------------------

@triton.jit
def _load_block(row, t, c_end, mask_n, col, GW: tl.constexpr, EVEN: tl.constexpr):
    """The four [BLOCK_N, GW] word tiles of a block starting at word t."""
    mask = mask_n[:, None]
    return (tl.load(row + t, mask=mask & ((t + col < c_end) | EVEN)[None, :], other=0),
            tl.load(row + t + GW, mask=mask & ((t + GW + col < c_end) | EVEN)[None, :], other=0),
            tl.load(row + t + 2 * GW, mask=mask & ((t + 2 * GW + col < c_end) | EVEN)[None, :], other=0),
            tl.load(row + t + 3 * GW, mask=mask & ((t + 3 * GW + col < c_end) | EVEN)[None, :], other=0))


@triton.jit
def _group(words, t, s_row, z_row, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW, h, acc,
           GW: tl.constexpr, F16X2: tl.constexpr, EVEN: tl.constexpr):
    """One group's tile (words t .. t + GW of each row) into h (fp16 pairs) or acc (fp32)."""
    c = t + tl.arange(0, GW)
    ok = (c < c_end) | EVEN
    p0, p1, p2, p3, xw = _x_pairs(xp_ptr, xw_ptr, c, ok, KW)
    g_ok = mask_n if EVEN else mask_n & (offs_n * 0 + t < c_end)   # a 1-D mask: the interpreter needs it
    s = tl.load(s_row + t // GW, mask=g_ok, other=0.0).to(tl.float32)[:, None]
    acc += tl.load(z_row + t // GW, mask=g_ok, other=0.0).to(tl.float32)[:, None] * xw[None, :]
    if F16X2:
        h = _codes_times_x(words, _half2(s), _half2(s * -1024.0), p0[None, :], p1[None, :], p2[None, :],
                           p3[None, :], h)
    else:
        acc = _codes_times_x_f32(words, s, p0[None, :], p1[None, :], p2[None, :], p3[None, :], acc)
    return h, acc


@triton.jit
def _block(w0, w1, w2, w3, t, s_row, z_row, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW, acc,
           GW: tl.constexpr, F16X2: tl.constexpr, EVEN: tl.constexpr):
    """A block of four groups into acc: summed in fp16 pairs, then added in fp32."""
    h = tl.zeros(w0.shape, tl.int32)
    h, acc = _group(w0, t, s_row, z_row, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW, h, acc,
                    GW, F16X2, EVEN)
    h, acc = _group(w1, t + GW, s_row, z_row, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW, h, acc,
                    GW, F16X2, EVEN)
    h, acc = _group(w2, t + 2 * GW, s_row, z_row, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW, h,
                    acc, GW, F16X2, EVEN)
    h, acc = _group(w3, t + 3 * GW, s_row, z_row, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW, h,
                    acc, GW, F16X2, EVEN)
    if F16X2:
        acc = _flush(h, acc)
    return acc


@triton.jit
def _program_rows(w_ptr, s_ptr, z_ptr, N, KW, groups, words_per_split, BLOCK_N: tl.constexpr,
                  GW: tl.constexpr, EVEN: tl.constexpr, ROPE_DIM: tl.constexpr = 0):
    """Program (pid_n, pid_k)'s rows and K split: offsets and mask of its rows (in order, or with
    the rotary fused, ROPE_DIM, as triton_fused.rope_tile_rows pairs them), a group's word columns,
    the split's words [c_start, c_end), word pointers of its gate rows and (gate_up) of the up rows
    N further on, and those rows' scale and zero pointers."""
    offs_n = rope_tile_rows(tl.program_id(0), BLOCK_N, ROPE_DIM)
    mask_n = (offs_n < N) | EVEN   # EVEN: whole tiles only, the masks fold away
    col = tl.arange(0, GW)
    c_start = tl.program_id(1) * words_per_split
    c_end = tl.minimum(c_start + words_per_split, KW)
    row_g = w_ptr + offs_n.to(tl.int64)[:, None] * KW + col[None, :]
    row_u = w_ptr + (offs_n + N).to(tl.int64)[:, None] * KW + col[None, :]
    s_g, z_g = s_ptr + offs_n * groups, z_ptr + offs_n * groups
    return offs_n, mask_n, col, c_start, c_end, row_g, row_u, s_g, z_g, s_g + N * groups, z_g + N * groups


@triton.jit
def _store_rows(acc_g, acc_u, offs_n, mask_n, N, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n, pid_k, split_k,
                SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr,
                SPLITS: tl.constexpr, rope=(), ROPE_DIM: tl.constexpr = 0):
    """The rows' sums (gate and up tiles [BLOCK_N, words]), split-K reduced in-launch, stored as y
    or (ROPE_DIM) rotated into q and the KV caches: `rope` is triton_fused.rope_state's tuple."""
    yg = tl.sum(acc_g, 1)[None, :]
    yu = yg
    if SILU_MUL:
        yu = tl.sum(acc_u, 1)[None, :]
    rows = tl.arange(0, 1)
    yg, yu, stores = _reduce_splits(yg, yu, rows, offs_n, rows < 1, mask_n, N, ws_ptr, lock_ptr, pid_n,
                                    pid_k, split_k, 1, SILU_MUL, USE_SPLIT, SPLITS)
    if stores:
        if ROPE_DIM:
            rope_store_tile(yg, offs_n, pid_n, b_ptr, rope, HAS_BIAS, ROPE_DIM)
        else:
            _store_y(yg, yu, rows, offs_n, rows < 1, mask_n, N, b_ptr, y_ptr, N, SILU_MUL, HAS_BIAS)


@triton.jit(do_not_specialize=["split_k"])
def _int4_gemv_kernel(xp_ptr, xw_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
                      N, KW, groups, words_per_split, split_k,
                      rq_ptr, rpos_ptr, rcs_ptr, rkc_ptr, rvc_ptr, rslot_ptr, r_stride_c, r_stride_cb,
                      r_stride_cs, r_stride_ch, r_q_rows, r_kv_rows, r_block_size,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                      SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr,
                      SPLITS: tl.constexpr, F16X2: tl.constexpr, EVEN: tl.constexpr,
                      PDL: tl.constexpr, ROPE_DIM: tl.constexpr = 0):
    """Grid (N tiles, K splits). A program walks its rows' K split in blocks of four groups, each
    group a [BLOCK_N, GROUP / 8 words] tile with one scale and zero per row (1-D loads that share the
    tile's layout: no layout conversions in the loop), and keeps the next block in flight.
    ROPE_DIM: a qkv projection that rotates and stores its output (RopeStore's arguments, r*)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    GW: tl.constexpr = GROUP // 8   # words per group
    offs_n, mask_n, col, c_start, c_end, row_g, row_u, s_g, z_g, s_u, z_u = _program_rows(
        w_ptr, s_ptr, z_ptr, N, KW, groups, words_per_split, BLOCK_N, GW, EVEN, ROPE_DIM)
    rope = rope_state(offs_n, rq_ptr, rpos_ptr, rcs_ptr, rkc_ptr, rvc_ptr, rslot_ptr, r_stride_c, r_stride_cb,
                      r_stride_cs, r_stride_ch, r_q_rows, r_kv_rows, r_block_size, ROPE_DIM)
    # The weights do not depend on the previous kernel: ask for the first block before waiting on it.
    g0, g1, g2, g3 = _load_block(row_g, c_start, c_end, mask_n, col, GW, EVEN)
    u0, u1, u2, u3 = g0, g1, g2, g3
    if SILU_MUL:
        u0, u1, u2, u3 = _load_block(row_u, c_start, c_end, mask_n, col, GW, EVEN)
    wait_previous(PDL)
    acc_g = tl.zeros([BLOCK_N, GW], tl.float32)
    acc_u = acc_g
    for t in range(c_start, c_end, 4 * GW):
        # The next block is in flight meanwhile; past the split's end the last one again (no mask).
        t_next = tl.minimum(t + 4 * GW, c_end - 4 * GW) if EVEN else t + 4 * GW
        n0, n1, n2, n3 = _load_block(row_g, t_next, c_end, mask_n, col, GW, EVEN)
        if SILU_MUL:
            m0, m1, m2, m3 = _load_block(row_u, t_next, c_end, mask_n, col, GW, EVEN)
        acc_g = _block(g0, g1, g2, g3, t, s_g, z_g, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW,
                       acc_g, GW, F16X2, EVEN)
        g0, g1, g2, g3 = n0, n1, n2, n3
        if SILU_MUL:
            acc_u = _block(u0, u1, u2, u3, t, s_u, z_u, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW,
                           acc_u, GW, F16X2, EVEN)
            u0, u1, u2, u3 = m0, m1, m2, m3
    _store_rows(acc_g, acc_u, offs_n, mask_n, N, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n, pid_k, split_k,
                SILU_MUL, HAS_BIAS, USE_SPLIT, SPLITS, rope, ROPE_DIM)


# ---- launch ---------------------------------------------------------------------------------------

def default_config(N: int, K: int, group: int, silu_mul: bool, device: torch.device,
                   mma: bool | None = None) -> Int4GemvConfig:
    """64-row tiles. On CUDA with group 128 (mma None or True) int4_mma's kernel, by `mma_config`.
    Otherwise K split in powers of two while there are fewer than 2 programs per SM (gate_up's
    counted twice: two weight streams each) and each split keeps at least two blocks of four groups
    (one in flight while the other is summed): from the H100 sweep of docs/PERF.md (run 14), the
    fastest, or within 0.4% of it, for Llama-3-8B's qkv, o, gate_up and down."""
    blocks, split = triton.cdiv(K, group * 4), 1
    programs = triton.cdiv(N, 64) * (2 if silu_mul else 1)
    sms = num_sms(device, interpreter=4)
    if (device.type == "cuda" if mma is None else mma) and group == 128 and K % 512 == 0 and N % 64 == 0:
        return mma_config(programs, blocks, silu_mul, sms)
    while programs * split < 2 * sms and 4 * split <= blocks:
        split *= 2
    return Int4GemvConfig(64, split)


def mma_config(programs: int, blocks: int, silu_mul: bool, sms: int) -> Int4GemvConfig:
    """int4_mma's launch for `programs` 64-row tiles (gate_up's counted twice) of `blocks` blocks of
    four groups: splits divide the blocks and keep two a split. Two blocks in flight (183
    registers: 2 programs an SM) unsplit where the tiles alone fill that wave, or at the largest
    split that fits it if that gives 1.5 programs an SM; else one block in flight (106 registers;
    gate_up's two streams take 255), split to 2 programs an SM. The H200 sweep of docs/PERF.md (run
    17): the best or within 3% for Llama-3-8B's qkv (one block ahead, split 4), o and down (two
    ahead, split 4), gate_up (one ahead, unsplit) and an int4 lm_head (two ahead, unsplit)."""
    splits = [d for d in range(1, blocks // 2 + 1) if blocks % d == 0] or [1]
    fits = [d for d in splits if programs * d <= 2 * sms]
    if not silu_mul and (not fits or programs * fits[-1] >= 1.5 * sms):
        split, ahead = (fits[-1] if fits else 1), 2
    else:
        split, ahead = next((d for d in splits if programs * d >= 2 * sms), splits[-1]), 1
    return Int4GemvConfig(64, split, mma=True, ahead=ahead, **pack_in_kernel(blocks, split))


def pack_in_kernel(blocks: int, split: int) -> dict:
    """x packed by the tensor-core GEMV's own programs, each its split's words in one go (up to 512)
    and the norm's 1/rms from loads of up to 4096 wide: 1-2 L2 round trips after the wait instead of
    a pack_x launch. A Llama-3-8B layer's four linears: 58.0 -> 52.2 us, at the floor of x packed
    beforehand (51.9); batch-1 decode +1.2-2.9% (docs/PERF.md run 21). Narrower chunks cost up to
    10 us a layer: each round trip waits on L2."""
    return dict(pack_in_kernel=True, pack_words=min(512, triton.next_power_of_2(64 * blocks // split)),
                rstd_block=rstd_block(512 * blocks))   # K: blocks of 4 groups of 128


def int4_gemv(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None, *,
              norm_weight: torch.Tensor | None = None, eps: float = 0.0,
              residual: torch.Tensor | None = None, silu_mul: bool = False,
              config: Int4GemvConfig | None = None,
              rope: RopeStore | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(rmsnorm(x + residual) W^T + b), residual out) for x [1, K] on CUDA (or the interpreter);
    the fusions as in kernels.fused_linear (docs/CONTRACTS.md). Two launches: x packed, then the
    GEMV (one with the tensor-core kernel, which packs x itself).
    rope (a qkv projection's, no silu_mul): instead of y, q [1, H, D] with k and v in the caches,
    as qk_norm_rope_store leaves them: rotated in the GEMV's epilogue where the tiles allow it."""
    N2, K = w.shape
    N = N2 // 2 if silu_mul else N2
    assert x.shape == (1, K) and x.stride(-1) == 1, (x.shape, K)
    cfg = config or default_config(N, K, w.group_size, silu_mul, x.device)
    if rope is not None and not rope.fits(cfg.block_n):
        return _rope_after(int4_gemv(x, w, bias, norm_weight=norm_weight, eps=eps, residual=residual,
                                     config=cfg), rope)
    assert rope is None or (not silu_mul and N == rope.rows), (N, rope)
    pdl = pdl_supported(x.device)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device) if rope is None else rope.q
    rope_args = rope.args() if rope is not None else RopeStore.unused(y)
    rope_dim = rope.head_dim if rope is not None else 0
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    counters, ws = arrival_counters(x.device, grid[0] if cfg.split_k > 1 else 0), y
    if cfg.split_k > 1:
        ws = torch.empty(cfg.split_k * N2, dtype=torch.float32, device=x.device)
    if cfg.mma:
        from . import int4_mma   # it builds on this module's helpers
        assert int4_mma.supports(x, w.group_size, N, K, cfg.block_n, cfg.split_k, cfg.num_warps), cfg
        pack = None
        if cfg.pack_in_kernel:
            xp, xg, r_out = pack_buffers(x, norm_weight is not None, residual, mma=True)
            pack = int4_mma.PackInKernel(x, residual, norm_weight, r_out, eps, cfg.pack_words, cfg.rstd_block)
        else:
            xp, xg, r_out = pack_x(x, norm_weight, eps, residual, mma=True)
        int4_mma.launch(xp, xg, w, bias, y, ws, counters, N, K, cfg.block_n, cfg.split_k, cfg.num_warps,
                        silu_mul, pdl, pdl_launch(x.device) if pdl else {}, cfg.ahead, pack,
                        rope_args=rope_args, rope_dim=rope_dim)
        return y, r_out
    xp, xw, r_out = pack_x(x, norm_weight, eps, residual)
    step = w.group_size // 8 * 4   # words a split is a multiple of: whole blocks of four groups
    words_per_split = triton.cdiv(triton.cdiv(K // 8, step), cfg.split_k) * step
    _int4_gemv_kernel[grid](
        xp, xw, w.packed, w.scales, w.zeros, bias if bias is not None else x, y, ws, counters,
        N, K // 8, K // w.group_size, words_per_split, cfg.split_k, *rope_args, GROUP=w.group_size,
        BLOCK_N=cfg.block_n, SILU_MUL=silu_mul,
        HAS_BIAS=bias is not None, USE_SPLIT=cfg.split_k > 1, SPLITS=triton.next_power_of_2(cfg.split_k),
        F16X2=x.is_cuda,
        EVEN=N % cfg.block_n == 0 and words_per_split * cfg.split_k == K // 8,
        PDL=pdl, ROPE_DIM=rope_dim, num_warps=cfg.num_warps, **(pdl_launch(x.device) if pdl else {}))
    return y, r_out


def _rope_after(out: tuple[torch.Tensor, torch.Tensor | None], rope: RopeStore) -> tuple:
    """int4_gemv's result with rope, from y and one more launch: for tiles that cannot rotate."""
    from pagedeploy.kernels import qk_norm_rope_store
    y, r_out = out
    q = qk_norm_rope_store(y, None, None, 0.0, rope.positions, rope.cos_sin_cache, rope.k_cache,
                           rope.v_cache, rope.slot_mapping, rope.q.shape[1], rope.k_cache.shape[2],
                           rope.head_dim)
    return q.view_as(rope.q), r_out
