"""int4_gemv (quant/int4_gemv.py), the batch-1 int4 linear with its fusions, against the unfused
torch reference (rms_norm_ref, int4_matmul_reference, silu_and_mul_ref) on random inputs.

Both are measured against the exact product (fp32 input, fp32 dequantized weight): the kernel must
come within 1.5x of the reference's own error, which rounds each weight to the model dtype, and for
fp16 models of the bf16 reference's (the kernel rounds code * scale to fp16 and sums up to 16
products in fp16: about as exact as bf16 weights, less than fp16 ones). Full sizes on a CUDA GPU
(marked `gpu`); small ones on the CPU under TRITON_INTERPRET=1 in a child process
(kernel_checks.py), where the kernel computes in fp32 instead of packed fp16 (no inline PTX there).
"""
from __future__ import annotations

import sys

import pytest
import torch
from kernel_checks import (check_residual_out, needs_triton, on_gpu, rel_err, run_cpu_groups,
                           run_interpreter)

from pagedeploy.kernels.reference import fused_linear_ref, rms_norm_ref, silu_and_mul_ref
from pagedeploy.quant.int4 import dequantize_int4, int4_matmul_reference, quantize_int4


def make_case(n, k, group, dtype, device, *, silu, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * n if silu else n

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device, dtype)
    w = quantize_int4(torch.randn(rows, k, generator=gen) * k ** -0.5, group).to(device)
    return dict(w=w, x=randn(1, k), residual=randn(1, k, scale=3.0), bias=randn(rows),
                norm_weight=1.0 + randn(k, scale=0.2))


