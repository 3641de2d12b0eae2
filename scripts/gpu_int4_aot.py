"""`python scripts/gpu_int4.py --aot`: compile the int4 kernels (the fma, dot and gemm kernels
of int4_triton.py, the batch-1 kernels of int4_gemv.py and int4_mma.py) for sm_90a on a machine
without a GPU and count, from the SASS, the instructions of the hottest loop per weight (the
figure the kernel notes in docs/PERF.md quote), with registers and spills."""
from __future__ import annotations

from gpu_common import RunLog, compile_for_h100, sass_loop_ops, triton_bin_dir

from pagedeploy.quant import int4_gemv as G4
from pagedeploy.quant import int4_mma as M4
from pagedeploy.quant import int4_triton as K4

log = RunLog("int4.log")


def aot() -> int:
    """Compile the fma, dot and GEMV kernels for sm_90a (Triton's own ptxas) and print registers, spills and
    the instructions of the hottest loop per weight (from the SASS): no GPU needed."""
    import subprocess
    import tempfile

    bin_dir = triton_bin_dir()
    ptrs = {"x_ptr": "*bf16", "xs_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
            "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32", "xp_ptr": "*i32",
            "xw_ptr": "*fp32", "xg_ptr": "*fp32", "r_ptr": "*bf16", "nw_ptr": "*bf16", "r_out_ptr": "*bf16"}
    div16 = ("N", "KW", "groups", "words_per_split", "stride_xm", "stride_ym")
    common = dict(GROUP=128, USE_SPLIT=True, HAS_BIAS=False, ROPE_DIM=0)
    fma = ((1, 128, 1, 4), (1, 256, 1, 4), (1, 64, 2, 2), (2, 256, 1, 4))
    variants = [(K4._int4_fma_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, UNROLL=u, NUM_STAGES=2, EVEN=True),
                 nw, bn * 128 * u) for bm, bn, u, nw in fma]
    variants += [(K4._int4_dot_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, SWAP_AB=sw, FOLD=True,
                                            PRECISION="tf32"), nw, bn * 128)
                 for bm, bn, nw, sw in ((16, 128, 4, True), (32, 128, 4, False), (32, 128, 4, True))]
    gemv = dict(GROUP=128, SPLITS=4, F16X2=True, PDL=2, EVEN=True, USE_SPLIT=True, HAS_BIAS=False)
    variants += [(G4._int4_gemv_kernel, dict(gemv, BLOCK_N=bn, SILU_MUL=silu), nw,
                  bn * 512 * (2 if silu else 1))
                 for bn, nw, silu in ((64, 4, False), (64, 4, True), (32, 4, False))]
    mma = dict(SPLITS=4, PDL=2, USE_SPLIT=True, HAS_BIAS=False, EARLY=False, RESIDUAL=False, RSTD_BLOCK=4096)
    variants += [(M4._int4_mma_kernel, dict(mma, BLOCK_N=bn, SILU_MUL=silu, AHEAD=ahead, PACK=pack, NORM=pack and silu,
                                            PACK_C=words), nw, bn * 512 * (2 if silu else 1))
                 for bn, nw, silu, ahead, pack, words in ((64, 4, False, 1, False, 512), (64, 4, False, 2, False, 512),
                                                          (64, 4, True, 1, False, 512), (32, 2, True, 1, False, 512),
                                                          (64, 4, False, 2, True, 512), (64, 4, True, 1, True, 512))]
    variants += [(K4._int4_gemm_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, NUM_STAGES=3, PRECISION="tf32",
                                             FOLD=fold), nw, bn * 128)
                 for bm, bn, nw, fold in ((64, 128, 8, False), (64, 64, 4, False), (128, 128, 8, False),
                                          (64, 128, 4, True))]
    for fn, consts, nw, weights_per_step in variants:
        consts = {k: v for k, v in {**common, **consts}.items() if k in fn.arg_names}
        args = [n for n in fn.arg_names if n not in consts]
        types = dict(ptrs, xp_ptr="*i64") if fn is M4._int4_mma_kernel else ptrs   # pack_x(mma=True)'s pairs
        kernel = compile_for_h100(fn, {n: types.get(n, "fp32" if n == "eps" else "i32") for n in args}, consts,
                                  [n for n in args if n in ptrs or n in div16], nw, 3)
        with tempfile.TemporaryDirectory() as d:
            with open(f"{d}/k.cubin", "wb") as f:
                f.write(kernel.asm["cubin"])
            sass = subprocess.run([f"{bin_dir}/nvdisasm", "-c", f"{d}/k.cubin"], capture_output=True, text=True).stdout
            usage = subprocess.run([f"{bin_dir}/cuobjdump", "-res-usage", f"{d}/k.cubin"], capture_output=True,
                                   text=True).stdout.strip().splitlines()[-1].split()
        ops = sass_loop_ops(sass)
        per_weight = sum(ops.values()) * 32 * nw / weights_per_step
        log(f"{fn.__name__} {consts}: {' '.join(usage[:3])}; loop {sum(ops.values())} instructions a thread, "
            f"{per_weight:.2f} per weight; top {dict(ops.most_common(6))}")
    return 0
