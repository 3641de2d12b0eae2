"""ModelRunner: owns the model and the paged KV pool, and turns a scheduled batch into logits.

The engine decides what runs; the runner only builds the flat batch tensors (token ids, positions,
cache slots, block tables), runs the model and returns float32 logits for the items that sample.
It never changes the sequences (docs/CONTRACTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedeploy.runtime.config import EngineConfig
from pagedeploy.runtime.cuda_graphs import DecodeGraphs
from pagedeploy.runtime.loader import load_model, torch_dtype
from pagedeploy.runtime.model import AttentionMetadata


@dataclass
class BatchInputs:
    input_ids: torch.Tensor     # int64 [T]
    positions: torch.Tensor     # int64 [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor   # int64 [items with need_logits]: row of each item's last token


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.block_size = config.block_size
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.model = load_model(config)
        spec = config.spec
        # One tensor for the whole pool: [K/V, layer, block, slot, kv head, head dim].
        self.kv_cache = torch.zeros(
            2, spec.num_hidden_layers, config.num_blocks, config.block_size,
            spec.num_key_value_heads, spec.head_dim,
            dtype=torch_dtype(config.kv_cache_dtype), device=self.device)
        self.model.bind_kv_cache(list(self.kv_cache[0]), list(self.kv_cache[1]))
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

    @torch.inference_mode()
    def execute(self, items) -> torch.Tensor:
        """float32 logits [number of items with need_logits, vocab], in item order."""
        if not items:
            return torch.empty(0, self.config.spec.vocab_size, device=self.device)
        batch = self.prepare(items)
        meta = batch.meta
        if self.graphs and self.graphs.can_run(len(items), batch.input_ids.shape[0],
                                               meta.max_context_len, meta.block_tables.shape[1]):
            hidden = self.graphs.run(batch.input_ids, batch.positions, meta)
        else:
            hidden = self.model(batch.input_ids, batch.positions, meta)
        return self.model.compute_logits(hidden.index_select(0, batch.logits_rows)).float()

    def prepare(self, items) -> BatchInputs:
        """Flatten the items' new tokens; positions and slots come from vectorized index math
        (numpy on the host: a step of hundreds of sequences must cost well under a millisecond)."""
        n = len(items)
        starts = np.fromiter((item.seq.num_computed_tokens for item in items), np.int64, n)
        q_lens = np.fromiter((item.num_new_tokens for item in items), np.int64, n)
        assert (q_lens > 0).all(), "every scheduled item computes at least one token"
        ends = starts + q_lens
        token_ids = np.fromiter(_new_tokens(items), np.int64, int(q_lens.sum()))
        block_tables = self._block_tables(items, ends)

        query_start_loc = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start_loc[1:])
        seq_of_token = np.repeat(np.arange(n), q_lens)
        positions = np.arange(len(token_ids)) + (starts - query_start_loc[:-1])[seq_of_token]
        blocks = block_tables[seq_of_token, positions // self.block_size].astype(np.int64)
        slot_mapping = blocks * self.block_size + positions % self.block_size
        need = np.fromiter((item.need_logits for item in items), np.bool_, n)
        logits_rows = (query_start_loc[1:] - 1)[need]

        meta = AttentionMetadata(
            slot_mapping=self._to_device(slot_mapping),
            block_tables=self._to_device(block_tables),
            context_lens=self._to_device(ends.astype(np.int32)),
            query_start_loc=self._to_device(query_start_loc.astype(np.int32)),
            num_decodes=_leading_ones(q_lens), max_context_len=int(ends.max()))
        return BatchInputs(input_ids=self._to_device(token_ids),
                           positions=self._to_device(positions), meta=meta,
                           logits_rows=self._to_device(logits_rows))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return tensor
        return tensor.to(self.device, non_blocking=True)

    def _block_tables(self, items, ends: np.ndarray) -> np.ndarray:
        """int32 [B, max blocks]: each row the blocks covering the sequence up to this step's end,
        padded with 0 (kernels never read past context_lens)."""
        needed = (ends + self.block_size - 1) // self.block_size
        tables = np.zeros((len(items), int(needed.max())), dtype=np.int32)
        for row, (item, n) in enumerate(zip(items, needed.tolist())):
            table = item.seq.block_table
            assert len(table) >= n, (f"sequence {getattr(item.seq, 'seq_id', '?')} needs {n} "
                                     f"blocks but its table holds {len(table)}")
            tables[row, :n] = table[:n]
        return tables


def _new_tokens(items):
    for item in items:
        start = item.seq.num_computed_tokens
        yield from item.seq.token_ids[start:start + item.num_new_tokens]


def _leading_ones(q_lens: np.ndarray) -> int:
    """How many items at the front decode one token (the GPU kernel's decode split)."""
    not_one = np.flatnonzero(q_lens != 1)
    return int(not_one[0]) if len(not_one) else len(q_lens)
