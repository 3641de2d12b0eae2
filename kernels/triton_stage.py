"""Triton staging of a decode batch into a CUDA graph's input buffers (docs/CONTRACTS.md): one
launch for what five copies and two fills did, on every step that replays a graph."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stage_kernel(ids, positions, slots, tables, lens, src_ids, src_positions, src_slots, src_tables,
                  src_lens, rows, width, dst_stride, src_stride, BLOCK_W: tl.constexpr):
    """Program r: row r of each buffer, the source's below `rows`, padding at and past it."""
    r = tl.program_id(0)
    live = r < rows
    tl.store(ids + r, tl.load(src_ids + r, mask=live), mask=live)   # padding rows: left as they are
    tl.store(positions + r, tl.load(src_positions + r, mask=live), mask=live)
    tl.store(slots + r, tl.load(src_slots + r, mask=live, other=-1))
    tl.store(lens + r, tl.load(src_lens + r, mask=live, other=1))
    if live:
        cols = tl.arange(0, BLOCK_W)
        for c0 in range(0, width, BLOCK_W):
            ok = c0 + cols < width
            entry = tl.load(src_tables + r.to(tl.int64) * src_stride + c0 + cols, mask=ok)
            tl.store(tables + r.to(tl.int64) * dst_stride + c0 + cols, entry, mask=ok)


def stage_decode_inputs(dst: tuple, src: tuple) -> None:
    """dst and src: (input_ids, positions, slot_mapping, block_tables, context_lens); see
    kernels.stage_decode_inputs_ref."""
    ids, positions, slots, tables, lens = dst
    s_ids, s_positions, s_slots, s_tables, s_lens = src
    rows, width = s_tables.shape
    size = ids.shape[0]
    assert rows <= size and width <= tables.shape[1] and tables.stride(1) == s_tables.stride(1) == 1
    _stage_kernel[(size,)](ids, positions, slots, tables, lens, s_ids, s_positions, s_slots, s_tables, s_lens,
                           rows, width, tables.stride(0), s_tables.stride(0),
                           BLOCK_W=min(1024, triton.next_power_of_2(max(width, 16))), num_warps=1)
