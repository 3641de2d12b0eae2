"""Issue 6, the route after docs/PERF.md run 25: a batch-1 int4 GEMV whose MMAs are Hopper's
wgmma (Triton's Gluon), A the dequantized weights in registers, x in shared memory. Run 26 ran it
on the H200: correct, and no faster than int4_mma (the table there). Kept as the measured record
of the route: one weight stream, no fused norm/silu/rotary, x permuted by the host
(`pack_x_wgmma`), split-K partials summed by the host.

Per program: 64 or 128 rows (one warpgroup; 128 is two m64 tiles), a K split of GPS groups. x's
split goes to shared memory once, K-major with a 128-byte swizzle as [GPS, 8, 128] (x in every
column of B, so every thread's first accumulator column is a row's sum; Triton 3.6 computes an
unswizzled [128, 8] B wrongly past K 64, gpu_gluon_probe). Per group, the words (16 bytes a
thread and a row tile, gpu_gluon_probe.words_layout) decode with int4_mma's LOP3s and one HFMA2 a
pair, (1024 + c) s - 1024 s = c s rounded once (odd codes, decoded as 1024 + 16 c, give 16 c s, and
x comes divided by 16 there), into wgmma's register A operand after a trivial layout conversion.
The zeros' part, the sum over groups of z * sum(x), is fp32 FMAs beside the MMAs. (A first
version folded z into the fma's addend, z - 1024 s in fp16, and lost 2-3% to that rounding.)
One async `warpgroup_mma` (8 wgmma.m64n8k16 a tile) accumulates all groups in one fp32 accumulator.

OVERLAP (off; a measurement knob) decodes the next group while the MMAs run. It races: the
device's ptxas (Triton 3.6) writes the next group's A into the registers the wgmma in flight is
still reading, before its wait (the SASS shows HFMA2 to R60-R91 above WARPGROUP.DEPBAR), and some
results come out wrong or NaN; the wait's deps keep only Triton's fp16 values alive, not the
packed registers. Triton 3.9's ptxas moves the wait to the loop's top, which is what OVERLAP off
does. ptxas also serialized two other designs (C7511 / C7514 under `ptxas -v`): a fresh
accumulator a group (int4_mma's exact-code way), and four groups' MMAs in flight.

`--aot` (no GPU): compile for sm_90a and print registers, spills and the loop's instructions
(Triton 3.9: 64 rows 2.9 a weight, 128 rows 2.5, against int4_mma's 1.41).
On a GPU: check three times against the dequantized weights' product (float64) for Llama-3-8B's
four shapes (gate_up as a 2N-row stream), then time the kernel alone (x packed before; the split
sum not counted) against int4_gemv at its shipped launch (µs a call, CUDA graph over weights past
L2), for each tile, split and OVERLAP.
Usage: python3 scripts/gpu_int4_wgmma.py [--aot]
"""
from __future__ import annotations

import itertools
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper

from gpu_gluon_probe import MMA_LAYOUT, decode_asm, to_operand, words_layout

GROUP = 128
# Triton 3.9 calls it barrier, 3.6 (the device's) thread_barrier
BARRIER = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier


# the decode, then one fma a pair: (1024 + c) s - 1024 s = c s, rounded once (-1024 s is exact); odd
# codes decode as 1024 + 16 c, so the same fma gives 16 c s, and x comes divided by 16 there
DEQUANT = gl.constexpr(decode_asm("\n".join(f"fma.rn.f16x2 {r}, {r}, $9, $10;" for r in "abcd")))


@gluon.jit
def _half2(v):
    """fp16 v (fp32 in) in both halves of an int32."""
    bits = v.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return bits | (bits << 16)


@gluon.jit
def _dequant(words, s):
    """A group's [rows, 16] words and its scales s [rows] (fp32) -> wgmma's [rows, 128] fp16 A:
    s * code (16 s * code at odd codes); the zeros are the kernel's fp32 zero term."""
    s, _ = gl.broadcast(s[:, None], words)
    c0, c4, c2, c6, c1, c5, c3, c7 = gl.inline_asm_elementwise(
        DEQUANT, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, _half2(s), _half2(-1024 * s)],
        dtype=[gl.float16] * 8, is_pure=True, pack=1)
    return to_operand(c0, c4, c2, c6, c1, c5, c3, c7)


