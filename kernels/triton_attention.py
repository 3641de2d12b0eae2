"""Paged attention in Triton: decode (flash-decoding splits) and prefill/extend over paged K/V.

One kernel serves both. A program owns one tile of query rows of one sequence and one kv head; the
rows are (query token, query head of that kv head's GQA group) pairs, so each K/V tile is read once
for the whole group and the two products run on the tensor cores (tl.dot needs >= 16 rows, which a
decode step's group alone rarely fills). K/V rows are gathered token by token through the block
table, so a tile may span several cache blocks and any block size works.

Decode rows (one query token each: the whole batch when T == B, or the batch's first num_decodes
sequences) use one tile per sequence and, when there are too few (sequence, kv head) pairs to fill
the GPU, split each context into up to NUM_SPLITS chunks of at least MIN_CHUNK tokens; the last
chunk's program to finish merges the partial results by their log-sum-exp (an arrival counter,
triton_launch.py: one launch, not two). The grid is sized for the longest context the launch may
see; the programs of splits a shorter context does not need end at once, and a context that fits
one chunk is written by its one program with no merge.
The other rows take the prefill tiles. Launch shapes depend only on tensor shapes
and host integers, never on tensor values, so a decode step can be captured in a CUDA graph.

Split decode is latency-bound (a few dozen programs): under PDL its programs read the metadata and
ask L2 for their first K/V tile before waiting on the kernel before (rotary + the KV store), load
their one or two tiles straight into registers (one pipeline stage), and the last split merges all
of a tile's heads at once, 64 // QG_P2 splits a load (docs/PERF.md runs 21, 22).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_launch
from .triton_launch import arrival_counters, num_sms, pdl_launch, pdl_supported, wait_previous

_LOG2E = 1.4426950408889634
# A decode tile's split merge loads all its rows at once (_merge_rows), not row by row.
MERGE_ROWS = True
# Fewest context tokens a split takes. The grid's split count is sized for the longest context a
# launch may see (a CUDA graph's is max_model_len); each (sequence, kv head) uses only
# min(splits, ceil(context / MIN_CHUNK)) of them, and one alone writes its output with no merge.
MIN_CHUNK = 64
# Running-max start: finite, so a row with every key masked gets exp2(-inf - m) = 0, never NaN.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _find_seq(query_start_loc, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest b with query_start_loc[b] // BLOCK_Q + b <= tile (sequence b's tiles start there)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc + mid) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# What varies from step to step is left unspecialized, so that one compiled variant serves every
# batch: num_seqs and the block-table width (Triton specializes integers equal to 1 or divisible by
# 16: a batch of one would compile anew), and the alignment of the per-sequence tables, which are
# sliced at the decode/prefill split.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "min_chunk"],
            do_not_specialize_on_alignment=["block_tables", "context_lens", "query_start_loc"])
def _attention_kernel(
    q_ptr, k_cache, v_cache, block_tables, context_lens, query_start_loc, out_ptr,
    part_out, part_lse, counters, num_seqs, qk_scale, window, min_chunk,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    QG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    IS_DECODE: tl.constexpr, USE_WINDOW: tl.constexpr, NUM_HEADS: tl.constexpr,
    PDL: tl.constexpr, EARLY: tl.constexpr = False, PRE_WAIT: tl.constexpr = False,
    QG_P2: tl.constexpr = 1, MERGE_ROWS: tl.constexpr = False,
):
    # Split decode (few sequences: latency-bound) with PRE_WAIT under PDL: what earlier steps
    # wrote (the metadata, copied before the step) loads before the wait, and the first K/V tile
    # is asked of L2, while rotary + the KV store still run.
    PRE: tl.constexpr = IS_DECODE and PRE_WAIT and PDL >= 1 and NUM_SPLITS > 1
    if not PRE:
        wait_previous(PDL, EARLY)   # q and the new K/V come from the kernels just before
    tile = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    BLOCK_Q: tl.constexpr = BLOCK_M // QG  # query tokens per tile
    if IS_DECODE:
        seq = tile
        q0 = 0
    else:
        seq = _find_seq(query_start_loc, tile, num_seqs, BLOCK_Q)
        if seq < 0:  # a tile before this slice's first sequence (query_start_loc[0] > 0)
            return
        q0 = (tile - (tl.load(query_start_loc + seq) // BLOCK_Q + seq)) * BLOCK_Q
    q_begin = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_begin
    if q0 >= q_len:
        if PRE:
            wait_previous(PDL, EARLY)
        return
    ctx = tl.load(context_lens + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // QG                       # token index inside the sequence's queries
    head = kh * QG + rows % QG
    row_ok = (rows < BLOCK_Q * QG) & (tok < q_len)
    q_pos = ctx - q_len + tok                   # absolute position of each row's query
    dims = tl.arange(0, HEAD_DIM)
    q_off = (q_begin + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    if not PRE:
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)

    # K/V range this tile needs: causal end at its last query, window start at its first.
    kv_end = ctx - q_len + tl.minimum(q0 + BLOCK_Q, q_len)
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(ctx - q_len + q0 - window + 1, 0)
    active = 1   # splits with work: NUM_SPLITS is the grid's (sized for the longest context)
    if NUM_SPLITS > 1:
        active = tl.minimum(tl.cdiv(kv_end - kv_start, min_chunk), NUM_SPLITS)
        if split >= active:   # past this context: no work, no partial, no arrival (PRE: no wait)
            return
        chunk = tl.cdiv(tl.cdiv(kv_end - kv_start, active), BLOCK_N) * BLOCK_N
        kv_start = kv_start + split * chunk
        kv_end = tl.minimum(kv_end, kv_start + chunk)

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    kv_head = kh * stride_ch
    table = block_tables + seq * stride_bt
    if PRE:   # the split's first K/V rows into L2 (the new token's too: L2 sees the store after)
        _prefetch_tile(k_cache, v_cache, table, kv_start, kv_end, cols, kv_head, stride_cb, stride_cs,
                       BLOCK_SIZE, HEAD_DIM)
        wait_previous(PDL, EARLY)
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    for start in range(kv_start, kv_end, BLOCK_N):
        n = start + cols
        n_ok = n < kv_end
        kv_off = _kv_rows(table, n, n_ok, kv_head, stride_cb, stride_cs, BLOCK_SIZE)
        k = tl.load(k_cache + kv_off[None, :] + dims[:, None], mask=n_ok[None, :], other=0.0)
        s = tl.dot(q, k.to(q.dtype)) * qk_scale
        ok = n_ok[None, :] & (n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            ok = ok & (n[None, :] > q_pos[:, None] - window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + kv_off[:, None] + dims[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    # Rows that saw no key (empty split) have l_i = 0: their output is 0 and their lse -inf.
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    token = q_begin + tok
    if active == 1:   # the whole range in this program: no partials, no merge
        out_off = token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        slot = (token * NUM_HEADS + head) * NUM_SPLITS
        tl.store(part_out + (slot + split)[:, None] * HEAD_DIM + dims[None, :], o,
                 mask=row_ok[:, None])
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_lse + slot + split, lse, mask=row_ok)
        # The last active split of this (tile, kv head) to finish merges them: no second launch.
        tl.debug_barrier()   # every thread's partial is written before the release below
        counter = counters + tile * tl.num_programs(1) + kh
        if tl.atomic_add(counter, 1) == active - 1:   # acq_rel, gpu scope
            if IS_DECODE and MERGE_ROWS:   # one token: all its rows at once
                _merge_rows(part_out, part_lse, out_ptr, q_begin, kh, active, stride_ot, stride_oh, QG,
                            QG_P2, HEAD_DIM, NUM_SPLITS, NUM_HEADS)
            else:
                _merge_splits(part_out, part_lse, out_ptr, q_begin, q0, q_len, kh, active, stride_ot,
                              stride_oh, QG, BLOCK_Q, HEAD_DIM, NUM_SPLITS, NUM_HEADS)
            tl.atomic_xchg(counter, 0)   # re-armed for the next launch (graph replays)


# `prefetch.global.L2` of one address; $0 is a dummy out (inline asm needs one).
_PREFETCH_L2 = tl.constexpr("prefetch.global.L2 [$1];\n mov.u32 $0, 0;")


@triton.jit
def _kv_rows(table, n, n_ok, kv_head, stride_cb, stride_cs, BLOCK_SIZE: tl.constexpr):
    """Element offsets of positions n's K/V rows (this kv head) in the cache, through the block table."""
    page = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0)
    return page.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_head


