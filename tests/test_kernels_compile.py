"""The GPU-only paths of the kernels compile for sm_90a on the CPU (Triton's own ptxas, no GPU
needed), and their PTX has the shape they rely on.

The CPU interpreter cannot run them (inline PTX, programmatic dependent launch), so without this CI
would not see them at all: the tensor-core int4 GEMV packing x itself (int4_mma.py's PACK) and split
decode attention starting before its wait (triton_attention.py's PRE_WAIT). The same compile that
`scripts/gpu_int4.py --aot` and `scripts/gpu_kernels.py --aot` run, on the shipped launch shapes.
"""
from __future__ import annotations

import inspect
import os
import re
import sys

import torch

from kernel_checks import needs_triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

PTR = "*bf16"
# int4_mma._int4_mma_kernel's pointer arguments (x packed as pack_x(mma=True) packs it)
MMA_TYPES = {n: PTR for n in ("x_ptr", "r_ptr", "nw_ptr", "r_out_ptr", "b_ptr", "y_ptr")} | {
    "xp_ptr": "*i64", "xg_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "ws_ptr": "*fp32",
    "lock_ptr": "*i32"}


def _compile(fn, consts: dict, types: dict, num_warps: int, num_stages: int) -> str:
    """The PTX of `fn` for sm_90a; ptxas must also accept it with no spills."""
    from gpu_common import compile_for_h100, ptxas_usage
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.name not in consts
                and p.default is not inspect.Parameter.empty}
    consts = {**defaults, **consts}   # the constexprs a launch may leave out, at their defaults
    args = [n for n in fn.arg_names if n not in consts]
    arg_types = {n: types.get(n, "fp32" if n in ("eps", "qk_scale") else "i32") for n in args}
    div16 = [n for n in args if arg_types[n].startswith("*") or n.startswith("stride")]
    kernel = compile_for_h100(fn, arg_types, consts, div16, num_warps, num_stages)
    ptx = kernel.asm["ptx"]
    usage = ptxas_usage(ptx)
    assert "0 bytes spill stores" in usage, usage
    return ptx


@needs_triton
def test_int4_mma_packs_x_after_its_wait():
    """gate_up (norm + residual, silu, one block ahead) and down (two ahead) as mma_config launches
    them: the packing's stores and the barrier come after griddepcontrol.wait, the MMAs after both."""
    from pagedeploy.quant import int4_mma
    types = MMA_TYPES
    for silu, ahead, split in ((True, 1, 1), (False, 2, 4)):
        consts = dict(BLOCK_N=64, SILU_MUL=silu, HAS_BIAS=False, USE_SPLIT=split > 1, SPLITS=split, PDL=2,
                      AHEAD=ahead, EARLY=True, PACK=True, NORM=silu, RESIDUAL=silu, PACK_C=512, RSTD_BLOCK=4096,
                      ROPE_DIM=0)
        ptx = _compile(int4_mma._int4_mma_kernel, consts, types, 4, 3)
        wait = ptx.index("griddepcontrol.wait")
        barrier = ptx.index("bar.sync", wait)
        assert ptx.find("st.global", wait) < barrier < ptx.index("mma.sync.aligned.m16n8k16", wait)


@needs_triton
def test_int4_mma_timing_floors_keep_the_loop():
    """int4_mma.FLOOR (docs/PERF.md run 25) times the shipped loop with its weights (2) or x (1) read
    from the split's first block: the loads must stay in the loop (not hoisted out of it as
    loop-invariant, which would change what is timed) and the kernel must not spill. (FLOOR 3, both,
    spills 24 bytes on gate_up with its residual: it is not the figure run 25 quotes.)"""
    from pagedeploy.quant import int4_mma
    types = MMA_TYPES
    consts = dict(BLOCK_N=64, SILU_MUL=True, HAS_BIAS=False, USE_SPLIT=False, SPLITS=1, PDL=2, AHEAD=1,
                  EARLY=True, PACK=True, NORM=True, RESIDUAL=True, PACK_C=512, RSTD_BLOCK=4096, ROPE_DIM=0)
    loads = {}
    for floor in (0, 1, 2):
        ptx = _compile(int4_mma._int4_mma_kernel, dict(consts, FLOOR=floor), types, 4, 3)
        loop = _longest_loop(ptx)
        assert "mma.sync.aligned.m16n8k16" in loop
        loads[floor] = (loop.count("ld.global.b32"), loop.count("ld.global.b16"), loop.count("ld.global.b64"))
    assert loads[0] == loads[1] == loads[2] and min(loads[0]) > 0, loads