@gluon.jit
def int4_wgmma_kernel(xs_ptr, xsum_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, KW, groups, GPS: gl.constexpr,
                      WL: gl.constexpr, OVERLAP: gl.constexpr = False):
    """y[pid_k, rows] = the split's sums for a tile of WL.shape[0] rows (64, or 128: two m64 tiles);
    xs: x in the kernel's K order (pack_x_wgmma), xsum: x's sum a group."""
    ROWS: gl.constexpr = WL.shape[0]
    acc_layout: gl.constexpr = MMA_LAYOUT
    pid_n = gl.program_id(0)
    g0 = gl.program_id(1) * GPS
    # the split's x into shared memory K-major ([8, 128] a group, x in every row: every column of the
    # [128, 8] B is x), swizzled: Triton 3.6 gets an unswizzled [128, 8] B wrong past K 64
    xb: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    x_smem = gl.allocate_shared_memory(gl.float16, [GPS, 8, 128],
                                       gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
    k = gl.arange(0, 128, layout=gl.SliceLayout(0, xb))
    for gi in range(GPS):
        xv = gl.load(xs_ptr + (g0 + gi) * 128 + k)
        x_smem.index(gi).store(gl.expand_dims(xv, 0) + gl.zeros([8, 128], gl.float16, xb))
    hopper.fence_async_shared()
    BARRIER()

    rows = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, WL))
    cols = gl.arange(0, 16, layout=gl.SliceLayout(0, WL))
    w_row = w_ptr + rows.to(gl.int64)[:, None] * KW + cols[None, :]
    s_row = s_ptr + rows * groups
    acc_rows = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
    z_row = z_ptr + acc_rows * groups
    # the zeros' part, sum over groups of z * sum(x), in fp32 beside the MMAs
    zsum = gl.load(z_row + g0).to(gl.float32) * gl.load(xsum_ptr + g0)
    # one accumulator; words 4 groups ahead in registers; a group's MMAs waited on before the next
    # group's decode (OVERLAP: after it, which races under Triton 3.6's ptxas)
    w0, w1, w2, w3 = _words(w_row, g0, g0 + GPS - 4)
    a = _dequant(w0, gl.load(s_row + g0).to(gl.float32))
    acc = hopper.warpgroup_mma(a, x_smem.index(0).permute((1, 0)), gl.zeros([ROWS, 8], gl.float32, acc_layout),
                               use_acc=False, is_async=True)
    w0, w1, w2, w3 = w1, w2, w3, gl.load(w_row + gl.minimum(g0 + 4, g0 + GPS - 1) * 16)
    for gi in range(1, GPS):
        if not OVERLAP:   # the group's MMAs done before the next decode (see the module's docstring)
            acc, a = hopper.warpgroup_mma_wait(0, deps=[acc, a])
        a_next = _dequant(w0, gl.load(s_row + g0 + gi).to(gl.float32))
        w0, w1, w2, w3 = w1, w2, w3, gl.load(w_row + (g0 + gl.minimum(gi + 4, GPS - 1)) * 16)
        zsum += gl.load(z_row + g0 + gi).to(gl.float32) * gl.load(xsum_ptr + g0 + gi)
        if OVERLAP:
            acc, a = hopper.warpgroup_mma_wait(0, deps=[acc, a])
        acc = hopper.warpgroup_mma(a_next, x_smem.index(gi).permute((1, 0)), acc, is_async=True)
        a = a_next
    total, a = hopper.warpgroup_mma_wait(0, deps=[acc, a])
    col = gl.arange(0, 8, layout=gl.SliceLayout(0, acc_layout))
    y = gl.sum(gl.where(col[None, :] == 0, total, 0.0), axis=1) + zsum
    gl.store(y_ptr + gl.program_id(1) * N + acc_rows, y)


@gluon.jit
def _words(w_row, g, g_last):
    """Groups g .. g + 3's words (clamped to the split's last block)."""
    g = gl.minimum(g, g_last)
    return gl.load(w_row + g * 16), gl.load(w_row + (g + 1) * 16), gl.load(w_row + (g + 2) * 16), \
        gl.load(w_row + (g + 3) * 16)


