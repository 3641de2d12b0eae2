"""ModelRunner: owns the model and the paged KV pool, and turns a scheduled batch into logits.

The engine decides what runs; the runner only builds the flat batch tensors (token ids, positions,
cache slots, block tables), runs the model and returns float32 logits for the items that sample.
It never changes the sequences (docs/CONTRACTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

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
        """Flatten the items' new tokens; positions and slots come from vectorized index math."""
        starts = [item.seq.num_computed_tokens for item in items]
        q_lens = [item.num_new_tokens for item in items]
        assert all(n > 0 for n in q_lens), "every scheduled item computes at least one token"
        token_ids: list[int] = []
        for item, start, n in zip(items, starts, q_lens):
            token_ids += item.seq.token_ids[start:start + n]
        ends = [s + n for s, n in zip(starts, q_lens)]
        block_tables = self._block_tables(items, ends)

        cpu = torch.device("cpu")
        q_lens_t = torch.tensor(q_lens, dtype=torch.int64)
        query_start_loc = torch.zeros(len(items) + 1, dtype=torch.int64)
        torch.cumsum(q_lens_t, 0, out=query_start_loc[1:])
        seq_of_token = torch.repeat_interleave(torch.arange(len(items)), q_lens_t)
        offset = torch.tensor(starts, dtype=torch.int64) - query_start_loc[:-1]
        positions = torch.arange(len(token_ids), dtype=torch.int64) + offset[seq_of_token]
        blocks = block_tables.to(cpu, torch.int64)[seq_of_token, positions // self.block_size]
        slot_mapping = blocks * self.block_size + positions % self.block_size
        need = torch.tensor([item.need_logits for item in items], dtype=torch.bool)
        logits_rows = (query_start_loc[1:] - 1)[need]

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(dev, non_blocking=True),
            block_tables=block_tables.to(dev, non_blocking=True),
            context_lens=torch.tensor(ends, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=query_start_loc.to(dev, torch.int32, non_blocking=True),
            num_decodes=_leading_ones(q_lens), max_context_len=max(ends))
        return BatchInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.int64).to(dev, non_blocking=True),
            positions=positions.to(dev, non_blocking=True), meta=meta,
            logits_rows=logits_rows.to(dev, non_blocking=True))

    def _block_tables(self, items, ends: list[int]) -> torch.Tensor:
        """int32 [B, max blocks]: each row the blocks covering the sequence up to this step's end,
        padded with 0 (kernels never read past context_lens)."""
        needed = [-(-end // self.block_size) for end in ends]
        width = max(needed)
        rows = []
        for item, n in zip(items, needed):
            table = item.seq.block_table
            assert len(table) >= n, (f"sequence {getattr(item.seq, 'seq_id', '?')} needs {n} "
                                     f"blocks but its table holds {len(table)}")
            rows.append(table[:n] + [0] * (width - n))
        return torch.tensor(rows, dtype=torch.int32)


def _leading_ones(q_lens: list[int]) -> int:
    """How many items at the front decode one token (the GPU kernel's decode split)."""
    n = 0
    while n < len(q_lens) and q_lens[n] == 1:
        n += 1
    return n
