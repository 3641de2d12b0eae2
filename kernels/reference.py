"""Plain-torch references of the kernels (docs/CONTRACTS.md).

They are the CPU path of the runtime and the oracle the Triton kernels are tested against, so they
must be exact for every case the contract covers and still reasonably fast on a CPU: attention
gathers each sequence's K/V from its block table once and hands the math to
scaled_dot_product_attention; decode-only sequences share one batched call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, KH, D] into the caches [NB, BS, KH, D] at flat slots; slot < 0 is skipped."""
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    kh, d = k_cache.shape[-2:]
    k_cache.view(-1, kh, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kh, d).index_copy_(0, slots, v.to(v_cache.dtype))


def stage_decode_inputs_ref(dst: tuple, src: tuple) -> None:
    """Copy a decode batch into a CUDA graph's input buffers. dst and src are (input_ids,
    positions, slot_mapping, block_tables, context_lens); src holds B rows (its block tables `width`
    columns), dst the graph's size of rows ≥ B (and ≥ width columns). Rows below B get the source
    (block tables: its columns only); rows from B on are padding: slot -1 (nothing stored) and
    context length 1; their other entries are left as they are."""
    ids, positions, slots, tables, lens = dst
    s_ids, s_positions, s_slots, s_tables, s_lens = src
    b, width = s_tables.shape
    ids[:b].copy_(s_ids)
    positions[:b].copy_(s_positions)
    slots[:b].copy_(s_slots)
    slots[b:].fill_(-1)
    tables[:b, :width].copy_(s_tables)
    lens[:b].copy_(s_lens)
    lens[b:].fill_(1)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, optionally after adding a residual (returned as residual_out).

    Same operation order as HF's LlamaRMSNorm (normalize in fp32, cast, then scale), so that fp32
    runs match it bit for bit and bf16 runs round the same way.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding; q [T, H, D], k [T, KH, D], cache fp32 [P, D]."""
    cos, sin = cos_sin_cache[positions.long()].unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    # HF's `x * cos + rotate_half(x) * sin` term by term (a + (-b) * c == a - b * c exactly),
    # so fp32 results are bit-identical to HF's.
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def qk_norm_rope_store_ref(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None,
                           k_norm_weight: torch.Tensor | None, eps: float,
                           positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                           head_dim: int) -> torch.Tensor:
    """q [T, H, D] from qkv [T, (H + 2 KH) D]: optional per-head RMSNorm of q and k (Qwen3),
    rotary, and k, v stored at slot_mapping. The unfused ops in the model's order, so the CPU
    path stays bit-identical to it; qkv is not modified."""
    t = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    q = q.reshape(t, num_heads, head_dim)
    k = k.reshape(t, num_kv_heads, head_dim)
    v = v.reshape(t, num_kv_heads, head_dim)
    if q_norm_weight is not None:   # rows of head_dim
        q = rms_norm_ref(q.reshape(-1, head_dim), q_norm_weight, eps)[0].view(q.shape)
    if k_norm_weight is not None:
        k = rms_norm_ref(k.reshape(-1, head_dim), k_norm_weight, eps)[0].view(k.shape)
    q, k = apply_rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x [..., 2 I] = cat(gate, up) -> [..., I], as HF's MLP computes it."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                     residual: torch.Tensor | None = None,
                     silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(rmsnorm(x + residual) W^T + b), x + residual): a decoder layer's norm, linear and
    activation as the unfused layers compute them. Without norm_weight, x goes in as it is and the
    residual out is None; with silu_mul, W's rows are [gate; up] and act gives silu(gate) * up."""
    residual_out = None
    if norm_weight is not None:
        x, residual_out = rms_norm_ref(x, norm_weight, eps, residual)
    y = F.linear(x, weight, bias)
    return (silu_and_mul_ref(y) if silu_mul else y), residual_out


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, scale: float,
                        sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's cached K/V (see CONTRACTS.md)."""
    ctx_lens, starts = context_lens.tolist(), query_start_loc.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(ctx_lens))]
    if len(q_lens) == 1 and q_lens[0] > 0:   # batch of one: no scatter into `out`
        return _attend_one(q, k_cache, v_cache, block_tables[0], ctx_lens[0], scale,
                           sliding_window)
    out = torch.empty_like(q)
    decodes = [b for b, n in enumerate(q_lens) if n == 1]
    if len(decodes) > 1:
        _decode_batch(q, k_cache, v_cache, block_tables, ctx_lens, starts, decodes, scale,
                      sliding_window, out)
    batched = set(decodes) if len(decodes) > 1 else set()
    for b, q_len in enumerate(q_lens):
        if q_len == 0 or b in batched:
            continue
        s = starts[b]
        out[s:s + q_len] = _attend_one(q[s:s + q_len], k_cache, v_cache, block_tables[b],
                                       ctx_lens[b], scale, sliding_window)
    return out


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[n, BS, KH, D] blocks of one or more sequences -> [..., n * BS, KH, D] token rows."""
    rows = cache.index_select(0, blocks.reshape(-1).long())
    return rows.view(*blocks.shape[:-1], -1, *cache.shape[-2:])


def _attend_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                block_table: torch.Tensor, ctx_len: int, scale: float,
                window: int | None) -> torch.Tensor:
    q_len, bs = q.shape[0], k_cache.shape[1]
    blocks = block_table[: (ctx_len + bs - 1) // bs]
    k = _gather(k_cache, blocks)[:ctx_len].to(q.dtype)
    v = _gather(v_cache, blocks)[:ctx_len].to(q.dtype)
    mask = None
    # A lone query at the end sees every cached key: no mask needed unless a window cuts in.
    needs_causal_offset = q_len != ctx_len and q_len > 1
    if needs_causal_offset or (window is not None and window < ctx_len):
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
        k_pos = torch.arange(ctx_len, device=q.device)[None, :]
        mask = _allowed(q_pos, k_pos, window)
    out = _sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask,
                is_causal=mask is None and q_len > 1, scale=scale)
    return out.transpose(0, 1)


def _decode_batch(q, k_cache, v_cache, block_tables, ctx_lens, starts, seqs, scale, window, out):
    """One query per sequence: gather all sequences' blocks at once and mask the padding."""
    bs = k_cache.shape[1]
    idx = torch.tensor(seqs, device=q.device)
    ctx = torch.tensor([ctx_lens[b] for b in seqs], device=q.device)
    max_blocks = (max(ctx_lens[b] for b in seqs) + bs - 1) // bs
    # Shorter sequences' padding entries are gathered too (then masked): any value >= 0 is
    # allowed there, so keep them inside the pool.
    blocks = block_tables.index_select(0, idx)[:, :max_blocks].clamp(max=k_cache.shape[0] - 1)
    k = _gather(k_cache, blocks).to(q.dtype).transpose(1, 2)     # [N, KH, L, D]
    v = _gather(v_cache, blocks).to(q.dtype).transpose(1, 2)
    k_pos = torch.arange(k.shape[2], device=q.device)[None, :]
    mask = _allowed((ctx - 1)[:, None], k_pos, window) & (k_pos < ctx[:, None])
    rows = torch.tensor([starts[b] for b in seqs], device=q.device)
    n, h, d = len(seqs), q.shape[1], q.shape[2]
    # A kv head's query heads become its query rows: no K/V copies for GQA.
    qs = q.index_select(0, rows).view(n, k.shape[1], h // k.shape[1], d)
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    out[rows] = o.reshape(n, h, d)


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _sdpa(q, k, v, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """SDPA with GQA: q [H, Lq, D], k/v [KH, Lk, D]. Batched 4-D inputs take the CPU flash
    kernel (3-D ones fall back to the slower math path), which also handles GQA without copies."""
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                         is_causal=is_causal, scale=scale,
                                         enable_gqa=q.shape[0] != k.shape[0])
    return out[0]
