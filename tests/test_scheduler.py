"""Scheduler: token budget, chunked prefill batched with decodes, prefix hits, preemption order,
swap-out and swap-in."""
from pagedeploy.runtime.block_manager import BlockManager
from pagedeploy.runtime.sampling_params import SamplingParams
from pagedeploy.runtime.scheduler import Scheduler
from pagedeploy.runtime.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=32, prefix=True, swap=0) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, prefix, swap), max_num_seqs, budget)


def seq(seq_id: int, prompt_len: int, start: int = 0) -> Sequence:
    return Sequence(seq_id, list(range(start, start + prompt_len)), prompt_len, SamplingParams())


def run_step(sched: Scheduler, next_token: int = 5):
    """Schedule, then do what the engine does after the model ran: advance, commit, append."""
    batch = sched.schedule()
    for item in batch.items:
        item.seq.num_computed_tokens += item.num_new_tokens
        sched.block_manager.commit(item.seq)
        if item.need_logits:
            item.seq.append_token(next_token)
    return batch


def shape(batch) -> list[tuple[int, int, bool]]:
    return [(i.seq.seq_id, i.num_new_tokens, i.need_logits) for i in batch.items]


def test_long_prompt_is_chunked_and_only_the_last_chunk_samples():
    sched = make(budget=32)
    sched.add(seq(0, 100))
    chunks = [shape(run_step(sched)) for _ in range(4)]
    assert chunks == [[(0, 32, False)], [(0, 32, False)], [(0, 32, False)], [(0, 4, True)]]
    assert shape(run_step(sched)) == [(0, 1, True)]        # then it decodes


def test_decodes_go_first_and_a_prefill_chunk_fills_the_rest_of_the_budget():
    sched = make(budget=32)
    sched.add(seq(0, 10))
    run_step(sched)
    sched.add(seq(1, 50, start=1000))
    assert shape(run_step(sched)) == [(0, 1, True), (1, 31, False)]
    assert shape(run_step(sched)) == [(0, 1, True), (1, 19, True)]


def test_max_num_seqs_limits_the_running_batch():
    sched = make(max_num_seqs=2, budget=100)
    for i in range(3):
        sched.add(seq(i, 5, start=100 * i))
    assert [i.seq.seq_id for i in run_step(sched).items] == [0, 1]
    assert len(sched.waiting) == 1


def test_prefix_hit_skips_cached_tokens_but_computes_the_last_one():
    sched = make(budget=64)
    sched.add(seq(0, 12))
    run_step(sched)
    sched.add(seq(1, 12))                 # same prompt
    batch = run_step(sched)
    assert shape(batch) == [(0, 1, True), (1, 4, True)]   # 8 of 12 tokens cached (last block recomputed)
    assert sched.running[1].num_cached_tokens == 8
    assert sched.block_manager.prefix_hits == 8


def test_preemption_takes_the_newest_and_puts_it_in_front_of_waiting():
    sched = make(num_blocks=6, budget=64)
    a, b, c = seq(0, 8), seq(1, 8, 100), seq(2, 4, 200)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)                        # a: 2 blocks + b: 2 + c: 1; one block left
    assert sched.block_manager.num_free_blocks == 1
    batch = run_step(sched)                # a and b both need a 3rd block: c goes
    assert batch.preempted == [c]
    assert c.status == SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert sched.waiting[0] is c and sched.preemptions == 1
    assert shape(batch) == [(0, 1, True), (1, 1, True)]
    assert not any(i.seq is c for i in batch.items)       # no admission in a step that preempted


def test_preempted_sequence_recomputes_prompt_and_output():
    sched = make(num_blocks=3, budget=64, prefix=False)
    a, b = seq(0, 4), seq(1, 3, 100)
    sched.add(a)
    sched.add(b)
    run_step(sched)                        # a: 1 block, b: 1 block, each sampled a token
    run_step(sched)                        # a opens its 2nd block (the last free one)
    batch = run_step(sched)                # b needs a 2nd block: b (the newest) is preempted
    assert batch.preempted == [b] and b.num_output_tokens == 2
    while b.status != SequenceStatus.RUNNING:
        a.finish_reason = "length"
        sched.finish(a)
        batch = run_step(sched)
    assert shape(batch) == [(1, 5, True)]  # prompt + both generated tokens in one go


def test_finish_releases_blocks_from_any_queue():
    sched = make()
    a, b = seq(0, 6), seq(1, 6, 100)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    sched.finish(a)
    sched.finish(b)                        # still waiting
    assert not sched.has_unfinished()
    sched.block_manager.check_all_free()