def pack_x_wgmma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [K] -> (fp16 [K] in the kernel's K order, odd codes' x divided by 16; fp32 [K / 128] x's sum
    a group). Code j of word 4t + i of a group is at 32 i + 16 (j % 2) + 8 (j // 2 % 2) + 2 t + j // 4
    (gpu_gluon_probe)."""
    k = torch.arange(GROUP, device=x.device)
    i, p, h, t, jj = k // 32, k // 16 % 2, k // 8 % 2, k // 2 % 4, k % 2
    src = 8 * (4 * t + i) + p + 2 * h + 4 * jj
    groups = x.float().view(-1, GROUP)
    xs = groups[:, src] / torch.where(p == 1, 16.0, 1.0)
    return xs.half().reshape(-1).contiguous(), groups.sum(1)


def launch(xs: tuple[torch.Tensor, torch.Tensor], w, split: int, rows: int = 64, overlap: bool = False) -> torch.Tensor:
    """The kernel alone on x packed by pack_x_wgmma: the split partials [split, N] fp32."""
    N, K = w.shape
    assert K // GROUP % split == 0 and K // GROUP // split >= 4, "a split of 4 groups or more"
    y = torch.empty(split, N, dtype=torch.float32, device=xs[0].device)
    int4_wgmma_kernel[(N // rows, split)](xs[0], xs[1], w.packed, w.scales, w.zeros, y, N, K // 8, K // GROUP,
                                          GPS=K // GROUP // split, WL=words_layout(rows), OVERLAP=overlap,
                                          num_warps=4)
    return y


def int4_wgmma(x: torch.Tensor, w, split: int, rows: int = 64, overlap: bool = False) -> torch.Tensor:
    """x [1, K] @ W^T for an int4_gemv weight (group 128): [N] fp32, the split partials summed here."""
    return launch(pack_x_wgmma(x.reshape(-1)), w, split, rows, overlap).sum(0)


def aot() -> None:
    from gpu_common import compile_for_h100, ptxas_usage
    types = {"xs_ptr": "*fp16", "xsum_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
             "y_ptr": "*fp32", "N": "i32", "KW": "i32", "groups": "i32"}
    for rows in (64, 128):
        for gps in (8, 32):
            kernel = compile_for_h100(int4_wgmma_kernel, types, dict(GPS=gps, WL=words_layout(rows), OVERLAP=False),
                                      list(types), num_warps=4, num_stages=1)
            ptx = kernel.asm["ptx"]
            print(f"{rows} rows, GPS {gps}: {ptxas_usage(ptx)}; {ptx.count('wgmma.mma_async')} wgmma.mma_async, "
                  f"{ptx.count('wgmma.wait_group')} waits, {ptx.count('ld.global.v4')} ld.global.v4, "
                  f"{ptx.count('lop3.b32')} lop3, {ptx.count('ld.shared')} ld.shared")
            ops = loop_ops(kernel.asm["cubin"])
            # the loop: one group, rows x 128 codes over 128 threads
            print(f"  SASS loop: {sum(ops.values())} instructions a thread, {sum(ops.values()) / rows:.2f} a weight; "
                  f"{dict(ops.most_common(8))}")


def loop_ops(cubin: bytes):
    """Opcode counts of the longest loop in the cubin's SASS (gpu_common.sass_loop_ops)."""
    import subprocess
    import tempfile

    from gpu_common import sass_loop_ops, triton_bin_dir
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return sass_loop_ops(subprocess.run([f"{triton_bin_dir()}/nvdisasm", "-c", f.name], capture_output=True,
                                            text=True).stdout)


def main() -> None:
    import gpu_int4_b1 as B1
    from gpu_int4 import random_int4, time_calls

    from pagedeploy.quant import int4_gemv as G
    from pagedeploy.quant.int4 import dequantize_int4
    torch.manual_seed(0)
    for name, (n, k, norm, silu) in B1.SHAPES.items():
        rows = 2 * n if silu else n
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        ws = [random_int4(rows, k, seed=i) for i in range(B1.copies(rows * k // 2))]
        ref = (x.double() @ dequantize_int4(ws[0]).double().T).reshape(-1)
        cfg = G.default_config(rows, k, 128, False, x.device)
        xs = pack_x_wgmma(x.reshape(-1))
        for overlap, tile, split in itertools.product((False, True), (64, 128), (1, 2, 4, 8)):
            if k // GROUP // split < 4 or k // GROUP // split * 2048 > 200 * 1024:   # x's shared memory
                continue
            # three checks: a race shows as a run that differs
            errs = [((int4_wgmma(x, ws[0], split, tile, overlap).double() - ref).norm() / ref.norm()).item()
                    for _ in range(3)]
            us = time_calls([lambda w=w: launch(xs, w, split, tile, overlap) for w in ws])
            print(f"{name:8s} wgmma {tile} rows split {split} {'overlap' if overlap else 'serial '}: {us:7.2f} us "
                  f"(the kernel alone)  rel. err {max(errs):.1e}")
        us = time_calls([lambda w=w: G.int4_gemv(x, w, config=cfg) for w in ws])
        err = ((G.int4_gemv(x, ws[0], config=cfg)[0].double().reshape(-1) - ref).norm() / ref.norm()).item()
        print(f"{name:8s} int4_gemv (shipped, split {cfg.split_k}): {us:7.2f} us  rel. err {err:.1e}")
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    aot() if "--aot" in sys.argv or not torch.cuda.is_available() else main()
