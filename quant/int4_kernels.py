"""The Triton device code of the int4 W4A16 matmul: nibble decoding, the fma (CUDA-core), dot and
gemm (tensor-core) kernels with their in-launch split-K reduction, the x permutation for the dot path
and the dequantize kernel of the dense path. How and when each runs: int4_triton.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

# ---- device helpers -------------------------------------------------------------------------------

@triton.jit
def _magic(nib, DT: tl.constexpr):
    """Nibbles (int32, 0..15) as DT values MAGIC + code, exactly (fp32: the code itself)."""
    if DT == tl.float32:
        return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    elif DT == tl.bfloat16:
        return (nib | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)    # 128 + code
    else:
        return (nib | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)     # 1024 + code


@triton.jit
def _magic_plane(words, j: tl.constexpr, DT: tl.constexpr):
    return _magic((words >> (4 * j)) & 0xF, DT)


@triton.jit
def _magic_value(DT: tl.constexpr):
    if DT == tl.float32:
        return 0.0
    elif DT == tl.bfloat16:
        return 128.0
    else:
        return 1024.0


@triton.jit
def _fma_row(acc, words, hi, s, ms, z, magic, x_row, c, mask_c, XDT: tl.constexpr):
    """acc[n, c] += sum_j x[8c + j] (code_j s + z) for one row of x; ms = -2^23 s.

    16-bit x is read as int32 pairs (x[8c + 2p], x[8c + 2p + 1]): half the loads."""
    xw = tl.zeros(c.shape, tl.float32)
    for p in tl.static_range(4):
        if XDT == tl.float32:
            x_lo = tl.load(x_row + c * 8 + 2 * p, mask=mask_c, other=0.0)
            x_hi = tl.load(x_row + c * 8 + 2 * p + 1, mask=mask_c, other=0.0)
        else:
            pair = tl.load(x_row + c * 4 + p, mask=mask_c, other=0)
            if XDT == tl.bfloat16:   # bf16 -> fp32 is a 16-bit shift of the bits
                x_lo = (pair << 16).to(tl.float32, bitcast=True)
                x_hi = (pair & -65536).to(tl.float32, bitcast=True)
            else:
                x_lo = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                x_hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        xw += x_lo + x_hi
        acc = _fma_plane(acc, words, hi, s, ms, magic, x_lo, 2 * p)
        acc = _fma_plane(acc, words, hi, s, ms, magic, x_hi, 2 * p + 1)
    return acc + z * xw[None, :]


@triton.jit
def _fma_plane(acc, words, hi, s, ms, magic, xj, j: tl.constexpr):
    # Nibble j stays in place: (word & 0xF << 4j) | bits of 2^23 = 2^23 + code * 16^j exactly (j <= 4
    # fits the 23-bit mantissa; nibbles 5..7 come from hi = word >> 12, at bits 8..19). One fma takes
    # 2^23 s off (exact: a power of two times s), and x is scaled by 16^-shift instead. `magic`
    # (= 0x4B000000) comes in as an argument so that it sits in one register and the mask is the
    # LOP3's immediate (as literals, ptxas re-materializes masks into registers on every use).
    sh: tl.constexpr = 4 * j if j < 5 else 4 * (j - 3)
    part = words if j < 5 else hi
    f = ((part & (0xF << sh)) | magic).to(tl.float32, bitcast=True)
    return acc + tl.fma(f, s, ms) * (xj * (1.0 / (1 << sh)))[None, :]


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, lock_ptr, tile, pid_k, split_k,
              USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write acc [BM, BN] (fp32) to y; with split-K, the last program of the tile reduces."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if USE_SPLIT:
        part = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()   # every thread's partial is written before the release below
        arrived = tl.atomic_add(lock_ptr + tile, 1)   # acq_rel, gpu scope
        if arrived == split_k - 1:
            total = tl.zeros(acc.shape, tl.float32)
            for s in range(split_k):   # fixed order: deterministic
                total += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            _store_y(total, offs_m, offs_n, mask, N, y_ptr, stride_ym, b_ptr, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)   # re-armed for the next launch (graph replays)
    else:
        _store_y(acc, offs_m, offs_n, mask, N, y_ptr, stride_ym, b_ptr, HAS_BIAS)


@triton.jit
def _store_y(acc, offs_m, offs_n, mask, N, y_ptr, stride_ym, b_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid in grouped order: GROUP_M row tiles walk the column
    tiles together (x tiles reused from L2)."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows_in_group, (pid % per_group) // rows_in_group


# ---- kernels ----------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["M", "groups", "split_k"])   # fewer compiled variants; no speed lost
def _int4_fma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, M, N, KW, groups, words_per_split,
                     split_k, stride_xm, stride_ym, magic, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr,
                     NUM_STAGES: tl.constexpr, USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     EVEN: tl.constexpr):
    """Grid (N tiles, K splits). One or two rows of x, one [BLOCK_N, BLOCK_K/8] accumulator each;
    UNROLL sub-tiles of BLOCK_K per loop step (each with its own group scale when BLOCK_K <= GROUP)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    BKW: tl.constexpr = BLOCK_K // 8
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BKW)
    mask_n = (offs_n < N) | EVEN   # EVEN: no ragged tiles, masks fold away
    xs = x_ptr if XDT == tl.float32 else x_ptr.to(tl.pointer_type(tl.int32))
    sxm = stride_xm if XDT == tl.float32 else stride_xm // 2
    acc0 = tl.zeros((BLOCK_N, BKW), tl.float32)
    acc1 = acc0
    c_start = pid_k * words_per_split
    c_end = tl.minimum(c_start + words_per_split, KW)
    for c0 in tl.range(c_start, c_end, BKW * UNROLL, num_stages=NUM_STAGES):
        for u in tl.static_range(UNROLL):
            c = c0 + u * BKW + offs_c
            mask_c = (c < c_end) | EVEN
            mask = mask_n[:, None] & mask_c[None, :]
            words = tl.load(w_ptr + offs_n[:, None] * KW + c[None, :], mask=mask, other=0)
            if GROUP % BLOCK_K == 0:   # the sub-tile lies in one group: a scale and a zero per row
                g = offs_n * groups + (c0 + u * BKW) // (GROUP // 8)
                s = tl.load(s_ptr + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
                z = tl.load(z_ptr + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            else:                      # several groups: a scale and a zero per word (L1 hits)
                g = offs_n[:, None] * groups + c[None, :] // (GROUP // 8)
                s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g, mask=mask, other=0.0).to(tl.float32)
            hi = words >> 12
            s = tl.broadcast_to(s, (BLOCK_N, BKW))
            ms = s * -8388608.0
            acc0 = _fma_row(acc0, words, hi, s, ms, z, magic, xs, c, mask_c, XDT)
            if BLOCK_M > 1:
                acc1 = _fma_row(acc1, words, hi, s, ms, z, magic, xs + sxm, c,
                                mask_c & (offs_c < (M > 1) * BKW), XDT)
    y0 = tl.sum(acc0, axis=1)
    if BLOCK_M == 1:
        out = y0[None, :]
    else:
        out = tl.trans(tl.join(y0, tl.sum(acc1, axis=1)))
    _epilogue(out, tl.arange(0, BLOCK_M), offs_n, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, lock_ptr,
              pid_n, pid_k, split_k, USE_SPLIT, HAS_BIAS)


@triton.jit(do_not_specialize=["M", "groups", "split_k"])
def _int4_dot_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, M, N, KW, groups,
                     words_per_split, split_k, stride_xm, stride_ym, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     SWAP_AB: tl.constexpr, FOLD: tl.constexpr, USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Grid (M tiles * N tiles, K splits). 8 dots per K tile, one per nibble plane. x comes from
    `_x_prep_kernel`: in plane order (contiguous tiles), with its per-group sums in xs_ptr."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    BKW: tl.constexpr = BLOCK_K // 8
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_m, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BKW)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), tl.float32)
    c_start = pid_k * words_per_split
    c_end = tl.minimum(c_start + words_per_split, KW)
    for c0 in range(c_start, c_end, BKW):
        c = c0 + offs_c
        mask_c = c < c_end
        if SWAP_AB:   # words [BN, BKW]: A operand; x planes [BKW, BM]: B operand
            wmask = mask_n[:, None] & mask_c[None, :]
            words = tl.load(w_ptr + offs_n[:, None] * KW + c[None, :], mask=wmask, other=0)
        else:         # words [BKW, BN]: B operand; x planes [BM, BKW]: A operand
            wmask = mask_c[:, None] & mask_n[None, :]
            words = tl.load(w_ptr + offs_n[None, :] * KW + c[:, None], mask=wmask, other=0)
        if FOLD:   # exact codes through the MMA, scale and zero once per (tile, column)
            part = tl.zeros(acc.shape, tl.float32)
            for j in tl.static_range(8):
                xj = _x_plane(x_ptr, offs_m, c, j, mask_m, mask_c, stride_xm, KW, SWAP_AB)
                if SWAP_AB:
                    part = tl.dot(_magic_plane(words, j, DT), xj, part, input_precision=PRECISION)
                else:
                    part = tl.dot(xj, _magic_plane(words, j, DT), part, input_precision=PRECISION)
            g = c0 // (GROUP // 8)
            xsum = tl.load(xs_ptr + offs_m * groups + g, mask=mask_m, other=0.0)
            s = tl.load(s_ptr + offs_n * groups + g, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n * groups + g, mask=mask_n, other=0.0).to(tl.float32)
            z -= _magic_value(DT) * s
            if SWAP_AB:
                s2, z2, x2 = s[:, None], z[:, None], xsum[None, :]
            else:
                s2, z2, x2 = s[None, :], z[None, :], xsum[:, None]
            # two fmas per element (as one expression it takes three ops)
            acc = tl.fma(tl.broadcast_to(z2, acc.shape), tl.broadcast_to(x2, acc.shape),
                         tl.fma(part, tl.broadcast_to(s2, acc.shape), acc))
        else:      # per-weight dequantization (groups smaller than the tile)
            if SWAP_AB:
                g = offs_n[:, None] * groups + c[None, :] // (GROUP // 8)
            else:
                g = offs_n[None, :] * groups + c[:, None] // (GROUP // 8)
            s = tl.load(s_ptr + g, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g, mask=wmask, other=0.0).to(tl.float32)
            for j in tl.static_range(8):
                xj = _x_plane(x_ptr, offs_m, c, j, mask_m, mask_c, stride_xm, KW, SWAP_AB)
                w = (_magic_plane(words, j, tl.float32) * s + z).to(DT)
                if SWAP_AB:
                    acc = tl.dot(w, xj, acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(xj, w, acc, input_precision=PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)
    _epilogue(acc, offs_m, offs_n, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, lock_ptr, pid, pid_k, split_k,
              USE_SPLIT, HAS_BIAS)


@triton.jit
def _unpack_words(words):
    """[R, C] words -> [R, 8C] nibbles (int32) in K order, nibble j of word c at 8c + j. Nested
    interleaves keep each word's eight nibbles in the thread that loaded it (a 3-D broadcast and
    reshape spread them over threads and went through shared memory)."""
    low = tl.interleave(tl.interleave(words & 0xF, (words >> 16) & 0xF),
                        tl.interleave((words >> 8) & 0xF, (words >> 24) & 0xF))
    high = tl.interleave(tl.interleave((words >> 4) & 0xF, (words >> 20) & 0xF),
                         tl.interleave((words >> 12) & 0xF, (words >> 28) & 0xF))
    return tl.interleave(low, high)


@triton.jit(do_not_specialize=["M", "groups", "split_k"])
def _int4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, M, N, KW, groups,
                      words_per_split, split_k, stride_xm, stride_ym, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr,
                      USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                      FOLD: tl.constexpr):
    """Grid (M tiles * N tiles, K splits); group 128, one K step a group. The step's [BLOCK_N, 16]
    words become a [BLOCK_N, 128] tile in x's own K order (nibble j of word c at k = 8c + j), so x
    is read as it is. FOLD=False (the default dispatch): the tile is dequantized in fp32 (c s + z),
    rounded once to x.dtype and multiplied into the MMA's accumulator. FOLD=True: exact codes
    MAGIC + c go through the MMA and the group's scale and zero apply once to its fp32 result, as
    in the dot kernel. One dot of K = 128 a group instead of eight of K = 16: the tile reaches the
    MMA in 16-byte shared-memory stores, not the eight 2-byte layout conversions of the dot kernel."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_m, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    offs_c, offs_k = tl.arange(0, 16), tl.arange(0, 128)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    c_start = pid_k * words_per_split
    c_end = tl.minimum(c_start + words_per_split, KW)
    for c0 in tl.range(c_start, c_end, 16, num_stages=NUM_STAGES):
        words = tl.load(w_ptr + offs_n[:, None] * KW + (c0 + offs_c)[None, :], mask=mask_n[:, None], other=0)
        codes = _unpack_words(words)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (8 * c0 + offs_k)[None, :], mask=mask_m[:, None],
                    other=0.0)
        g = c0 // 16
        s = tl.load(s_ptr + offs_n * groups + g, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * groups + g, mask=mask_n, other=0.0).to(tl.float32)
        if FOLD:
            part = tl.dot(x, tl.trans(_magic(codes, DT)), input_precision=PRECISION)
            z -= _magic_value(DT) * s
            xsum = tl.sum(x.to(tl.float32), axis=1)
            acc = tl.fma(tl.broadcast_to(z[None, :], acc.shape), tl.broadcast_to(xsum[:, None], acc.shape),
                         tl.fma(part, tl.broadcast_to(s[None, :], acc.shape), acc))
        else:   # the weight in x.dtype (rounded once, as the reference), the MMA accumulates
            wd = tl.fma(_magic(codes, tl.float32), s[:, None], z[:, None]).to(DT)
            acc = tl.dot(x, tl.trans(wd), acc, input_precision=PRECISION)
    _epilogue(acc, offs_m, offs_n, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, lock_ptr, pid, pid_k, split_k,
              USE_SPLIT, HAS_BIAS)


@triton.jit
def _x_plane(x_ptr, offs_m, c, j: tl.constexpr, mask_m, mask_c, stride_xm, KW, SWAP_AB: tl.constexpr):
    """x[m, 8c + j]: a contiguous slice of x permuted to plane order [M, 8, K/8]."""
    if SWAP_AB:
        xj = tl.load(x_ptr + offs_m[None, :] * stride_xm + j * KW + c[:, None],
                     mask=mask_c[:, None] & mask_m[None, :], other=0.0)
    else:
        xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + j * KW + c[None, :],
                     mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    return xj


@triton.jit
def _x_prep_kernel(x_ptr, xp_ptr, xs_ptr, KW, groups, stride_xm, GROUP: tl.constexpr):
    """Grid (M, groups): x in plane order, xp[m, j K/8 + c] = x[m, 8c + j], and xs[m, g] = the sum of
    x[m] over group g (fp32): the dot kernel's contiguous x tiles and its zero-point term."""
    m, g = tl.program_id(0), tl.program_id(1)
    c = g * (GROUP // 8) + tl.arange(0, GROUP // 8)
    j = tl.arange(0, 8)
    x = tl.load(x_ptr + m * stride_xm + c[:, None] * 8 + j[None, :])
    tl.store(xp_ptr + m * KW * 8 + j[None, :] * KW + c[:, None], x)
    tl.store(xs_ptr + m * groups + g, tl.sum(tl.sum(x.to(tl.float32), axis=1), axis=0))


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, KW, groups, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                         GROUPS_PER_PROGRAM: tl.constexpr):
    """out [N, K] = code * scale + zero in out's dtype (the reference's rounding). Grid (N tiles, K chunks):
    a [BLOCK_N, GROUP/8] word tile per group, unpacked along a third axis of 8 nibbles and stored as
    [BLOCK_N, GROUP] rows (16-byte stores)."""
    pid_n, pid_g = tl.program_id(0), tl.program_id(1)
    GW: tl.constexpr = GROUP // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    shifts = tl.arange(0, 8) * 4
    for i in tl.static_range(GROUPS_PER_PROGRAM):
        g = pid_g * GROUPS_PER_PROGRAM + i
        ok = mask_n & (offs_n * 0 + g < groups)
        words = tl.load(w_ptr + offs_n[:, None] * KW + g * GW + tl.arange(0, GW)[None, :], mask=ok[:, None], other=0)
        nib = (words[:, :, None] >> shifts[None, None, :]) & 0xF
        code = (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        s = tl.load(s_ptr + offs_n * groups + g, mask=ok, other=0.0).to(tl.float32)[:, None, None]
        z = tl.load(z_ptr + offs_n * groups + g, mask=ok, other=0.0).to(tl.float32)[:, None, None]
        w = tl.reshape(code * s + z, (BLOCK_N, GROUP)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_n[:, None] * (KW * 8) + g * GROUP + tl.arange(0, GROUP)[None, :], w, mask=ok[:, None])
