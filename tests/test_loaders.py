"""Weight loaders (HF folder, GGUF, dummy) and the tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (BlockPool, FakeSeq, Item, random_state_dict, smollm2_engine_config,
                      tiny_config, write_hf_folder)

from pagedeploy.launcher.model_spec import ModelSpec
from pagedeploy.runtime.config import EngineConfig
from pagedeploy.runtime.gguf_loader import hf_name, iter_gguf_tensors, reverse_permute
from pagedeploy.runtime.loader import load_model
from pagedeploy.runtime.model_runner import ModelRunner
from pagedeploy.runtime.tokenizer import eos_token_ids, load_tokenizer


def folder_config(folder, config: dict, **kw) -> EngineConfig:
    spec = ModelSpec.from_config(config, source="folder", path=str(folder))
    return EngineConfig(spec=spec, num_blocks=8, block_size=4, max_model_len=64, **kw)


@pytest.mark.parametrize("kind", ["qwen3", "llama3", "qwen2"])
def test_folder_loader_fills_every_weight(tmp_path, kind):
    config = tiny_config(kind)
    state = random_state_dict(config, seed=3)
    model = load_model(folder_config(write_hf_folder(tmp_path, config, state, 3), config))
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        if ".q_proj." in name:   # fused: q, k, v rows stacked in that order
            parts = [name.replace("q_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
            fused = torch.cat([state[p] for p in parts])
            assert torch.equal(params[name.replace("q_proj", "qkv_proj")], fused)
        elif ".gate_proj." in name:
            fused = torch.cat([tensor, state[name.replace("gate_proj", "up_proj")]])
            assert torch.equal(params[name.replace("gate_proj", "gate_up_proj")], fused)
        elif not any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            assert torch.equal(params[name], tensor), name
    if config["tie_word_embeddings"]:
        assert model.lm_head is None
        hidden = torch.randn(2, config["hidden_size"])
        embed = state["model.embed_tokens.weight"]
        # Close, not equal: on the CPU the weights are stored input-major (loader.py), which
        # changes the BLAS summation order; a wrong or untied weight would be off by O(1).
        torch.testing.assert_close(model.compute_logits(hidden), hidden @ embed.T, rtol=1e-5, atol=1e-5)


def test_folder_loader_names_missing_and_misshapen_weights(tmp_path):
    config = tiny_config("qwen2")
    state = random_state_dict(config)
    missing = dict(state)
    missing.pop("model.layers.1.self_attn.k_proj.bias")
    folder = write_hf_folder(tmp_path / "missing", config, missing)
    with pytest.raises(ValueError, match=r"lacks 1 weights.*layers\.1\.self_attn\.k_proj\.bias"):
        load_model(folder_config(folder, config))
    bad = dict(state, **{"model.norm.weight": torch.ones(3)})
    folder = write_hf_folder(tmp_path / "bad", config, bad)
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(3,\)"):
        load_model(folder_config(folder, config))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(folder_config(tmp_path, config))


def test_dummy_weights_are_seeded_and_realistic():
    config = tiny_config("llama3")
    spec = ModelSpec.from_config(config, source="catalog")

    def params(seed):
        cfg = EngineConfig(spec=spec, num_blocks=8, block_size=4, max_model_len=64, seed=seed)
        assert cfg.load_format == "dummy"
        return dict(load_model(cfg).named_parameters())

    a, b, c = params(0), params(0), params(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    qkv = a["model.layers.0.self_attn.qkv_proj.weight"]
    assert 0.018 < qkv.std().item() < 0.022 and abs(qkv.mean().item()) < 0.002
    norm = a["model.layers.1.post_attention_layernorm.weight"]
    assert (norm - 1).abs().max() < 0.1 and norm.std() > 0


def test_dummy_model_gives_non_degenerate_logits():
    config = dict(tiny_config("qwen3"), num_hidden_layers=4)
    runner = ModelRunner(EngineConfig(spec=ModelSpec.from_config(config, source="catalog"),
                                      num_blocks=16, block_size=4, max_model_len=64))
    seqs = [FakeSeq(list(range(3, 20))), FakeSeq(list(range(40, 50)))]
    pool = BlockPool(16)
    for s in seqs:
        pool.grow(s, len(s.token_ids), 4)
    logits = runner.execute([Item(s, len(s.token_ids)) for s in seqs])
    assert torch.isfinite(logits).all()
    assert logits.std(-1).min() > 0.05                        # not flat
    assert (logits[0] - logits[1]).abs().max() > 0.05          # depends on the input
    assert runner.kv_cache_bytes() == 2 * 4 * 16 * 4 * 2 * 32 * 4


def test_reverse_permute_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    rng = np.random.default_rng(0)
    for name, rows in (("blk.0.attn_q.weight", 576), ("blk.0.attn_k.weight", 192)):
        w = rng.standard_normal((rows, 576)).astype(np.float32)
        ours = reverse_permute(w, 9 if "attn_q" in name else 3)
        assert np.array_equal(ours, proc.process(w, name).weights)
        assert not np.array_equal(ours, w)


def test_gguf_names_map_to_hf():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.12.attn_q.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert hf_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("rope_freqs.weight") == "rope_freqs.weight"
    assert hf_name("blk.0.unknown_thing.weight") is None


def test_gguf_rope_freqs_divide_the_frequencies():
    """llama.cpp stores llama3 rope scaling as per-frequency divisors: dividing all by 4 must
    equal linear scaling by 4."""
    config = tiny_config("qwen3")
    spec = ModelSpec.from_config(config, source="catalog")
    model = load_model(EngineConfig(spec=spec, num_blocks=1, max_model_len=64))
    assert model.load_weight("rope_freqs.weight", torch.full((16,), 4.0))
    linear = ModelSpec.from_config(dict(config, rope_scaling={"type": "linear", "factor": 4.0}))
    expected = load_model(EngineConfig(spec=linear, num_blocks=1, max_model_len=64))
    torch.testing.assert_close(model.model.cos_sin_cache, expected.model.cos_sin_cache)


@pytest.mark.slow
def test_gguf_weights_equal_transformers_gguf_load(smollm2_gguf_path, hf_smollm2):
    ours = dict(iter_gguf_tensors(smollm2_gguf_path))
    theirs = {k: v for k, v in hf_smollm2.state_dict().items() if k != "lm_head.weight"}
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.slow
def test_gguf_second_load_uses_the_cache(smollm2_gguf_path, monkeypatch):
    list(iter_gguf_tensors(smollm2_gguf_path))   # fills the cache if this run is the first

    def no_reader(*args, **kwargs):
        raise AssertionError("the GGUF was parsed again despite the cache")

    monkeypatch.setattr("gguf.GGUFReader", no_reader)
    model = load_model(smollm2_engine_config(smollm2_gguf_path))
    assert model.model.embed_tokens.weight.shape == (49152, 576)


@pytest.mark.slow
def test_gguf_tokenizer_has_chat_template_and_eos(smollm2_gguf_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.encode("Hello world")
    assert ids and ids[0] != tok.bos_token_id and tok.decode(ids) == "Hello world"
    assert eos_token_ids(smollm2_engine_config(smollm2_gguf_path), tok) == [2]


def test_tokenizer_absent_for_dummy_and_eos_from_generation_config(tmp_path):
    config = dict(tiny_config("qwen3"), eos_token_id=7)
    dummy = EngineConfig(spec=ModelSpec.from_config(config, source="catalog"), num_blocks=1)
    assert load_tokenizer(dummy) is None
    assert eos_token_ids(dummy) == [7]
    folder = write_hf_folder(tmp_path, config, {}, num_shards=1)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert load_tokenizer(folder_config(folder, config)) is None   # no tokenizer files there
    assert eos_token_ids(folder_config(folder, config)) == [7, 9]


# ---- a tiny GGUF written here: checks the permutation direction without transformers ----

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (the inverse of ours)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path, config: dict, state: dict, matrix_type=None):
    from gguf import GGUFWriter
    from gguf.quants import quantize

    from pagedeploy.runtime.gguf_loader import hf_name as to_hf

    arch = "llama" if config["model_type"] == "llama" else config["model_type"]
    names = {to_hf(f"blk.{i}.{part}.{kind}"): f"blk.{i}.{part}.{kind}"
             for i in range(config["num_hidden_layers"]) for kind in ("weight", "bias")
             for part in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                          "ffn_gate", "ffn_up", "ffn_down")}
    names.update({"model.embed_tokens.weight": "token_embd.weight",
                  "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"})
    w = GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_vocab_size(config["vocab_size"])
    for name, tensor in state.items():
        arr = tensor.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            arr = _llama_cpp_permute(arr, heads)
        if matrix_type is not None and arr.ndim == 2:
            w.add_tensor(names[name], quantize(arr, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(names[name], np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_gguf_config(kind: str) -> dict:
    config = tiny_config(kind)
    config.pop("head_dim", None)   # GGUF metadata derives it from hidden / heads
    return dict(config, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, rope_scaling=None)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_tiny_gguf_round_trips_to_hf_weights_and_logits(tmp_path, monkeypatch, kind):
    from conftest import hf_model_from_config

    from pagedeploy.launcher.gguf_meta import spec_from_gguf

    monkeypatch.setenv("PAGEDEPLOY_CACHE", str(tmp_path / "cache"))
    config = tiny_gguf_config(kind)
    state = random_state_dict(config, seed=11)
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", config, state)
    loaded = dict(iter_gguf_tensors(path))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[n], t) for n, t in state.items())
    runner = ModelRunner(EngineConfig(spec=spec_from_gguf(path), num_blocks=16, block_size=4,
                                      max_model_len=64))
    seq = FakeSeq(list(range(5, 30)))
    BlockPool(16).grow(seq, len(seq.token_ids), 4)
    logits = runner.execute([Item(seq, len(seq.token_ids))])
    with torch.inference_mode():
        expected = hf_model_from_config(config, state)(torch.tensor([seq.token_ids])).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_tiny_gguf_quantized_matrices_dequantize_near_the_originals(tmp_path, monkeypatch, qtype):
    from gguf import GGMLQuantizationType

    monkeypatch.setenv("PAGEDEPLOY_CACHE", str(tmp_path / "cache"))
    config = tiny_gguf_config("llama3")
    state = random_state_dict(config, seed=12)
    path = write_tiny_gguf(tmp_path / "q.gguf", config, state, GGMLQuantizationType[qtype])
    loaded = dict(iter_gguf_tensors(path))
    for name, tensor in state.items():
        scale = tensor.abs().max().item()
        # a wrong q/k row order would be off by about the weights' own size
        tol = scale * (0.01 if qtype == "Q8_0" else 0.15) if tensor.dim() == 2 else 0.0
        assert (loaded[name] - tensor).abs().max().item() <= tol, name


def test_gguf_without_tokenizer_gives_none(tmp_path, monkeypatch):
    from pagedeploy.launcher.gguf_meta import spec_from_gguf

    monkeypatch.setenv("PAGEDEPLOY_CACHE", str(tmp_path / "cache"))
    config = tiny_gguf_config("qwen2")
    path = write_tiny_gguf(tmp_path / "m.gguf", config, random_state_dict(config))
    assert load_tokenizer(EngineConfig(spec=spec_from_gguf(path), num_blocks=1)) is None
