"""Triton kernels against their torch references (kernels/reference.py), on random inputs: store_kv,
rms_norm, apply_rotary and the fused qk_norm_rope_store / silu_and_mul (paged_attention has its own
file, test_kernels_attention.py).

Two modes share the same checks:
- on a CUDA GPU (marked `gpu`, skipped without one) at full sizes, bf16 and fp16;
- on the CPU under TRITON_INTERPRET=1 at small sizes, fp32 (numpy has no bf16), in a child process
  (this file run as a script with group names; kernel_checks.py says why).
Kernel modules are imported inside the checks only, so collecting this file imports no Triton.
"""
from __future__ import annotations

import sys

import pytest
import torch
from kernel_checks import (REL_TOL, needs_triton, on_gpu, qkv_views, randn, run_cpu_groups,
                           run_interpreter)

from pagedeploy.kernels import reference as ref


# --------------------------------------------------------------------------- store_kv

def check_store_kv(t, kh, d, bs, dtype, device, seed=0):
    from pagedeploy.kernels.triton_cache import store_kv
    gen = torch.Generator().manual_seed(seed)
    _, _, k, v = qkv_views(t, 2, kh, d, dtype, device, gen)
    nb = t // bs + 3
    k_cache = torch.randn(nb, bs, kh, d, generator=gen).to(device, dtype)
    v_cache = torch.randn(nb, bs, kh, d, generator=gen).to(device, dtype)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.2] = -1  # padding tokens must be skipped
    slots = slots.to(device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref.store_kv_ref(k, v, k_ref, v_ref, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kh,d,bs", [(8, 128, 16), (2, 64, 256), (4, 128, 32), (1, 64, 128)])
@on_gpu
def test_store_kv_gpu(dtype, kh, d, bs):
    check_store_kv(1000, kh, d, bs, dtype, "cuda")


# --------------------------------------------------------------------------- rms_norm

def check_rms_norm(rows, hidden, with_residual, dtype, device, seed=0):
    from pagedeploy.kernels.triton_norm import rms_norm
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen).to(device, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(device, dtype) if with_residual else None
    out_ref, res_ref = ref.rms_norm_ref(x, w, 1e-6, residual)
    if device == "cuda":  # unwritten outputs would read these NaNs back from the allocator
        torch.full((2 * rows * hidden,), float("nan"), device=device, dtype=dtype)
    out, res = rms_norm(x, w, 1e-6, residual)
    assert torch.equal(res, res_ref)
    assert out.dtype == out_ref.dtype and torch.isfinite(out).all()
    # The fp32 sum of squares is reduced in another order: allow one rounding step of the dtype.
    torch.testing.assert_close(out, out_ref, rtol=REL_TOL[dtype] * 2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [1024, 4096, 896, 8192])
@pytest.mark.parametrize("with_residual", [False, True])
@on_gpu
def test_rms_norm_gpu(dtype, hidden, with_residual):
    check_rms_norm(300, hidden, with_residual, dtype, "cuda")


# --------------------------------------------------------------------------- apply_rotary

def rope_cache(d: int, device, max_pos: int = 4096) -> torch.Tensor:
    """fp32 [max_pos, d] = cat(cos, sin), as the model builds it."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    angles = torch.arange(max_pos).double()[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float().to(device)


def check_rotary(t, h, kh, d, dtype, device, seed=0):
    from pagedeploy.kernels.triton_rotary import apply_rotary
    gen = torch.Generator().manual_seed(seed)
    qkv, q, k, v = qkv_views(t, h, kh, d, dtype, device, gen)
    v_before = v.clone()
    cache = rope_cache(d, device)
    positions = torch.randint(0, 4096, (t,), generator=gen).to(device)
    q_ref, k_ref = ref.apply_rotary_ref(q.clone(), k.clone(), positions, cache)
    q_out, k_out = apply_rotary(q, k, positions, cache)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()  # in place
    tol = REL_TOL[dtype]
    torch.testing.assert_close(q_out, q_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(k_out, k_ref, rtol=tol, atol=tol)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,kh,d", [(16, 8, 128), (32, 8, 128), (28, 4, 64), (8, 8, 64)])
@on_gpu
def test_rotary_gpu(dtype, h, kh, d):
    check_rotary(777, h, kh, d, dtype, "cuda")


# --------------------------------------------------------------------------- fused kernels
# The fused kernels round where the unfused ones do, so they differ from the references only in
# fp32 details (sum order, rsqrt/exp, fused multiply-adds on the GPU): bit-exact where none of those
# is involved, elsewhere within a few fp32-ulps-turned-dtype-ulps (`assert_matches`).

def assert_matches(out: torch.Tensor, expect: torch.Tensor, exact: bool, ulps: float = 4):
    """Bit-exact, or: every element within `ulps` rounding steps of the dtype relative to its
    row's largest value, and (16-bit dtypes) under 1 % of elements off at all, which a rounding
    step missed or added would exceed many times over."""
    assert out.shape == expect.shape and out.dtype == expect.dtype, (out.shape, out.dtype)
    if exact:
        assert torch.equal(out, expect), (out.double() - expect.double()).abs().max()
        return
    if out.dtype == torch.float32:
        ulps *= 2   # fp32 outputs keep the rstd's few-ulp difference (sum order) unrounded
    scale = expect.double().abs().amax(dim=-1, keepdim=True)
    err = (out.double() - expect.double()).abs() / (torch.finfo(out.dtype).eps * scale)
    assert err.max() <= ulps, err.max()
    if out.dtype != torch.float32:
        assert (out != expect).double().mean() < 0.01, (out != expect).double().mean()


def guarded_cache(nb, bs, kh, d, dtype, device, gen):
    """A random cache with one guard block on each side: a store to a negative slot lands there."""
    full = randn(nb + 2, bs, kh, d, gen=gen, device=device, dtype=dtype)
    return full, full[1:-1]


def qk_case(t, h, kh, d, bs, with_norm, dtype, device, seed, strided, cache_dtype):
    gen = torch.Generator().manual_seed(seed)
    width = (h + 2 * kh) * d
    # strided: rows of a wider buffer (row stride > width), which the kernel must read in place
    qkv = 2 * randn(t, width + (3 * d if strided else 0), gen=gen, device=device, dtype=dtype)
    nb = t // bs + 3
    k_full, k_cache = guarded_cache(nb, bs, kh, d, cache_dtype or dtype, device, gen)
    v_full, v_cache = guarded_cache(nb, bs, kh, d, cache_dtype or dtype, device, gen)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.2] = -1   # padding tokens: no store, q still written
    norm = [(1 + 0.1 * torch.randn(d, generator=gen)).to(device, dtype) if with_norm else None
            for _ in range(2)]
    return dict(qkv=qkv[:, :width], q_norm_weight=norm[0], k_norm_weight=norm[1], eps=1e-6,
                positions=torch.randint(0, 4096, (t,), generator=gen).to(device),
                cos_sin_cache=rope_cache(d, device), k_cache=k_cache, v_cache=v_cache,
                slot_mapping=slots.to(device), num_heads=h, num_kv_heads=kh,
                head_dim=d), k_full, v_full


def check_qk_norm_rope_store(t, h, kh, d, bs, with_norm, dtype, device, seed=0, strided=True,
                             unfused=None, cache_dtype=None):
    """The fused kernel against `unfused(**case)` (default: the torch reference) on copies;
    `cache_dtype`: a KV cache in another dtype than the model's (kv_cache_dtype)."""
    from pagedeploy.kernels.triton_fused import qk_norm_rope_store
    case, k_full, v_full = qk_case(t, h, kh, d, bs, with_norm, dtype, device, seed, strided,
                                   cache_dtype)
    qkv_before, k_exp, v_exp = case["qkv"].clone(), k_full.clone(), v_full.clone()
    q_exp = (unfused or ref.qk_norm_rope_store_ref)(
        **dict(case, qkv=case["qkv"].clone(), k_cache=k_exp[1:-1], v_cache=v_exp[1:-1]))
    if device == "cuda":  # unwritten outputs would read these NaNs back from the allocator
        torch.full((2 * q_exp.numel(),), float("nan"), device=device, dtype=dtype)
    q = qk_norm_rope_store(**case)
    assert q.is_contiguous() and torch.isfinite(q).all()
    assert torch.equal(case["qkv"], qkv_before)        # read only
    assert torch.equal(v_full, v_exp)                   # v is copied: bit-exact, guards untouched
    assert torch.equal(k_full[0], k_exp[0]) and torch.equal(k_full[-1], k_exp[-1])
    # Without the norm, the interpreter does the reference's exact fp32 ops; the GPU may fuse
    # multiply-adds in the rotation.
    exact = device == "cpu" and not with_norm
    assert_matches(q, q_exp, exact)
    # k is rounded to the model dtype, then to the cache's: compare in the coarser of the two.
    coarse = max(dtype, k_full.dtype, key=lambda dt: torch.finfo(dt).eps)
    assert_matches(k_full.to(coarse), k_exp.to(coarse), exact)


QK_GPU = [  # h, kh, d, bs
    (16, 8, 128, 16),    # Qwen3-0.6B, group 2
    (32, 8, 128, 16),    # Qwen3-8B / Llama-3-8B, group 4
    (64, 8, 128, 16),    # Llama-3-70B, group 8
    (28, 4, 128, 256),   # Qwen2.5-7B, group 7
    (8, 8, 64, 32),      # group 1
    (9, 3, 64, 16),      # SmolLM2-135M: head counts not powers of two, group 3
    (14, 2, 64, 128),    # Qwen2.5-0.5B, group 7
    (12, 2, 64, 32),     # group 6
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("h,kh,d,bs", QK_GPU)
@on_gpu
def test_qk_norm_rope_store_gpu(dtype, with_norm, h, kh, d, bs):
    check_qk_norm_rope_store(777, h, kh, d, bs, with_norm, dtype, "cuda")


@pytest.mark.parametrize("t", [1, 256, 5000])
@on_gpu
def test_qk_norm_rope_store_sizes_gpu(t):
    """Decode-sized and prefill-sized batches; a contiguous qkv too."""
    check_qk_norm_rope_store(t, 16, 8, 128, 16, True, torch.bfloat16, "cuda", strided=t != 256)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, torch.float16),
                                               (torch.float16, torch.float32)])
