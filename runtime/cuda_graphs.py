"""CUDA graphs of decode steps, one per batch size of a ladder, captured once from one memory pool.

A decode step of a small model is dozens of short kernel launches; replaying a captured graph
turns them into one launch, which is what batch-1 speed needs. Only decode-only batches replay
(every sequence adds one token): prefill shapes vary too much to capture.
The graphs read fixed input buffers; a batch is copied into their first rows and the rest is
padding that writes no cache slot (slot -1) and whose outputs are dropped: one launch
(kernels.stage_decode_inputs), where five copies and two fills were a launch each.
"""
from __future__ import annotations

import bisect
import math

import torch

from pagedeploy.kernels import stage_decode_inputs
from pagedeploy.runtime.config import cuda_graph_batch_sizes
from pagedeploy.runtime.model import AttentionMetadata


class DecodeGraphs:
    def __init__(self, model, max_num_seqs: int, max_context: int, block_size: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.sizes = cuda_graph_batch_sizes(max_num_seqs)   # batches above the top run eagerly
        self.width = math.ceil(max_context / block_size)     # block-table columns
        self.max_context = self.width * block_size
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.meta = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
            block_tables=torch.zeros(n, self.width, dtype=torch.int32, device=device),
            context_lens=torch.ones(n, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
            num_decodes=n, max_context_len=self.max_context)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool_bytes = 0

    def can_run(self, num_seqs: int, num_tokens: int, max_context_len: int, width: int) -> bool:
        return (num_seqs == num_tokens and num_seqs <= self.sizes[-1]
                and max_context_len <= self.max_context and width <= self.width)

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, so the smaller graphs reuse the largest one's pool memory."""
        before = _device_used()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            meta = self._meta(size)
            self._forward(size, meta)          # warm-up: compiles kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size, meta)
            self.graphs[size] = graph
        self.pool_bytes = _device_used() - before

    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [B, hidden] of a decode-only batch."""
        b = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, b)]
        m = self.meta
        stage_decode_inputs((self.input_ids[:size], self.positions[:size], m.slot_mapping[:size],
                             m.block_tables[:size], m.context_lens[:size]),
                            (input_ids, positions, meta.slot_mapping, meta.block_tables, meta.context_lens))
        self.graphs[size].replay()
        return self.hidden[:b]

    def _meta(self, size: int) -> AttentionMetadata:
        m = self.meta
        return AttentionMetadata(
            slot_mapping=m.slot_mapping[:size], block_tables=m.block_tables[:size],
            context_lens=m.context_lens[:size], query_start_loc=m.query_start_loc[:size + 1],
            num_decodes=size, max_context_len=self.max_context)

    def _forward(self, size: int, meta: AttentionMetadata) -> None:
        self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], meta)


def _device_used() -> int:
    """Device memory in use as the driver sees it, after returning the caching allocator's free
    blocks: a graph's private pool stays, so the difference across capture is the pool's size."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return total - free
