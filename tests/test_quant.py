"""4-bit formats: int4 packing and quantization, GGUF 4-bit conversion, bitsandbytes NF4/FP4,
QuantLinear bytes and dispatch, Triton kernels (interpreter on the CPU, real on a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType, quants

from pagedeploy.quant.formats import bnb_weight_bytes, int4_group_size, int4_weight_bytes
from pagedeploy.quant.int4 import (Int4Weight, concat_rows, dequantize_int4, int4_from_gguf, int4_matmul_reference,
                                   pack_int4, quantize_int4, unpack_int4)
from pagedeploy.quant.linear import QuantLinear, quantize_linear, quantize_model_linears


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _needs_bnb(method: str = "nf4") -> None:
    if method != "int4":
        pytest.importorskip("bitsandbytes")   # the optional `bnb` extra


# ---- int4 format ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 8), (7, 64), (33, 1536)])
def test_pack_unpack_identity(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=_gen(shape[0]))
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] // 8)
    assert torch.equal(unpack_int4(packed), codes)


def test_pack_layout_is_nibble_j_of_word_c():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = pack_int4(codes)[0, 0].item() & 0xFFFFFFFF
    assert word == 0xF7654321


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_quantize_int4_min_max_error_bounds(group_size, scale_dtype):
    w = torch.randn(96, 512, generator=_gen(1)) * 0.05
    q = quantize_int4(w, group_size, scale_dtype, search=False)
    assert q.scales.dtype == scale_dtype and q.scales.shape == (96, 512 // group_size)
    err = (dequantize_int4(q) - w).view(96, -1, group_size).abs()
    wg = w.view(96, -1, group_size)
    spread = (wg.amax(-1) - wg.amin(-1)).unsqueeze(-1)
    # Half a step, plus the rounding of the stored scale and zero (bf16 keeps 8 bits).
    slack = 2.0 ** (-7 if scale_dtype == torch.bfloat16 else -10) * (spread + wg.abs().amax(-1, keepdim=True))
    assert (err <= q.scales.float().unsqueeze(-1) / 2 + slack).all()
    rel = (err.mean() / w.abs().mean()).item()
    assert rel < (0.09 if group_size == 32 else 0.12), rel   # step/4 of a 4-5 sigma range


@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_int4_search_never_worse_than_min_max(group_size):
    w = torch.randn(64, 512, generator=_gen(2)) * 0.05
    w[::7, ::13] *= 6   # outliers, where shrinking the range matters
    def group_sq_err(q):
        return (dequantize_int4(q) - w).view(64, -1, group_size).square().sum(-1)
    plain, searched = (group_sq_err(quantize_int4(w, group_size, search=s)) for s in (False, True))
    # Per group no worse (up to fp16 rounding of scale and zero), and clearly better overall.
    assert (searched <= plain * 1.01 + 1e-9).all()
    assert searched.sum() < 0.9 * plain.sum(), (searched.sum(), plain.sum())


def test_quantize_int4_chunks_rows_like_whole(monkeypatch):
    import pagedeploy.quant.int4 as int4
    w = torch.randn(50, 256, generator=_gen(2))
    whole = quantize_int4(w)
    monkeypatch.setattr(int4, "_CHUNK_ELEMS", 256 * 7)   # 7 rows at a time
    chunked = quantize_int4(w)
    assert torch.equal(whole.packed, chunked.packed) and torch.equal(whole.scales, chunked.scales)


def test_constant_group_dequantizes_exactly():
    w = torch.randn(4, 128, generator=_gen(3))
    w[1, :64] = 0.3125   # zero spread: scale 0, every code 0, zero holds the value
    assert torch.equal(dequantize_int4(quantize_int4(w, 64))[1, :64], w[1, :64])


def test_int4weight_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(4, 96, generator=_gen(4)), 64)
    q = quantize_int4(torch.randn(4, 128, generator=_gen(4)))
    with pytest.raises(ValueError, match="packed must be int32"):
        Int4Weight(q.packed.to(torch.int64), q.scales, q.zeros, q.shape, q.group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matmul_equals_dense(dtype):
    q = quantize_int4(torch.randn(48, 256, generator=_gen(5)))
    x = torch.randn(2, 3, 256, generator=_gen(6)).to(dtype)
    bias = torch.randn(48, generator=_gen(7))
    y = int4_matmul_reference(x, q, bias)
    dense = x.float() @ dequantize_int4(q).to(dtype).float().T + bias.to(dtype).float()
    assert y.dtype == dtype and y.shape == (2, 3, 48)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), dense, atol=tol, rtol=tol)


def test_rows_reorders_output_rows():
    q = quantize_int4(torch.randn(16, 128, generator=_gen(8)))
    perm = torch.randperm(16, generator=_gen(9))
    assert torch.equal(dequantize_int4(q.rows(perm)), dequantize_int4(q)[perm])


def test_concat_rows_stacks_outputs():
    parts = [quantize_int4(torch.randn(n, 256, generator=_gen(n)), 64) for n in (16, 8, 8)]
    fused = concat_rows(parts)
    assert fused.shape == (32, 256)
    assert torch.equal(dequantize_int4(fused), torch.cat([dequantize_int4(p) for p in parts]))
    with pytest.raises(ValueError, match="same in_features"):
        concat_rows([parts[0], quantize_int4(torch.randn(8, 256, generator=_gen(1)), 128)])


# ---- GGUF 4-bit -> int4 -------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_legacy_blocks_convert_exactly(qtype):
    w = np.random.default_rng(10).standard_normal((24, 320)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType[qtype])
    q = int4_from_gguf(raw, qtype, (24, 320))
    assert q.group_size == 32 and q.scales.dtype == torch.float16
    expected = quants.dequantize(raw, GGMLQuantizationType[qtype])
    assert np.array_equal(dequantize_int4(q).numpy(), expected)


def test_gguf_q4_k_blocks_convert_exactly():
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (8 * 2, 144), dtype=np.uint8)   # 8 rows of 512 = 2 super-blocks each
    blocks[:, :4] = (rng.random((16, 2)) * 0.02).astype(np.float16).view(np.uint8)   # d, dmin
    raw = blocks.reshape(8, -1)
    q = int4_from_gguf(raw, "Q4_K", (8, 512))
    expected = quants.dequantize(raw, GGMLQuantizationType.Q4_K)
    assert np.array_equal(dequantize_int4(q).numpy(), expected)


def test_gguf_rejects_wrong_sizes_and_types():
    raw = quants.quantize(np.ones((4, 64), np.float32), GGMLQuantizationType.Q4_1)
    with pytest.raises(ValueError, match="does not fit"):
        int4_from_gguf(raw, "Q4_1", (4, 96))
    with pytest.raises(ValueError, match="cannot load as int4"):
        int4_from_gguf(raw, "Q8_0", (4, 64))


# ---- bitsandbytes ---------------------------------------------------------------------------------------

# 96 inputs: rows end mid-block (bitsandbytes' native CPU kernel got those wrong, see dequantize_bnb)
@pytest.mark.parametrize("in_features", [576, 96])
@pytest.mark.parametrize("quant_type,max_rel", [("nf4", 0.10), ("fp4", 0.13)])
def test_bnb_roundtrip_and_matmul(quant_type, max_rel, in_features):
    _needs_bnb()
    from pagedeploy.quant.bnb import bnb_matmul, dequantize_bnb, quantize_bnb
    w = torch.randn(192, in_features, generator=_gen(12)) * 0.02
    q = quantize_bnb(w, quant_type)
    dense = dequantize_bnb(q)
    rel = ((dense - w).abs().mean() / w.abs().mean()).item()
    assert rel < max_rel, rel
    x, bias = torch.randn(5, in_features, generator=_gen(13)), torch.randn(192, generator=_gen(14))
    torch.testing.assert_close(bnb_matmul(x, q, bias), x @ dense.T + bias, atol=1e-4, rtol=1e-4)
    yb = bnb_matmul(x.bfloat16(), q, bias)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), x @ dense.T + bias, atol=5e-2, rtol=5e-2)


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # makes `import bitsandbytes` fail
    with pytest.raises(ImportError) as e:
        quantize_linear(nn.Linear(64, 64), "nf4")
    assert str(e.value) == "quantization: nf4 needs bitsandbytes: pip install 'pagedeploy[bnb]'"
    quantize_linear(nn.Linear(64, 64), "int4")   # int4 never needs it


# ---- QuantLinear -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_f,in_f", [(1536, 576), (576, 1536), (512, 4096)])
def test_weight_bytes_match_plan_formula(out_f, in_f):
    linear = nn.Linear(in_f, out_f, bias=False)
    nn.init.normal_(linear.weight, std=0.02, generator=_gen(15))
    numel = out_f * in_f
    group = 128 if in_f % 128 == 0 else 64        # SmolLM2's 576 falls back to 64
    assert quantize_linear(linear, "int4").weight_bytes() == numel // 2 + 4 * numel // group
    assert int4_weight_bytes(out_f, in_f) == numel // 2 + 4 * numel // group
    _needs_bnb()
    for method in ("nf4", "fp4"):
        assert quantize_linear(linear, method).weight_bytes() == numel * 0.5625 == bnb_weight_bytes(numel)


def test_int4_group_size_fallbacks():
    assert [int4_group_size(n) for n in (4096, 14336, 576, 96)] == [128, 128, 64, 32]
    with pytest.raises(ValueError, match="divisible by 32"):
        int4_group_size(100)


@pytest.mark.parametrize("method", ["int4", "nf4", "fp4"])
def test_quant_linear_forward_matches_dequantized(method):
    _needs_bnb(method)
    linear = nn.Linear(256, 96)
    nn.init.normal_(linear.weight, std=0.05, generator=_gen(16))
    nn.init.normal_(linear.bias, generator=_gen(17))
    q = quantize_linear(linear, method)
    x = torch.randn(4, 256, generator=_gen(18))
    if method == "int4":
        dense = dequantize_int4(q.qweight)
    else:
        from pagedeploy.quant.bnb import dequantize_bnb
        dense = dequantize_bnb(q.qweight)
    torch.testing.assert_close(q(x), x @ dense.T + linear.bias, atol=1e-4, rtol=1e-4)
    # Quantization error stays small relative to the layer's output.
    y_full = linear(x).detach()
    assert ((q(x) - y_full).norm() / y_full.norm()).item() < 0.15


@pytest.mark.parametrize("method", ["int4", "nf4"])
def test_quant_linear_to_dtype_keeps_scales(method):
    _needs_bnb(method)
    linear = nn.Linear(128, 64)
    nn.init.normal_(linear.weight, generator=_gen(19))
    q = quantize_linear(linear, method)
    scales = (q.scales if method == "int4" else q.absmax).clone()
    q.to(torch.bfloat16)
    assert torch.equal(q.scales if method == "int4" else q.absmax, scales)
    assert q.bias.dtype == torch.bfloat16
    x = torch.randn(3, 128, generator=_gen(20)).bfloat16()
    assert q(x).dtype == torch.bfloat16
    assert set(q.state_dict()) >= {"packed", "bias"}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.down_proj = nn.Linear(128, 128), nn.Linear(128, 64, bias=False)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 128)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(64, 32, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = torch.relu(layer.q_proj(h))
            out = layer.down_proj(h)
            h = torch.cat([out, out], -1)
        return self.lm_head(out)


@pytest.mark.parametrize("method", ["int4", "nf4"])
def test_quantize_model_linears_in_place(method):
    _needs_bnb(method)
    torch.manual_seed(21)
    model = _Tiny()
    ids = torch.randint(0, 32, (2, 5), generator=_gen(22))
    before = model(ids).detach()
    names = quantize_model_linears(model, method)
    assert names == ["layers.0.q_proj", "layers.0.down_proj", "layers.1.q_proj", "layers.1.down_proj"]
    assert isinstance(model.layers[1].down_proj, QuantLinear)
    assert type(model.lm_head) is nn.Linear
    after = model(ids).detach()
    assert ((after - before).norm() / before.norm()).item() < 0.2


# ---- Triton kernels -----------------------------------------------------------------------------------------

_INTERPRETER_CASES = textwrap.dedent("""
    import json, torch
    from pagedeploy.quant.int4 import quantize_int4, int4_matmul_reference
    from pagedeploy.quant.int4_triton import int4_matmul, KernelConfig as C
    g = torch.Generator().manual_seed(0)
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    cases = [  # M, N, K, group, bias, x dtype, config (the interpreter cannot dot bf16: fma only)
        (1, 48, 256, 128, True, f32, C("fma", 1, 16, 128, 1)),              # fma, one group per tile
        (1, 40, 1024, 128, False, bf16, C("fma", 1, 32, 64, 2, unroll=4)),  # bf16 pairs, split-K
        (2, 24, 768, 32, True, f16, C("fma", 2, 16, 128, 3)),               # per-word scales, 3 splits
        (2, 40, 576, 64, True, f32, C("fma", 2, 32, 128, 2)),               # ragged K, group 64
        (5, 40, 256, 128, True, f16, C("dot", 16, 16, 128, 2)),             # gather x, ones-dot sums
        (7, 24, 512, 128, True, f16, C("dot", 16, 16, 128, 3, swap_ab=True)),
        (16, 24, 576, 64, False, f32, C("dot", 16, 32, 128, 2, swap_ab=True)),  # no fold (group 64)
        (20, 72, 256, 128, True, f16, C("dot", 32, 32, 128, 1)),  # GEMM, ragged M and N
        (33, 64, 768, 32, False, f16, C("dot", 16, 32, 128, 2)),  # GEMM, no fold, split
        (9, 48, 256, 64, True, f32, C("dense")),
        (2, 40, 640, 128, True, bf16, C("fma", 2, 32, 128, 2, unroll=2)),       # ragged unrolled steps
        (20, 72, 640, 128, False, f16, C("dot", 32, 32, 128, 3, swap_ab=True)),
        (20, 72, 640, 128, True, f16, C("gemm", 16, 32, 128, 3)),              # one dot a group, folded
        (37, 40, 512, 128, True, f16, C("gemm", 32, 16, 128, 2, fold=False)),  # dequantized tile
    ]
    errs = []
    for M, N, K, group, has_bias, dtype, cfg in cases:
        w = quantize_int4(torch.randn(N, K, generator=g) * 0.1, group)
        x = torch.randn(M, K, generator=g).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if has_bias else None
        exact = int4_matmul_reference(x.float(), w, None if b is None else b.float())
        rel = lambda y: ((y.float() - exact).norm() / exact.norm()).item()  # noqa: E731
        budget = 1.5 * rel(int4_matmul_reference(x, w, b)) + 1e-5   # the reference rounds to x.dtype too
        for _ in range(2):   # twice: the split-K arrival counters must re-arm
            errs.append(rel(int4_matmul(x, w, b, config=cfg)) / budget)
    x3 = torch.randn(2, 3, 256, generator=g)
    y3 = int4_matmul(x3, w := quantize_int4(torch.randn(24, 256, generator=g)))
    errs.append((y3 - int4_matmul_reference(x3, w)).abs().max().item() / 1e-4)
    print(json.dumps(errs))
