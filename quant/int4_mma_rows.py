"""int4 linears for 2-64 rows of x (decode batches) on tensor cores fed from registers (group 128).

int4_mma.py's batch-1 kernel with tokens in the MMA's 8 columns instead of 8 copies of one x. The
words load in the same blocked layout and decode the same way (four LOP3 and one shift a word:
codes ORed into fp16 1024 + code, or 1024 + 16 code for the odd planes), once for all the tokens: a
thread's two rows g and g + 8 are the A fragment of `mma.sync.m16n8k16`. B is x as
int4_pack.pack_x_rows writes it: thread (g, t) of the warp gives column g, so n-tile j's B is token
8j + g's pairs for the thread's words, loaded per row of the tile as token 8j + (row % 8) (rows of
a thread differ by multiples of 8, so both ask for the same bytes).

One asm block runs two n-tiles (16 tokens: a "pair") over a group: 16 MMAs, four independent
chains. C comes back in the tile's own elements: row g's four elements hold (token 2t, 2t + 1) of
n-tile 2p and of n-tile 2p + 1, row g + 8's the same, so element (row, word w) of pair p is token
16p + PAIR_TOKEN[w], with no exchange between threads. As in int4_mma.py a group's C is code . x +
1024 * (the sum of x's pairs as packed), both exact in fp32; the kernel adds the group's constant
and applies scale and zero per element: acc += s * (C - constant) + z * sum(x).

Up to 4 pairs (64 tokens) a launch; fewer rows are padded to whole pairs (zeros in x). A program
owns BLOCK_N output rows and a K split, reduced in-launch as int4_gemv's splits are. CUDA only: the
CPU interpreter cannot run PTX (the dot and gemm paths of int4_triton.py cover those tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int4 import Int4Weight
from .int4_gemv import _program_rows
from .int4_mma import GROUP, _advance, _stream
from .int4_pack import pack_x_rows

MAX_PAIRS = 4   # 64 tokens
WEIGHT_CACHE = ".cg"   # weights bypass L1, which then keeps x (read by every row tile)


def _asm() -> str:
    """PTX for one group of two n-tiles. $0-7 out (C of elements 0-7), $8-15 codes (0, 4) of the
    words (row g: 8-11, row g + 8: 12-15), $16-23 codes (2, 6), $24-31 codes (1, 5) * 16, $32-39
    codes (3, 7) * 16, then x's B operands (int64, elements 0-3: row g's words; 4-7 repeat them):
    $40-47 n-tile 2p pairs 0 | 2, $48-55 its pairs 1 | 3, $56-63 and $64-71 n-tile 2p + 1's."""
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
    acc = ("c", "d", "e", "f")   # (n-tile 2p, even planes), (2p, odd), (2p + 1, even), (2p + 1, odd)
    lines = [".reg .b32 b<8>;", ".reg .f32 " + ", ".join(f"{a}{k}" for a in acc for k in range(4)) + ";",
             *(f"mov.f32 {a}{k}, 0f00000000;" for a in acc for k in range(4))]
    for i in range(4):
        even = f"{{${8 + i}, ${12 + i}, ${16 + i}, ${20 + i}}}"
        odd = f"{{${24 + i}, ${28 + i}, ${32 + i}, ${36 + i}}}"
        lines += [f"mov.b64 {{b{2 * k}, b{2 * k + 1}}}, ${40 + 8 * k + i};" for k in range(4)]
        for k, (a, frag) in enumerate(zip(acc, (even, odd, even, odd))):
            regs = ", ".join(f"{a}{r}" for r in range(4))
            lines.append(f"{mma} {{{regs}}}, {frag}, {{b{2 * k}, b{2 * k + 1}}}, {{{regs}}};")
    # element q of row g: n-tile 2p + q // 2, column 2t + q % 2 (C regs 0, 1); row g + 8: C regs 2, 3
    for q in range(4):
        lo, hi = ("c", "d") if q < 2 else ("e", "f")
        lines += [f"add.f32 ${q}, {lo}{q % 2}, {hi}{q % 2};", f"add.f32 ${4 + q}, {lo}{2 + q % 2}, {hi}{2 + q % 2};"]
    return "{\n" + "\n".join(lines) + "\n}"


