"""Scheduler: continuous batching with chunked prefill, prefix-cache hits, preemption by swap or recompute.

Every step first gives each running sequence its next tokens (one for a decode, a chunk for a
prefill in progress), oldest first, then admits waiting sequences while the token budget
(max_num_batched_tokens), max_num_seqs and the free blocks allow. When a running sequence needs a
block and none is free, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the waiting queue. When the CPU swap pool has room for its computed blocks it
is swapped out: the blocks are copied to the CPU, and when the front of the queue can have device
blocks for all of them plus its next tokens, they are copied back and it goes on where it stopped.
Otherwise it recomputes prompt + generated tokens later (its full blocks usually are still in the
prefix cache then, so the recompute is cheap).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class BatchItem:
    seq: Sequence
    num_new_tokens: int
    need_logits: bool


@dataclass
class ScheduledBatch:
    items: list[BatchItem] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Block copies the runner does before this step's model run, as (source, destination) pairs:
    # swap_out (device block, CPU block), then swap_in (CPU block, device block). A step that
    # preempts admits nothing, so it never has both.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        assert max_num_seqs > 0 and max_num_batched_tokens > 0
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # in admission order: the newest is preempted first
        self.preemptions = 0                   # swap-outs included
        self.swap_outs = 0
        self.swap_ins = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:      # blocks are short: admitting more would only thrash
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        bm, items = self.block_manager, batch.items
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = seq.num_tokens
            if num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens:
                i += 1           # its last token is still on the device; it finishes once read
                continue
            num_new = min(num_tokens - seq.num_computed_tokens, budget)
            assert num_new > 0, "a running sequence must have a token to compute"
            if not bm.can_append(seq, num_new) and not self._make_room(seq, num_new, i, batch):
                break                # seq itself was preempted: it was the newest left
            bm.append_slots(seq, num_new)
            items.append(BatchItem(seq, num_new, seq.num_computed_tokens + num_new == num_tokens))
            budget -= num_new
            i += 1
        return budget

    def _make_room(self, seq: Sequence, num_new: int, index: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running sequences until seq (at `index`) fits; False if seq went too.
        Victims come from the end, after seq: none of them is in this batch yet."""
        while not self.block_manager.can_append(seq, num_new):
            assert len(self.running) - 1 >= index, "preempting a sequence already in this batch"
            victim = self.running[-1]
            self.preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._ready_to_admit(seq):
                break                # keep arrival order: a held-back sibling blocks the queue
            if self.block_manager.is_swapped(seq):
                num_new = self._swap_in(seq, budget, batch)
            else:
                num_new = self._admit(seq, budget)
            if num_new == 0:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.items.append(self._item(seq, num_new))
            budget -= num_new

    def _ready_to_admit(self, seq: Sequence) -> bool:
        """n > 1 siblings wait until the first sibling's full prompt blocks are computed, to share them.
        A swapped-out sequence waits until its last sampled token is known: the async engine feeds
        a token still on the device only to a sequence of the step that sampled it."""
        if self.block_manager.is_swapped(seq):
            return seq.num_pending == 0
        parent = seq.fork_parent
        if parent is None or parent.status != SequenceStatus.RUNNING:
            return True          # finished or preempted: seq goes alone (the prefix cache may still help)
        return parent.num_computed_tokens >= self._num_shared_blocks(seq) * self.block_manager.block_size

    def _num_shared_blocks(self, seq: Sequence) -> int:
        return (seq.num_prompt_tokens - 1) // self.block_manager.block_size

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give seq its shared/cached prefix and blocks for its first chunk; 0 if it does not fit."""
        bm = self.block_manager
        parent = seq.fork_parent
        if parent is not None and parent.status == SequenceStatus.RUNNING:
            cached: list[int] = []
            reuse = parent.block_table[:self._num_shared_blocks(seq)]
        else:
            cached = bm.find_cached_prefix(seq)
            reuse = cached
        num_new = min(seq.num_tokens - len(reuse) * bm.block_size, budget)
        if not bm.can_admit(seq, reuse, num_new):
            return 0
        if reuse is cached:
            bm.record_prefix_lookup(len(seq.token_ids) - 1, len(cached) * bm.block_size)
            bm.admit(seq, cached)
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
        else:
            bm.fork(parent, seq)
        bm.append_slots(seq, num_new)
        return num_new

    def _swap_in(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> int:
        """Bring a swapped-out seq back with blocks for its next chunk; 0 if they do not all fit."""
        bm = self.block_manager
        num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
        assert num_new > 0, "a swapped-out sequence must have a token to compute"
        if not bm.can_swap_in(seq, num_new):
            return 0
        batch.swap_in += bm.swap_in(seq)
        bm.append_slots(seq, num_new)
        self.swap_ins += 1
        return num_new

    @staticmethod
    def _item(seq: Sequence, num_new: int) -> BatchItem:
        return BatchItem(seq, num_new, seq.num_computed_tokens + num_new == seq.num_tokens)

    # ---- state changes from the engine --------------------------------------------------------
    def preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Free seq's device blocks and put it in front of the waiting queue: swapped out (it keeps
        num_computed_tokens, even with a token pending) when the swap pool has room, else to recompute."""
        self.running.remove(seq)
        if self.block_manager.can_swap_out(seq):
            batch.swap_out += self.block_manager.swap_out(seq)
            self.swap_outs += 1
        else:
            self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
        batch.preempted.append(seq)

    @property
    def num_swapped(self) -> int:
        return len(self.block_manager.swapped)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence, wherever it is."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED

