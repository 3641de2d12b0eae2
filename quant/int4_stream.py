"""The tensor-core int4 GEMV (int4_mma.py) as a stream-K launch: persistent programs, each an equal
run of (row tile, block of four groups) units, for linears whose tiles do not fill the SMs evenly.

Why. int4_mma's grid is (row tiles, K splits) and two programs fit an SM. Llama-3-8B's gate_up has
224 tiles of 8 blocks (both its weight streams in each program, 255 registers: no split fits the
wave), so 92 SMs run two programs and 40 run one: the launch lasts as long as a program's 8 blocks
while the average SM has 6.8 blocks of work a slot. Here the 224 x 8 units are cut into one run per
slot (2 an SM), 6 or 7 units each, in tile-major order, so a run may end inside a tile and the next
program's run carry on with it.

How a tile is finished. A run's segment inside one tile is summed in registers, as int4_mma sums a
split. A tile covered by one segment (whole) is stored at once. Otherwise each segment's sums go to
the workspace, slot 2p for program p's first segment, 2p + 1 for its last (only a program's first
and last segments can be partial), and the tile's arrival counter is bumped; the last to arrive
sums the slots of the tile's programs in program order (deterministic), applies the bias and
silu(gate) * up, stores, and re-arms the counter. The next units' weights load while a tile is
finished, across tile ends (the units are one stream to the loads).

x is packed by each program for the words its units touch (one K range, or two when its run wraps
past a tile's end; all of K from a whole tile's worth of units on), after the wait, as int4_mma's PACK.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedeploy.kernels.triton_gemv import _store_y
from pagedeploy.kernels.triton_launch import wait_previous

from .int4_gemv import _block as _fp16_block
from .int4_gemv import _load_block
from . import int4_mma
from .int4_mma import GROUP, PackInKernel, _advance, _block, _scales
from .int4_pack import pack_words, row_rstd


@triton.jit
def _run(pid, programs, units):
    """Program pid's units [start, end): equal runs, the remainder spread one each."""
    return pid * units // programs, (pid + 1) * units // programs


@triton.jit
def _owner(u, programs, units):
    """The program whose run holds unit u (the last p with _run(p)'s start <= u)."""
    return ((u + 1) * programs + units - 1) // units - 1


