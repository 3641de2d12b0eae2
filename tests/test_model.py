"""Our decoder + ModelRunner against HF models built from the same config and state dict.

For each tiny family config (Qwen3 q/k norm, Llama-3 rope scaling, Qwen2 biases, Mistral sliding
window) the logits of every computed token must match HF's full-sequence forward (fp32, 1e-4),
whether prompts run as one prefill, in chunks batched with decodes, or on top of prefix blocks
already in the cache; and greedy tokens must equal HF's argmax.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (TINY_CONFIGS, BlockPool, FakeSeq, Item, hf_model_from_config,
                      random_state_dict, tiny_config, write_hf_folder)

from pagedeploy.launcher.model_spec import ModelSpec
from pagedeploy.runtime.config import EngineConfig
from pagedeploy.runtime.model import Linear, rope_cos_sin_cache
from pagedeploy.runtime.model_runner import ModelRunner

BS = 4
NUM_BLOCKS = 96
ATOL = 1e-4


def build_runner(folder, config: dict, dtype: str = "float32") -> ModelRunner:
    spec = ModelSpec.from_config(config, source="folder", path=str(folder))
    return ModelRunner(EngineConfig(spec=spec, num_blocks=NUM_BLOCKS, block_size=BS,
                                    dtype=dtype, max_model_len=256))


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    """(our runner, HF model, vocab size) sharing one random state dict."""
    config = tiny_config(request.param)
    state = random_state_dict(config, seed=1)
    folder = write_hf_folder(tmp_path_factory.mktemp(request.param), config, state)
    return build_runner(folder, config), hf_model_from_config(config, state), config


def prompts(vocab: int, lengths=(13, 29, 7), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([token_ids])).logits[0].float()


@torch.inference_mode()
def step_all_rows(runner: ModelRunner, items: list[Item]) -> list[torch.Tensor]:
    """Logits of every new token of every item (not only the sampled ones), then advance."""
    batch = runner.prepare(items)
    hidden = runner.model(batch.input_ids, batch.positions, batch.meta)
    logits = runner.model.compute_logits(hidden).float()
    for item in items:
        item.seq.num_computed_tokens += item.num_new_tokens
    return list(logits.split([item.num_new_tokens for item in items]))


def test_single_prefill_matches_hf_and_execute_returns_sampled_rows(pair):
    runner, hf, config = pair
    pool = BlockPool(NUM_BLOCKS, seed=1)
    seqs = [FakeSeq(p) for p in prompts(config["vocab_size"])]
    for s in seqs:
        pool.grow(s, len(s.token_ids), BS)
    need = [True, False, True]
    logits = runner.execute([Item(s, len(s.token_ids), n) for s, n in zip(seqs, need)])
    assert logits.dtype == torch.float32 and logits.shape == (2, config["vocab_size"])
    expected = torch.stack([hf_logits(hf, seqs[i].token_ids)[-1] for i in (0, 2)])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    # every row of the prompt, through the same batch preparation
    rows = step_all_rows(runner, [Item(s, len(s.token_ids)) for s in seqs])
    for s, got in zip(seqs, rows):
        torch.testing.assert_close(got, hf_logits(hf, s.token_ids), atol=ATOL, rtol=0)


def test_chunked_prefill_mixed_with_decodes_matches_hf(pair):
    """Prompts in chunks of 5, each sequence decoding greedily as soon as its prompt is in:
    batches mix chunks and decodes, and end decode-only."""
    runner, hf, config = pair
    pool = BlockPool(NUM_BLOCKS, seed=2)
    seqs = [FakeSeq(p) for p in prompts(config["vocab_size"], seed=3)]
    prompt_lens = [len(s.token_ids) for s in seqs]
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    max_new, kinds_seen = 8, set()
    while True:
        active = [i for i, s in enumerate(seqs) if len(s.token_ids) - prompt_lens[i] < max_new]
        if not active:
            break
        items = []
        for i in active:
            s = seqs[i]
            n = min(5, len(s.token_ids) - s.num_computed_tokens)
            pool.grow(s, s.num_computed_tokens + n, BS)
            items.append(Item(s, n, s.num_computed_tokens + n == len(s.token_ids)))
        kinds_seen.add(tuple(sorted({it.num_new_tokens == 1 for it in items})))
        for i, item, got in zip(active, items, step_all_rows(runner, items)):
            rows[i].append(got)
            if item.need_logits:
                item.seq.token_ids.append(int(got[-1].argmax()))
    assert {(False, True), (True,)} <= kinds_seen   # mixed batches and decode-only batches ran
    for s, got in zip(seqs, rows):
        expected = hf_logits(hf, s.token_ids)[: s.num_computed_tokens]
        torch.testing.assert_close(torch.cat(got), expected, atol=ATOL, rtol=0)
        greedy_hf = expected.argmax(-1)[len(s.token_ids) - max_new - 1:].tolist()
        assert s.token_ids[-max_new:] == greedy_hf


def test_batch1_fused_route_matches_hf(pair, monkeypatch):
    """Batch-1 decode steps through the fused route (on CUDA: one GEMV kernel with the norm before it
    and silu * up after it; here fused_linear's reference, forced on for one-row batches): the
    residual stream, the biases and the gate/up halves are threaded as in the unfused layers."""
    from pagedeploy.runtime import model as model_module
    runner, hf, config = pair
    calls = []

    def route(x, linear):
        calls.append(x.shape[0])
        return x.shape[0] == 1 and type(linear) is Linear
    monkeypatch.setattr(model_module, "use_gemv", route)
    pool = BlockPool(NUM_BLOCKS, seed=4)
    seq = FakeSeq(prompts(config["vocab_size"], lengths=(11,), seed=5)[0])
    rows = []
    for step in range(6):   # the prompt, then one token at a time
        n = len(seq.token_ids) - seq.num_computed_tokens
        pool.grow(seq, len(seq.token_ids), BS)
        got = step_all_rows(runner, [Item(seq, n)])[0]
        rows.append(got)
        seq.token_ids.append(int(got[-1].argmax()))
    assert 1 in calls
    expected = hf_logits(hf, seq.token_ids)[: seq.num_computed_tokens]
    torch.testing.assert_close(torch.cat(rows), expected, atol=ATOL, rtol=0)


def test_prefix_cache_hit_matches_hf(pair):
    """A second sequence reuses the first one's full prefix blocks and computes only its tail,
    batched with a fresh prompt."""
    runner, hf, config = pair
    pool = BlockPool(NUM_BLOCKS, seed=4)
    first, tail, fresh = prompts(config["vocab_size"], lengths=(21, 11, 9), seed=5)
    owner = FakeSeq(first)
    pool.grow(owner, len(first), BS)
    step_all_rows(runner, [Item(owner, len(first))])
    shared = 16   # four full blocks of the owner's prefix
    hit = FakeSeq(first[:shared] + tail, num_computed_tokens=shared,
                  block_table=owner.block_table[: shared // BS])
    pool.grow(hit, len(hit.token_ids), BS)
    other = FakeSeq(fresh)
    pool.grow(other, len(fresh), BS)
    got_hit, got_other = step_all_rows(runner, [Item(hit, 6), Item(other, len(fresh))])
    (got_hit_rest,) = step_all_rows(runner, [Item(hit, len(tail) - 6)])
    expected = hf_logits(hf, hit.token_ids)[shared:]
    torch.testing.assert_close(torch.cat([got_hit, got_hit_rest]), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_other, hf_logits(hf, fresh), atol=ATOL, rtol=0)


def test_llama3_rope_cache_equals_hf_rotary_embedding():
    config = tiny_config("llama3")
    hf = hf_model_from_config(config)
    positions = torch.arange(200)[None]
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = hf.model.rotary_emb(x, positions)
    ours = rope_cos_sin_cache(ModelSpec.from_config(config), 200)
    half = ours.shape[1] // 2
    torch.testing.assert_close(torch.cat([ours[:, :half]] * 2, -1), cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([ours[:, half:]] * 2, -1), sin[0], atol=1e-6, rtol=0)
    plain = rope_cos_sin_cache(ModelSpec.from_config(dict(config, rope_scaling=None)), 200)
    assert not torch.allclose(plain, ours)   # the scaling really changed the frequencies


def test_bf16_runner_tracks_fp32(tmp_path):
    config = tiny_config("qwen3")
    state = random_state_dict(config, seed=7)
    folder = write_hf_folder(tmp_path / "m", config, state, num_shards=1)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        runner = build_runner(folder, config, dtype)
        assert runner.kv_cache.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        seqs = [FakeSeq(p) for p in prompts(config["vocab_size"], seed=8)]
        pool = BlockPool(NUM_BLOCKS)
        for s in seqs:
            pool.grow(s, len(s.token_ids), BS)
        logits[dtype] = runner.execute([Item(s, len(s.token_ids)) for s in seqs])
    assert logits["bfloat16"].dtype == torch.float32
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])   # tied lm_head and biases; untied lm_head
def test_cpu_packed_weights_match_dense_and_follow_weight_writes(tmp_path, kind):
    """On the CPU every float32 linear and the lm_head compute on a oneDNN-packed copy
    (runtime/cpu_weights.py): the products of F.linear on the dense weight, at decode and prefill
    row counts; and a write into the dense weight (a loader, the bench's HF copy) reaches them."""
    config = tiny_config(kind)
    folder = write_hf_folder(tmp_path, config, random_state_dict(config, seed=11))
    model = build_runner(folder, config).model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    head = model.model.embed_tokens if model.lm_head is None else model.lm_head
    assert all(m.packed is not None for m in [*linears, head])
    gen = torch.Generator().manual_seed(12)

    def check():
        for rows in (1, 3, 8, 40):
            for m in linears:
                x = torch.randn(rows, m.weight.shape[1], generator=gen)
                torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), atol=1e-5, rtol=0)
            h = torch.randn(rows, config["hidden_size"], generator=gen)
            torch.testing.assert_close(model.compute_logits(h), F.linear(h, head.weight),
                                       atol=1e-5, rtol=0)

    check()
    with torch.no_grad():   # other weights, in place: a stale packed copy would be off by O(1)
        for name, tensor in random_state_dict(config, seed=13).items():
            assert model.load_weight(name, tensor)
    check()


