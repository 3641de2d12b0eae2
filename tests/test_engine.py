"""LLMEngine on a fake paged model (tests/paged_fakes.py): scheduling must never change the tokens.

The end-to-end comparisons with HF transformers on real weights are in test_engine_hf.py.
"""
import random

import paged_fakes
import pytest
from paged_fakes import EOS_ID, fake_engine, reference_greedy, run_to_completion

from pagedeploy.runtime.engine import RequestError
from pagedeploy.runtime.sampling_params import SamplingParams


@pytest.fixture(autouse=True, params=["sync", "async"])
def scheduling(request, monkeypatch):
    """Every test twice: tokens read in the step that sampled them, and one step late."""
    monkeypatch.setattr(paged_fakes, "ASYNC_SCHEDULING", request.param == "async")
    return request.param


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randint(0, 255) for _ in range(rnd.randint(lo, hi))] for _ in range(n)]


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def run_greedy(engine, batch: list[list[int]], max_tokens: int = 24) -> list[list[int]]:
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, greedy(max_tokens))
    finals = run_to_completion(engine)
    engine.block_manager.check_all_free()
    return [finals[str(i)].outputs[0].token_ids for i in range(len(batch))]


@pytest.mark.parametrize("overrides", [
    dict(),                                              # everything batched together
    dict(max_num_batched_tokens=7),                      # chunked prefill, chunks batched with decodes
    dict(max_num_seqs=1),                                # one at a time
    dict(num_blocks=16, max_num_batched_tokens=16),      # tiny pool: preemption by recompute
    dict(enable_prefix_caching=False, num_blocks=16),
], ids=["batched", "chunked", "serial", "preempt", "preempt-no-prefix-cache"])
def test_greedy_matches_the_cacheless_reference(overrides):
    engine = fake_engine(**overrides)
    batch = prompts(10)
    got = run_greedy(engine, batch)
    assert got == [reference_greedy(p, 24) for p in batch]
    if "num_blocks" in overrides:
        assert engine.stats().preemptions > 0


def test_prefix_cache_hit_gives_the_same_tokens():
    engine = fake_engine()
    shared = prompts(1, seed=3, lo=30, hi=30)[0]
    first = run_greedy(engine, [shared + [1, 2]])
    engine.add_request("again", shared + [1, 2], greedy())
    engine.add_request("other-tail", shared + [9], greedy())
    finals = run_to_completion(engine)
    assert finals["again"].num_cached_tokens == 28                 # 7 full blocks of 4
    assert finals["again"].outputs[0].token_ids == first[0]
    assert finals["other-tail"].outputs[0].token_ids == reference_greedy(shared + [9], 24)
    stats = engine.stats()
    assert stats.prefix_hits >= 28 + 28 and stats.prefix_queries > stats.prefix_hits
    engine.block_manager.check_all_free()


def test_no_block_leak_after_a_mixed_run_with_aborts():
    engine = fake_engine(num_blocks=24, max_num_batched_tokens=16)
    rnd = random.Random(1)
    for i, p in enumerate(prompts(12, seed=1)):
        params = SamplingParams(temperature=rnd.choice([0.0, 0.8]), max_tokens=rnd.randint(1, 30),
                                n=rnd.choice([1, 1, 2]), stop=["ab"] if i % 3 == 0 else [])
        engine.add_request(f"r{i}", p, params)
    aborted = set()
    for step in range(10_000):
        if not engine.has_unfinished():
            break
        engine.step()
        if step in (2, 5, 9):                                      # abort running and waiting ones
            for rid in list(engine.requests)[:2]:
                out = engine.abort(rid)
                assert out.finished and all(o.finish_reason in ("abort", "stop", "length") for o in out.outputs)
                aborted.add(rid)
    assert aborted and engine.stats().num_running == 0
    engine.block_manager.check_all_free()
    assert engine.abort("r0") is None


def test_abort_frees_blocks_at_once():
    engine = fake_engine()
    engine.add_request("a", prompts(1, lo=30, hi=30)[0], greedy(100))
    engine.step()
    assert engine.stats().num_free_blocks < engine.stats().num_blocks
    engine.abort("a")
    engine.block_manager.check_all_free()
    assert not engine.has_unfinished() and engine.step() == []


def test_same_seed_same_text_alone_and_batched():
    def sample(with_others: bool) -> list[int]:
        engine = fake_engine(eos_bias=-30.0)
        params = SamplingParams(temperature=1.0, seed=7, max_tokens=20)
        if with_others:
            engine.add_request("x", [5, 6, 7], SamplingParams(temperature=1.0, max_tokens=20))
        engine.add_request("seeded", [1, 2, 3], params)
        if with_others:
            engine.add_request("y", [8, 9], SamplingParams(temperature=0.5, seed=8, max_tokens=20))
        return run_to_completion(engine)["seeded"].outputs[0].token_ids
    alone = sample(False)
    assert alone == sample(True)
    assert alone != reference_greedy([1, 2, 3], 20, -30.0)