""")


def test_triton_interpreter_matches_reference():
    """Every kernel path, in the interpreter: error vs the exact product within 1.5x the reference's."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _INTERPRETER_CASES], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errs = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(errs) == 29 and max(errs) < 1, errs


def test_triton_rejects_wrong_features():
    pytest.importorskip("triton")
    from pagedeploy.quant.int4_triton import KernelConfig, int4_matmul
    with pytest.raises(ValueError, match="expects 128"):
        int4_matmul(torch.randn(2, 64), quantize_int4(torch.randn(8, 128, generator=_gen(23))))
    with pytest.raises(ValueError, match="gemm needs group 128"):
        int4_matmul(torch.randn(20, 128), quantize_int4(torch.randn(8, 128, generator=_gen(23)), 64),
                    config=KernelConfig("gemm", 16, 16))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_case(M, N, K, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = quantize_int4(torch.randn(N, K, generator=g) * 0.02, group).to("cuda")
    x = torch.randn(M, K, generator=g).to("cuda", dtype)
    bias = torch.randn(N, generator=g).to("cuda", dtype)
    exact = x.float() @ dequantize_int4(w).T.cuda() + bias.float()
    return w, x, bias, exact


def _rel(y, exact):
    return ((y.float() - exact).norm() / exact.norm()).item()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("M", [1, 2, 3, 7, 16, 17, 64, 300, 600])
@pytest.mark.parametrize("N,K,group", [(4096, 4096, 128), (1024, 4096, 128), (1536, 576, 64), (512, 768, 32)])
def test_triton_gpu_matches_reference(M, N, K, group):
    """The default dispatch (fma, dot GEMV, dot GEMM, dense by M) is as close to the exact product as
    the torch reference, which rounds each weight to bf16 first."""
    from pagedeploy.quant.int4_triton import int4_matmul
    w, x, bias, exact = _gpu_case(M, N, K, group, torch.bfloat16, M + N)
    y = int4_matmul(x, w, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert _rel(y, exact) <= 1.5 * _rel(int4_matmul_reference(x, w, bias), exact) + 1e-4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,cfg", [
    (1, dict(kind="fma", block_m=1, block_n=256, split_k=4)), (2, dict(kind="fma", block_m=2, unroll=2, split_k=2)),
    (2, dict(kind="fma", block_m=2, block_n=64)), (5, dict(kind="dot", swap_ab=True, split_k=4)),
    (16, dict(kind="dot", block_n=64, split_k=2)), (64, dict(kind="dot", block_m=64, split_k=2)),
    (100, dict(kind="dot", block_m=64, fold=False)), (130, dict(kind="dense")),
    (40, dict(kind="dot", block_m=32, swap_ab=True, split_k=2)),
    (64, dict(kind="gemm", block_m=64, block_n=128, split_k=2)),
    (100, dict(kind="gemm", block_m=64, block_n=64, split_k=4, fold=False)),
    (40, dict(kind="gemm", block_m=64, block_n=128, num_warps=8, fold=False))])
