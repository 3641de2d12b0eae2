"""Issue 6, the route after docs/PERF.md run 25: a batch-1 int4 GEMV whose MMAs are Hopper's async
wgmma (Triton's Gluon), A the dequantized weights in registers, x in shared memory. Version 0,
compiled for sm_90a here but NOT YET RUN on a GPU: one weight stream, no fused norm/silu/rotary, x
permuted by the host (`pack_x_wgmma`), split-K partials summed by the host.

Per program: 64 rows (one warpgroup), a K split of GPS groups. x's split goes to shared memory
once, as [GPS, 128, 8] (x in every column, so every thread's first accumulator element is a row's
sum). Per group, the [64, 16] words (16 bytes a thread, gpu_gluon_probe.WORDS) decode with
int4_mma's LOP3s and one HFMA2 a pair into fp16 s * code + z, which is wgmma's [64, 128] register
A operand after a trivial layout conversion. One async `warpgroup_mma` (8 wgmma.m64n8k16)
accumulates into the one fp32 accumulator while the next group decodes, its words 4 groups ahead.
ptxas serialized two other designs (its C7511 / C7514 notes under `ptxas -v`):
- exact codes with a fresh accumulator a group (int4_mma's way: the scales applied to each group's
  sums), because the accumulators are read between wgmma stages;
- four groups' MMAs in flight, for lack of registers.
Compiled (Triton 3.9, sm_90a): 96 registers, no spills, no serialization; 192 SASS instructions a
thread a group, 3.0 a weight, against int4_mma's 1.41. The decode is 72 of them (1.1 a weight); the
rest is the group's fixed cost: re-packing the decoded halves (16 MOV), the B tiles' addresses
(16 UMOV), the scales. Two things would cut that: more rows a thread (two m64 tiles a warpgroup)
and more groups an iteration. Whether the async MMAs and the 5 programs an SM that 96 registers
allow make up for it is what the GPU has to show.

`--aot` (no GPU): compile for sm_90a and print registers, spills and the loop's instructions.
On a GPU: check against the dequantized weights' product (float64) for Llama-3-8B's four
shapes (gate_up as a 2N-row stream), then time the kernel alone (x packed before; the split sum
not counted) against int4_gemv at its shipped launch (µs a call, CUDA graph over weights past L2).
Usage: python3 scripts/gpu_int4_wgmma.py [--aot]
"""
from __future__ import annotations

import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper

from gpu_gluon_probe import MMA_LAYOUT, WORDS, decode_asm, to_operand

GROUP = 128


# the decode, then (1024 + c) * s + (z - 1024 s) for even codes, (1024 + 16 c) * s / 16 + (z - 64 s) for odd
DEQUANT = gl.constexpr(decode_asm("\n".join(f"fma.rn.f16x2 {r}, {r}, {m}, {c};"
                                             for r, m, c in (("a", "$9", "$10"), ("b", "$9", "$10"),
                                                             ("c", "$11", "$12"), ("d", "$11", "$12")))))


@gluon.jit
def _half2(v):
    """fp16 v (fp32 in) in both halves of an int32."""
    bits = v.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return bits | (bits << 16)


@gluon.jit
def _dequant(words, s_ptr, z_ptr, arow, groups, g):
    """group g's [64, 16] words -> wgmma's [64, 128] fp16 A: s * code + z (even codes: (1024 + c) s +
    (z - 1024 s); odd, decoded as 1024 + 16 c: (s / 16) and (z - 64 s))."""
    s = gl.load(s_ptr + arow * groups + g).to(gl.float32)[:, None]
    z = gl.load(z_ptr + arow * groups + g).to(gl.float32)[:, None]
    ones = gl.zeros(words.shape, gl.float32, words.type.layout)
    c0, c4, c2, c6, c1, c5, c3, c7 = gl.inline_asm_elementwise(
        DEQUANT, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r",
        [words, _half2(s + ones), _half2(z - 1024 * s + ones), _half2(s / 16 + ones), _half2(z - 64 * s + ones)],
        dtype=[gl.float16] * 8, is_pure=True, pack=1)
    return to_operand(c0, c4, c2, c6, c1, c5, c3, c7)


@gluon.jit
def _words(w_row, g, g_last):
    """Groups g .. g + 3's [64, 16] words (clamped to the split's last block)."""
    g = gl.minimum(g, g_last)
    return gl.load(w_row + g * 16), gl.load(w_row + (g + 1) * 16), gl.load(w_row + (g + 2) * 16), \
        gl.load(w_row + (g + 3) * 16)


