"""The rotary and the KV store in the batch-1 int4 qkv GEMV's epilogue (int4_gemv's `rope`,
kernels/triton_fused.py's RopeStore) against the GEMV's y through qk_norm_rope_store: q, the K and V
rows of the token's slot, and the residual out, bit for bit (both round y to the model dtype, rotate
in fp32 and round once; on the GPU up to an fma contraction), and the cache's other rows untouched.
Tiles of half a head and of a whole one, split-K, a bias, a padding slot (nothing stored), and tiles
that cannot rotate (int4_gemv falls back to the separate launch). On the CPU under TRITON_INTERPRET=1
(the packed-fp16 kernel's fp32 form), on the GPU (marked `gpu`) at Llama-3-8B's and SmolLM2's qkv
with both kernels, and inside a CUDA graph whose positions and slots change between replays.
"""
from __future__ import annotations

import sys

import pytest
import torch
from kernel_checks import needs_triton, on_gpu, run_cpu_groups, run_interpreter

from pagedeploy.quant.int4 import quantize_int4


def make_rope_case(h, kh, d, k, group, dtype, device, *, blocks=6, block_size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device, dtype)
    n = (h + 2 * kh) * d
    return dict(w=quantize_int4(torch.randn(n, k, generator=gen) * k ** -0.5, group).to(device),
                x=randn(1, k), residual=randn(1, k, scale=3.0), bias=randn(n),
                norm_weight=1.0 + randn(k, scale=0.2),
                cos_sin=torch.randn(4096, d, generator=gen).to(device),
                k_cache=randn(blocks, block_size, kh, d), v_cache=randn(blocks, block_size, kh, d))


def rotated_alike(got: torch.Tensor, expect: torch.Tensor, device) -> None:
    """Bit-equal on the CPU. On the GPU the compiler may contract a * cos - b * sin into an fma in
    one kernel and not the other (seen in fp16): a rotated value may then differ in its last bit,
    or by b * sin's rounding where the two terms cancel."""
    if device == "cpu":
        assert torch.equal(got, expect), (got - expect).abs().max()
    else:
        eps = torch.finfo(got.dtype).eps
        torch.testing.assert_close(got, expect, rtol=eps, atol=4 * eps)


def check_rope_gemv(h, kh, d, k, group, dtype, device, *, config=None, bias=False, norm=True,
                    position=17, slot=9, seed=0):
    """Fused against separate on one case; returns whether the epilogue rotated (tiles fit)."""
    from pagedeploy.kernels import qk_norm_rope_store
    from pagedeploy.kernels.triton_fused import RopeStore
    from pagedeploy.quant.int4_gemv import Int4GemvConfig, default_config, int4_gemv
    t = make_rope_case(h, kh, d, k, group, dtype, device, seed=seed)
    b = t["bias"] if bias else None
    kw = dict(norm_weight=t["norm_weight"], eps=1e-6, residual=t["residual"]) if norm else {}
    cfg = Int4GemvConfig(**config) if config else None
    pos = torch.tensor([position], device=device)
    slots = torch.tensor([slot], device=device)
    caches = t["k_cache"].clone(), t["v_cache"].clone()
    y, r_expect = int4_gemv(t["x"], t["w"], b, config=cfg, **kw)
    q_expect = qk_norm_rope_store(y, None, None, 0.0, pos, t["cos_sin"], *caches, slots, h, kh, d)
    if slot >= 0:   # the separate launch wrote the slot's rows (and only those)
        written = torch.zeros(caches[0].shape[:2], dtype=torch.bool, device=device)
        written.view(-1)[slot] = True
        assert not torch.equal(caches[0][written], t["k_cache"][written])
        assert torch.equal(caches[0][~written], t["k_cache"][~written])
    for _ in range(2):   # twice: split-K arrival counters must re-arm
        q = torch.empty(1, h, d, dtype=dtype, device=device)
        got_caches = t["k_cache"].clone(), t["v_cache"].clone()
        rope = RopeStore(q, pos, t["cos_sin"], *got_caches, slots)
        out, r_out = int4_gemv(t["x"], t["w"], b, config=cfg, rope=rope, **kw)
        assert out.shape == (1, h, d)
        rotated_alike(out, q_expect.view(1, h, d), device)
        rotated_alike(got_caches[0], caches[0], device)
        assert torch.equal(got_caches[1], caches[1])
        assert (r_out is None and r_expect is None) or torch.equal(r_out, r_expect)
    n = (h + 2 * kh) * d
    return rope.fits((cfg or default_config(n, k, group, False, torch.device(device))).block_n)


