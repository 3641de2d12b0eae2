"""fused_linear (kernels/triton_gemv.py) against fused_linear_ref, on random inputs.

Like test_kernels_triton.py: full sizes on a CUDA GPU (marked `gpu`), small sizes on the CPU under
TRITON_INTERPRET=1 in a child process (this file run as a script, kernel_checks.py), fp32 and fp16
there.
"""
from __future__ import annotations

import sys

import pytest
import torch
from kernel_checks import (check_residual_out, needs_triton, on_gpu, rel_err, run_cpu_groups,
                           run_interpreter)

from pagedeploy.kernels import reference as ref

# ||out - ref|| / ||ref|| against the reference run in fp32 on the same (upcast) inputs (its fp32
# bound is looser than kernel_checks.REL_TOL's 1e-5)
GEMV_REL_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def make_inputs(m, n, k, dtype, device, *, silu, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * n if silu else n

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device, dtype)
    # x and residual of different scales: the residual add is visible in the norm
    return dict(x=randn(m, k), residual=randn(m, k, scale=3.0), weight=randn(rows, k, scale=k ** -0.5),
                bias=randn(rows) if bias else None, norm_weight=1.0 + randn(k, scale=0.2))


def check_fused_linear(m, n, k, dtype, device, *, norm=False, residual=False, silu=False,
                       bias=False, config=None, seed=0, strided_x=False):
    from pagedeploy.kernels.triton_gemv import GemvConfig, fused_linear
    t = make_inputs(m, n, k, dtype, device, silu=silu, bias=bias, seed=seed)
    x = t["x"]
    if strided_x:   # a row slice of a wider buffer, as the model's hidden state can be
        x = torch.cat([x, x[:, :8]], dim=1)[:, :k]
    kw = dict(norm_weight=t["norm_weight"] if norm else None, eps=1e-6,
              residual=t["residual"] if residual else None, silu_mul=silu)
    before = x.clone(), t["residual"].clone()
    cfg = GemvConfig(**config, pdl=device == "cuda") if config else None
    out, r_out = fused_linear(x, t["weight"], t["bias"], config=cfg, **kw)
    f32 = {key: (v.float() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    expect, r_expect = ref.fused_linear_ref(x.float(), t["weight"].float(),
                                            None if t["bias"] is None else t["bias"].float(), **f32)
    assert out.shape == (m, n) and out.dtype == dtype and torch.isfinite(out).all()
    err = rel_err(out, expect)
    assert err < GEMV_REL_TOL[dtype], (m, n, k, dtype, norm, residual, silu, bias, config, err)
    assert torch.equal(x, before[0]) and torch.equal(t["residual"], before[1])
    check_residual_out(r_out, x, kw["residual"], norm)
    return err


def check_graph_replay(m, n, k, dtype, device="cuda"):
    """Split-K reduction and PDL inside a CUDA graph: fresh inputs, replayed twice, same as eager."""
    from pagedeploy.kernels.triton_gemv import GemvConfig, fused_linear
    t = make_inputs(m, n, k, dtype, device, silu=True, bias=False, seed=3)
    x = t["x"].clone()
    w_down = (torch.randn(k, n, device=device) * n ** -0.5).to(dtype)
    cfg = GemvConfig(block_n=8, block_k=128, split_k=8)
    kw = dict(norm_weight=t["norm_weight"], eps=1e-6, residual=t["residual"], silu_mul=True)
    warm, _ = fused_linear(x, t["weight"], config=cfg, **kw)   # compile outside the capture
    fused_linear(warm, w_down, config=GemvConfig(split_k=4))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, r_out = fused_linear(x, t["weight"], config=cfg, **kw)
        down, _ = fused_linear(out, w_down, config=GemvConfig(split_k=4))
    for _ in range(2):
        x.copy_(torch.randn(m, k, device=device).to(dtype))
        graph.replay()
        expect, r_expect = fused_linear(x, t["weight"], config=cfg, **kw)
        expect_down, _ = fused_linear(expect, w_down, config=GemvConfig(split_k=4))
        assert torch.equal(out, expect) and torch.equal(r_out, r_expect) and torch.equal(down, expect_down)


# --------------------------------------------------------------------------- GPU

SHAPES = {  # name: (n, k, norm, silu) of Qwen3-0.6B and Llama-3-8B decode linears
    "qwen qkv": (4096, 1024, True, False), "qwen o": (1024, 2048, False, False),
    "qwen gate_up": (3072, 1024, True, True), "qwen down": (1024, 3072, False, False),
    "llama qkv": (6144, 4096, True, False), "llama o": (4096, 4096, False, False),
    "llama gate_up": (14336, 4096, True, True), "llama down": (4096, 14336, False, False),
    "odd": (1000, 1000, True, True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", list(SHAPES))
@on_gpu
def test_fused_linear_gpu(shape, m, dtype):
    n, k, norm, silu = SHAPES[shape]
    check_fused_linear(m, n, k, dtype, "cuda", norm=norm, residual=norm, silu=silu, bias=m == 3,
                       seed=m)


@pytest.mark.parametrize("split", [1, 2, 16])
@on_gpu
def test_fused_linear_forced_splits_gpu(split):
    check_fused_linear(2, 1024, 2048, torch.bfloat16, "cuda", norm=True, residual=False, silu=True,
                       config=dict(block_n=16, block_k=128, split_k=split), strided_x=True)


@on_gpu
def test_fused_linear_graph_replay_gpu():
    check_graph_replay(1, 1024, 1024, torch.bfloat16)
    check_graph_replay(4, 3072, 1024, torch.float16)


# --------------------------------------------------------------------------- CPU interpreter

def _cpu_cases() -> None:
    small = dict(block_n=16, block_k=64)
    for s, (m, n, k) in enumerate([(1, 40, 64), (2, 96, 200), (3, 33, 130), (4, 64, 256)]):
        for dt in (torch.float32, torch.float16):
            check_fused_linear(m, n, k, dt, "cpu", config=dict(small, split_k=1 + s % 3), seed=s)
            check_fused_linear(m, n, k, dt, "cpu", norm=True, residual=s % 2 == 0, silu=True,
                               bias=s == 2, config=dict(small, split_k=2 ** s), seed=10 + s,
                               strided_x=s == 1)
            check_fused_linear(m, n, k, dt, "cpu", norm=True, residual=True, bias=True,
                               config=dict(small, split_k=1), seed=20 + s)
    check_fused_linear(1, 300, 96, torch.float32, "cpu", norm=True, residual=True, silu=True)  # defaults
    # the batch-1 defaults of plain linears: 4 rows, K tiles of 512 / 2048 (ragged last tile)
    check_fused_linear(1, 50, 160, torch.float32, "cpu", norm=True, residual=True, bias=True)
    check_fused_linear(1, 20, 2100, torch.float16, "cpu")


CPU_GROUPS = {"fused_linear": _cpu_cases}


@needs_triton
def test_interpreter():
    run_interpreter(__file__, CPU_GROUPS)


if __name__ == "__main__":
    sys.exit(run_cpu_groups(CPU_GROUPS, sys.argv[1:]))