@on_gpu
def test_qk_norm_rope_store_cache_dtype_gpu(dtype, cache_dtype):
    check_qk_norm_rope_store(300, 32, 8, 128, 16, True, dtype, "cuda", cache_dtype=cache_dtype)


def unfused_triton(qkv, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, k_cache,
                   v_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
    """The GPU path the fused kernel replaces: model.py's old Attention.forward sequence."""
    from pagedeploy.kernels.triton_cache import store_kv
    from pagedeploy.kernels.triton_norm import rms_norm
    from pagedeploy.kernels.triton_rotary import apply_rotary
    t, kv = qkv.shape[0], num_kv_heads * head_dim
    q, k, v = qkv.split([num_heads * head_dim, kv, kv], dim=-1)
    q, k = q.view(t, num_heads, head_dim), k.view(t, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q = rms_norm(q.reshape(-1, head_dim), q_norm_weight, eps)[0].view(q.shape)
        k = rms_norm(k.reshape(-1, head_dim), k_norm_weight, eps)[0].view(k.shape)
    q, k = apply_rotary(q, k, positions, cos_sin_cache)
    store_kv(k, v.view(k.shape), k_cache, v_cache, slot_mapping)
    return q.contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("h,kh,d,bs", QK_GPU[:4])
@on_gpu
def test_qk_norm_rope_store_vs_unfused_triton_gpu(dtype, with_norm, h, kh, d, bs):
    check_qk_norm_rope_store(777, h, kh, d, bs, with_norm, dtype, "cuda", unfused=unfused_triton)


def check_silu_and_mul(t, inter, dtype, device, seed=0, strided=True):
    from pagedeploy.kernels.triton_fused import silu_and_mul
    gen = torch.Generator().manual_seed(seed)
    # Spread wide enough that silu's negative side and its saturation both occur.
    x = 3 * randn(t, 2 * inter + (64 if strided else 0), gen=gen, device=device, dtype=dtype)
    x = x[:, :2 * inter]
    before = x.clone()
    expect = ref.silu_and_mul_ref(x)
    if device == "cuda":
        torch.full((2 * expect.numel(),), float("nan"), device=device, dtype=dtype)
    out = silu_and_mul(x)
    assert out.is_contiguous() and torch.isfinite(out).all() and torch.equal(x, before)
    assert_matches(out, expect, exact=False)   # exp differs in the last fp32 bits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter", [3072, 1536, 4864, 11008, 14336, 100])
@on_gpu
def test_silu_and_mul_gpu(dtype, inter):
    check_silu_and_mul(300, inter, dtype, "cuda", strided=inter != 3072)


# --------------------------------------------------------------------------- argmax

def check_argmax(b, v, dtype, device, seed=0):
    """Random rows with planted ties (the first index must win) and a row of -inf (index 0)."""
    from pagedeploy.kernels.triton_argmax import argmax
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v, generator=gen).to(device, dtype)
    for r in range(0, b, 2):   # three equal maxima: in different chunks or in one chunk
        cols = torch.randperm(v, generator=gen)[:3].sort().values
        x[r, cols] = 100.0
    if b > 1:
        x[-1] = float("-inf")
    out = argmax(x)
    assert out.dtype == torch.int64 and torch.equal(out, x.argmax(dim=-1)), (b, v, dtype)


@pytest.mark.parametrize("b,v", [(1, 128256), (1, 151936), (3, 49152), (256, 128256), (64, 1000)])
@on_gpu
def test_argmax_gpu(b, v):
    check_argmax(b, v, torch.bfloat16, "cuda")
    check_argmax(b, v, torch.float32, "cuda", seed=1)


# --------------------------------------------------------------------------- stage_decode_inputs

def check_stage(b, size, width, graph_width, device, seed=0):
    """A batch of b rows (block tables `width` wide, a view of a wider flat buffer as prepare makes
    them) staged into graph buffers of `size` rows full of stale values: equal to the reference,
    padding included, and the stale entries it must leave alone left."""
    from pagedeploy.kernels.triton_stage import stage_decode_inputs
    gen = torch.Generator().manual_seed(seed)

    def longs(n):
        return torch.randint(0, 1 << 40, (n,), generator=gen).to(device)

    def ints(*shape):
        return torch.randint(0, 1 << 20, shape, generator=gen, dtype=torch.int32).to(device)
    flat = ints(b * width + 2 * b + 1)    # block tables then context lengths, one buffer
    src = (longs(b), longs(b), longs(b), flat[:b * width].view(b, width), flat[b * width:b * width + b])
    dst = (longs(size), longs(size), longs(size), ints(size, graph_width), ints(size))
    expect = tuple(t.clone() for t in dst)
    ref.stage_decode_inputs_ref(expect, src)
    stage_decode_inputs(dst, src)
    for got, want in zip(dst, expect):
        assert torch.equal(got, want), (b, size, width, graph_width)


@pytest.mark.parametrize("b,size,width", [(1, 1, 3), (3, 4, 40), (17, 24, 1500), (256, 256, 512)])
@on_gpu
def test_stage_decode_inputs_gpu(b, size, width):
    check_stage(b, size, width, 2048, "cuda")


# --------------------------------------------------------------------------- CPU interpreter

CPU_GROUPS = {  # small sizes for the interpreter (~1e4x slower than the GPU)
    "store_kv": lambda: [check_store_kv(40, kh, d, bs, torch.float32, "cpu", seed=s)
                         for s, (kh, d, bs) in enumerate([(2, 16, 16), (1, 32, 64), (3, 16, 32)])],
    "rms_norm": lambda: [check_rms_norm(7, hidden, res, dt, "cpu")
                         for hidden in (96, 256) for res in (False, True)
                         for dt in (torch.float32, torch.float16)],
    "apply_rotary": lambda: [check_rotary(9, h, kh, d, torch.float32, "cpu")
                             for h, kh, d in [(4, 2, 32), (6, 6, 16), (8, 1, 64)]],
    # groups 1-8, head_dim 64 / 128 (96: a half that is no power of two), bs 8-32
    "qk_norm_rope_store": lambda: [
        check_qk_norm_rope_store(9, h, kh, d, bs, norm, dt, "cpu", seed=s, strided=s % 3 > 0)
        for s, (h, kh, d, bs) in enumerate([(4, 4, 64, 16), (8, 1, 64, 32), (6, 2, 128, 16),
                                            (4, 1, 128, 8), (7, 1, 64, 16), (10, 5, 96, 16)])
        for norm in (False, True) for dt in (torch.float32, torch.float16)]
    + [check_qk_norm_rope_store(9, 6, 2, 64, 16, norm, torch.float32, "cpu", seed=7,
                                cache_dtype=torch.float16) for norm in (False, True)],
    "argmax": lambda: [check_argmax(b, v, torch.float32, "cpu", seed=s)
                       for s, (b, v) in enumerate([(1, 5000), (3, 300), (9, 4097), (2, 2048)])],
    "stage_decode_inputs": lambda: [check_stage(b, size, width, gw, "cpu", seed=s) for s, (b, size, width, gw)
                                    in enumerate([(1, 1, 2, 4), (3, 4, 5, 8), (5, 8, 40, 40), (2, 2, 1100, 1200)])],
    "silu_and_mul": lambda: [check_silu_and_mul(5, inter, dt, "cpu", strided=inter != 48)
                             for inter in (48, 96, 1536) for dt in (torch.float32, torch.float16)],
}


@needs_triton
def test_interpreter():
    """All CPU groups in one child process (importing torch and Triton once keeps it quick)."""
    run_interpreter(__file__, CPU_GROUPS)


if __name__ == "__main__":
    sys.exit(run_cpu_groups(CPU_GROUPS, sys.argv[1:]))