_PAIR_MMA = tl.constexpr(_asm())
_PAIR_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["r"] * 32 + ["l"] * 32))


@triton.jit
def _pair_token(GW: tl.constexpr):
    """Token (within a pair) of each word column's element: word 4t + q holds column 2t + q % 2 of
    n-tile q // 2."""
    w = tl.arange(0, GW)
    return (w % 4) // 2 * 8 + (w // 4) * 2 + w % 2


@triton.jit
def _pair(codes, x_row, KW, xg_ptr, q, groups, MP, s, z, p: tl.constexpr, acc, GW: tl.constexpr):
    """acc += one group of pair p: its MMAs, the group's constant, scale and zero."""
    lo0, lo2, hi1, hi3 = codes
    tokens = x_row + p * 32 * KW   # n-tile 2p: tokens 16p + g; 2p + 1: 8 tokens (16 KW) on
    c = tl.inline_asm_elementwise(
        _PAIR_MMA, _PAIR_CONSTRAINTS,
        [lo0, lo2, hi1, hi3, tl.load(tokens), tl.load(tokens + KW), tl.load(tokens + 16 * KW),
         tl.load(tokens + 17 * KW)], dtype=tl.float32, is_pure=True, pack=8)
    at = xg_ptr + q * MP + p * 16 + _pair_token(GW)
    start = tl.load(at)[None, :]
    sum_x = tl.load(at + groups * MP)[None, :]
    return acc + s * (c - start) + z * sum_x


@triton.jit
def _group(words, t, s, z, x_row, KW, xg_ptr, groups, MP, accs, PAIRS: tl.constexpr, GW: tl.constexpr):
    """One group's [BLOCK_N, GW] words into every pair's accumulator."""
    shifted = words >> 8   # the masks below keep none of the sign-extended bits
    codes = ((words & 0x000F000F) | 0x64006400, (shifted & 0x000F000F) | 0x64006400,
             (words & 0x00F000F0) | 0x64006400, (shifted & 0x00F000F0) | 0x64006400)
    x_row = x_row + t
    q = t // GW
    s = s.to(tl.float32)[:, None]
    z = z.to(tl.float32)[:, None]
    a0, a1, a2, a3 = accs
    a0 = _pair(codes, x_row, KW, xg_ptr, q, groups, MP, s, z, 0, a0, GW)
    if PAIRS > 1:
        a1 = _pair(codes, x_row, KW, xg_ptr, q, groups, MP, s, z, 1, a1, GW)
    if PAIRS > 2:
        a2 = _pair(codes, x_row, KW, xg_ptr, q, groups, MP, s, z, 2, a2, GW)
    if PAIRS > 3:
        a3 = _pair(codes, x_row, KW, xg_ptr, q, groups, MP, s, z, 3, a3, GW)
    return a0, a1, a2, a3


@triton.jit
def _block(block, t, x_row, KW, xg_ptr, groups, MP, accs, PAIRS: tl.constexpr, GW: tl.constexpr):
    """A block (int4_mma._stream's words and scales) into the accumulators."""
    w0, w1, w2, w3, sz = block
    s0, s1, s2, s3, z0, z1, z2, z3 = sz
    accs = _group(w0, t, s0, z0, x_row, KW, xg_ptr, groups, MP, accs, PAIRS, GW)
    accs = _group(w1, t + GW, s1, z1, x_row, KW, xg_ptr, groups, MP, accs, PAIRS, GW)
    accs = _group(w2, t + 2 * GW, s2, z2, x_row, KW, xg_ptr, groups, MP, accs, PAIRS, GW)
    return _group(w3, t + 3 * GW, s3, z3, x_row, KW, xg_ptr, groups, MP, accs, PAIRS, GW)


