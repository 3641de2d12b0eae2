"""Batch-1 decode linears on int4 weights through tensor cores fed from registers (group 128).

The packed-fp16 GEMV (int4_gemv.py) spends 2.7 instructions a weight: a LOP3 to decode each pair
of codes, an fma for the scale, an fma for x. Here the decoded pairs go straight into
`mma.sync.m16n8k16` as its A operand, with x as B, so a word's 8 codes cost 4 LOP3, 1 shift and
one MMA: 1.4-1.7 instructions a weight in the SASS loop with the loads and addressing
(`scripts/gpu_int4.py --aot`). No weight is re-laid out: the standard packing already gives each
thread what an MMA wants.

How a word becomes an MMA operand. A [BLOCK_N, 16 words] tile (one group of 128 codes a row) loads
as Triton's blocked layout for it: 16-byte loads, a thread holding 4 words of a row, 8 threads down
the rows and 4 across, the warp repeating every 8 * num_warps rows. Thread (g = lane / 4, t = lane %
4) thus holds words 4t .. 4t + 3 of a row r and of the row r' one repetition further; those two rows
are the MMA tile's rows g and g + 8. For word i of the four, its codes (j, j + 4) ORed into fp16
1024 (one LOP3, `0x000f000f`) are the A pair at K slots (2t, 2t + 1), codes (2, 6) at (2t + 8, 2t +
9); codes (1, 5) and (3, 7) masked in place (`0x00f000f0`: 1024 + 16 code) fill a second MMA whose x
is over 16 (int4_pack.pack_words(MMA)). B is x's pairs for the same words, which pack_words writes
in exactly that order (each program for its own split, PACK, or pack_x's launch before), so the 16
K slots of each MMA are 16 of the group's K in some order that the weights and x share. All 8
columns of B hold the same x; column 0 of C is the result.

What the sums carry. Each product is (1024 + code) x exactly in fp32 and the MMA sums in fp32, so a
group's C is code . x + 1024 * (sum of x's pairs as packed). pack_words gives that constant per group,
and the sum of x for the zero's term (w = code * scale + zero): a row gains scale * (C - constant) +
zero * sum(x), all in fp32. The codes are never rounded: for fp16 and bf16 x this is at least as
exact as the dequantize-then-matmul reference.

The asm relies on the blocked layout above and on Triton handing an asm block its 8 elements as a
thread's two rows of four words (`pack=8`); tests/test_int4_gemv.py checks the result on the GPU.
The CPU interpreter cannot run PTX: int4_gemv keeps the packed-fp16 path there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedeploy.kernels.triton_fused import rope_state
from pagedeploy.kernels.triton_launch import wait_previous

from .int4_gemv import _load_block, _program_rows, _store_rows
from .int4_pack import pack_words, row_rstd

GROUP = 128   # codes a row per MMA step: the kernel's only group size
EARLY_LAUNCH = True   # the kernel after may launch before this one's wait (wait_previous's EARLY): docs/PERF.md run 18
# Timing floors, for measurement only (wrong sums): 1 every block's x is the split's first block's,
# 2 its weights are (L1 hits after the first), 3 both (gate_up spills a little). docs/PERF.md run
# 25: with the weights in L1 a layer's four linears take 48.0 us against 52.2, so DRAM is not what
# bounds this kernel.
FLOOR = 0


def _asm() -> str:
    """PTX for one group of a thread's two rows. Operands: $0-7 out (the running sums in element 0
    of each row's four, elements 1-3 passed through), $8-15 the words (row g: 8-11, row g + 8:
    12-15), $16-23 and $24-31 x's B operands for those words (int64: pairs 0 | 2 and 1 | 3), the
    scale at $32/$36, minus the group's constant at $40, the zero's term at $48/$52, the sums in at
    $56-63."""
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
    lines = [".reg .b32 a0, a1, a2, a3, q0, q1, q2, q3, v, u, b0, b1, e0, e1;",
             ".reg .f32 c0, c1, c2, c3, d0, d1, d2, d3;",
             *(f"mov.f32 {r}, 0f00000000;" for r in ("c0", "c1", "c2", "c3", "d0", "d1", "d2", "d3"))]
    for i in range(4):
        wa, wb = f"${8 + i}", f"${12 + i}"
        lines += [f"lop3.b32 a0, {wa}, 0x000f000f, 0x64006400, 0xea;",
                  f"lop3.b32 a1, {wb}, 0x000f000f, 0x64006400, 0xea;",
                  f"shr.u32 v, {wa}, 8;", f"shr.u32 u, {wb}, 8;",
                  "lop3.b32 a2, v, 0x000f000f, 0x64006400, 0xea;",
                  "lop3.b32 a3, u, 0x000f000f, 0x64006400, 0xea;",
                  f"lop3.b32 q0, {wa}, 0x00f000f0, 0x64006400, 0xea;",
                  f"lop3.b32 q1, {wb}, 0x00f000f0, 0x64006400, 0xea;",
                  "lop3.b32 q2, v, 0x00f000f0, 0x64006400, 0xea;",
                  "lop3.b32 q3, u, 0x00f000f0, 0x64006400, 0xea;",
                  f"mov.b64 {{b0, b1}}, ${16 + i};", f"mov.b64 {{e0, e1}}, ${24 + i};",
                  f"{mma} {{c0, c1, c2, c3}}, {{a0, a1, a2, a3}}, {{b0, b1}}, {{c0, c1, c2, c3}};",
                  f"{mma} {{d0, d1, d2, d3}}, {{q0, q1, q2, q3}}, {{e0, e1}}, {{d0, d1, d2, d3}};"]
    lines += ["add.f32 c0, c0, d0;", "add.f32 c2, c2, d2;", "add.f32 c0, c0, $40;", "add.f32 c2, c2, $40;",
              "fma.rn.f32 c0, $32, c0, $56;", "fma.rn.f32 c2, $36, c2, $60;",
              "add.f32 $0, c0, $48;", "add.f32 $4, c2, $52;"]
    lines += [f"mov.b32 ${k}, ${56 + k};" for k in (1, 2, 3, 5, 6, 7)]
    return "{\n" + "\n".join(lines) + "\n}"


_MMA_GROUP = tl.constexpr(_asm())
_MMA_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["r"] * 8 + ["l"] * 16 + ["f"] * 32))


@triton.jit
def _mma_group(words, xa, xb, s, start, zx, acc):
    """acc (element 0 of each row's four a thread holds) += s * (the MMAs' sum + start) + zx for one
    group: start takes the codes' offset of 1024 off, zx is the zero's term."""
    return tl.inline_asm_elementwise(_MMA_GROUP, _MMA_CONSTRAINTS, [words, xa, xb, s, start, zx, acc],
                                     dtype=tl.float32, is_pure=True, pack=8)


@triton.jit
def _scales(s_row, z_row, t, GW: tl.constexpr):
    """A block's scales and zeros, [BLOCK_N] each for its four groups (fp16)."""
    q = t // GW
    return (tl.load(s_row + q), tl.load(s_row + q + 1), tl.load(s_row + q + 2), tl.load(s_row + q + 3),
            tl.load(z_row + q), tl.load(z_row + q + 1), tl.load(z_row + q + 2), tl.load(z_row + q + 3))