def test_triton_gpu_each_path(M, cfg, dtype):
    from pagedeploy.quant.int4_triton import KernelConfig, int4_matmul
    w, x, bias, exact = _gpu_case(M, 2048, 4096, 128, dtype, M)
    y = int4_matmul(x, w, bias, config=KernelConfig(**cfg))
    assert _rel(y, exact) <= 1.5 * _rel(int4_matmul_reference(x, w, bias), exact) + 1e-4


@pytest.mark.gpu
@cuda
def test_triton_gpu_split_k_in_cuda_graph():
    """Decode steps are captured: split-K launches replay with fresh inputs, counters re-armed."""
    from pagedeploy.quant.int4_triton import default_config, int4_matmul
    w, _, _, _ = _gpu_case(1, 4096, 4096, 128, torch.bfloat16, 0)
    xs = [torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) for m in (1, 2, 8, 32, 64)]
    assert any(default_config(x.shape[0], 4096, 4096, 128, x.device).split_k > 1 for x in xs)
    for x in xs:
        int4_matmul(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = [int4_matmul(x, w) for x in xs]
    for _ in range(3):
        for x in xs:
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        for x, y in zip(xs, ys):
            exact = x.float() @ dequantize_int4(w).T.cuda()
            assert _rel(y, exact) <= 1.5 * _rel(int4_matmul_reference(x, w), exact) + 1e-4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", ["int4", "nf4"])
def test_quant_linear_cuda_matches_cpu(method):
    _needs_bnb(method)
    linear = nn.Linear(1024, 512)
    nn.init.normal_(linear.weight, std=0.02, generator=_gen(24))
    q = quantize_linear(linear, method)
    x = torch.randn(3, 1024, generator=_gen(25))
    y_cpu = q(x)
    q_gpu = quantize_linear(linear.cuda(), method)   # quantized on the GPU itself
    assert q_gpu.packed.is_cuda
    torch.testing.assert_close(q_gpu(x.cuda()).cpu(), y_cpu, atol=2e-3, rtol=2e-3)
    moved = q.to("cuda")   # quantized on the CPU, then moved (the CPU-offload path)
    torch.testing.assert_close(moved(x.cuda()).cpu(), y_cpu, atol=2e-3, rtol=2e-3)