def test_n2_shares_prompt_blocks_and_finishes_when_both_do():
    engine = fake_engine(eos_bias=-30.0)
    prompt = prompts(1, lo=18, hi=18)[0]
    engine.add_request("n2", prompt, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10))
    shared_seen = False
    finals = []
    while engine.has_unfinished():
        for out in engine.step():
            finals.append(out)
        a, b = engine.requests["n2"].seqs if "n2" in engine.requests else (None, None)
        if a is not None and a.block_table and b.block_table:
            assert a.block_table[:4] == b.block_table[:4]          # 16 of 18 prompt tokens
            assert all(engine.block_manager.blocks[i].ref_count == 2 for i in a.block_table[:4])
            shared_seen = True
    assert shared_seen
    last = finals[-1]
    assert last.finished and [o.index for o in last.outputs] == [0, 1]
    assert all(len(o.token_ids) == 10 and o.finish_reason == "length" for o in last.outputs)
    assert last.outputs[0].token_ids != last.outputs[1].token_ids
    assert not any(o.finished for o in finals[:-1])
    engine.block_manager.check_all_free()


def test_stream_deltas_add_up_to_the_final_output():
    engine = fake_engine(eos_bias=-30.0)
    engine.add_request("s", "Hi there", SamplingParams(temperature=0.0, max_tokens=30, logprobs=2))
    text, ids, lps = "", [], []
    while engine.has_unfinished():
        for out in engine.step():
            o = out.outputs[0]
            text += o.text_delta
            ids += o.token_ids_delta
            lps += o.logprobs_delta
    assert o.finish_reason == "length" and out.finished
    assert text == o.text and ids == o.token_ids and len(lps) == 30
    assert [lp.token_id for lp in lps] == ids
    assert out.prompt_token_ids == list(b"Hi there") and out.prompt == "Hi there"


def test_stop_string_is_not_returned_and_eos_stops():
    engine = fake_engine(eos_bias=-30.0)
    engine.add_request("a", [1, 2, 3], greedy(40))
    full = run_to_completion(engine)["a"].outputs[0].text
    stop = full[5:7]
    engine.add_request("b", [1, 2, 3], greedy(40, stop=[stop]))
    out = run_to_completion(engine)["b"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)]
    eos_engine = fake_engine(eos_bias=30.0)                       # EOS is always the argmax
    eos_engine.add_request("e", [1], greedy(10))
    out = run_to_completion(eos_engine)["e"].outputs[0]
    assert out.token_ids == [EOS_ID] and out.finish_reason == "stop" and out.text == ""
    eos_engine.add_request("i", [1], greedy(10, ignore_eos=True))
    out = run_to_completion(eos_engine)["i"].outputs[0]
    assert out.token_ids == [EOS_ID] * 10 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, params, param", [
    ([1] * 500, greedy(20), "max_tokens"),                         # 500 + 20 > max_model_len 512
    ([1] * 512, greedy(1), "prompt"),
    ([], greedy(), "prompt"),
    ([1, 999], greedy(), "prompt"),                                # outside the vocabulary
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(logprobs=50), "logprobs"),
    ([1], SamplingParams(n=0), "n"),
])
def test_bad_requests_are_rejected_at_admission(prompt, params, param):
    engine = fake_engine()
    with pytest.raises(RequestError) as err:
        engine.add_request("r", prompt, params)
    assert err.value.param == param and str(err.value).endswith(".")
    assert not engine.has_unfinished()


def test_request_larger_than_the_pool_is_rejected():
    engine = fake_engine(num_blocks=4)
    with pytest.raises(RequestError, match="KV blocks"):
        engine.add_request("r", [1] * 10, greedy(10))                 # 20 tokens > 4 blocks of 4


def test_max_tokens_none_runs_to_max_model_len():
    engine = fake_engine(eos_bias=-30.0, max_model_len=40)
    engine.add_request("r", [1] * 30, SamplingParams(temperature=0.0, max_tokens=None))
    out = run_to_completion(engine)["r"].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_stats_count_tokens():
    engine = fake_engine(eos_bias=-30.0)
    run_greedy(engine, [[1, 2, 3], [4, 5]], max_tokens=5)
    stats = engine.stats()
    assert stats.prompt_tokens_total == 5 and stats.generation_tokens_total == 10
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_usage == 0.0


def test_preempted_seeded_requests_resume_with_identical_samples():
    def run(**overrides) -> tuple[list[list[int]], int]:
        engine = fake_engine(eos_bias=-30.0, **overrides)
        for i, p in enumerate(prompts(6, seed=5)):
            engine.add_request(str(i), p, SamplingParams(temperature=1.0, seed=i, max_tokens=24))
        finals = run_to_completion(engine)
        engine.block_manager.check_all_free()
        return [finals[str(i)].outputs[0].token_ids for i in range(6)], engine.stats().preemptions
    roomy, none = run(num_blocks=128)
    tight, preemptions = run(num_blocks=16, max_num_batched_tokens=16)
    assert none == 0 and preemptions > 0 and tight == roomy


def test_async_scheduling_reads_tokens_one_step_late(scheduling):
    engine = fake_engine()
    engine.add_request("r", [5, 6, 7], greedy(max_tokens=3))
    counts = []
    while engine.has_unfinished():
        outs = engine.step()
        counts.append(sum(len(o.outputs[0].token_ids_delta) for o in outs))
    # sync: a token per step over 3 steps; async: nothing after the prefill, the last one read by
    # a step that has nothing left to run.
    assert counts == ([1, 1, 1] if scheduling == "sync" else [0, 1, 1, 1])
    assert engine.runner.num_calls == 3
    engine.block_manager.check_all_free()