def _longest_loop(ptx: str) -> str:
    """The PTX between a label and the longest branch back to it."""
    labels = {m.group(1): m.end() for m in re.finditer(r"^(\$L__BB\w+):", ptx, re.M)}
    back = [(labels[m.group(1)], m.start()) for m in re.finditer(r"bra(?:\.uni)?\s+(\$L__BB\w+);", ptx)
            if labels.get(m.group(1), m.start()) < m.start()]
    start, stop = max(back, key=lambda se: se[1] - se[0])
    return ptx[start:stop]


@needs_triton
def test_split_decode_attention_prefetches_before_its_wait():
    """Split decode asks L2 for its first K/V tile before griddepcontrol.wait; unsplit decode (many
    sequences) keeps the plain kernel, with no prefetch at all."""
    from pagedeploy.kernels.triton_attention import _attention_kernel, launch_config
    types = {n: PTR for n in ("q_ptr", "k_cache", "v_cache", "out_ptr")}
    types |= {n: "*i32" for n in ("block_tables", "context_lens", "query_start_loc", "counters")}
    types |= {"part_out": "*fp32", "part_lse": "*fp32"}
    for splits in (32, 4, 1):
        cfg = launch_config(True, 4, splits=splits)
        consts = dict(QG=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                      NUM_SPLITS=splits, IS_DECODE=True, USE_WINDOW=False, NUM_HEADS=32, PDL=2, EARLY=False,
                      PRE_WAIT=True, QG_P2=4, MERGE_ROWS=True)
        ptx = _compile(_attention_kernel, consts, types, cfg["num_warps"], cfg["num_stages"])
        if splits > 1:
            assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")
        else:
            assert "prefetch.global.L2" not in ptx


@needs_triton
def test_int4_gemvs_rotate_in_their_epilogue():
    """Llama-3-8B's qkv with the rotary and the KV store in the epilogue (ROPE_DIM 128), on both
    batch-1 kernels as int4_gemv launches them: no spills, the MMAs before the cache stores. The
    interpreter runs only the packed-fp16 kernel's fp32 form (tests/test_rope_gemv.py)."""
    from pagedeploy.quant import int4_gemv, int4_mma
    types = MMA_TYPES | {"rq_ptr": PTR, "rkc_ptr": PTR, "rvc_ptr": PTR, "rpos_ptr": "*i64", "rcs_ptr": "*fp32",
                         "rslot_ptr": "*i64"}
    split = dict(BLOCK_N=64, SILU_MUL=False, HAS_BIAS=True, USE_SPLIT=True, SPLITS=4, PDL=2, ROPE_DIM=128)
    consts = dict(split, AHEAD=1, EARLY=True, PACK=True, NORM=True, RESIDUAL=True, PACK_C=128, RSTD_BLOCK=4096)
    ptx = _compile(int4_mma._int4_mma_kernel, consts, types, 4, 3)
    assert ptx.rindex("mma.sync.aligned.m16n8k16") < ptx.rindex("atom.global") < ptx.rindex("st.global")
    fp16_types = dict(types, xp_ptr="*i32", xw_ptr="*fp32")
    _compile(int4_gemv._int4_gemv_kernel, dict(split, GROUP=128, F16X2=True, EVEN=True), fp16_types, 4, 3)


