"""BlockManager: pool accounting, chained-hash prefix cache, LRU reuse of freed cached blocks, forks."""
import pytest

from pagedeploy.runtime import block_manager as bm_module
from pagedeploy.runtime.block_manager import BlockManager
from pagedeploy.runtime.sampling_params import SamplingParams
from pagedeploy.runtime.sequence import Sequence

BS = 4


def make_seq(tokens, seq_id=0) -> Sequence:
    return Sequence(seq_id, list(tokens), len(tokens), SamplingParams())


def compute(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """What the engine does around one step: blocks for the new tokens, then commit."""
    n = len(seq.token_ids) - seq.num_computed_tokens if num_tokens is None else num_tokens
    assert bm.can_append(seq, n)
    bm.append_slots(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    cached = bm.find_cached_prefix(seq)
    bm.admit(seq, cached)
    return cached


def test_allocation_and_free_account_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(10))
    compute(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.usage() == pytest.approx(3 / 8)
    seq.append_token(99)
    seq.append_token(98)
    compute(bm, seq, 2)                    # 12 tokens: still 3 blocks
    assert len(seq.block_table) == 3
    seq.append_token(97)
    compute(bm, seq, 1)                    # the 13th token opens a 4th block
    assert len(seq.block_table) == 4
    bm.free_seq(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    bm.check_all_free()


def test_can_append_refuses_when_pool_is_short():
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(range(9))
    assert not bm.can_append(seq, 9)       # needs 3 blocks
    assert bm.can_append(seq, 8)


def test_prefix_hit_needs_the_whole_prefix_and_the_same_tokens():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(list(range(13)), 0)       # 3 full blocks + 1 token
    compute(bm, a)
    assert len(a.block_hashes) == 3
    same_start = make_seq(list(range(8)) + [50, 51, 52, 53, 54], 1)
    assert bm.find_cached_prefix(same_start) == a.block_table[:2]
    # Block 1 equal to a's block 1 but block 0 different: the chain breaks at block 0.
    other_head = make_seq([9, 9, 9, 9] + list(range(4, 13)), 2)
    assert bm.find_cached_prefix(other_head) == []


def test_hit_never_covers_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a)
    assert len(a.block_hashes) == 2
    b = make_seq(range(8), 1)              # exactly the same two full blocks
    cached = admit(bm, b)
    assert len(cached) == 1 and b.num_computed_tokens == 4   # the last block is recomputed
    assert bm.blocks[cached[0]].ref_count == 2


def test_hash_collision_is_caught_by_the_token_check(monkeypatch):
    monkeypatch.setattr(bm_module, "chained_hash", lambda parent, tokens: 7)
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(5))
    compute(bm, a)
    b = make_seq([40, 41, 42, 43, 44], 1)
    assert bm.find_cached_prefix(b) == []


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(9))                 # 2 full (cached) blocks + 1 partial
    compute(bm, a)
    full = a.block_table[:2]
    bm.free_seq(a)
    bm.check_all_free()
    b = make_seq(list(range(8)) + [77], 1)
    assert admit(bm, b) == full            # still cached after the free
    assert b.num_computed_tokens == 8
    compute(bm, b)
    bm.free_seq(b)
    # New unrelated data takes the uncached (partial) block first, then the oldest cached one.
    c = make_seq([100 + i for i in range(12)], 2)
    probe = make_seq(list(range(8)) + [1], 3)
    compute(bm, c, 4)
    compute(bm, c, 4)
    assert bm.find_cached_prefix(probe) == full
    compute(bm, c, 4)                      # the pool is full now: the LRU cached block goes
    assert bm.find_cached_prefix(probe) == full[:1]   # tail evicted first


def test_prefix_counters_count_tokens():
    bm = BlockManager(num_blocks=16, block_size=BS)
    bm.record_prefix_lookup(12, 8)
    assert (bm.prefix_queries, bm.prefix_hits) == (12, 8)


def test_fork_shares_full_prompt_blocks_and_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=BS)
    parent = make_seq(range(10))
    compute(bm, parent)
    child = make_seq(range(10), 1)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2]      # the partial block is not shared
    assert child.num_computed_tokens == 8
    assert all(bm.blocks[b].ref_count == 2 for b in child.block_table)
    compute(bm, child)                     # recomputes its own copy of the partial block
    assert child.block_table[2] != parent.block_table[2]
    bm.free_seq(parent)
    assert all(bm.blocks[b].ref_count == 1 for b in child.block_table)
    bm.free_seq(child)
    bm.check_all_free()


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    a = make_seq(range(9))
    compute(bm, a)
    assert bm.find_cached_prefix(make_seq(range(9), 1)) == []
    assert a.block_hashes == []