@triton.jit
def _tokens(p: tl.constexpr, GW: tl.constexpr):
    return p * 16 + _pair_token(GW)


@triton.jit
def _park(acc, p: tl.constexpr, offs_n, N, MP, ws_ptr, pid_k, GW: tl.constexpr):
    """A split's partial of pair p into the workspace [split, MP, N] (padded tokens too)."""
    tl.store(ws_ptr + (pid_k * MP + _tokens(p, GW)[None, :]) * N + offs_n[:, None], acc)


@triton.jit
def _gather(p: tl.constexpr, offs_n, N, MP, ws_ptr, split_k, SPLITS: tl.constexpr, GW: tl.constexpr):
    """Pair p summed over the splits, in a fixed order (deterministic)."""
    sp = tl.arange(0, SPLITS)[:, None, None]
    parts = ws_ptr + (sp * MP + _tokens(p, GW)[None, None, :]) * N + offs_n[None, :, None]
    return tl.sum(tl.load(parts, mask=sp < split_k, other=0.0, cache_modifier=".cg"), 0)


@triton.jit
def _put(acc, p: tl.constexpr, offs_n, M, b_ptr, y_ptr, stride_ym, HAS_BIAS: tl.constexpr, GW: tl.constexpr):
    """Pair p's outputs y[token, row] (+ bias) for the tokens below M."""
    tok = _tokens(p, GW)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[:, None]
    tl.store(y_ptr + tok[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=(tok < M)[None, :])


@triton.jit(do_not_specialize=["split_k"])
def _int4_mma_rows_kernel(xp_ptr, xg_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
                          M, MP, N, KW, groups, words_per_split, split_k, stride_ym,
                          BLOCK_N: tl.constexpr, PAIRS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          USE_SPLIT: tl.constexpr, SPLITS: tl.constexpr, AHEAD: tl.constexpr = 1,
                          WEIGHT_CACHE: tl.constexpr = ".cg"):
    """Grid (N tiles, K splits), whole tiles only: a program walks its rows' K split in blocks of
    four groups (AHEAD blocks of words, scales and zeros in flight), every token at once."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    GW: tl.constexpr = 16
    B: tl.constexpr = 4 * GW
    offs_n, mask_n, col, c_start, c_end, rows, _, s_rows, z_rows, _, _ = _program_rows(
        w_ptr, s_ptr, z_ptr, N, KW, groups, words_per_split, BLOCK_N, GW, True)
    # x of token 8j + (row % 8) for n-tile j (the row's MMA column), at word column col
    x_row = xp_ptr + (tl.arange(0, BLOCK_N) % 8)[:, None] * (2 * KW) + col[None, :]
    g = _stream(rows, s_rows, z_rows, c_start, c_end, mask_n, col, GW, WEIGHT_CACHE)
    h = g
    if AHEAD == 2:
        h = _stream(rows, s_rows, z_rows, c_start + B, c_end, mask_n, col, GW, WEIGHT_CACHE)
    zero = tl.zeros([BLOCK_N, GW], tl.float32)
    accs = (zero, zero, zero, zero)
    for t in range(c_start, c_end, B):
        new = _stream(rows, s_rows, z_rows, t + AHEAD * B, c_end, mask_n, col, GW, WEIGHT_CACHE)
        accs = _block(g, t, x_row, KW, xg_ptr, groups, MP, accs, PAIRS, GW)
        g, h = _advance(g, h, new, AHEAD)
    a0, a1, a2, a3 = accs
    if USE_SPLIT:
        _park(a0, 0, offs_n, N, MP, ws_ptr, pid_k, GW)
        if PAIRS > 1:
            _park(a1, 1, offs_n, N, MP, ws_ptr, pid_k, GW)
        if PAIRS > 2:
            _park(a2, 2, offs_n, N, MP, ws_ptr, pid_k, GW)
        if PAIRS > 3:
            _park(a3, 3, offs_n, N, MP, ws_ptr, pid_k, GW)
        tl.debug_barrier()   # every thread's partial is written before the release below
        if tl.atomic_add(lock_ptr + pid_n, 1) == split_k - 1:   # acq_rel: the last split sums them
            a0 = _gather(0, offs_n, N, MP, ws_ptr, split_k, SPLITS, GW)
            if PAIRS > 1:
                a1 = _gather(1, offs_n, N, MP, ws_ptr, split_k, SPLITS, GW)
            if PAIRS > 2:
                a2 = _gather(2, offs_n, N, MP, ws_ptr, split_k, SPLITS, GW)
            if PAIRS > 3:
                a3 = _gather(3, offs_n, N, MP, ws_ptr, split_k, SPLITS, GW)
            _put_pairs(a0, a1, a2, a3, offs_n, M, b_ptr, y_ptr, stride_ym, PAIRS, HAS_BIAS, GW)
            tl.atomic_xchg(lock_ptr + pid_n, 0)   # re-armed for the next launch (graph replays)
    else:
        _put_pairs(a0, a1, a2, a3, offs_n, M, b_ptr, y_ptr, stride_ym, PAIRS, HAS_BIAS, GW)


@triton.jit
def _put_pairs(a0, a1, a2, a3, offs_n, M, b_ptr, y_ptr, stride_ym, PAIRS: tl.constexpr,
               HAS_BIAS: tl.constexpr, GW: tl.constexpr):
    _put(a0, 0, offs_n, M, b_ptr, y_ptr, stride_ym, HAS_BIAS, GW)
    if PAIRS > 1:
        _put(a1, 1, offs_n, M, b_ptr, y_ptr, stride_ym, HAS_BIAS, GW)
    if PAIRS > 2:
        _put(a2, 2, offs_n, M, b_ptr, y_ptr, stride_ym, HAS_BIAS, GW)
    if PAIRS > 3:
        _put(a3, 3, offs_n, M, b_ptr, y_ptr, stride_ym, HAS_BIAS, GW)


def supports(x: torch.Tensor, w: Int4Weight, block_n: int, split_k: int, num_warps: int) -> bool:
    """CUDA, 2-64 rows, group 128, whole row tiles of an even number of the layout's 8 * num_warps-row
    repeats, whole blocks of four groups in every split."""
    (M, K), N = x.shape, w.shape[0]
    return (x.is_cuda and 1 <= M <= 16 * MAX_PAIRS and w.group_size == GROUP and N % block_n == 0
            and block_n % (16 * num_warps) == 0 and K % GROUP == 0 and (K // GROUP) % (4 * split_k) == 0)


def int4_mma_rows(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, block_n: int, split_k: int,
                  num_warps: int, ahead: int, counters: torch.Tensor) -> torch.Tensor:
    """y = x @ dequant(w)^T (+ bias) for x [M <= 64, K] contiguous: x packed, then one launch."""
    (M, K), N = x.shape, w.shape[0]
    pairs = triton.cdiv(M, 16)
    mp = 16 * pairs
    xp, xg = pack_x_rows(x, mp)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws = torch.empty(split_k, mp, N, dtype=torch.float32, device=x.device) if split_k > 1 else y
    words_per_split = K // 8 // split_k
    _int4_mma_rows_kernel[(N // block_n, split_k)](
        xp, xg, w.packed, w.scales, w.zeros, bias if bias is not None else y, y, ws, counters,
        M, mp, N, K // 8, K // GROUP, words_per_split, split_k, y.stride(0), BLOCK_N=block_n,
        PAIRS=pairs, HAS_BIAS=bias is not None, USE_SPLIT=split_k > 1,
        SPLITS=triton.next_power_of_2(split_k), AHEAD=ahead, WEIGHT_CACHE=WEIGHT_CACHE, num_warps=num_warps)
    return y
