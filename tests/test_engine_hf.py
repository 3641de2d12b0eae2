"""LLMEngine end to end against HF transformers `generate` (float32, greedy): the tokens must be
identical whatever the scheduler does — alone, all batched, chunked prefill, prefix-cache hits,
preemption by recompute — and the logprobs within 1e-3 of HF's.

Models: SmolLM2-135M-Instruct (real GGUF weights, HF's own GGUF load as the oracle), and tiny
dummy Qwen3 / Llama-3 models with the same config and state dict on both sides. The HF
reference and our ModelRunner are built once per model; each scheduling variant gets a fresh
engine (block manager + scheduler) over the same runner.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import hf_model_from_config, random_state_dict, tiny_config, write_hf_folder

from pagedeploy.launcher.model_spec import ModelSpec
from pagedeploy.runtime.config import EngineConfig
from pagedeploy.runtime.engine import LLMEngine
from pagedeploy.runtime.model_runner import ModelRunner
from pagedeploy.runtime.sampling_params import SamplingParams

NEW_TOKENS = 64
POOL_BLOCKS = 128          # the runner's pool; each variant's engine uses at most this many
LOGPROB_ATOL = 1e-3

CHAT = ["What is the capital of France?",
        "Write a short story about a robot who learns to paint, with a happy ending.",
        "Explain in detail how a bicycle works.",
        "hi",
        "List five prime numbers and explain for each one why it is prime, step by step."]


@dataclass
class Case:
    name: str
    config: EngineConfig
    runner: ModelRunner
    tokenizer: object
    prompts: list[list[int]]
    hf_tokens: list[list[int]]
    hf_logprobs: list[torch.Tensor]    # [NEW_TOKENS, vocab] log_softmax of HF's raw logits


@torch.inference_mode()
def hf_reference(hf, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy, one prompt at a time (no padding), never stopping early."""
    tokens, logprobs = [], []
    for p in prompts:
        ids = torch.tensor([p])
        # An explicit mask: without one HF treats prompt tokens equal to pad_token_id as padding.
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
        tokens.append(out.sequences[0, len(p):].tolist())
        logprobs.append(torch.log_softmax(torch.cat(out.logits).float(), dim=-1))
        assert len(tokens[-1]) == NEW_TOKENS
    return tokens, logprobs


def smollm2_case(path: str, hf, tokenizer) -> Case:
    from conftest import smollm2_engine_config
    config = smollm2_engine_config(path, num_blocks=POOL_BLOCKS, block_size=16, max_model_len=1024)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)) for text in CHAT]
    return Case("smollm2", config, ModelRunner(config), tokenizer, prompts, *hf_reference(hf, prompts))


def dummy_case(kind: str, folder) -> Case:
    hf_config = tiny_config(kind)
    state = random_state_dict(hf_config, seed=3)
    write_hf_folder(folder, hf_config, state)
    spec = ModelSpec.from_config(hf_config, source="folder", path=str(folder))
    config = EngineConfig(spec=spec, num_blocks=POOL_BLOCKS, block_size=4, max_model_len=256)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, hf_config["vocab_size"], (n,), generator=g).tolist() for n in (5, 23, 40, 1, 17)]
    hf = hf_model_from_config(hf_config, state)
    return Case(kind, config, ModelRunner(config), None, prompts, *hf_reference(hf, prompts))


@pytest.fixture(scope="module", params=["smollm2", "qwen3", "llama3"])
def case(request, tmp_path_factory) -> Case:
    if request.param == "smollm2":
        return smollm2_case(request.getfixturevalue("smollm2_gguf_path"),
                            request.getfixturevalue("hf_smollm2"),
                            request.getfixturevalue("smollm2_tokenizer"))
    return dummy_case(request.param, tmp_path_factory.mktemp(request.param))


def make_engine(case: Case, **overrides) -> LLMEngine:
    import dataclasses
    config = dataclasses.replace(case.config, **overrides)
    assert config.num_blocks <= POOL_BLOCKS
    return LLMEngine(config, runner=case.runner, tokenizer=case.tokenizer)


def generate(engine: LLMEngine, prompts: list[list[int]], logprobs: int | None = None,
             max_tokens: int = NEW_TOKENS) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    engine.block_manager.check_all_free()
    outputs = [finals[str(i)] for i in range(len(prompts))]
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return outputs


def assert_same_tokens(case: Case, outputs) -> None:
    for i, out in enumerate(outputs):
        ours = out.outputs[0].token_ids
        assert ours == case.hf_tokens[i][:len(ours)], f"{case.name} prompt {i} differs from HF"


def pool_for(case: Case, fraction: float) -> int:
    """A pool too small for all prompts at once (forces preemption), big enough for any one."""
    longest = max(len(p) for p in case.prompts) + NEW_TOKENS
    per_seq = -(-longest // case.config.block_size)
    return max(per_seq + 1, int(per_seq * len(case.prompts) * fraction))


@pytest.mark.slow
def test_alone_matches_hf(case):
    assert_same_tokens(case, generate(make_engine(case, max_num_seqs=1), case.prompts))


@pytest.mark.slow
def test_batched_with_logprobs_then_prefix_cache_hit_match_hf(case):
    engine = make_engine(case)
    outputs = generate(engine, case.prompts, logprobs=3)
    assert_same_tokens(case, outputs)
    assert_logprobs_match(case, outputs)
    if case.tokenizer is not None:                       # incremental text == one-shot decode
        for out in outputs:
            assert out.outputs[0].text == case.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    # The prompts' full blocks are cached now; 16 tokens show the hit computes the same thing.
    again = generate(engine, case.prompts, max_tokens=16)
    assert_same_tokens(case, again)
    assert sum(o.num_cached_tokens for o in again) > 0
    assert engine.stats().prefix_hits > 0


def assert_logprobs_match(case: Case, outputs) -> None:
    """Chosen token and top-3 alternatives within 1e-3 of HF's log_softmax(logits)."""
    for out, hf_tokens, hf_lp in zip(outputs, case.hf_tokens, case.hf_logprobs):
        lps = out.outputs[0].logprobs
        assert len(lps) == NEW_TOKENS
        for step, lp in enumerate(lps):
            assert lp.token_id == hf_tokens[step] == lp.top[0][0]
            assert abs(lp.logprob - float(hf_lp[step, lp.token_id])) < LOGPROB_ATOL
            for token_id, value in lp.top:
                assert abs(value - float(hf_lp[step, token_id])) < LOGPROB_ATOL


@pytest.mark.slow
def test_chunked_prefill_matches_hf(case):
    engine = make_engine(case, max_num_batched_tokens=32)
    assert_same_tokens(case, generate(engine, case.prompts))


@pytest.mark.slow
def test_preemption_matches_hf(case):
    engine = make_engine(case, num_blocks=pool_for(case, 0.5))
    assert_same_tokens(case, generate(engine, case.prompts))
    assert engine.stats().preemptions > 0


@pytest.mark.slow
def test_async_scheduling_matches_hf(case):
    """Tokens read one step late (the CUDA default): the runner copies the pending input ids on
    the device. Chunked prefill, preemption and logprobs together."""
    engine = make_engine(case, async_scheduling=True, max_num_batched_tokens=32,
                         num_blocks=pool_for(case, 0.5))
    outputs = generate(engine, case.prompts, logprobs=3)
    assert_same_tokens(case, outputs)
    assert_logprobs_match(case, outputs)
    assert engine.stats().preemptions > 0