def ref_error(t, b, kw, exact, dtype) -> float:
    """The unfused reference's error in `dtype` (it rounds each weight to it)."""
    cast = {key: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    x = t["x"].to(dtype)
    if cast["norm_weight"] is not None:
        x = rms_norm_ref(x, cast["norm_weight"], 1e-6, cast["residual"])[0]
    y = int4_matmul_reference(x, t["w"], None if b is None else b.to(dtype))
    return rel_err(silu_and_mul_ref(y) if kw["silu_mul"] else y, exact)


def check_int4_gemv(n, k, group, dtype, device, *, norm=False, residual=False, silu=False,
                    bias=False, config=None, seed=0, repeat=2):
    from pagedeploy.quant.int4_gemv import Int4GemvConfig, int4_gemv
    t = make_case(n, k, group, dtype, device, silu=silu, seed=seed)
    b = t["bias"] if bias else None
    kw = dict(norm_weight=t["norm_weight"] if norm else None, eps=1e-6,
              residual=t["residual"] if residual else None, silu_mul=silu)
    cfg = Int4GemvConfig(**config) if config else None
    before = t["x"].clone(), t["residual"].clone()
    f32 = {key: (v.float() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    exact, _ = fused_linear_ref(t["x"].float(), dequantize_int4(t["w"]).float(),
                                None if b is None else b.float(), **f32)
    budget = 1.5 * max(ref_error(t, b, kw, exact, dtype), ref_error(t, b, kw, exact, torch.bfloat16)) + 1e-4
    for _ in range(repeat):   # twice: split-K arrival counters must re-arm
        out, r_out = int4_gemv(t["x"], t["w"], b, config=cfg, **kw)
        assert out.shape == (1, n) and out.dtype == dtype and torch.isfinite(out).all()
        err = rel_err(out, exact)
        assert err <= budget, (n, k, group, dtype, norm, residual, silu, bias, config, err, budget)
    assert torch.equal(t["x"], before[0]) and torch.equal(t["residual"], before[1])
    check_residual_out(r_out, t["x"], kw["residual"], norm)
    return err / budget


# --------------------------------------------------------------------------- GPU

SHAPES = {  # name: (n, k, group, norm, silu) of decode linears
    "llama qkv": (6144, 4096, 128, True, False), "llama o": (4096, 4096, 128, False, False),
    "llama gate_up": (14336, 4096, 128, True, True), "llama down": (4096, 14336, 128, False, False),
    "qwen gate_up": (3072, 1024, 128, True, True), "smollm2 qkv g64": (960, 576, 64, True, False),
    "gguf down g32": (576, 1536, 32, False, False), "odd": (1000, 1024, 128, True, True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
@on_gpu
def test_int4_gemv_gpu(shape, dtype):
    n, k, group, norm, silu = SHAPES[shape]
    check_int4_gemv(n, k, group, dtype, "cuda", norm=norm, residual=norm, silu=silu,
                    bias=shape == "odd", seed=n)


@pytest.mark.parametrize("config", [dict(split_k=1), dict(split_k=8, block_n=32),
                                    dict(split_k=3), dict(split_k=2, block_n=128, num_warps=8)])
@on_gpu
def test_int4_gemv_configs_gpu(config):
    check_int4_gemv(2048, 4096, 128, torch.bfloat16, "cuda", bias=True, config=config)
    check_int4_gemv(1024, 4096, 128, torch.bfloat16, "cuda", norm=True, residual=True, silu=True,
                    config=config)


MMA_CONFIGS = [dict(mma=True, split_k=1), dict(mma=True, split_k=2, block_n=32, num_warps=2),
               dict(mma=True, split_k=4, block_n=128, ahead=2), dict(mma=True, split_k=7, block_n=128, num_warps=8),
               dict(mma=True, split_k=2, ahead=2),
               # x packed by the GEMV's programs: a range of half a chunk (masked), 2, 1 and 16 chunks;
               # the norm's loads in 14, 4 and 1 rounds
               dict(mma=True, split_k=7, pack_in_kernel=True, pack_words=512, rstd_block=1024),
               dict(mma=True, split_k=4, block_n=128, ahead=2, pack_in_kernel=True, pack_words=64),
               dict(mma=True, split_k=1, pack_in_kernel=True, pack_words=512, rstd_block=4096),
               dict(mma=True, split_k=2, block_n=32, num_warps=2, pack_in_kernel=True, pack_words=16)]


@pytest.mark.parametrize("pack_in_kernel", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["llama qkv", "llama o", "llama gate_up", "llama down", "qwen gate_up"])
@on_gpu
def test_int4_gemv_mma_gpu(shape, dtype, pack_in_kernel):
    """The tensor-core path (int4_mma.py) on the decode shapes, at its default launch, with x packed
    by pack_x or by the GEMV itself."""
    from pagedeploy.quant.int4_gemv import default_config
    n, k, group, norm, silu = SHAPES[shape]
    cfg = default_config(n, k, group, silu, torch.device("cuda"))
    assert cfg.mma
    check_int4_gemv(n, k, group, dtype, "cuda", norm=norm, residual=norm, silu=silu, bias=True,
                    config=dict(cfg.__dict__, pack_in_kernel=pack_in_kernel), seed=n)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("config", [dict(split_k=4), dict(split_k=1, ahead=2), dict(split_k=7, pack_words=128)])
@on_gpu
def test_int4_mma_pack_in_kernel_equal_gpu(config, norm):
    """x packed by the GEMV's programs gives outputs (and residual out) bit-equal to pack_x's launch
    on these inputs: both pack the same pairs. The per-group sums of x may be reduced in another
    order with another chunk width; on these inputs they round alike (end to end, greedy tokens of
    dummy weights did differ: docs/PERF.md run 21)."""
    from pagedeploy.quant.int4_gemv import Int4GemvConfig, int4_gemv
    k = 14336 if config["split_k"] == 7 else 4096
    t = make_case(2048, k, 128, torch.bfloat16, "cuda", silu=False, seed=11)
    kw = dict(norm_weight=t["norm_weight"], eps=1e-6, residual=t["residual"]) if norm else {}
    expect, r_expect = int4_gemv(t["x"], t["w"], t["bias"], config=Int4GemvConfig(mma=True, **config), **kw)
    for _ in range(2):
        out, r_out = int4_gemv(t["x"], t["w"], t["bias"],
                               config=Int4GemvConfig(mma=True, pack_in_kernel=True, **config), **kw)
        assert torch.equal(out, expect)
        assert (r_out is None and r_expect is None) or torch.equal(r_out, r_expect)


@pytest.mark.parametrize("config", MMA_CONFIGS)
@on_gpu
def test_int4_gemv_mma_configs_gpu(config):
    """Row tiles of 1, 2 and 4 repeats of the layout a warp, and splits, on the tensor-core path."""
    k = 14336 if config["split_k"] == 7 else 4096
    check_int4_gemv(2048, k, 128, torch.bfloat16, "cuda", bias=True, config=config)
    check_int4_gemv(1024, k, 128, torch.float16, "cuda", norm=True, residual=True, silu=True,
                    config=config)
    check_int4_gemv(1024, k, 128, torch.bfloat16, "cuda", norm=True, config=config)   # a first layer


@pytest.mark.parametrize("early", [(False, False), (True, False), (True, True)])
@on_gpu
def test_int4_gemv_graph_replay_gpu(early, monkeypatch):
    """Split-K and PDL inside a CUDA graph: fresh inputs, replayed twice, equal to eager calls; with
    the kernel after pack_x, and after the tensor-core GEMV, launched before they wait or not; and
    with x packed inside the tensor-core GEMV."""
    from pagedeploy.quant import int4_mma, int4_pack
    from pagedeploy.quant.int4_gemv import Int4GemvConfig, int4_gemv
    monkeypatch.setattr(int4_pack, "EARLY_LAUNCH", early[0])
    monkeypatch.setattr(int4_mma, "EARLY_LAUNCH", early[1])
    t = make_case(2048, 4096, 128, torch.bfloat16, "cuda", silu=True, seed=5)
    down = make_case(4096, 2048, 128, torch.bfloat16, "cuda", silu=False, seed=6)["w"]
    x = t["x"].clone()
    kw = dict(norm_weight=t["norm_weight"], eps=1e-6, residual=t["residual"], silu_mul=True)
    for mma, in_kernel in ((False, False), (True, False), (True, True)):
        cfg = Int4GemvConfig(split_k=8, mma=mma, pack_in_kernel=in_kernel)
        cfg_down = Int4GemvConfig(split_k=4, mma=mma, ahead=1 + mma, pack_in_kernel=in_kernel)

        def layer():
            act, r_out = int4_gemv(x, t["w"], config=cfg, **kw)
            return int4_gemv(act, down, config=cfg_down)[0], r_out
        layer()   # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, r_out = layer()
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            expect, r_expect = layer()
            assert torch.equal(out, expect) and torch.equal(r_out, r_expect)


# --------------------------------------------------------------------------- CPU interpreter

def test_mma_launch_rule():
    """int4_mma's launches for Llama-3-8B's decode linears on 132 SMs (the H200 sweep's choices),
    and the packed-fp16 GEMV off CUDA or for other groups."""
    from pagedeploy.quant.int4_gemv import Int4GemvConfig, default_config, mma_config
    def mma(ahead, words, rstd):   # x packed in the kernel: its split's words at once, the row's norm
        return dict(mma=True, ahead=ahead, pack_in_kernel=True, pack_words=words, rstd_block=rstd)
    assert mma_config(96, 8, False, 132) == Int4GemvConfig(64, 4, **mma(1, 128, 4096))     # qkv
    assert mma_config(64, 8, False, 132) == Int4GemvConfig(64, 4, **mma(2, 128, 4096))     # o
    assert mma_config(448, 8, True, 132) == Int4GemvConfig(64, 1, **mma(1, 512, 4096))     # gate_up
    assert mma_config(64, 28, False, 132) == Int4GemvConfig(64, 4, **mma(2, 512, 4096))    # down: 4 divides 28
    assert mma_config(2004, 8, False, 132) == Int4GemvConfig(64, 1, **mma(2, 512, 4096))   # an int4 lm_head
    assert mma_config(16, 2, False, 132) == Int4GemvConfig(64, 1, **mma(1, 128, 1024))     # one split only
    cpu = torch.device("cpu")
    assert not default_config(4096, 4096, 128, False, cpu).mma
    assert default_config(4096, 4096, 128, False, cpu, mma=True).mma
    assert not default_config(4096, 4096, 64, False, cpu, mma=True).mma
    assert not default_config(1000, 4096, 128, False, cpu, mma=True).mma


def _cpu_cases() -> None:
    f16 = torch.float16   # the kernel's x pairs are fp16: bf16 and fp16 models only (numpy: no bf16)
    check_int4_gemv(40, 256, 128, f16, "cpu", bias=True, config=dict(block_n=16))
    check_int4_gemv(32, 1024, 128, f16, "cpu", config=dict(block_n=16, split_k=2))       # EVEN
    check_int4_gemv(24, 768, 32, f16, "cpu", norm=True, residual=True, silu=True, bias=True,
                    config=dict(block_n=16, split_k=3))
    check_int4_gemv(48, 576, 64, f16, "cpu", norm=True, bias=True, config=dict(block_n=32, split_k=2))
    check_int4_gemv(16, 640, 128, f16, "cpu", silu=True, config=dict(block_n=16))
    check_int4_gemv(64, 1024, 128, f16, "cpu", norm=True, residual=True, silu=True)   # defaults
    _check_pack_odd_over_16()


def _check_pack_odd_over_16() -> None:
    """pack_x(odd_over_16=True): pairs 1 and 3 exactly a sixteenth of the plain packing, sums alike
    (exact for |x| >= 2^-10; below, x / 16 is an fp16 subnormal and loses bits)."""
    from pagedeploy.quant.int4_pack import pack_x
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(7))
    x = (x.sign() * (x.abs() + 2 ** -9)).to(torch.float16)
    xp, xw, _ = pack_x(x)
    xp16, xw16, _ = pack_x(x, odd_over_16=True)
    plain, scaled = xp.view(torch.float16).view(4, -1, 2), xp16.view(torch.float16).view(4, -1, 2)
    assert torch.equal(scaled[0::2], plain[0::2]) and torch.equal(scaled[1::2] * 16, plain[1::2])
    assert torch.equal(xw16, xw)
    _check_pack_mma(x, plain, xw)


def _check_pack_mma(x, plain, xw) -> None:
    """pack_x(mma=True): pairs (0, 2) and (1, 3) of each word side by side in int64 (1 and 3 over 16),
    and per 128 K 1024 * the sum of those pairs as packed and the sum of x."""
    from pagedeploy.quant.int4_pack import pack_x
    xp, xg, _ = pack_x(x, mma=True)
    assert xp.shape == (2, x.shape[1] // 8) and xp.dtype == torch.int64 and xg.shape == (2, x.shape[1] // 128)
    halves = xp.view(torch.float16).view(2, -1, 2, 2)   # [even/odd pairs, word, pair, lo/hi]
    assert torch.equal(halves[0, :, 0], plain[0]) and torch.equal(halves[0, :, 1], plain[2])
    assert torch.equal(halves[1, :, 0] * 16, plain[1]) and torch.equal(halves[1, :, 1] * 16, plain[3])
    groups = halves.float().permute(1, 0, 2, 3).reshape(-1, 16 * 8).sum(1)
    torch.testing.assert_close(xg[0], 1024 * groups, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(xg[1], xw.view(-1, 16).sum(1), rtol=1e-6, atol=1e-5)
    _check_pack_chunks(x)


def _check_pack_chunks(x) -> None:
    """pack_words as the tensor-core GEMV runs it (int4_mma.py's PACK: a split's words in one chunk
    of up to 512, masked past the split's end), through pack_x's `words`: the same pairs as 64-word
    chunks, bit for bit, and the same group sums up to the order of the additions; after RMSNorm
    with a residual too."""
    from pagedeploy.quant.int4_pack import pack_x
    gen = torch.Generator().manual_seed(8)
    k = x.shape[1]
    norm = dict(norm_weight=(1 + 0.2 * torch.randn(k, generator=gen)).to(x.dtype), eps=1e-6,
                residual=(3 * torch.randn(1, k, generator=gen)).to(x.dtype))
    for kw in ({}, norm):
        xp, xg, r_out = pack_x(x, mma=True, **kw)
        for words in (16, 128, 512):   # 512 > K / 8 = 64: one chunk, most of it masked
            xp_c, xg_c, r_c = pack_x(x, mma=True, words=words, **kw)
            assert torch.equal(xp_c, xp), words
            torch.testing.assert_close(xg_c, xg, rtol=1e-6, atol=1e-4)
            assert (r_out is None and r_c is None) or torch.equal(r_c, r_out)


CPU_GROUPS = {"int4_gemv": _cpu_cases}


@needs_triton
def test_interpreter():
    run_interpreter(__file__, CPU_GROUPS)


if __name__ == "__main__":
    sys.exit(run_cpu_groups(CPU_GROUPS, sys.argv[1:]))