def test_double_free_is_an_internal_error():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(3))
    compute(bm, a)
    table = list(a.block_table)
    bm.free_seq(a)
    a.block_table = table
    with pytest.raises(AssertionError):
        bm.free_seq(a)


def test_leak_is_reported():
    bm = BlockManager(num_blocks=4, block_size=BS)
    compute(bm, make_seq(range(3)))
    with pytest.raises(AssertionError, match="still held"):
        bm.check_all_free()


# ---- swap to the CPU pool ----

def test_swap_out_copies_shared_blocks_too_and_drops_only_its_references():
    bm = BlockManager(num_blocks=16, block_size=BS, num_swap_blocks=8)
    a = make_seq(range(10))
    compute(bm, a)
    b = make_seq(list(range(8)) + [60, 61, 62], 1)
    assert admit(bm, b) == a.block_table[:2]                # 2 blocks shared with a (ref 2)
    compute(bm, b)
    b_table = list(b.block_table)
    pairs = bm.swap_out(b)
    assert pairs == list(zip(b_table, [0, 1, 2]))            # every computed block, shared ones too
    assert bm.is_swapped(b) and b.block_table == [] and b.num_computed_tokens == 11
    assert [bm.blocks[i].ref_count for i in b_table] == [1, 1, 0]
    assert bm.swap.num_free_blocks == 5 and bm.num_swapped_blocks == 3
    back = bm.swap_in(b)
    assert [cpu for cpu, _ in back] == [0, 1, 2] and [dev for _, dev in back] == b.block_table
    assert not set(b.block_table) & set(a.block_table)       # fresh private blocks
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table)
    assert not bm.is_swapped(b) and bm.swap.num_free_blocks == 8
    bm.free_seq(a)
    bm.free_seq(b)
    bm.check_all_free()


def test_swap_out_copies_only_computed_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS, num_swap_blocks=8)
    seq = make_seq(range(6))
    compute(bm, seq, 4)
    bm.append_slots(seq, 2)                # scheduled but not computed: its block is not copied
    assert len(seq.block_table) == 2
    assert len(bm.swap_out(seq)) == 1 and bm.num_free_blocks == 8


def test_can_swap_out_needs_room_for_all_computed_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS, num_swap_blocks=2)
    seq = make_seq(range(12))
    assert not bm.can_swap_out(seq)        # nothing computed: nothing to keep
    compute(bm, seq, 8)
    assert bm.can_swap_out(seq)
    compute(bm, seq, 1)                    # a 3rd block
    assert not bm.can_swap_out(seq)
    assert not BlockManager(num_blocks=8, block_size=BS).can_swap_out(seq)   # no swap pool


def test_can_swap_in_counts_the_swapped_blocks_and_the_next_tokens():
    bm = BlockManager(num_blocks=4, block_size=BS, num_swap_blocks=4)
    seq = make_seq(range(8))
    compute(bm, seq)
    seq.append_token(8)
    bm.swap_out(seq)
    other = make_seq([50] * 8, 1)
    compute(bm, other)                     # 2 of the 4 device blocks left
    assert bm.can_swap_in(seq, 0) and not bm.can_swap_in(seq, 1)
    bm.free_seq(other)
    assert bm.can_swap_in(seq, 1)


def test_swapped_in_blocks_are_hashed_again_by_the_next_commit():
    bm = BlockManager(num_blocks=3, block_size=BS, num_swap_blocks=4)
    seq = make_seq(range(9))
    compute(bm, seq)
    bm.swap_out(seq)
    filler = make_seq([70] * 12, 1)
    compute(bm, filler)                    # evicts seq's cached blocks from the device pool
    probe = make_seq(list(range(8)) + [5], 2)
    assert bm.find_cached_prefix(probe) == []
    bm.free_seq(filler)
    bm.swap_in(seq)
    seq.append_token(9)
    compute(bm, seq, 1)
    assert bm.find_cached_prefix(probe) == seq.block_table[:2]


def test_freeing_a_swapped_sequence_releases_its_cpu_blocks():
    bm = BlockManager(num_blocks=4, block_size=BS, num_swap_blocks=4)
    seq = make_seq(range(6))
    compute(bm, seq)
    bm.swap_out(seq)
    with pytest.raises(AssertionError, match="swapped out"):
        bm.check_all_free()
    bm.free_seq(seq)                       # abort while swapped out
    assert not bm.is_swapped(seq) and seq.num_computed_tokens == 0
    bm.check_all_free()