# ---- SmolLM2-135M-Instruct, real GGUF weights, against transformers' own GGUF load ----

CHAT = ["What is the capital of France?", "Write a haiku about the sea.",
        "List three prime numbers and explain why they are prime."]


def chat_ids(tokenizer, text: str) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                           add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(prompt)


@pytest.fixture(scope="module")
def smollm2_runner(smollm2_gguf_path):
    from conftest import smollm2_engine_config
    return ModelRunner(smollm2_engine_config(smollm2_gguf_path, num_blocks=64, block_size=16))


@pytest.mark.slow
def test_smollm2_prompt_logits_match_hf(smollm2_runner, hf_smollm2, smollm2_tokenizer):
    seqs = [FakeSeq(chat_ids(smollm2_tokenizer, text)) for text in CHAT]
    pool = BlockPool(64, seed=9)
    for s in seqs:
        pool.grow(s, len(s.token_ids), 16)
    rows = step_all_rows(smollm2_runner, [Item(s, len(s.token_ids)) for s in seqs])
    for s, got in zip(seqs, rows):
        torch.testing.assert_close(got, hf_logits(hf_smollm2, s.token_ids), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_hf_generate(smollm2_runner, hf_smollm2, smollm2_tokenizer):
    seqs = [FakeSeq(chat_ids(smollm2_tokenizer, text)) for text in CHAT[:2]]
    prompt_lens = [len(s.token_ids) for s in seqs]
    pool = BlockPool(64, seed=10)
    for _ in range(16):   # first step: both prompts; then batched decodes
        items = [Item(s, len(s.token_ids) - s.num_computed_tokens) for s in seqs]
        for s in seqs:
            pool.grow(s, len(s.token_ids), 16)
        logits = smollm2_runner.execute(items)
        for item, row in zip(items, logits):
            item.seq.num_computed_tokens += item.num_new_tokens
            item.seq.token_ids.append(int(row.argmax()))
    for s, n in zip(seqs, prompt_lens):
        with torch.inference_mode():
            out = hf_smollm2.generate(torch.tensor([s.token_ids[:n]]), max_new_tokens=16,
                                      do_sample=False)
        hf_tokens = out[0, n:].tolist()
        assert len(hf_tokens) >= 8, "HF stopped early; pick prompts with longer answers"
        assert s.token_ids[n:n + len(hf_tokens)] == hf_tokens


def test_rope_read_from_transformers5_rope_parameters():
    """transformers 5 writes rope_theta and the scaling inside `rope_parameters`."""
    old_style = dict(tiny_config("llama3"), rope_theta=100000.0)
    new_style = {k: v for k, v in old_style.items() if k not in ("rope_theta", "rope_scaling")}
    new_style["rope_parameters"] = dict(old_style["rope_scaling"], rope_theta=100000.0)
    expected = rope_cos_sin_cache(ModelSpec.from_config(old_style), 128)
    assert torch.equal(rope_cos_sin_cache(ModelSpec.from_config(new_style), 128), expected)


def test_prepare_flattens_items_into_slots_positions_and_hints():
    config = tiny_config("qwen3")
    runner = ModelRunner(EngineConfig(spec=ModelSpec.from_config(config, source="catalog"),
                                      num_blocks=16, block_size=BS, max_model_len=64))
    decode = FakeSeq(list(range(10)), num_computed_tokens=9, block_table=[7, 3, 12])
    chunk = FakeSeq(list(range(20)), num_computed_tokens=6, block_table=[5, 0, 9, 14, 2])
    fresh = FakeSeq([1, 2, 3], block_table=[11])
    batch = runner.prepare([Item(decode, 1), Item(chunk, 5, False), Item(fresh, 3)])
    assert batch.input_ids.tolist() == [9, 6, 7, 8, 9, 10, 1, 2, 3]
    assert batch.positions.tolist() == [9, 6, 7, 8, 9, 10, 0, 1, 2]
    # slot = block_table[pos // BS] * BS + pos % BS
    assert batch.meta.slot_mapping.tolist() == [49, 2, 3, 36, 37, 38, 44, 45, 46]
    assert batch.meta.block_tables.tolist() == [[7, 3, 12], [5, 0, 9], [11, 0, 0]]
    assert batch.meta.context_lens.tolist() == [10, 11, 3]
    assert batch.meta.query_start_loc.tolist() == [0, 1, 6, 9]
    assert (batch.meta.num_decodes, batch.meta.max_context_len) == (1, 11)
    assert batch.logits_rows.tolist() == [0, 8]
    # decode-only, every item sampled: the rows are the logits' rows as they are (no gather)
    decode2 = FakeSeq(list(range(5)), num_computed_tokens=4, block_table=[1, 4])
    assert runner.prepare([Item(decode, 1), Item(decode2, 1)]).logits_rows is None
    assert runner.prepare([Item(decode, 1), Item(decode2, 1, False)]).logits_rows.tolist() == [0]
    assert runner.execute([]).shape == (0, config["vocab_size"])


def test_rotary_asks_for_early_launch_on_unquantized_layers_only(tmp_path, monkeypatch):
    """Rotary + KV store lets attention launch early on bf16 layers, not on int4 ones, where it cost
    1-2% (docs/PERF.md run 19): the model passes early_launch by the o projection's kind."""
    from pagedeploy.runtime import model as model_module
    from pagedeploy.runtime.loader import quantize_layer_linears
    config = tiny_config("llama3")
    runner = build_runner(write_hf_folder(tmp_path, config, random_state_dict(config, seed=1)), config)
    asked = []
    real = model_module.qk_norm_rope_store

    def recorder(*args, early_launch=False):
        asked.append(early_launch)
        return real(*args, early_launch=early_launch)
    monkeypatch.setattr(model_module, "qk_norm_rope_store", recorder)
    seq = FakeSeq(prompts(config["vocab_size"], lengths=(5,), seed=9)[0])
    BlockPool(NUM_BLOCKS, seed=6).grow(seq, 5, BS)
    step_all_rows(runner, [Item(seq, 5)])
    assert asked and all(asked)
    for layer in runner.model.model.layers:
        quantize_layer_linears(layer, "int4", torch.float32)
    asked.clear()
    seq.num_computed_tokens = 0
    step_all_rows(runner, [Item(seq, 5)])
    assert asked and not any(asked)
