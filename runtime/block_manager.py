"""BlockManager: the fixed pool of KV blocks, per-sequence block tables, ref counts, prefix cache.

A full block whose K/V are computed gets a chained hash, hash((parent hash, its token ids)), so a
hit means the whole prefix up to and including that block matches (the tokens are checked too, a
hash collision must never serve wrong K/V). Freed blocks with a hash stay in the cache and are reused
on a hit until the LRU free list hands them out for new data.

With a swap pool (num_swap_blocks > 0) a preempted sequence's computed blocks can wait in CPU
blocks instead: `swap_out` trades its device blocks for CPU blocks, `swap_in` the reverse; the
runner does the copies (runtime/swap.py).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence
from .swap import SwapAllocator


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None    # what `hash` covers, to verify hits


def chained_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_swap_blocks: int = 0):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: first out = least recently freed (uncached ones go first).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}       # hash -> block_id
        self.prefix_queries = 0                # tokens looked up
        self.prefix_hits = 0                   # tokens found
        self.swap = SwapAllocator(num_swap_blocks)
        self.swapped: dict[Sequence, list[int]] = {}   # swapped-out sequence -> its CPU blocks, in order

    # ---- pool state -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq.token_ids. The last token is never covered:
        it must be computed so that logits exist (and a shared block is never written)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        found, parent = [], None
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = chained_hash(parent, tokens)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
        return found

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_queried_tokens
        self.prefix_hits += num_hit_tokens

    def num_free_taken_by(self, block_ids: list[int]) -> int:
        """How many of these (cached) blocks sit in the free list, i.e. cost a free block to reuse."""
        return sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    # ---- allocation -------------------------------------------------------------------------
    def can_admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        total = len(cached) * self.block_size + num_new_tokens
        needed = self.blocks_for(total) - len(cached) + self.num_free_taken_by(cached)
        return needed <= self.num_free_blocks

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give a waiting sequence its cached prefix blocks; it then computes from there."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        parent = None
        for block_id in cached:
            self._take(block_id)
            seq.block_table.append(block_id)
            parent = self.blocks[block_id].hash
            seq.block_hashes.append(parent)
        seq.num_computed_tokens = len(cached) * self.block_size

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """n > 1: the child shares the parent's full prompt blocks (the partial last one it recomputes,
        so siblings never write into a shared block)."""
        assert not child.block_table and child.num_computed_tokens == 0
        shared = (child.num_prompt_tokens - 1) // self.block_size
        assert parent.num_computed_tokens >= shared * self.block_size, "forking blocks not yet computed"
        for block_id in parent.block_table[:shared]:
            self._take(block_id)
            child.block_table.append(block_id)
        child.block_hashes = parent.block_hashes[:shared]
        child.num_computed_tokens = shared * self.block_size

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._missing_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make seq.block_table cover the tokens this step computes."""
        for _ in range(self._missing_blocks(seq, num_new_tokens)):
            seq.block_table.append(self._allocate_fresh())

    def _missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def commit(self, seq: Sequence) -> None:
        """After a step: hash the blocks that just became full and computed, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = chained_hash(parent, tokens)
            seq.block_hashes.append(h)
            self._register(seq.block_table[i], h, tokens)

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks, device and swapped (finish, abort or preemption by recompute)."""
        cpu_blocks = self.swapped.pop(seq, None)
        if cpu_blocks is not None:
            self.swap.release(cpu_blocks)
        self._release(seq)
        seq.num_computed_tokens = 0

    # ---- swap to the CPU pool ---------------------------------------------------------------
    # Shared blocks (prefix-cache hits, n > 1 siblings) are copied out like private ones and only
    # seq's reference is dropped; swap-in gives seq fresh private blocks for all of them. Costlier
    # than re-sharing, but it never has to ask whether a shared block survived meanwhile.
    def is_swapped(self, seq: Sequence) -> bool:
        return seq in self.swapped

    @property
    def num_swapped_blocks(self) -> int:
        return self.swap.num_blocks - self.swap.num_free_blocks

    def can_swap_out(self, seq: Sequence) -> bool:
        return 0 < self.blocks_for(seq.num_computed_tokens) <= self.swap.num_free_blocks

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Trade seq's computed blocks for CPU blocks; seq keeps num_computed_tokens. Returns the
        (device block, CPU block) copies, to be done before the freed device blocks are written."""
        assert not self.is_swapped(seq)
        device_blocks = seq.block_table[:self.blocks_for(seq.num_computed_tokens)]
        cpu_blocks = self.swap.allocate(len(device_blocks))
        self.swapped[seq] = cpu_blocks
        self._release(seq)       # the next commit re-hashes the swapped-in copies
        return list(zip(device_blocks, cpu_blocks))

    def can_swap_in(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Room for all of seq's swapped blocks plus the blocks of its next tokens."""
        return self.blocks_for(seq.num_computed_tokens + num_new_tokens) <= self.num_free_blocks

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Give seq fresh device blocks for its swapped ones; returns the (CPU block, device block)
        copies, to be done before seq's next tokens are computed."""
        assert not seq.block_table
        cpu_blocks = self.swapped.pop(seq)
        seq.block_table = [self._allocate_fresh() for _ in cpu_blocks]
        self.swap.release(cpu_blocks)
        return list(zip(cpu_blocks, seq.block_table))

    # ---- internals --------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        """Drop seq's references to its device blocks. Reversed, so the tail of a prefix is evicted
        before its head."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:               # nothing worth keeping: reuse it first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _allocate_fresh(self) -> int:
        assert self.free, "no free KV block: the scheduler must check before allocating"
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash is not None:                   # evict its cached content
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def _register(self, block_id: int, h: int, tokens: tuple[int, ...]) -> None:
        block = self.blocks[block_id]
        if block.hash == h:                          # a shared prefix block, already registered
            return
        assert block.hash is None, "a block's content changed while it was cached"
        block.hash, block.token_ids = h, tokens
        # If another block already holds this prefix (two requests computed it at once), keep that
        # one in the index; this block is still correct for its owner and is recycled when freed.
        self.cached.setdefault(h, block_id)

    def check_all_free(self) -> None:
        """Invariant for tests: once every request has finished, no block is held."""
        held = [b.block_id for b in self.blocks if b.ref_count != 0]
        assert not held, f"blocks still held after all requests finished: {held[:10]}"
        assert len(self.free) == self.num_blocks, "free list lost blocks"
        assert not self.swapped, f"{len(self.swapped)} sequences still swapped out"
        self.swap.check_all_free()