@gluon.jit
def int4_wgmma_kernel(xs_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, KW, groups, GPS: gl.constexpr):
    """y[pid_k, rows] = the split's sums for a 64-row tile; xs: x in the kernel's K order (pack_x_wgmma)."""
    acc_layout: gl.constexpr = MMA_LAYOUT
    pid_n = gl.program_id(0)
    g0 = gl.program_id(1) * GPS
    # the split's x into shared memory, every column x
    xb: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [4, 1], [1, 0])
    x_smem = gl.allocate_shared_memory(gl.float16, [GPS, 128, 8],
                                       gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2))
    k = gl.arange(0, 128, layout=gl.SliceLayout(1, xb))
    for gi in range(GPS):
        xv = gl.load(xs_ptr + (g0 + gi) * 128 + k)
        x_smem.index(gi).store(gl.expand_dims(xv, 1) + gl.zeros([128, 8], gl.float16, xb))
    hopper.fence_async_shared()
    gl.barrier()

    rows = pid_n * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, WORDS))
    cols = gl.arange(0, 16, layout=gl.SliceLayout(0, WORDS))
    w_row = w_ptr + rows.to(gl.int64)[:, None] * KW + cols[None, :]
    srow = pid_n * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    arow = pid_n * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, WORDS))
    zero_acc = gl.zeros([64, 8], gl.float32, acc_layout)
    # one accumulator: each group's A is its codes dequantized in fp16 (s * code + z, one HFMA2 a
    # pair); words 4 groups ahead in registers; one group's MMAs in flight while the next decodes
    w0, w1, w2, w3 = _words(w_row, g0, g0 + GPS - 4)
    acc = hopper.warpgroup_mma(_dequant(w0, s_ptr, z_ptr, arow, groups, g0), x_smem.index(0), zero_acc,
                               use_acc=False, is_async=True)
    w0, w1, w2, w3 = w1, w2, w3, gl.load(w_row + (g0 + 4) * 16)
    for gi in range(1, GPS):
        a = _dequant(w0, s_ptr, z_ptr, arow, groups, g0 + gi)
        w0, w1, w2, w3 = w1, w2, w3, gl.load(w_row + (g0 + gl.minimum(gi + 4, GPS - 1)) * 16)
        acc = hopper.warpgroup_mma_wait(0, deps=[acc])
        acc = hopper.warpgroup_mma(a, x_smem.index(gi), acc, is_async=True)
    total = hopper.warpgroup_mma_wait(0, deps=[acc])
    col = gl.arange(0, 8, layout=gl.SliceLayout(0, acc_layout))
    y = gl.sum(gl.where(col[None, :] == 0, total, 0.0), axis=1)
    gl.store(y_ptr + gl.program_id(1) * N + srow, y)


def pack_x_wgmma(x: torch.Tensor) -> torch.Tensor:
    """x [K] -> fp16 [K] in the kernel's K order (gpu_gluon_probe: code j of word 4t + i of a group
    at 32 i + 16 (j % 2) + 8 (j // 2 % 2) + 2 t + j // 4)."""
    k = torch.arange(GROUP, device=x.device)
    i, p, h, t, jj = k // 32, k // 16 % 2, k // 8 % 2, k // 2 % 4, k % 2
    src = 8 * (4 * t + i) + p + 2 * h + 4 * jj
    return x.float().view(-1, GROUP)[:, src].half().reshape(-1).contiguous()


def launch(xs: torch.Tensor, w, split: int) -> torch.Tensor:
    """The kernel alone on x packed by pack_x_wgmma: the split partials [split, N] fp32."""
    N, K = w.shape
    y = torch.empty(split, N, dtype=torch.float32, device=xs.device)
    int4_wgmma_kernel[(N // 64, split)](xs, w.packed, w.scales, w.zeros, y, N, K // 8, K // GROUP,
                                        GPS=K // GROUP // split, num_warps=4)
    return y


def int4_wgmma(x: torch.Tensor, w, split: int) -> torch.Tensor:
    """x [1, K] @ W^T for an int4_gemv weight (group 128): [N] fp32, the split partials summed here."""
    return launch(pack_x_wgmma(x.reshape(-1)), w, split).sum(0)


def aot() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from gpu_common import ptxas_usage
    sig = {"xs_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*fp32",
           "N": "i32", "KW": "i32", "groups": "i32", "GPS": "constexpr"}
    for gps in (8, 32):
        src = GluonASTSource(int4_wgmma_kernel, sig, constexprs={(8,): gps},
                             attrs={(i,): [["tt.divisibility", 16]] for i in range(8)})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        ptx = kernel.asm["ptx"]
        print(f"GPS {gps}: {ptxas_usage(ptx)}; {ptx.count('wgmma.mma_async')} wgmma.mma_async, "
              f"{ptx.count('wgmma.wait_group')} waits, {ptx.count('ld.global.v4')} ld.global.v4, "
              f"{ptx.count('lop3.b32')} lop3, {ptx.count('ld.shared')} ld.shared")
        ops = loop_ops(kernel.asm["cubin"])
        # the loop: one group, 64 rows x 128 codes over 128 threads
        print(f"  SASS loop: {sum(ops.values())} instructions a thread, {sum(ops.values()) / 64:.2f} a weight; "
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
        for split in (1, 2, 4):
            try:   # split 1 of down wants 224 KB of shared memory
                y = int4_wgmma(x, ws[0], split)
            except Exception as e:
                print(f"{name:8s} wgmma split {split}: {type(e).__name__}: {str(e)[:100]}")
                continue
            err = ((y.double() - ref).norm() / ref.norm()).item()
            xs = pack_x_wgmma(x.reshape(-1))
            us = time_calls([lambda w=w: launch(xs, w, split) for w in ws])
            print(f"{name:8s} wgmma split {split}: {us:7.2f} us (the kernel alone, x packed before)  "
                  f"rel. err {err:.1e}")
        us = time_calls([lambda w=w: G.int4_gemv(x, w, config=cfg) for w in ws])
        err = ((G.int4_gemv(x, ws[0], config=cfg)[0].double().reshape(-1) - ref).norm() / ref.norm()).item()
        print(f"{name:8s} int4_gemv (shipped, split {cfg.split_k}): {us:7.2f} us  rel. err {err:.1e}")
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    aot() if "--aot" in sys.argv or not torch.cuda.is_available() else main()