@triton.jit
def _group(words, t, s, z, xp_ptr, xg_ptr, KW, groups, acc, GW: tl.constexpr):
    """One group's [BLOCK_N, GW] tile (words t .. t + GW of each row) into acc."""
    c = t + tl.arange(0, GW)
    q = t // GW
    zx = z.to(tl.float32) * tl.load(xg_ptr + groups + q)
    start = -tl.load(xg_ptr + q + tl.zeros([1, 1], tl.int32))
    return _mma_group(words, tl.load(xp_ptr + c)[None, :], tl.load(xp_ptr + KW + c)[None, :],
                      s.to(tl.float32)[:, None], start, zx[:, None], acc)


@triton.jit
def _block(block, t, xp_ptr, xg_ptr, KW, groups, acc, GW: tl.constexpr):
    """A block (_stream's words and scales) into acc."""
    w0, w1, w2, w3, sz = block
    s0, s1, s2, s3, z0, z1, z2, z3 = sz
    acc = _group(w0, t, s0, z0, xp_ptr, xg_ptr, KW, groups, acc, GW)
    acc = _group(w1, t + GW, s1, z1, xp_ptr, xg_ptr, KW, groups, acc, GW)
    acc = _group(w2, t + 2 * GW, s2, z2, xp_ptr, xg_ptr, KW, groups, acc, GW)
    return _group(w3, t + 3 * GW, s3, z3, xp_ptr, xg_ptr, KW, groups, acc, GW)


