"""Triton kernels against their torch references (kernels/reference.py), on random inputs.

Two modes share the same checks:
- on a CUDA GPU (marked `gpu`, skipped without one) at full sizes, bf16 and fp16;
- on the CPU under TRITON_INTERPRET=1 at small sizes, fp32 (numpy has no bf16). The interpreter is
  chosen when a kernel is decorated, i.e. when its module is first imported, so those cases run in a
  child process (this file run as a script) and leave this process's Triton untouched.
Kernel modules are imported inside the checks only, so collecting this file imports no Triton.
"""
from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys

import pytest
import torch

from pagedeploy.kernels import reference as ref

HAS_CUDA = torch.cuda.is_available()


def on_gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(fn))


# ||out - ref|| / ||ref|| bound per dtype (refs run in fp32 on upcast inputs); one row may reach 4x.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    return ((out.double() - expect.double()).norm() / expect.double().norm()).item()


def randn(*shape, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """Random normals drawn on `device` (GPU-sized caches are too slow to draw on the CPU)."""
    dev_gen = torch.Generator(device).manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
    return torch.randn(*shape, generator=dev_gen, device=device).to(dtype)


def qkv_views(t: int, h: int, kh: int, d: int, dtype, device, gen):
    """q, k, v as strided views of one fused buffer, as a model's qkv projection leaves them."""
    qkv = randn(t, (h + 2 * kh) * d, gen=gen, device=device, dtype=dtype)
    q, k, v = qkv.split([h * d, kh * d, kh * d], dim=-1)
    return qkv, q.view(t, h, d), k.view(t, kh, d), v.view(t, kh, d)


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


# --------------------------------------------------------------------------- paged_attention

def lengths(kind: str, num_seqs: int, max_ctx: int, rng: random.Random):
    """(q_lens, ctx_lens) of a ragged batch: decode, fresh prefill, prefix hit, or a mix
    ("mixed": interleaved; "split": decode rows first, the order num_decodes asks for)."""
    q_lens, ctx_lens = [], []
    for i in range(num_seqs):
        ctx = rng.randint(1, max_ctx)
        row = kind if kind not in ("mixed", "split") else ("decode", "prefill", "prefix")[i % 3]
        if kind == "split":
            row = "decode" if i < num_seqs // 2 else ("prefill", "prefix")[i % 2]
        q_len = {"decode": 1, "prefill": ctx, "prefix": rng.randint(1, ctx)}[row]
        q_lens.append(q_len)
        ctx_lens.append(ctx)
    return q_lens, ctx_lens


def attention_case(q_lens, ctx_lens, h, kh, d, bs, dtype, device, seed=0):
    """Random q and caches; each sequence's blocks are a random, non-contiguous pick of the pool."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs, total = len(q_lens), sum(q_lens)
    blocks = [-(-c // bs) for c in ctx_lens]
    width = max(blocks) + 2
    nb = sum(blocks) + 5
    perm = torch.randperm(nb, generator=gen).tolist()
    table = torch.randint(0, nb, (num_seqs, width), generator=gen, dtype=torch.int32)
    for b, n in enumerate(blocks):  # unused entries keep their random (valid) values
        table[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    _, q, _, _ = qkv_views(total, h, kh, d, dtype, device, gen)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return dict(q=q,
                k_cache=randn(nb, bs, kh, d, gen=gen, device=device, dtype=dtype),
                v_cache=randn(nb, bs, kh, d, gen=gen, device=device, dtype=dtype),
                block_tables=table.to(device),
                context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
                scale=d ** -0.5)


def check_attention(kind, num_seqs, max_ctx, h, kh, d, bs, dtype, device, seed=0,
                    window=None, **hints):
    from pagedeploy.kernels.triton_attention import paged_attention
    q_lens, ctx_lens = lengths(kind, num_seqs, max_ctx, random.Random(seed))
    case = attention_case(q_lens, ctx_lens, h, kh, d, bs, dtype, device, seed)
    if kind == "split":
        hints["num_decodes"] = num_seqs // 2
    up = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
          for k, v in case.items()}
    expect = ref.paged_attention_ref(**up, sliding_window=window)
    out = torch.full_like(case["q"], float("nan"))  # every element must be written
    got = paged_attention(**case, sliding_window=window, out=out, **hints)
    assert got is out and torch.isfinite(out).all(), "unwritten or non-finite output"
    err = rel_err(out, expect)
    row_err = ((out.double() - expect.double()).norm(dim=-1)
               / expect.double().norm(dim=-1)).max().item()
    tol = REL_TOL[dtype]
    assert err < tol and row_err < 4 * tol, (err, row_err)
    return err


GPU_ATTENTION = [  # kind, seqs, max_ctx, h, kh, d, bs
    ("decode", 37, 3000, 8, 8, 64, 16),      # group 1
    ("decode", 64, 2048, 16, 8, 128, 16),    # Qwen3-0.6B
    ("decode", 5, 4096, 32, 8, 128, 256),    # Llama-3-8B, few sequences: split contexts
    ("decode", 3, 1500, 28, 4, 128, 32),     # group 7
    ("decode", 20, 700, 64, 8, 64, 128),     # group 8
    ("prefill", 6, 700, 16, 8, 128, 16),
    ("prefill", 4, 1100, 32, 8, 64, 256),
    ("prefix", 7, 1200, 8, 8, 128, 64),
    ("prefix", 5, 900, 28, 4, 64, 16),
    ("mixed", 11, 1000, 32, 4, 128, 128),
    ("mixed", 9, 800, 16, 8, 128, 16),
    ("mixed", 6, 300, 12, 6, 64, 32),        # group 2
    ("split", 12, 2000, 32, 8, 128, 16),     # decode kernel on the first half, prefill on the rest
    ("split", 7, 900, 28, 4, 64, 256),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_ATTENTION, ids=lambda c: "-".join(map(str, c)))
@on_gpu
def test_attention_gpu(dtype, case):
    check_attention(*case, dtype, "cuda")


@pytest.mark.parametrize("kind", ["decode", "prefix", "mixed", "split"])
@on_gpu
def test_attention_window_gpu(kind):
    check_attention(kind, 8, 1500, 16, 8, 128, 16, torch.bfloat16, "cuda", window=300)


@pytest.mark.parametrize("splits", [1, 2, 8, 32])
@on_gpu
def test_decode_splits_gpu(splits):
    check_attention("decode", 3, 5000, 32, 8, 128, 16, torch.bfloat16, "cuda", num_splits=splits)


@on_gpu
def test_decode_cuda_graph_gpu():
    """A decode step captured once replays correctly for new lengths: no host reads of tensors."""
    from pagedeploy.kernels.triton_attention import paged_attention
    case = attention_case([1] * 4, [900, 20, 3000, 1], 16, 8, 128, 16, torch.bfloat16, "cuda")
    out = torch.empty_like(case["q"])
    max_ctx = case["block_tables"].shape[1] * 16
    paged_attention(**case, out=out, max_context_len=max_ctx)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(**case, out=out, max_context_len=max_ctx)
    for lens in ([900, 20, 3000, 1], [17, 2999, 64, 256]):
        case["context_lens"].copy_(torch.tensor(lens, dtype=torch.int32))
        case["q"].copy_(torch.randn_like(case["q"]))
        out.fill_(float("nan"))
        graph.replay()
        up = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in case.items()}
        assert rel_err(out, ref.paged_attention_ref(**up)) < REL_TOL[torch.bfloat16]


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
    "silu_and_mul": lambda: [check_silu_and_mul(5, inter, dt, "cpu", strided=inter != 48)
                             for inter in (48, 96, 1536) for dt in (torch.float32, torch.float16)],
    "decode": lambda: [
        check_attention("decode", 5, 90, 4, 4, 16, 16, torch.float32, "cpu", seed=1),
        check_attention("decode", 3, 150, 8, 2, 32, 32, torch.float32, "cpu", seed=2),
        check_attention("decode", 4, 80, 6, 2, 16, 16, torch.float32, "cpu", seed=3, num_splits=4),
        check_attention("decode", 2, 200, 16, 2, 16, 64, torch.float32, "cpu", seed=4,
                        num_splits=2, window=50),
        check_attention("decode", 3, 60, 4, 2, 16, 8, torch.float32, "cpu", seed=12),  # bs 8
    ],
    "prefill": lambda: [
        check_attention("prefill", 3, 40, 4, 2, 16, 16, torch.float32, "cpu", seed=5),
        check_attention("prefix", 4, 70, 6, 3, 32, 16, torch.float32, "cpu", seed=6),
        check_attention("mixed", 6, 50, 8, 1, 16, 32, torch.float32, "cpu", seed=7),
        check_attention("mixed", 4, 60, 4, 4, 16, 16, torch.float32, "cpu", seed=8, window=20),
        check_attention("prefix", 2, 50, 8, 2, 16, 16, torch.float32, "cpu", seed=9,
                        num_splits=2),
        check_attention("split", 5, 90, 4, 2, 16, 16, torch.float32, "cpu", seed=10),
        check_attention("split", 4, 70, 8, 2, 32, 32, torch.float32, "cpu", seed=11,
                        num_splits=4, window=30),
    ],
}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_interpreter():
    """All CPU groups in one child process (importing torch and Triton once keeps it quick)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, *CPU_GROUPS], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _run_cpu_groups(names: list[str]) -> int:
    import traceback
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_interpreter"
    failed = 0
    for name in names:
        try:
            CPU_GROUPS[name]()
            print(f"ok   {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run_cpu_groups(sys.argv[1:]))