@needs_triton
def test_gluon_int4_decode_is_the_wgmma_register_operand():
    """scripts/gpu_gluon_probe.py (the route after docs/PERF.md run 25): a 64-row tile of int4 words,
    decoded by int4_mma's LOP3s, is wgmma's register A operand with no data movement (its
    convert_layout asserts it is trivial, so a layout change fails the compile), and the group's
    K = 128 runs as 8 async wgmma with x from shared memory (K-major, 128-byte swizzle: the layout
    the H200 run of docs/PERF.md run 26 found right). Compiled in a child process: Gluon's
    IR objects, left at exit, make nanobind print leak warnings after pytest's summary."""
    import subprocess
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import gpu_gluon_probe as P\n"
            "from gpu_common import compile_for_h100\n"
            "types = {'w_ptr': '*i32', 'b_ptr': '*fp16', 'c_ptr': '*fp32'}\n"
            "kernel = compile_for_h100(P.group_kernel, types, dict(KMAJOR=True, SWIZZLE=128), types, 4, 1)\n"
            "sys.stdout.write(kernel.asm['ptx'])\n")
    scripts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")
    run = subprocess.run([sys.executable, "-c", code, scripts], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    ptx = run.stdout
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16") == 8
    assert "ld.shared" not in ptx   # A never goes through shared memory
    assert ptx.count("ld.global.v4") == 2   # a thread's words: 16 bytes from each of its two rows
    from gpu_common import ptxas_usage
    assert "0 bytes spill stores" in ptxas_usage(ptx)


def test_gluon_int4_k_order_matches_its_x_packing():
    """The K order of the Gluon route (scripts/gpu_gluon_probe.py, gpu_int4_wgmma.py) on the CPU:
    to_operand's join / reshape / permute of a word's 8 decoded codes (its constants), replayed with
    torch's stack / reshape / permute (the same tensor semantics), is the order
    gpu_gluon_probe.group_operand documents; gpu_int4_wgmma's dequantized A (s * code, 16 s * code at
    odd codes) with pack_x_wgmma's x and sum(x) and the zeros' term is the plain (s * codes + z) @ x.
    (That the rearranged tensor is wgmma's A operand is test_gluon_int4_decode_is_the_wgmma_register_operand's
    part.)"""
    import gpu_gluon_probe as P
    import gpu_int4_wgmma as W

    from pagedeploy.quant.int4 import pack_int4
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 128), generator=gen)
    words = pack_int4(codes)                                   # [64, 16]: code j of a word at bits 4j
    # the kernels' decode order, (c0, c4, c2, c6, c1, c5, c3, c7); odd codes decode as 16 code
    w = words.to(torch.int64) & 0xFFFFFFFF
    c = [((w >> (4 * j)) & 0xF) * (16 if j % 2 else 1) + 1024 for j in range(8)]
    join = lambda a, b: torch.stack([a, b], -1)  # noqa: E731  (gl.join: a new last axis of 2)
    a = join(join(join(c[0], c[4]), join(c[2], c[6])), join(join(c[1], c[5]), join(c[3], c[7])))
    a = a.reshape((64, ) + P.OPERAND_SPLIT.value).permute(P.OPERAND_PERM.value).reshape(64, 128)   # to_operand's
    assert torch.equal(a.double(), P.group_operand(words))
    # gpu_int4_wgmma's A: its fma takes 1024 s off, so s * code at even codes and 16 s * code at odd
    # ones; with pack_x_wgmma's x (divided by 16 at odd codes) and the zero term, the plain product
    s, z = torch.rand(64, 1, generator=gen, dtype=torch.float64) * 0.01, torch.randn(64, 1, generator=gen) * 0.01
    x = torch.randn(128, generator=gen).half().double()   # fp16 values: the packing rounds nothing
    xs, xsum = W.pack_x_wgmma(x)
    y = ((a.double() - 1024) * s) @ xs.double() + z.double().reshape(-1) * xsum.double()
    exact = (codes.double() * s + z.double()) @ x
    assert torch.allclose(y.reshape(-1), exact.reshape(-1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(xsum.double(), x.sum(), rtol=1e-6)


def test_triton_fp_fusion_default_is_pinned_on():
    """Importing the kernels pins Triton's fp-fusion default on (our kernels were measured with fma
    contraction; Triton 3.10 turns it off by default), and a user's own setting is kept."""
    import subprocess
    code = "import os, pagedeploy.kernels; print(os.environ['TRITON_DEFAULT_FP_FUSION'])"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    unset = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    user = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "TRITON_DEFAULT_FP_FUSION": "0"})
    assert (unset.stdout.strip(), user.stdout.strip()) == ("1", "0"), unset.stderr + user.stderr
