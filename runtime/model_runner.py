"""ModelRunner: owns the model and the paged KV pool, and turns a scheduled batch into logits.

The engine decides what runs; the runner only builds the flat batch tensors (token ids, positions,
cache slots, block tables), runs the model and returns float32 logits for the items that sample.
It never changes the sequences (docs/CONTRACTS.md).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedeploy.kernels import warm_up_attention
from pagedeploy.runtime.config import EngineConfig
from pagedeploy.runtime.cuda_graphs import DecodeGraphs
from pagedeploy.runtime.loader import load_model, torch_dtype
from pagedeploy.runtime.model import AttentionMetadata
from pagedeploy.runtime.sampler import SampledTokens
from pagedeploy.runtime.swap import copy_blocks, host_pool


@dataclass
class BatchInputs:
    input_ids: torch.Tensor     # int64 [T]
    positions: torch.Tensor     # int64 [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor | None   # int64 [items with need_logits]: row of each item's last
    #                                    token; None: every row, in order (a decode-only batch)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.block_size = config.block_size
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        spec = config.spec
        # One tensor for the whole pool: [K/V, layer, block, slot, kv head, head dim].
        pool_shape = [2, spec.num_hidden_layers, config.num_blocks, config.block_size,
                      spec.num_key_value_heads, spec.head_dim]
        kv_dtype = torch_dtype(config.kv_cache_dtype)
        # The planned CPU pool that preempted sequences' blocks are swapped to (runtime/swap.py).
        # Pinning gigabytes takes seconds (2.7 s for 4 GiB on the H100 machine): done in a thread
        # while the weights load.
        swap_pool = None
        if config.num_swap_blocks:
            pool = ThreadPoolExecutor(max_workers=1)
            swap_pool = pool.submit(host_pool, pool_shape, kv_dtype, config.num_swap_blocks,
                                    self.device.type == "cuda")
            pool.shutdown(wait=False)
        self.model = load_model(config)
        self.kv_cache = torch.zeros(pool_shape, dtype=kv_dtype, device=self.device)
        self.model.bind_kv_cache(list(self.kv_cache[0]), list(self.kv_cache[1]))
        self.swap_cache = swap_pool.result() if swap_pool else None
        warm_up_attention(spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim,
                          config.block_size, self.kv_cache.dtype, self.device, spec.sliding_window)
        self.graphs = self._capture_graphs() if self._use_graphs() else None

    def _use_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager

    def _capture_graphs(self) -> DecodeGraphs:
        c, spec = self.config, self.config.spec
        graphs = DecodeGraphs(self.model, c.max_num_seqs, min(c.max_seq_len_to_capture, c.max_model_len),
                              c.block_size, spec.hidden_size, torch_dtype(c.dtype), self.device)
        graphs.capture()
        return graphs

    def cuda_graph_bytes(self) -> int:
        """Measured memory of the captured graphs' pool (0 when eager)."""
        return self.graphs.pool_bytes if self.graphs else 0

    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """A step's block copies, queued before its model run: out first, since a device block a
        swap-out freed may be a swap-in's destination in the same step."""
        copy_blocks(self.kv_cache, self.swap_cache, swap_out)
        copy_blocks(self.swap_cache, self.kv_cache, swap_in)

    @torch.inference_mode()
    def execute(self, items, pending: SampledTokens | None = None, float32: bool = True) -> torch.Tensor:
        """float32 logits [number of items with need_logits, vocab], in item order (in the model's
        dtype when float32 is False). `pending`: the previous step's sampled tokens, still on the
        device, which are some items' input tokens."""
        if not items:
            return torch.empty(0, self.config.spec.vocab_size, device=self.device)
        batch = self.prepare(items, pending)
        meta = batch.meta
        if self.graphs and self.graphs.can_run(len(items), batch.input_ids.shape[0],
                                               meta.max_context_len, meta.block_tables.shape[1]):
            hidden = self.graphs.run(batch.input_ids, batch.positions, meta)
        else:
            hidden = self.model(batch.input_ids, batch.positions, meta)
        rows = hidden if batch.logits_rows is None else hidden.index_select(0, batch.logits_rows)
        logits = self.model.compute_logits(rows)
        return logits.float() if float32 else logits

    def prepare(self, items, pending: SampledTokens | None = None) -> BatchInputs:
        """Flatten the items' new tokens; positions and slots come from vectorized index math on
        what one pass over the items gathered (a step of hundreds of sequences must cost well under
        a millisecond of host time). All index arrays reach the device in two copies."""
        g = _gather(items, self.block_size, pending)
        n = len(items)
        starts, q_lens = np.array(g.starts, dtype=np.int64), np.array(g.q_lens, dtype=np.int64)
        assert (q_lens > 0).all(), "every scheduled item computes at least one token"
        ends = starts + q_lens
        query_start_loc = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start_loc[1:])
        seq_of_token = np.repeat(np.arange(n), q_lens)
        positions = np.arange(len(g.tokens)) + (starts - query_start_loc[:-1])[seq_of_token]
        block_tables = _block_table_array(g.tables, g.num_blocks)
        blocks = block_tables[seq_of_token, positions // self.block_size].astype(np.int64)
        slot_mapping = blocks * self.block_size + positions % self.block_size
        logits_rows = (query_start_loc[1:] - 1)[np.array(g.need, dtype=np.bool_)]

        fill_to, fill_from = np.array(g.fill_to, dtype=np.int64), np.array(g.fill_from, dtype=np.int64)
        longs = self._to_device(np.array(g.tokens, dtype=np.int64), positions, slot_mapping, logits_rows,
                                fill_to, fill_from)
        ints = self._to_device(block_tables, ends, query_start_loc, dtype=torch.int32)
        input_ids, positions_d, slots_d, logits_rows_d, fill_to_d, fill_from_d = longs
        if len(fill_to):     # inputs that are the previous step's samples: copied on the device
            input_ids.index_copy_(0, fill_to_d, pending.token_ids.index_select(0, fill_from_d))
        meta = AttentionMetadata(
            slot_mapping=slots_d, block_tables=ints[0], context_lens=ints[1], query_start_loc=ints[2],
            num_decodes=_leading_ones(q_lens), max_context_len=int(ends.max()))
        # every token needs logits (decode-only, all sampled): no gather, one launch less a step
        every_row = len(logits_rows) == len(g.tokens)
        return BatchInputs(input_ids=input_ids, positions=positions_d, meta=meta,
                           logits_rows=None if every_row else logits_rows_d)

    def _to_device(self, *arrays: np.ndarray, dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
        """Views of one device tensor holding all `arrays`, cast to `dtype`: one copy, not one per
        array (each copy is a launch and, from pageable memory, a host stall)."""
        sizes = [a.size for a in arrays]
        flat = torch.empty(sum(sizes), dtype=dtype,
                           pin_memory=self.device.type == "cuda")
        np.concatenate([a.ravel() for a in arrays], out=flat.numpy(), casting="unsafe")
        if self.device.type == "cuda":
            flat = flat.to(self.device, non_blocking=True)
        views, offset = [], 0
        for a, size in zip(arrays, sizes):
            views.append(flat[offset:offset + size].view(a.shape))
            offset += size
        return views

@dataclass
class _Gathered:
    """Per-item facts of a batch, as plain lists (one Python pass; numpy takes it from there)."""
    starts: list[int] = field(default_factory=list)      # num_computed_tokens
    q_lens: list[int] = field(default_factory=list)      # new tokens
    need: list[bool] = field(default_factory=list)       # need_logits
    num_blocks: list[int] = field(default_factory=list)  # block-table entries covering this step
    tokens: list[int] = field(default_factory=list)      # all new input ids, flat (0 where pending)
    tables: list[int] = field(default_factory=list)      # the block-table entries, flat
    fill_to: list[int] = field(default_factory=list)     # flat input rows of pending tokens ...
    fill_from: list[int] = field(default_factory=list)   # ... and their rows in pending.token_ids


def _gather(items, block_size: int, pending: SampledTokens | None) -> _Gathered:
    g = _Gathered()
    starts, q_lens, need, num_blocks, tokens, tables = g.starts, g.q_lens, g.need, g.num_blocks, g.tokens, g.tables
    row = 0
    for item in items:
        seq, n = item.seq, item.num_new_tokens
        start = seq.num_computed_tokens
        end = start + n
        starts.append(start)
        q_lens.append(n)
        need.append(item.need_logits)
        known = seq.token_ids[start:end]
        tokens += known
        if len(known) < n:       # the newest token is still on the device (async scheduling)
            assert len(known) == n - 1 and pending is not None and seq.seq_id in pending.row_of, \
                f"sequence {seq.seq_id}: an input token is neither known nor pending"
            tokens.append(0)
            g.fill_to.append(row + n - 1)
            g.fill_from.append(pending.row_of[seq.seq_id])
        covered = (end + block_size - 1) // block_size
        table = seq.block_table
        assert len(table) >= covered, (f"sequence {getattr(seq, 'seq_id', '?')} needs {covered} "
                                       f"blocks but its table holds {len(table)}")
        tables += table[:covered]
        num_blocks.append(covered)
        row += n
    return g


def _block_table_array(flat: list[int], num_blocks: list[int]) -> np.ndarray:
    """int32 [B, max blocks]: row b holds its num_blocks[b] entries, padded with 0 (kernels never
    read past context_lens). One scatter: per-row assignments cost more than the data."""
    counts = np.array(num_blocks, dtype=np.int64)
    tables = np.zeros((len(num_blocks), int(counts.max())), dtype=np.int32)
    rows = np.repeat(np.arange(len(num_blocks)), counts)
    row_starts = np.cumsum(counts) - counts
    tables[rows, np.arange(len(flat)) - row_starts[rows]] = flat
    return tables


def _leading_ones(q_lens: np.ndarray) -> int:
    """How many items at the front decode one token (the GPU kernel's decode split)."""
    not_one = np.flatnonzero(q_lens != 1)
    return int(not_one[0]) if len(not_one) else len(q_lens)
