"""The kernels' torch references (the CPU path, through the public dispatching functions) against
naive float64 math and HF's own rms_norm / rotary code, on random inputs (never zeros)."""
from __future__ import annotations

import pytest
import torch

from pagedeploy.kernels import (apply_rotary, paged_attention, qk_norm_rope_store, rms_norm,
                                silu_and_mul, store_kv)

H = 8
# (tokens in the cache after the step, new tokens this step): full prefills, a chunk / prefix hit,
# decodes at several lengths (one exactly on a block boundary), a single-token prompt.
RAGGED = [(37, 37), (50, 13), (1, 1), (70, 1), (33, 1), (16, 16), (100, 1), (64, 40), (32, 1)]


def make_batch(kv_heads: int, head_dim: int, block_size: int, dtype, seqs=RAGGED, seed=0):
    g = torch.Generator().manual_seed(seed)
    needed = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(needed) + 5
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed) + 2
    tables, used = [], 0
    for n in needed:
        # unused entries may hold any value >= 0, even past the pool
        pad = torch.randint(0, 10 * num_blocks, (width - n,), generator=g).tolist()
        tables.append(order[used:used + n] + pad)
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q_lens = [q for _, q in seqs]
    q = torch.randn(sum(q_lens), H, head_dim, generator=g).to(dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return (q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32),
            torch.tensor([c for c, _ in seqs], dtype=torch.int32), qsl)


def naive_attention(q, k_cache, v_cache, block_tables, context_lens, qsl, scale, window=None):
    """Token by token from the block table, float64, explicit mask and softmax."""
    bs, groups = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, ctx in enumerate(context_lens.tolist()):
        start, end = qsl[b].item(), qsl[b + 1].item()
        pos = torch.arange(ctx)
        blocks = block_tables[b].long()[pos // bs]
        k = k_cache[blocks, pos % bs].double().repeat_interleave(groups, dim=1)
        v = v_cache[blocks, pos % bs].double().repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].double(), k) * scale
        q_pos = torch.arange(ctx - (end - start), ctx)[:, None]
        allowed = pos[None, :] <= q_pos
        if window is not None:
            allowed &= pos[None, :] > q_pos - window
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_paged_attention_ragged_batch(groups, head_dim, block_size, dtype):
    batch = make_batch(H // groups, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    out = paged_attention(*batch, scale)
    assert out.dtype == dtype and out.shape == batch[0].shape
    expected = naive_attention(*batch, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [1, 5, 20, 4096])
@pytest.mark.parametrize("groups", [1, 4])
def test_paged_attention_sliding_window(window, groups):
    batch = make_batch(H // groups, 64, 16, torch.float32, seed=window)
    out = paged_attention(*batch, 0.125, sliding_window=window)
    expected = naive_attention(*batch, 0.125, window=window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_decode_only_batch_matches_one_by_one():
    """The batched decode path (all sequences at q_len 1) equals running them one at a time."""
    seqs = [(70, 1), (3, 1), (33, 1), (128, 1)]
    batch = make_batch(2, 64, 16, torch.float32, seqs=seqs, seed=3)
    q, k_cache, v_cache, tables, ctx, qsl = batch
    together = paged_attention(*batch, 0.125)
    for b in range(len(seqs)):
        alone = paged_attention(q[b:b + 1], k_cache, v_cache, tables[b:b + 1], ctx[b:b + 1],
                                torch.tensor([0, 1], dtype=torch.int32), 0.125)
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(together.double(), naive_attention(*batch, 0.125), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_slots_and_skips_negative(dtype):
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(6, 16, 2, 64, generator=g).to(dtype)
    v_cache = torch.randn(6, 16, 2, 64, generator=g).to(dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([17, 3, -1, 95, 40, -1, 64])
    k = torch.randn(len(slots), 2, 64, generator=g).to(dtype)
    v = torch.randn(len(slots), 2, 64, generator=g).to(dtype)
    store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 64), v_cache.view(-1, 2, 64)
    written = slots >= 0
    assert torch.equal(flat_k[slots[written]], k[written])
    assert torch.equal(flat_v[slots[written]], v[written])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[written]] = False
    assert torch.equal(flat_k[untouched], before_k.view(-1, 2, 64)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, 2, 64)[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 576), (5, 4, 128)])
def test_rms_norm_matches_hf(shape, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    residual = torch.randn(shape, generator=g).to(dtype)
    hf = LlamaRMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(shape[-1], generator=g))
    with torch.no_grad():
        out, res = rms_norm(x, hf.weight, 1e-5)
        assert res is x and out.dtype == dtype
        torch.testing.assert_close(out, hf(x), atol=0, rtol=0)
        out, res = rms_norm(x, hf.weight, 1e-5, residual=residual)
        torch.testing.assert_close(res, x + residual, atol=0, rtol=0)
        torch.testing.assert_close(out, hf(x + residual), atol=0, rtol=0)
        naive = (x + residual).double()
        naive = naive / naive.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * hf.weight.double()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out.double(), naive, atol=tol, rtol=tol)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_apply_rotary_matches_hf(head_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(2)
    max_pos = 300
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (11,), generator=g)
    q = torch.randn(11, 6, head_dim, generator=g)
    k = torch.randn(11, 2, head_dim, generator=g)
    emb = torch.cat((freqs, freqs), dim=-1)[positions]
    hf_q, hf_k = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin(), unsqueeze_dim=1)
    out_q, out_k = apply_rotary(q, k, positions, cache)
    torch.testing.assert_close(out_q, hf_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_k, hf_k, atol=1e-6, rtol=0)
    bf_q, bf_k = apply_rotary(q.bfloat16(), k.bfloat16(), positions, cache)
    assert bf_q.dtype == torch.bfloat16
    torch.testing.assert_close(bf_q.float(), hf_q, atol=3e-2, rtol=3e-2)