@triton.jit
def _stream(row, s_row, z_row, t, c_end, mask_n, col, GW: tl.constexpr):
    """A block's words and scales, from word t on (clamped to the split's last block)."""
    t = tl.minimum(t, c_end - 4 * GW)
    w0, w1, w2, w3 = _load_block(row, t, c_end, mask_n, col, GW, True)
    return w0, w1, w2, w3, _scales(s_row, z_row, t, GW)


@triton.jit
def _advance(current, after, new, AHEAD: tl.constexpr):
    """A stream's blocks one on: (the block to sum next, the one after it when AHEAD is 2)."""
    if AHEAD == 2:
        return after, new
    return new, after


@triton.jit(do_not_specialize=["split_k"])
def _int4_mma_kernel(xp_ptr, xg_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
                     x_ptr, r_ptr, nw_ptr, r_out_ptr, eps,
                     N, KW, groups, words_per_split, split_k,
                     rq_ptr, rpos_ptr, rcs_ptr, rkc_ptr, rvc_ptr, rslot_ptr, r_stride_c, r_stride_cb,
                     r_stride_cs, r_stride_ch, r_q_rows, r_kv_rows, r_block_size, BLOCK_N: tl.constexpr,
                     SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr,
                     SPLITS: tl.constexpr, PDL: tl.constexpr, AHEAD: tl.constexpr = 1,
                     EARLY: tl.constexpr = False, PACK: tl.constexpr = False,
                     NORM: tl.constexpr = False, RESIDUAL: tl.constexpr = False,
                     PACK_C: tl.constexpr = 512, RSTD_BLOCK: tl.constexpr = 4096,
                     ROPE_DIM: tl.constexpr = 0, FLOOR: tl.constexpr = 0):
    """Grid (N tiles, K splits), whole tiles only. A program walks its rows' K split in blocks of
    four groups, each block's words, scales and zeros asked for AHEAD (1 or 2) blocks before it is
    summed. EARLY: the next kernel may launch before this one waits (wait_previous).
    PACK: x comes plain (x_ptr; NORM, RESIDUAL: rms_norm's fusions, as pack_x) and each program
    packs its split's words into xp and xg itself, PACK_C words at a time, after the wait: no
    pack_x launch. Programs of one split write the same bits to the same words; each reads back
    only what it wrote, after a barrier. ROPE_DIM: a qkv projection that rotates and stores its
    output (RopeStore's arguments, r*). FLOOR: the module's (timing floors, wrong sums)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    GW: tl.constexpr = 16   # words a group (GROUP // 8)
    offs_n, mask_n, col, c_start, c_end, row_g, row_u, s_g, z_g, s_u, z_u = _program_rows(
        w_ptr, s_ptr, z_ptr, N, KW, groups, words_per_split, BLOCK_N, GW, True, ROPE_DIM)
    rope = rope_state(offs_n, rq_ptr, rpos_ptr, rcs_ptr, rkc_ptr, rvc_ptr, rslot_ptr, r_stride_c, r_stride_cb,
                      r_stride_cs, r_stride_ch, r_q_rows, r_kv_rows, r_block_size, ROPE_DIM)
    B: tl.constexpr = 4 * GW
    g = _stream(row_g, s_g, z_g, c_start, c_end, mask_n, col, GW)   # gate (or the only) rows
    h = g   # their block after, when AHEAD == 2
    if AHEAD == 2:
        h = _stream(row_g, s_g, z_g, c_start + B, c_end, mask_n, col, GW)
    u, v = g, g   # the same for the up rows
    if SILU_MUL:
        u = _stream(row_u, s_u, z_u, c_start, c_end, mask_n, col, GW)
        if AHEAD == 2:
            v = _stream(row_u, s_u, z_u, c_start + B, c_end, mask_n, col, GW)
    wait_previous(PDL, EARLY)
    if PACK:
        rstd = row_rstd(x_ptr, r_ptr, r_out_ptr, KW * 8, eps, (pid_n == 0) & (pid_k == 0), NORM,
                        RESIDUAL, RSTD_BLOCK)
        for c0 in range(c_start, c_end, PACK_C):
            pack_words(x_ptr, r_ptr, nw_ptr, xp_ptr, xg_ptr, c0, c_end, rstd, KW * 8, PACK_C, NORM,
                       RESIDUAL, True, True, True)
        tl.debug_barrier()   # bar.sync: the words' stores are visible to the whole program
    acc_g = tl.zeros([BLOCK_N, GW], tl.float32)
    acc_u = acc_g
    for t in range(c_start, c_end, B):
        tw, tx = t + AHEAD * B, t   # where the next weights and this block's x are read
        if FLOOR:
            zero = N // (N + 1)   # 0, but not to the compiler: the floors' loads stay in the loop
            if FLOOR >= 2:
                tw = c_start + (tw - c_start) * zero
            if FLOOR % 2 == 1:
                tx = c_start + (t - c_start) * zero
        new_g = _stream(row_g, s_g, z_g, tw, c_end, mask_n, col, GW)
        if SILU_MUL:
            new_u = _stream(row_u, s_u, z_u, tw, c_end, mask_n, col, GW)
        acc_g = _block(g, tx, xp_ptr, xg_ptr, KW, groups, acc_g, GW)
        g, h = _advance(g, h, new_g, AHEAD)
        if SILU_MUL:
            acc_u = _block(u, tx, xp_ptr, xg_ptr, KW, groups, acc_u, GW)
            u, v = _advance(u, v, new_u, AHEAD)
    # Each row's sum sits in one element of each of the 4 threads across it: a quarter each, so
    # the row sum of _store_rows gives it back exactly.
    _store_rows(acc_g * 0.25, acc_u * 0.25, offs_n, mask_n, N, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n,
                pid_k, split_k, SILU_MUL, HAS_BIAS, USE_SPLIT, SPLITS, rope, ROPE_DIM)


def supports(x: torch.Tensor, group: int, N: int, K: int, block_n: int, split_k: int, num_warps: int) -> bool:
    """Whether the MMA kernel takes this linear: CUDA, group 128, whole row tiles of an even
    number of the layout's 8 * num_warps-row repeats, and whole blocks of four groups in every split."""
    return (x.is_cuda and group == GROUP and N % block_n == 0 and block_n % (16 * num_warps) == 0
            and K % GROUP == 0 and (K // GROUP) % (4 * split_k) == 0)


@dataclass(frozen=True)
class PackInKernel:
    """x plain, for the kernel to pack itself (PACK): rms_norm's fusions as in pack_x."""
    x: torch.Tensor
    residual: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None
    eps: float = 0.0
    words: int = 512        # PACK_C: words packed at a time
    rstd_block: int = 4096  # RSTD_BLOCK: width of the norm's loads


def launch(xp, xg, w, bias, y, ws, counters, N: int, K: int, block_n: int, split_k: int, num_warps: int,
           silu_mul: bool, pdl: int, launch_options: dict, ahead: int = 1,
           pack: PackInKernel | None = None, *, rope_args: tuple, rope_dim: int = 0):
    """One launch over x packed by int4_pack.pack_x(mma=True), or packed by the kernel into xp and
    xg (int4_pack.pack_buffers) from `pack`; rope_args and rope_dim as int4_gemv makes them.
    Returns Triton's handle of the compiled kernel (registers: .n_regs)."""
    words_per_split = K // 8 // split_k
    p = pack or PackInKernel(y)   # without packing, placeholders the kernel does not read
    norm = p.norm_weight is not None
    residual = p.residual if norm else None   # the residual is added only in front of a norm
    return _int4_mma_kernel[(N // block_n, split_k)](
        xp, xg, w.packed, w.scales, w.zeros, bias if bias is not None else y, y, ws, counters,
        p.x, residual if residual is not None else p.x, p.norm_weight if norm else p.x,
        p.residual_out if residual is not None else p.x, p.eps,
        N, K // 8, K // GROUP, words_per_split, split_k, *rope_args, BLOCK_N=block_n, SILU_MUL=silu_mul,
        HAS_BIAS=bias is not None, USE_SPLIT=split_k > 1, SPLITS=triton.next_power_of_2(split_k),
        PDL=pdl, AHEAD=ahead, EARLY=EARLY_LAUNCH, PACK=pack is not None,
        NORM=norm, RESIDUAL=residual is not None, PACK_C=p.words, RSTD_BLOCK=p.rstd_block, ROPE_DIM=rope_dim,
        FLOOR=FLOOR, num_warps=num_warps,
        **launch_options)
