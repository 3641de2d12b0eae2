"""swap_space: preempted sequences wait in the CPU swap pool and resume without recompute.

The tokens must be those of a run without any preemption (the cacheless reference on the fake paged
model, HF transformers on real weights), the swaps must really happen (counters, and the tokens the
model computed: none twice), a too-small swap pool falls back to recompute, and neither pool leaks.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import hf_model_from_config, random_state_dict, tiny_config, write_hf_folder
from paged_fakes import ByteTokenizer, FakePagedRunner, fake_config, reference_greedy, run_to_completion

from pagedeploy.launcher.model_spec import ModelSpec
from pagedeploy.runtime import swap as swap_module
from pagedeploy.runtime.config import EngineConfig
from pagedeploy.runtime.engine import LLMEngine
from pagedeploy.runtime.sampling_params import SamplingParams
from pagedeploy.runtime.swap import SwapAllocator, allocate_swap_pool, copy_blocks

MAX_TOKENS = 24
NO_EOS = -30.0


class SwapFakeRunner(FakePagedRunner):
    """The fake paged model with a pool in the real layout [K/V, layer, block, slot] (token ids as
    "K", positions as "V"), moved by runtime/swap.py's copy_blocks. After each copy the blocks no one
    may read any more are poisoned, so a missing or misdirected copy changes the output: device
    blocks a swap-out released that hold no cached prefix, and CPU blocks a swap-in released."""

    def __init__(self, config: EngineConfig, eos_bias: float):
        super().__init__(config, eos_bias)
        self.pool = torch.full((2, 1, config.num_blocks, config.block_size), -1, dtype=torch.long)
        self.cache_tokens = self.pool[0, 0].view(-1)     # the fake's slot views of the same pool
        self.cache_pos = self.pool[1, 0].view(-1)
        self.swap_pool = allocate_swap_pool(self.pool, config.num_swap_blocks).fill_(-1)
        self.block_manager = None                         # set by swap_engine
        self.poisoned = 0

    def swap(self, swap_out, swap_in) -> None:
        copy_blocks(self.pool, self.swap_pool, swap_out)
        copy_blocks(self.swap_pool, self.pool, swap_in)
        blocks = self.block_manager.blocks
        for device_block, _ in swap_out:
            if blocks[device_block].ref_count == 0 and blocks[device_block].hash is None:
                self.pool[:, :, device_block] = -7
                self.poisoned += 1
        for cpu_block, _ in swap_in:
            self.swap_pool[:, :, cpu_block] = -7


def swap_engine(num_swap_blocks: int, **overrides) -> LLMEngine:
    config = fake_config(num_swap_blocks=num_swap_blocks, **overrides)
    runner = SwapFakeRunner(config, NO_EOS)
    engine = LLMEngine(config, runner=runner, tokenizer=ByteTokenizer())
    runner.block_manager = engine.block_manager
    return engine


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randint(0, 255) for _ in range(rnd.randint(lo, hi))] for _ in range(n)]


def run_greedy(engine: LLMEngine, batch: list[list[int]]) -> list[list[int]]:
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    finals = run_to_completion(engine)
    engine.block_manager.check_all_free()
    return [finals[str(i)].outputs[0].token_ids for i in range(len(batch))]


TIGHT = dict(num_blocks=16, max_num_batched_tokens=16)     # 10 prompts of up to 40 + 24 tokens


@pytest.mark.parametrize("prefix", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_swap_gives_the_same_tokens_and_computes_each_token_once(prefix, async_scheduling):
    batch = prompts(10)
    engine = swap_engine(256, enable_prefix_caching=prefix, async_scheduling=async_scheduling, **TIGHT)
    got = run_greedy(engine, batch)
    assert got == [reference_greedy(p, MAX_TOKENS, NO_EOS) for p in batch]
    stats = engine.stats()
    assert stats.swap_outs > 0 and stats.swap_ins == stats.swap_outs
    assert stats.preemptions == stats.swap_outs                 # none recomputed
    assert stats.num_swapped == stats.num_swapped_blocks == 0 and stats.num_swap_blocks == 256
    # Every prompt token and every generated token but the last is computed exactly once.
    assert engine.runner.num_tokens == sum(len(p) + MAX_TOKENS - 1 for p in batch)
    if not prefix:
        assert engine.runner.poisoned > 0


def test_small_swap_pool_falls_back_to_recompute():
    batch = prompts(10)
    engine = swap_engine(4, enable_prefix_caching=False, **TIGHT)   # room for one short sequence
    assert run_greedy(engine, batch) == [reference_greedy(p, MAX_TOKENS, NO_EOS) for p in batch]
    stats = engine.stats()
    assert 0 < stats.swap_outs < stats.preemptions                # some swapped, some recomputed
    assert engine.runner.num_tokens > sum(len(p) + MAX_TOKENS - 1 for p in batch)


def test_seeded_sampling_resumes_identically_after_a_swap():
    def run(**overrides) -> tuple[list[list[int]], int]:
        engine = swap_engine(256, **overrides)
        for i, p in enumerate(prompts(6, seed=5)):
            engine.add_request(str(i), p, SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS))
        finals = run_to_completion(engine)
        engine.block_manager.check_all_free()
        return [finals[str(i)].outputs[0].token_ids for i in range(6)], engine.stats().swap_outs
    roomy, none = run(num_blocks=128)
    tight, swaps = run(**TIGHT)
    assert none == 0 and swaps > 0 and tight == roomy


def test_no_leak_in_either_pool_after_a_mixed_run_with_aborts():
    engine = swap_engine(24, num_blocks=24, max_num_batched_tokens=16)
    rnd = random.Random(1)
    for i, p in enumerate(prompts(16, seed=1)):
        params = SamplingParams(temperature=rnd.choice([0.0, 0.8]), max_tokens=rnd.randint(1, 40),
                                n=rnd.choice([1, 1, 2]), stop=["ab"] if i % 3 == 0 else [])
        engine.add_request(f"r{i}", p, params)
    bm = engine.block_manager
    aborted_swapped = 0
    for step in range(10_000):
        if not engine.has_unfinished():
            break
        engine.step()
        swapped = {seq.request_id for seq in bm.swapped}
        if step % 7 == 3 and swapped:      # abort one swapped-out request, and one other
            rid = sorted(swapped)[0]
            others = [r for r in engine.requests if r not in swapped]
            for r in [rid] + others[:1]:
                assert engine.abort(r).finished
            aborted_swapped += 1
    assert not engine.has_unfinished() and aborted_swapped > 0
    assert engine.stats().swap_ins > 0
    bm.check_all_free()


# ---- the pool and the copies ----

def test_copy_blocks_matches_a_per_block_copy(monkeypatch):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 3, 10, 4, 2, 8, generator=g)       # [K/V, layer, block, slot, kv head, dim]
    dst = torch.randn(2, 3, 6, 4, 2, 8, generator=g)
    pairs = [(7, 0), (2, 5), (9, 3), (0, 1)]
    expected = dst.clone()
    for s, d in pairs:
        expected[:, :, d] = src[:, :, s]
    monkeypatch.setattr(swap_module, "COPY_CHUNK_BYTES", 3 * 4 * 2 * 8 * 4 * 3)   # 3 blocks a chunk
    copy_blocks(src, dst, pairs)
    assert torch.equal(dst, expected)
    copy_blocks(src, dst, [])
    assert torch.equal(dst, expected)


def test_swap_pool_has_the_device_blocks_shape_and_dtype():
    device_pool = torch.zeros(2, 3, 10, 4, 2, 8, dtype=torch.bfloat16)
    pool = allocate_swap_pool(device_pool, 7)
    assert pool.shape == (2, 3, 7, 4, 2, 8) and pool.dtype == torch.bfloat16 and pool.device.type == "cpu"
    assert not pool.is_pinned()           # pinned only for a CUDA device pool


def test_swap_allocator_accounts_every_block():
    alloc = SwapAllocator(4)
    a = alloc.allocate(3)
    assert a == [0, 1, 2] and alloc.num_free_blocks == 1
    with pytest.raises(AssertionError, match="still held"):
        alloc.check_all_free()
    alloc.release(a)
    alloc.check_all_free()
    with pytest.raises(AssertionError):
        alloc.allocate(5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_copy_blocks_between_cuda_and_pinned_host():
    g = torch.Generator().manual_seed(1)
    device_pool = torch.randn(2, 3, 10, 4, 2, 8, generator=g).to(torch.bfloat16).cuda()
    host = allocate_swap_pool(device_pool, 6)
    assert host.is_pinned()
    copy_blocks(device_pool, host, [(7, 0), (2, 5), (9, 3)])
    before = device_pool.clone()
    device_pool[:, :, [1, 4, 8]] = 0                       # what the model would write meanwhile
    copy_blocks(host, device_pool, [(0, 1), (5, 4), (3, 8)])
    for s, d in [(7, 1), (2, 4), (9, 8)]:
        assert torch.equal(device_pool[:, :, d], before[:, :, s])


# ---- real models: tokens identical to HF with swaps forced ----

NEW_TOKENS = 32


@dataclasses.dataclass
class RealCase:
    config: EngineConfig
    runner: object
    tokenizer: object
    prompts: list[list[int]]
    hf_tokens: list[list[int]]


@torch.inference_mode()
def hf_greedy(hf, prompts: list[list[int]]) -> list[list[int]]:
    """One prompt at a time; the explicit mask matters: without it generate masks every token
    equal to pad_token_id out of the prompt."""
    return [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def qwen3_case(folder) -> RealCase:
    from pagedeploy.runtime.model_runner import ModelRunner
    hf_config = tiny_config("qwen3")
    state = random_state_dict(hf_config, seed=5)
    write_hf_folder(folder, hf_config, state)
    spec = ModelSpec.from_config(hf_config, source="folder", path=str(folder))
    config = EngineConfig(spec=spec, num_blocks=64, block_size=4, max_model_len=256, num_swap_blocks=128)
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, hf_config["vocab_size"], (n,), generator=g).tolist() for n in (5, 23, 40, 1, 17)]
    hf = hf_model_from_config(hf_config, state)
    return RealCase(config, ModelRunner(config), None, prompts, hf_greedy(hf, prompts))


def smollm2_case(path: str, hf, tokenizer) -> RealCase:
    from conftest import smollm2_engine_config

    from pagedeploy.runtime.model_runner import ModelRunner
    config = smollm2_engine_config(path, num_blocks=64, block_size=16, max_model_len=1024, num_swap_blocks=64)
    texts = ["What is the capital of France?", "Explain in detail how a bicycle works.", "hi"]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)) for t in texts]
    return RealCase(config, ModelRunner(config), tokenizer, prompts, hf_greedy(hf, prompts))


@pytest.fixture(scope="module", params=["qwen3", pytest.param("smollm2", marks=pytest.mark.slow)])
def real_case(request, tmp_path_factory) -> RealCase:
    if request.param == "smollm2":
        return smollm2_case(request.getfixturevalue("smollm2_gguf_path"), request.getfixturevalue("hf_smollm2"),
                            request.getfixturevalue("smollm2_tokenizer"))
    return qwen3_case(tmp_path_factory.mktemp("qwen3"))


def generate_real(case: RealCase, **overrides) -> LLMEngine:
    config = dataclasses.replace(case.config, **overrides)
    engine = LLMEngine(config, runner=case.runner, tokenizer=case.tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(case.prompts):
        engine.add_request(str(i), p, params)
    finals = run_to_completion(engine)
    engine.block_manager.check_all_free()
    for i in range(len(case.prompts)):
        assert finals[str(i)].outputs[0].token_ids == case.hf_tokens[i], f"prompt {i} differs from HF"
    return engine


def tight_pool(case: RealCase) -> int:
    """Too small for all prompts at once, big enough for the longest alone."""
    longest = max(len(p) for p in case.prompts) + NEW_TOKENS
    per_seq = -(-longest // case.config.block_size)
    return max(per_seq + 1, per_seq * len(case.prompts) // 2)


def test_real_model_swaps_and_matches_hf(real_case):
    engine = generate_real(real_case, num_blocks=tight_pool(real_case))
    stats = engine.stats()
    assert stats.swap_outs > 0 and stats.preemptions == stats.swap_outs == stats.swap_ins


def test_real_model_recompute_fallback_matches_hf(real_case):
    engine = generate_real(real_case, num_blocks=tight_pool(real_case), num_swap_blocks=3,
                           enable_prefix_caching=False)
    stats = engine.stats()
    assert stats.preemptions > stats.swap_outs