@triton.jit
def _place(u, row0, BPT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unit u's first row (row0 + its tile's) and block within the tile."""
    tile = u // BPT
    return row0 + tile * BLOCK_N, u - tile * BPT


@triton.jit
def _unit(w_rows, s_rows, z_rows, u, last, row0, KW, groups, BPT: tl.constexpr, BLOCK_N: tl.constexpr,
          GW: tl.constexpr):
    """Unit u's block (u past `last` clamped to it: the run's last block again, never read past):
    words and scales of rows row0 + (tile u // BPT) * BLOCK_N, block u % BPT. w_rows, s_rows,
    z_rows point at block 0 of rows 0 .. BLOCK_N: a unit moves them by one scalar each, so a unit
    costs the grid kernel's address arithmetic."""
    first_row, block = _place(tl.minimum(u, last), row0, BPT, BLOCK_N)
    w = w_rows + first_row.to(tl.int64) * KW + block * 4 * GW
    w0, w1, w2, w3 = _load_block(w, 0, KW, tl.full([BLOCK_N], True, tl.int1), tl.arange(0, GW), GW, True)
    q = first_row * groups + block * 4
    return w0, w1, w2, w3, _scales(s_rows + q, z_rows + q, 0, GW)


@triton.jit
def _sum_unit(block, u, row0, xp_ptr, xg_ptr, s_rows, z_rows, KW, groups, acc, BPT: tl.constexpr,
              BLOCK_N: tl.constexpr, GW: tl.constexpr, MMA: tl.constexpr, F16X2: tl.constexpr):
    """acc += unit u's block times x: int4_mma's MMAs, or int4_gemv's packed-fp16 sums (which
    load their own scales; in fp32 under the interpreter)."""
    first_row, b = _place(u, row0, BPT, BLOCK_N)
    t = b * 4 * GW   # the block's first word of K
    if MMA:
        return _block(block, t, xp_ptr, xg_ptr, KW, groups, acc, GW)
    w0, w1, w2, w3, _ = block
    offs_n = first_row + tl.arange(0, BLOCK_N)
    return _fp16_block(w0, w1, w2, w3, t, s_rows + first_row * groups, z_rows + first_row * groups, offs_n,
                       tl.full([BLOCK_N], True, tl.int1), KW, xp_ptr, xg_ptr, KW, acc, GW, F16X2, True)


@triton.jit
def _pack_range(x_ptr, r_ptr, nw_ptr, xp_ptr, xg_ptr, c_start, c_end, rstd, K,
                PACK_C: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    """Words [c_start, c_end) of x packed as int4_mma takes them (int4_pack.pack_words)."""
    for c0 in range(c_start, c_end, PACK_C):
        pack_words(x_ptr, r_ptr, nw_ptr, xp_ptr, xg_ptr, c0, c_end, rstd, K, PACK_C, NORM, RESIDUAL,
                   True, True, True)


@triton.jit
def _finish_segment(acc_g, acc_u, tile, seg_start, seg_end, first, pid, programs, units, bpt, N,
                    b_ptr, y_ptr, ws_ptr, lock_ptr, BLOCK_N: tl.constexpr, SILU_MUL: tl.constexpr,
                    HAS_BIAS: tl.constexpr, MAX_PARTS: tl.constexpr, ROW_SUM: tl.constexpr):
    """Tile `tile`'s sums over units [seg_start, seg_end) of this program: stored if they are the
    whole tile, else through the workspace and the tile's arrival counter (module docstring)."""
    rows = tl.arange(0, 1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    yg = tl.sum(acc_g * ROW_SUM, 1)[None, :]
    yu = yg
    if SILU_MUL:
        yu = tl.sum(acc_u * ROW_SUM, 1)[None, :]
    tile_start = tile * bpt
    if (seg_start == tile_start) & (seg_end == tile_start + bpt):
        _store_y(yg, yu, rows, offs_n, rows < 1, mask_n, N, b_ptr, y_ptr, N, SILU_MUL, HAS_BIAS)
    else:
        lane = tl.arange(0, BLOCK_N)[None, :]
        slot = ws_ptr + (2 * pid + (1 - first)) * 2 * BLOCK_N + lane
        tl.store(slot, yg)
        if SILU_MUL:
            tl.store(slot + BLOCK_N, yu)
        tl.debug_barrier()   # every thread's sums are written before the release below
        q_first = _owner(tile_start, programs, units)
        q_last = _owner(tile_start + bpt - 1, programs, units)
        arrived = tl.atomic_add(lock_ptr + tile, 1)   # acq_rel, gpu scope
        if arrived == q_last - q_first:
            q = q_first + tl.arange(0, MAX_PARTS)[:, None]
            q_start = q * units // programs
            parts = ws_ptr + (2 * q + (q_start < tile_start).to(tl.int32)) * 2 * BLOCK_N + lane
            ok = q <= q_last
            yg = tl.sum(tl.load(parts, mask=ok, other=0.0, cache_modifier=".cg"), 0)[None, :]
            if SILU_MUL:
                yu = tl.sum(tl.load(parts + BLOCK_N, mask=ok, other=0.0, cache_modifier=".cg"), 0)[None, :]
            _store_y(yg, yu, rows, offs_n, rows < 1, mask_n, N, b_ptr, y_ptr, N, SILU_MUL, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)   # re-armed for the next launch (graph replays)


@triton.jit(do_not_specialize=["programs"])
def _int4_stream_kernel(xp_ptr, xg_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
                        x_ptr, r_ptr, nw_ptr, r_out_ptr, eps, N, KW, groups, programs,
                        BLOCK_N: tl.constexpr, SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        PDL: tl.constexpr, AHEAD: tl.constexpr = 1, EARLY: tl.constexpr = False,
                        PACK: tl.constexpr = False, NORM: tl.constexpr = False,
                        RESIDUAL: tl.constexpr = False, PACK_C: tl.constexpr = 512,
                        RSTD_BLOCK: tl.constexpr = 4096, MAX_PARTS: tl.constexpr = 4,
                        MMA: tl.constexpr = True, GROUP: tl.constexpr = 128, F16X2: tl.constexpr = True,
                        BPT: tl.constexpr = 8):
    """Grid (programs,): program pid sums units _run(pid) (module docstring), AHEAD (1 or 2) units'
    words and scales in flight while one is summed. MMA: int4_mma's tensor cores (group 128); else
    int4_gemv's packed-fp16 sums on x from pack_x (any group; PACK not supported), which the CPU
    interpreter runs in fp32, so CI tests the runs and merges. BPT: units (blocks) a tile."""
    pid = tl.program_id(0)
    GW: tl.constexpr = GROUP // 8   # words a group
    B: tl.constexpr = 4 * GW   # words a unit
    # MMA: each row's sum sits in one element of each of the 4 threads across it (int4_mma)
    ROW_SUM: tl.constexpr = 0.25 if MMA else 1.0
    units = (N // BLOCK_N) * BPT
    u0, u1 = _run(pid, programs, units)
    last = u1 - 1
    rows = tl.arange(0, BLOCK_N)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * KW + tl.arange(0, GW)[None, :]
    s_rows, z_rows = s_ptr + rows * groups, z_ptr + rows * groups
    g = _unit(w_rows, s_rows, z_rows, u0, last, 0, KW, groups, BPT, BLOCK_N, GW)   # gate (or the only) rows
    h = g   # the unit after, when AHEAD == 2
    if AHEAD == 2:
        h = _unit(w_rows, s_rows, z_rows, u0 + 1, last, 0, KW, groups, BPT, BLOCK_N, GW)
    up, up_after = g, g   # the same for the up rows, N further on
    if SILU_MUL:
        up = _unit(w_rows, s_rows, z_rows, u0, last, N, KW, groups, BPT, BLOCK_N, GW)
        if AHEAD == 2:
            up_after = _unit(w_rows, s_rows, z_rows, u0 + 1, last, N, KW, groups, BPT, BLOCK_N, GW)
    wait_previous(PDL, EARLY)
    if PACK:
        rstd = row_rstd(x_ptr, r_ptr, r_out_ptr, KW * 8, eps, pid == 0, NORM, RESIDUAL, RSTD_BLOCK)
        b0, b1 = u0 % BPT, last % BPT
        if u1 - u0 >= BPT:
            _pack_range(x_ptr, r_ptr, nw_ptr, xp_ptr, xg_ptr, 0, KW, rstd, KW * 8, PACK_C, NORM, RESIDUAL)
        elif b0 <= b1:   # inside one tile
            _pack_range(x_ptr, r_ptr, nw_ptr, xp_ptr, xg_ptr, b0 * B, (b1 + 1) * B, rstd, KW * 8, PACK_C,
                        NORM, RESIDUAL)
        else:   # past a tile's end: its K tail, then the next tile's head
            _pack_range(x_ptr, r_ptr, nw_ptr, xp_ptr, xg_ptr, b0 * B, KW, rstd, KW * 8, PACK_C, NORM, RESIDUAL)
            _pack_range(x_ptr, r_ptr, nw_ptr, xp_ptr, xg_ptr, 0, (b1 + 1) * B, rstd, KW * 8, PACK_C, NORM,
                        RESIDUAL)
        tl.debug_barrier()   # bar.sync: the words' stores are visible to the whole program
    acc_g = tl.zeros([BLOCK_N, GW], tl.float32)
    acc_u = acc_g
    seg_start = u0
    for unit in range(u0, u1):
        new_g = _unit(w_rows, s_rows, z_rows, unit + AHEAD, last, 0, KW, groups, BPT, BLOCK_N, GW)
        if SILU_MUL:
            new_u = _unit(w_rows, s_rows, z_rows, unit + AHEAD, last, N, KW, groups, BPT, BLOCK_N, GW)
        acc_g = _sum_unit(g, unit, 0, xp_ptr, xg_ptr, s_rows, z_rows, KW, groups, acc_g, BPT, BLOCK_N, GW,
                          MMA, F16X2)
        g, h = _advance(g, h, new_g, AHEAD)
        if SILU_MUL:
            acc_u = _sum_unit(up, unit, N, xp_ptr, xg_ptr, s_rows, z_rows, KW, groups, acc_u, BPT, BLOCK_N,
                              GW, MMA, F16X2)
            up, up_after = _advance(up, up_after, new_u, AHEAD)
        if ((unit + 1) % BPT == 0) | (unit == last):
            _finish_segment(acc_g, acc_u, unit // BPT, seg_start, unit + 1, (seg_start == u0).to(tl.int32),
                            pid, programs, units, BPT, N, b_ptr, y_ptr, ws_ptr, lock_ptr, BLOCK_N,
                            SILU_MUL, HAS_BIAS, MAX_PARTS, ROW_SUM)
            acc_g = tl.zeros([BLOCK_N, GW], tl.float32)
            acc_u = acc_g
            seg_start = unit + 1


def max_parts(units: int, programs: int, blocks: int) -> int:
    """The most programs that share one tile of `blocks` units (a power of two, for the merge's
    one load): a tile's units over the shortest run, plus one for a run that ends inside it."""
    shortest = units // programs
    return triton.next_power_of_2(triton.cdiv(blocks - 1, shortest) + 1)


def launch(xp, xg, w, bias, y, counters, N: int, K: int, block_n: int, programs: int, num_warps: int,
           silu_mul: bool, pdl: int, launch_options: dict, ahead: int = 1,
           pack: PackInKernel | None = None, mma: bool = True) -> None:
    """int4_mma.launch's stream-K form: `programs` persistent programs (at most one a unit: a run
    is never empty), x as there (packed by pack_x(mma=True), or by the programs from `pack`); not
    mma: x from pack_x(), int4_gemv's sums, any group."""
    group = w.group_size
    assert (group == GROUP or not mma) and N % block_n == 0 and K % (4 * group) == 0 and not (pack and not mma)
    blocks = K // group // 4
    units = N // block_n * blocks
    programs = min(programs, units)
    ws = torch.empty(2 * programs * 2 * block_n, dtype=torch.float32, device=y.device)
    p = pack or PackInKernel(y)   # without packing, placeholders the kernel does not read
    norm = p.norm_weight is not None
    residual = p.residual if norm else None   # the residual is added only in front of a norm
    _int4_stream_kernel[(programs,)](
        xp, xg, w.packed, w.scales, w.zeros, bias if bias is not None else y, y, ws, counters,
        p.x, residual if residual is not None else p.x, p.norm_weight if norm else p.x,
        p.residual_out if residual is not None else p.x, p.eps,
        N, K // 8, K // group, programs, BLOCK_N=block_n, SILU_MUL=silu_mul, HAS_BIAS=bias is not None,
        PDL=pdl, AHEAD=ahead, EARLY=int4_mma.EARLY_LAUNCH, PACK=pack is not None, NORM=norm,
        RESIDUAL=residual is not None, PACK_C=p.words, RSTD_BLOCK=p.rstd_block,
        MAX_PARTS=max_parts(units, programs, blocks), MMA=mma, GROUP=group, F16X2=y.is_cuda, BPT=blocks,
        num_warps=num_warps, **launch_options)