@triton.jit
def _prefetch_tile(k_cache, v_cache, table, start, end, cols, kv_head, stride_cb, stride_cs,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Ask L2 for the 128-byte lines of the K and V rows of positions [start, min(start + BLOCK_N,
    end)). Holds no register, returns nothing."""
    n = start + cols
    n_ok = n < end
    row = _kv_rows(table, n, n_ok, kv_head, stride_cb, stride_cs, BLOCK_SIZE)
    LINE: tl.constexpr = 1024 // k_cache.dtype.element_ty.primitive_bitwidth   # elements a line
    LINES: tl.constexpr = (HEAD_DIM + LINE - 1) // LINE
    lines = tl.where(n_ok[:, None], row[:, None] + (tl.arange(0, LINES) * LINE)[None, :], 0)
    tl.inline_asm_elementwise(_PREFETCH_L2, "=r,l", [k_cache + lines], dtype=tl.int32, is_pure=False, pack=1)
    tl.inline_asm_elementwise(_PREFETCH_L2, "=r,l", [v_cache + lines], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _merge_rows(part_out, part_lse, out_ptr, token, kh, active, stride_ot, stride_oh,
                QG: tl.constexpr, QG_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr):
    """_merge_splits for a decode tile (one token, its QG heads: QG_P2 rows, the power of two
    above), all rows at once and up to 64 // QG_P2 splits a load (a [QG_P2, splits, HEAD_DIM]
    tile of at most 64 rows): one round trip to L2 for most contexts, not one per row, whatever
    the grid's NUM_SPLITS. Partials fold in with a running max, as in the main loop."""
    CHUNK: tl.constexpr = max(1, min(NUM_SPLITS, 64 // QG_P2))
    r = tl.arange(0, QG_P2)
    r_ok = r < QG
    head = kh * QG + r
    base = (token * NUM_HEADS + head) * NUM_SPLITS
    dims = tl.arange(0, HEAD_DIM)
    m = tl.full([QG_P2], _NEG_BIG, tl.float32)
    total = tl.zeros([QG_P2], tl.float32)
    acc = tl.zeros([QG_P2, HEAD_DIM], tl.float32)
    for first in range(0, active, CHUNK):
        splits = first + tl.arange(0, CHUNK)
        ok = r_ok[:, None] & (splits < active)[None, :]
        slot = base[:, None] + splits[None, :]
        lse = tl.load(part_lse + slot, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(part_out + slot[:, :, None] * HEAD_DIM + dims[None, None, :], mask=ok[:, :, None],
                    other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 1))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new[:, None])   # empty and absent splits: lse -inf, weight 0
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 1)
        total = total * alpha + tl.sum(w, 1)
        m = m_new
    o = acc / tl.where(r_ok, total, 1.0)[:, None]
    tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + dims[None, :],
             o.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])


