"""Issue 6, batch 1: the tensor-core int4 GEMV (int4_mma.py) with its weight loads left to Triton's
software pipeliner (cp.async or TMA into shared memory, STAGES blocks deep, read back into the
registers the MMAs take) instead of one or two blocks held in registers. The question of docs/PERF.md run 23:
does the GEMV wait on loads that more bytes in flight would hide? (ncu: 1.7 warps a scheduler,
40% of their cycles on global loads.)

Per Llama-3-8B linear, with x packed by pack_x for both (the pipelined kernel does not pack x
itself): the shipped kernel, and the pipelined one at 2-4 stages, its words by cp.async at the
shipped split and at twice as many splits, or by TMA at the shipped split. It needs fewer registers:
compiled for sm_90a here at 3 stages, gate_up takes 148 (cp.async) or 141 (TMA) and 68 KB of shared
memory, down 72 or 113, so 3 programs an SM can fit. At the shipped split the outputs must be
bit-equal (the same sums in the same order). Median µs a call in a CUDA graph with PDL, weights
overflowing L2; registers and shared memory of each compile.
`--e2e=STAGES`: instead, `deploy bench --batch-1` decode tok/s of int4 with the model's GEMVs shipped
or pipelined (cp.async, STAGES stages, shipped grid), interleaved, a fresh engine each, and bf16.
Usage (device machine): python3 scripts/gpu_int4_mma_pipe.py [--shapes=gate_up,down] [--e2e=STAGES]
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import gpu_int4_b1 as B1
import gpu_int4_fold as F
from gpu_common import RunLog
from gpu_int4 import time_calls
from gpu_int4_b1 import linear_cases, shapes_wanted
from gpu_int4_pipe import _tiles

from pagedeploy.kernels.triton_launch import wait_previous
from pagedeploy.quant import int4_gemv as G
from pagedeploy.quant import int4_mma
from pagedeploy.quant.int4_gemv import _program_rows, _store_rows
from pagedeploy.quant.int4_mma import _block, _scales

log = RunLog("int4_mma_pipe.log")


@triton.jit(do_not_specialize=["split_k"])
def _mma_pipe_kernel(xp_ptr, xg_ptr, w_ptr, desc, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
                     N, KW, groups, words_per_split, split_k, BLOCK_N: tl.constexpr,
                     SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr,
                     SPLITS: tl.constexpr, PDL: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr):
    """int4_mma's kernel on x from pack_x(mma=True), its blocks loaded inside the loop for the
    pipeliner to stage (nothing before the wait: the stages start in the loop's prologue), the
    words by cp.async or (TMA) through `desc`, [BLOCK_N, 16] words a load."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    GW: tl.constexpr = 16
    offs_n, mask_n, col, c_start, c_end, row_g, row_u, s_g, z_g, s_u, z_u = _program_rows(
        w_ptr, s_ptr, z_ptr, N, KW, groups, words_per_split, BLOCK_N, GW, True)
    wait_previous(PDL, True)
    acc_g = tl.zeros([BLOCK_N, GW], tl.float32)
    acc_u = acc_g
    for t in tl.range(c_start, c_end, 4 * GW, num_stages=STAGES):
        w0, w1, w2, w3 = _tiles(row_g, desc, pid_n * BLOCK_N, t, c_end, mask_n, col, GW, TMA, True)
        acc_g = _block((w0, w1, w2, w3, _scales(s_g, z_g, t, GW)), t, xp_ptr, xg_ptr, KW, groups, acc_g, GW)
        if SILU_MUL:
            w0, w1, w2, w3 = _tiles(row_u, desc, N + pid_n * BLOCK_N, t, c_end, mask_n, col, GW, TMA, True)
            acc_u = _block((w0, w1, w2, w3, _scales(s_u, z_u, t, GW)), t, xp_ptr, xg_ptr, KW, groups,
                           acc_u, GW)
    _store_rows(acc_g * 0.25, acc_u * 0.25, offs_n, mask_n, N, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n,
                pid_k, split_k, SILU_MUL, HAS_BIAS, USE_SPLIT, SPLITS)


LAUNCH = int4_mma.launch   # the shipped launch, restored after each patched call


def _placeholder(w, block_n: int):
    """A descriptor argument for the cp.async form, which never reads it."""
    return TensorDescriptor.from_tensor(w.packed, [block_n, 16])


def pipe_launch(xp, xg, w, bias, y, ws, counters, N, K, block_n, split_k, num_warps, silu_mul, pdl,
                launch_options, ahead=1, pack=None, *, stages=3, desc=None, rope_args=(), rope_dim=0):
    """int4_mma.launch's signature (x packed by pack_x: `pack` must be None; `ahead` unused), with
    _mma_pipe_kernel; desc: w's TensorDescriptor for TMA loads, None for cp.async."""
    assert pack is None and not rope_dim, "the pipelined kernel takes x from pack_x, and has no rotary"
    return _mma_pipe_kernel[(N // block_n, split_k)](
        xp, xg, w.packed, desc or _placeholder(w, block_n), w.scales, w.zeros,
        bias if bias is not None else y, y, ws, counters, N, K // 8, K // 128, K // 8 // split_k, split_k,
        BLOCK_N=block_n, SILU_MUL=silu_mul, HAS_BIAS=bias is not None, USE_SPLIT=split_k > 1,
        SPLITS=triton.next_power_of_2(split_k), PDL=pdl, STAGES=stages, TMA=desc is not None,
        num_warps=num_warps, **launch_options)


def mma_pipe(x, w, desc, cfg: G.Int4GemvConfig, stages: int, silu_mul: bool, **fusions):
    """int4_gemv at `cfg`, x packed by pack_x, its launch through _mma_pipe_kernel (desc as
    pipe_launch takes it): (y, residual out). The compiled kernel is left in mma_pipe.last."""
    def launch(*args):
        mma_pipe.last = pipe_launch(*args, stages=stages, desc=desc)
    int4_mma.launch = launch
    try:
        return G.int4_gemv(x, w, silu_mul=silu_mul, config=dataclasses.replace(cfg, pack_in_kernel=False),
                           **fusions)
    finally:
        int4_mma.launch = LAUNCH


def set_e2e_mode(stages: int) -> None:
    """The model's int4 GEMVs: shipped (stages 0), or the pipelined kernel with cp.async loads at
    the shipped grid, x packed by pack_x (gpu_int4_fold's "pack_x launch" rule)."""
    F.set_mode(F.MODES["pack_x launch"] if stages else None)
    int4_mma.launch = functools.partial(pipe_launch, stages=stages) if stages else LAUNCH


def end_to_end(stages: int, reps: int) -> None:
    """Batch-1 decode tok/s, shipped against pipelined, interleaved (gpu_int4_b1.interleaved_ab)."""
    modes = {"shipped": lambda: set_e2e_mode(0), f"cp.async {stages} stages": lambda: set_e2e_mode(stages)}
    rows = B1.interleaved_ab(modes, reps, log)
    set_e2e_mode(0)
    B1.log_speeds(rows["int4"] + rows["none"][:1], log)


def main() -> None:
    e2e = [int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--e2e=")]
    if e2e:
        return end_to_end(e2e[0], 2)
    for name, (n, k, norm, silu), ws, x, fus, _, _ in linear_cases(shapes_wanted()):
        shipped = dataclasses.replace(G.default_config(n, k, 128, silu, x.device), pack_in_kernel=False)
        expect = G.int4_gemv(x, ws[0], silu_mul=silu, config=shipped, **fus)[0]
        us = time_calls([lambda w=w: G.int4_gemv(x, w, silu_mul=silu, config=shipped, **fus) for w in ws])
        log(f"{name:8s} shipped (pack_x, split {shipped.split_k}, ahead {shipped.ahead}) {us:7.2f} us")
        blocks = k // 512
        splits = [d for d in (shipped.split_k, 2 * shipped.split_k) if blocks % d == 0]
        descs = [TensorDescriptor.from_tensor(w.packed, [shipped.block_n, 16]) for w in ws]
        # cp.async at the shipped split and at twice as many programs (fewer registers now); TMA at
        # the shipped split
        modes = [(split, False) for split in splits] + [(shipped.split_k, True)]
        for split, tma in modes:
            cfg = dataclasses.replace(shipped, split_k=split)
            for stages in (2, 3, 4):
                label = f"{name:8s} {'TMA' if tma else 'cp.async'} split {split} {stages} stages"
                try:
                    out = mma_pipe(x, ws[0], descs[0] if tma else None, cfg, stages, silu, **fus)[0]
                    meta = mma_pipe.last
                    # the shipped split sums in the same order: bit-equal; another split reorders
                    check = ("equal" if torch.equal(out, expect) else "DIFFER") if split == shipped.split_k \
                        else f"max |diff| {(out.float() - expect.float()).abs().max().item():.2e}"
                    calls = [lambda w=w, d=d: mma_pipe(x, w, d if tma else None, cfg, stages, silu, **fus)
                             for w, d in zip(ws, descs)]
                    us = time_calls(calls)
                    log(f"{label} {us:7.2f} us  {meta.n_regs} registers, {meta.metadata.shared} B shared  "
                        f"outputs {check}")
                except Exception as e:   # a stage count that does not fit shared memory
                    log(f"{label}: {type(e).__name__}: {str(e)[:120]}")
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
