"""CPU swap pool: host memory that a preempted sequence's KV blocks wait in instead of being recomputed.

Two halves, as for the device pool: `SwapAllocator` is the bookkeeping the block manager uses (which
CPU block ids are free), and `allocate_swap_pool` / `copy_blocks` are the tensors and the copies the
runner does, in the pool layout [K/V, layer, block, slot, kv head, head dim].
"""
from __future__ import annotations

import torch

BLOCK_DIM = 2                    # the block axis of a pool tensor
COPY_CHUNK_BYTES = 64 << 20      # gather at most this much at once: the staging copy needs free memory


class SwapAllocator:
    """Free CPU block ids of a pool of `num_blocks`. No prefix cache here: a swapped block belongs to
    exactly one sequence, so a plain free list is enough."""

    def __init__(self, num_blocks: int):
        assert num_blocks >= 0
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))    # pop() hands out the low ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free), "no free swap block: the scheduler must check before swapping out"
        return [self.free.pop() for _ in range(n)]

    def release(self, block_ids: list[int]) -> None:
        self.free.extend(reversed(block_ids))
        assert len(self.free) <= self.num_blocks, "swap block freed twice"

    def check_all_free(self) -> None:
        assert sorted(self.free) == list(range(self.num_blocks)), \
            f"swap blocks still held after all requests finished: {self.num_blocks - len(self.free)}"


def allocate_swap_pool(device_pool: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A host pool of `num_blocks` blocks shaped and typed as the device pool's blocks; pinned when
    the device pool is on CUDA, so copies from it can run asynchronously."""
    return host_pool(list(device_pool.shape), device_pool.dtype, num_blocks, device_pool.is_cuda)


def host_pool(pool_shape: list[int], dtype: torch.dtype, num_blocks: int, pinned: bool) -> torch.Tensor:
    """The same from the device pool's shape. Left uninitialized: a swap block is always written
    before it is read (and zeroing gigabytes costs start-up time)."""
    shape = list(pool_shape)
    shape[BLOCK_DIM] = num_blocks
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pinned)


@torch.inference_mode()
def copy_blocks(src_pool: torch.Tensor, dst_pool: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """dst_pool block d = src_pool block s for each (s, d): one gather and one scatter per K/V and
    chunk. Device work is queued on the current stream, so it is ordered with the model's reads and
    writes of the same blocks (a copy queued before a step's model run sees the previous step's
    writes and is done before this step's). Copies to the host wait for the device: the host pool
    is written by the host."""
    if not pairs:
        return
    block_bytes = src_pool[0].select(BLOCK_DIM - 1, 0).numel() * src_pool.element_size()
    step = max(1, COPY_CHUNK_BYTES // block_bytes)
    for start in range(0, len(pairs), step):
        chunk = pairs[start:start + step]
        src_ids = torch.tensor([s for s, _ in chunk], dtype=torch.long).to(src_pool.device)
        dst_ids = torch.tensor([d for _, d in chunk], dtype=torch.long).to(dst_pool.device)
        for kv in range(src_pool.shape[0]):
            blocks = _gather(src_pool[kv], src_ids)
            # non_blocking only towards CUDA: a non-blocking copy to the host returns before the
            # data is there, and the scatter below reads it at once.
            blocks = blocks.to(dst_pool.device, non_blocking=dst_pool.is_cuda)
            dst_pool[kv].index_copy_(BLOCK_DIM - 1, dst_ids, blocks)


def _gather(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The blocks `block_ids` of one K/V half [layer, block, ...]. From a pinned pool the result is
    pinned too, so the copy to the device is asynchronous (torch's pinned allocator keeps the buffer
    alive until that copy has run)."""
    dim = BLOCK_DIM - 1
    if not pool.is_pinned():
        return pool.index_select(dim, block_ids)
    shape = list(pool.shape)
    shape[dim] = len(block_ids)
    out = torch.empty(shape, dtype=pool.dtype, pin_memory=True)
    return torch.index_select(pool, dim, block_ids, out=out)