@triton.jit
def _merge_splits(part_out, part_lse, out_ptr, q_begin, q0, q_len, kh, active, stride_ot,
                  stride_oh, QG: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr):
    """out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse), over the `active` splits, for
    each of the tile's real rows: all of a row's splits in one load (empty splits have lse -inf,
    weight 0)."""
    splits = tl.arange(0, NUM_SPLITS)
    s_ok = splits < active
    dims = tl.arange(0, HEAD_DIM)
    for r in range(BLOCK_Q * QG):
        if q0 + r // QG < q_len:
            token = q_begin + q0 + r // QG
            head = kh * QG + r % QG
            slot = (token * NUM_HEADS + head) * NUM_SPLITS + splits
            lse = tl.load(part_lse + slot, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
            w = tl.exp2(lse - tl.max(lse, 0))
            o = tl.load(part_out + slot[:, None] * HEAD_DIM + dims[None, :], mask=s_ok[:, None],
                        other=0.0, cache_modifier=".cg")
            o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
            tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
                     o.to(out_ptr.dtype.element_ty))


def decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device,
                  min_chunk: int | None = None, max_splits: int = 64) -> int:
    """Context chunks per (sequence, kv head): enough programs for ~2 per SM, >= min_chunk tokens
    each, rounded down to a power of two. On the H100 sweep (docs/PERF.md, "Kernels") this picks the
    fastest or within 0.7 us of it: B=1 ctx 512 -> 8, ctx 4096 -> 32; B=64 (512 programs) -> 1."""
    programs = num_seqs * num_kv_heads
    min_chunk = min_chunk or MIN_CHUNK
    want = triton.cdiv(2 * num_sms(device, interpreter=8), programs)
    splits = min(want, triton.cdiv(max_context, min_chunk), max_splits)
    return 1 if splits <= 1 else 1 << (splits.bit_length() - 1)