# ---- fused functions: the references compose the ones above, so the CPU path is unchanged ----

def rope_inputs(head_dim: int, num_tokens: int, g: torch.Generator, max_pos: int = 300):
    """(cos_sin_cache, positions, HF's cos and sin at those positions)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq
    positions = torch.randint(0, max_pos, (num_tokens,), generator=g)
    emb = torch.cat((freqs, freqs), dim=-1)[positions]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1), positions, emb.cos(), emb.sin()


def fused_case(kv_heads: int, head_dim: int, with_norm: bool, dtype, seed: int = 0):
    """Arguments of qk_norm_rope_store: qkv as rows of a wider buffer, a third of the tokens
    padding (slot -1), random caches and norm weights; plus HF's cos and sin."""
    g = torch.Generator().manual_seed(seed)
    t, width = 12, (H + 2 * kv_heads) * head_dim
    qkv = (2 * torch.randn(t, width + head_dim, generator=g)).to(dtype)[:, :width]
    cache, positions, cos, sin = rope_inputs(head_dim, t, g)
    slots = torch.randperm(6 * 16, generator=g)[:t]
    slots[::3] = -1
    norms = [(1 + 0.1 * torch.randn(head_dim, generator=g)).to(dtype) if with_norm else None
             for _ in range(2)]
    args = dict(qkv=qkv, q_norm_weight=norms[0], k_norm_weight=norms[1], eps=1e-6,
                positions=positions, cos_sin_cache=cache,
                k_cache=torch.randn(6, 16, kv_heads, head_dim, generator=g).to(dtype),
                v_cache=torch.randn(6, 16, kv_heads, head_dim, generator=g).to(dtype),
                slot_mapping=slots, num_heads=H, num_kv_heads=kv_heads, head_dim=head_dim)
    return args, cos, sin


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_qk_norm_rope_store_matches_hf(groups, head_dim, with_norm):
    """float32 against HF's Qwen3 q/k RMSNorm and rotary, and the cache rows written by hand."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    kv = H // groups
    args, cos, sin = fused_case(kv, head_dim, with_norm, torch.float32, seed=groups)
    qkv_before, k_before, v_before = (args[n].clone() for n in ("qkv", "k_cache", "v_cache"))
    q = qk_norm_rope_store(**args)

    t = qkv_before.shape[0]
    hf_q, hf_k, hf_v = qkv_before.split([H * head_dim, kv * head_dim, kv * head_dim], dim=-1)
    hf_q, hf_k, hf_v = (x.reshape(t, -1, head_dim).clone() for x in (hf_q, hf_k, hf_v))
    if with_norm:
        for name, x in (("q_norm_weight", hf_q), ("k_norm_weight", hf_k)):
            norm = Qwen3RMSNorm(head_dim, eps=1e-6)
            norm.weight.data.copy_(args[name])
            x.copy_(norm(x).detach())
    hf_q, hf_k = apply_rotary_pos_emb(hf_q, hf_k, cos, sin, unsqueeze_dim=1)
    assert q.shape == (t, H, head_dim) and q.is_contiguous()
    torch.testing.assert_close(q, hf_q, atol=1e-6, rtol=0)
    assert torch.equal(args["qkv"], qkv_before)

    slots, written = args["slot_mapping"], args["slot_mapping"] >= 0
    flat_k = args["k_cache"].view(-1, kv, head_dim)
    flat_v = args["v_cache"].view(-1, kv, head_dim)
    torch.testing.assert_close(flat_k[slots[written]], hf_k[written], atol=1e-6, rtol=0)
    assert torch.equal(flat_v[slots[written]], hf_v[written])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[written]] = False
    assert torch.equal(flat_k[untouched], k_before.view(flat_k.shape)[untouched])
    assert torch.equal(flat_v[untouched], v_before.view(flat_v.shape)[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [False, True])
def test_qk_norm_rope_store_is_the_unfused_path(with_norm, dtype):
    """Bit for bit what the decoder did before the fusion: split, (norm,) rotary, store_kv."""
    args, _, _ = fused_case(2, 64, with_norm, dtype, seed=5)
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    t, d = args["qkv"].shape[0], 64
    q, k, v = args["qkv"].split([H * d, 2 * d, 2 * d], dim=-1)
    q, k, v = q.view(t, H, d), k.view(t, 2, d), v.view(t, 2, d)
    if with_norm:
        q = rms_norm(q.reshape(-1, d), args["q_norm_weight"], 1e-6)[0].view(q.shape)
        k = rms_norm(k.reshape(-1, d), args["k_norm_weight"], 1e-6)[0].view(k.shape)
    q, k = apply_rotary(q, k, args["positions"], args["cos_sin_cache"])
    store_kv(k, v, k_cache, v_cache, args["slot_mapping"])

    out = qk_norm_rope_store(**args)
    assert out.dtype == dtype and torch.equal(out, q)
    assert torch.equal(args["k_cache"], k_cache) and torch.equal(args["v_cache"], v_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_hf(dtype):
    from transformers.activations import ACT2FN

    g = torch.Generator().manual_seed(3)
    x = (4 * torch.randn(2, 5, 2 * 96 + 8, generator=g)).to(dtype)[..., :2 * 96]
    out = silu_and_mul(x)
    gate, up = x[..., :96], x[..., 96:]
    assert out.shape == (2, 5, 96) and out.dtype == dtype
    assert torch.equal(out, ACT2FN["silu"](gate) * up)   # HF's MLP: act_fn(gate) * up
    naive = gate.double() / (1 + torch.exp(-gate.double())) * up.double()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), naive, atol=tol, rtol=tol)