# --------------------------------------------------------------------------- CPU interpreter

def _cpu_cases() -> None:
    f16 = torch.float16
    assert check_rope_gemv(4, 2, 32, 256, 128, f16, "cpu", config=dict(block_n=16))          # half heads
    assert check_rope_gemv(4, 2, 32, 256, 128, f16, "cpu", config=dict(block_n=16, split_k=2), bias=True)
    assert check_rope_gemv(3, 1, 32, 512, 64, f16, "cpu", config=dict(block_n=32, split_k=2), slot=-1)
    assert check_rope_gemv(2, 2, 16, 256, 32, f16, "cpu", config=dict(block_n=8), norm=False, slot=23)
    assert check_rope_gemv(2, 1, 64, 256, 128, f16, "cpu")                                    # default launch
    # a 64-row tile spans two heads of 32: int4_gemv rotates in a launch of its own
    assert not check_rope_gemv(4, 2, 32, 256, 128, f16, "cpu", config=dict(block_n=64), bias=True)


CPU_GROUPS = {"rope_gemv": _cpu_cases}


@needs_triton
def test_interpreter():
    run_interpreter(__file__, CPU_GROUPS)


# --------------------------------------------------------------------------- GPU

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@on_gpu
def test_rope_gemv_llama_gpu(dtype, bias):
    """Llama-3-8B's qkv (32 heads, 8 KV heads of 128) at the shipped tensor-core launch, at other
    tensor-core launches and on the packed-fp16 kernel."""
    for config in (None, dict(mma=True, split_k=2, ahead=2), dict(mma=True, split_k=1, block_n=128),
                   dict(mma=False, split_k=4)):
        assert check_rope_gemv(32, 8, 128, 4096, 128, dtype, "cuda", config=config, bias=bias, slot=13,
                               position=3000)


@on_gpu
def test_rope_gemv_small_heads_gpu():
    """SmolLM2's qkv (9 heads, 3 KV heads of 64, group 64 from its GGUF: the packed-fp16 kernel),
    Qwen2's (a bias, 128 group on tensor cores), and a padding slot."""
    assert check_rope_gemv(9, 3, 64, 576, 64, torch.bfloat16, "cuda", slot=23)
    assert check_rope_gemv(14, 2, 64, 896, 128, torch.bfloat16, "cuda", bias=True, slot=-1)


@on_gpu
def test_rope_gemv_graph_replay_gpu():
    """The fused launch captured in a CUDA graph (PDL): new positions and slots copied in before each
    replay, as the runner's graphs take them, give what eager calls give."""
    from pagedeploy.kernels.triton_fused import RopeStore
    from pagedeploy.quant.int4_gemv import int4_gemv
    t = make_rope_case(32, 8, 128, 4096, 128, torch.bfloat16, "cuda", blocks=64, block_size=16)
    pos, slots = torch.tensor([5], device="cuda"), torch.tensor([7], device="cuda")
    q = torch.empty(1, 32, 128, dtype=torch.bfloat16, device="cuda")
    kw = dict(norm_weight=t["norm_weight"], eps=1e-6, residual=t["residual"])

    def project(caches):
        return int4_gemv(t["x"], t["w"], rope=RopeStore(q, pos, t["cos_sin"], *caches, slots), **kw)[0]
    graph_caches = t["k_cache"], t["v_cache"]
    project(graph_caches)   # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        project(graph_caches)
    for position, slot in ((40, 300), (63, 1023)):
        pos.fill_(position)
        slots.fill_(slot)
        graph.replay()
        q_graph = q.clone()
        eager_caches = t["k_cache"].clone(), t["v_cache"].clone()
        assert torch.equal(project(eager_caches), q_graph)
        assert torch.equal(eager_caches[0], graph_caches[0]) and torch.equal(eager_caches[1], graph_caches[1])


if __name__ == "__main__":
    sys.exit(run_cpu_groups(CPU_GROUPS, sys.argv[1:]))