def test_sibling_waits_for_the_first_prompt_then_shares_its_blocks():
    sched = make(budget=8)
    first, second = seq(0, 10), seq(1, 10)
    second.fork_parent = first
    sched.add(first)
    sched.add(second)
    assert shape(run_step(sched)) == [(0, 8, False)]      # the sibling waits for the full blocks
    assert shape(run_step(sched)) == [(0, 2, True), (1, 2, True)]
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]


# ---- preemption by swap ----

def three_in_a_pool_of_six(swap: int, prompt_c: int = 4):
    """a and b (2 blocks each) and c, all admitted and sampled once; then a and b need a 3rd block."""
    sched = make(num_blocks=6, budget=64, swap=swap)
    a, b, c = seq(0, 8), seq(1, 8, 100), seq(2, prompt_c, 200)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    return sched, a, b, c


def test_preemption_swaps_out_when_the_swap_pool_has_room():
    sched, a, b, c = three_in_a_pool_of_six(swap=8)
    c_blocks = list(c.block_table)
    batch = run_step(sched)
    assert batch.preempted == [c] and batch.swap_out == [(c_blocks[0], 0)] and batch.swap_in == []
    assert sched.block_manager.is_swapped(c) and c.block_table == [] and c.num_computed_tokens == 4
    assert c.status == SequenceStatus.WAITING and sched.waiting[0] is c
    assert (sched.preemptions, sched.swap_outs, sched.num_swapped) == (1, 1, 1)
    assert shape(batch) == [(0, 1, True), (1, 1, True)]
    a.finish_reason = "length"
    sched.finish(a)
    batch = run_step(sched)                # swapped back in: decodes its 5th token, no recompute
    assert shape(batch) == [(1, 1, True), (2, 1, True)]
    assert batch.swap_in == [(0, c.block_table[0])] and batch.swap_out == []
    assert sched.swap_ins == 1 and sched.num_swapped == 0 and sched.block_manager.swap.num_free_blocks == 8


def test_full_swap_pool_falls_back_to_recompute():
    sched, a, b, c = three_in_a_pool_of_six(swap=1, prompt_c=6)   # c holds 2 blocks, the pool 1
    batch = run_step(sched)
    assert batch.preempted == [c] and batch.swap_out == []
    assert not sched.block_manager.is_swapped(c) and c.num_computed_tokens == 0
    assert (sched.preemptions, sched.swap_outs) == (1, 0)


def test_swap_in_waits_for_room_for_all_blocks_and_the_next_token_and_keeps_queue_order():
    sched = make(num_blocks=7, budget=64, swap=8)
    a, b, c = seq(0, 8), seq(1, 4, 100), seq(2, 12, 200)   # 2 + 1 + 3 blocks
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    batch = run_step(sched)                # a takes the free block, b's 2nd block needs c to go
    assert batch.preempted == [c] and len(batch.swap_out) == 3
    assert sched.block_manager.num_free_blocks == 2
    d = seq(3, 2, 300)
    sched.add(d)
    batch = run_step(sched)                # c needs 4 blocks (12 computed + 1 new); d must not jump it
    assert batch.swap_in == [] and shape(batch) == [(0, 1, True), (1, 1, True)]
    assert list(sched.waiting) == [c, d]
    a.finish_reason = "length"
    sched.finish(a)
    batch = run_step(sched)
    assert [cpu for cpu, _ in batch.swap_in] == [0, 1, 2]
    assert shape(batch) == [(1, 1, True), (2, 1, True), (3, 2, True)]
    assert c.block_table[:3] == [dev for _, dev in batch.swap_in] and len(c.block_table) == 4


def test_a_swapped_sequence_with_a_pending_token_stays_out():
    sched, a, b, c = three_in_a_pool_of_six(swap=8)
    run_step(sched)
    a.finish_reason = b.finish_reason = "length"
    sched.finish(a)
    sched.finish(b)
    d = seq(3, 2, 300)
    sched.add(d)
    c.num_pending = 1                      # async engine: its last token is still on the device
    batch = run_step(sched)
    assert batch.items == [] and sched.waiting[0] is c and sched.waiting[1] is d
    c.num_pending = 0
    assert shape(run_step(sched)) == [(2, 1, True), (3, 2, True)]


def test_finishing_a_swapped_sequence_frees_its_cpu_blocks():
    sched, a, b, c = three_in_a_pool_of_six(swap=8)
    run_step(sched)
    assert sched.block_manager.is_swapped(c)
    for s in (a, b, c):                    # c is aborted while swapped out
        s.finish_reason = "abort"
        sched.finish(s)
    assert not sched.has_unfinished() and sched.num_swapped == 0
    sched.block_manager.check_all_free()