def launch_config(decode: bool, qg: int, tune: dict | None = None, splits: int = 1) -> dict:
    """Tile sizes: decode tiles are one token's GQA group (>= 16 rows for tl.dot); prefill tiles
    pack block_m // qg query tokens of one sequence. Split decode (few sequences) is latency-bound
    and its programs see one or two tiles each: loaded straight into registers (one stage), not
    staged through shared memory first. In a chain of Llama-3-8B layers that is 0.2-2.2 us a layer
    faster from 512 tokens of context on; at 128-384, end to end, no change (docs/PERF.md run 22)."""
    if decode:
        cfg = dict(block_m=max(16, triton.next_power_of_2(qg)), block_n=64, num_warps=4,
                   num_stages=1 if splits > 1 else 2)
    else:
        # H100 sweep (docs/PERF.md, "Kernels"): 128x32 tiles, 8 warps beat 64x64, 4 warps by 6-10%
        cfg = dict(block_m=max(128, triton.next_power_of_2(qg)), block_n=32, num_warps=8,
                   num_stages=2)
    cfg.update(tune or {})
    assert cfg["block_m"] >= qg, (cfg, qg)
    return cfg


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, sliding_window: int | None = None,
                    *, num_decodes: int | None = None, max_context_len: int | None = None,
                    num_splits: int | None = None, out: torch.Tensor | None = None,
                    tune: dict | None = None) -> torch.Tensor:
    """Causal attention of q [T, H, D] over paged K/V (docs/CONTRACTS.md, "Kernels").

    Every sequence must have at least one query token. Optional host-side hints, none of which
    needs a device sync: num_decodes (the first num_decodes sequences have one query token each:
    they go to the decode kernel, the rest to the prefill kernel; by default the whole batch is
    decode when T == B, else prefill), max_context_len (bounds the split count; by default the
    block table's width), num_splits (force a split count, each split taking an equal share of
    the context however short, for tuning and tests), out (a [T, H, D] buffer to
    write, e.g. a CUDA graph's static output), tune (launch_config overrides, for tuning).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim and head_dim >= 16 and head_dim & (head_dim - 1) == 0, head_dim
    assert num_heads % num_kv_heads == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_decodes is None:
        num_decodes = num_seqs if num_tokens == num_seqs else 0
    min_chunk = MIN_CHUNK if num_splits is None else 1
    args = (q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, scale,
            sliding_window, min_chunk, tune)
    if num_decodes:
        if num_splits is None:
            bound = max_context_len or block_tables.shape[1] * block_size
            num_splits = decode_splits(num_decodes, num_kv_heads, bound, q.device)
        _launch(*args, first=0, count=num_decodes, decode=True, num_splits=num_splits)
    if num_decodes < num_seqs:
        _launch(*args, first=num_decodes, count=num_seqs - num_decodes, decode=False,
                num_splits=1 if num_decodes else (num_splits or 1))
    return out


def _launch(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, scale,
            window, min_chunk, tune, *, first: int, count: int, decode: bool, num_splits: int) -> None:
    """Run sequences [first, first + count) (their tokens follow one another in q)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    qg = num_heads // num_kv_heads
    cfg = launch_config(decode, qg, tune, num_splits)
    # A decode tile is one sequence; prefill tiles are found by _find_seq, which needs at most
    # this many (query_start_loc[b] // block_q + b never exceeds it).
    grid0 = count if decode else num_tokens // (cfg["block_m"] // qg) + count
    assert num_splits & (num_splits - 1) == 0, num_splits
    part_out = part_lse = out  # placeholders, unused without splits
    counters = arrival_counters(q.device, grid0 * num_kv_heads if num_splits > 1 else 0)
    if num_splits > 1:  # decode tokens are the batch's first `count` tokens
        rows = count if decode else num_tokens
        part_out = torch.empty(rows * num_heads * num_splits * head_dim, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(rows * num_heads * num_splits, dtype=torch.float32, device=q.device)
    seqs = slice(first, first + count)
    pdl = pdl_supported(q.device)
    launch = pdl_launch(q.device) if pdl else {}
    _attention_kernel[(grid0, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables[seqs], context_lens[seqs], query_start_loc[first:],
        out, part_out, part_lse, counters, count, scale * _LOG2E, window or 0, min_chunk,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        QG=qg, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"], NUM_SPLITS=num_splits, IS_DECODE=decode,
        USE_WINDOW=window is not None, NUM_HEADS=num_heads, PDL=pdl, EARLY=triton_launch.EARLY_ATTENTION,
        PRE_WAIT=triton_launch.ATTENTION_PRE_WAIT, QG_P2=triton.next_power_of_2(qg), MERGE_ROWS=MERGE_ROWS,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch)


def warm_up(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
            device: torch.device, sliding_window: int | None = None) -> None:
    """Compile every variant a model's steps can launch (decode at each split count, prefill), on a
    scratch cache with the real one's per-block layout: a first compile in the middle of serving
    costs 0.2-1 s per variant, and a workload meets them one by one."""
    k_cache = torch.randn(2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.zeros(2, 2, dtype=torch.int32, device=device)
    context_lens = torch.full((2,), block_size, dtype=torch.int32, device=device)
    decode_q = torch.randn(2, num_heads, head_dim, dtype=dtype, device=device)
    decode_loc = torch.arange(3, dtype=torch.int32, device=device)
    splits = 1
    while splits <= 64:
        paged_attention(decode_q, k_cache, v_cache, block_tables, context_lens, decode_loc, 1.0,
                        sliding_window, num_decodes=2, num_splits=splits)
        splits *= 2
    prefill_q = torch.randn(2 * block_size, num_heads, head_dim, dtype=dtype, device=device)
    prefill_loc = torch.tensor([0, block_size, 2 * block_size], dtype=torch.int32, device=device)
    paged_attention(prefill_q, k_cache, v_cache, block_tables, context_lens, prefill_loc, 1.0,
                    sliding_window, num_decodes=0)
