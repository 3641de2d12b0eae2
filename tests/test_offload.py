"""Streaming 4-bit load (runtime/loader.py) and CPU offload of whole layers (runtime/offload.py).

Oracles: the loader as it was before streaming (the whole model in full precision, then quantized:
written out here), and the same model without offload. Both must agree bit for bit: streaming and
offload move bytes, they never change a value.
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BlockPool, FakeSeq, Item, random_state_dict, tiny_config, write_hf_folder

from pagedeploy.launcher.engine_config import build_engine_config
from pagedeploy.launcher.gpus import resolve_target
from pagedeploy.launcher.up import offload_lines
from pagedeploy.launcher.model_resolve import resolve_model
from pagedeploy.launcher.model_spec import ModelSpec
from pagedeploy.launcher.plan import plan, plan_weights
from pagedeploy.launcher.plan_fixes import offload_gb_for
from pagedeploy.launcher.profile import build_profile, load_profile
from pagedeploy.quant import bnb as bnb_module
from pagedeploy.quant.linear import QuantLinear, quantize_weight
from pagedeploy.runtime import loader
from pagedeploy.runtime.config import EngineConfig
from pagedeploy.runtime.loader import (StreamingLoader, create_model, iter_folder_tensors,
                                       load_model, load_weights, store_weights_input_major)
from pagedeploy.runtime.model import Linear, LlamaForCausalLM
from pagedeploy.runtime.model_runner import ModelRunner
from pagedeploy.runtime.offload import LayerOffloader, planned_layer_bytes

ROOT = Path(__file__).resolve().parent.parent
BS = 4
LAYERS = 5
# in_features 128 and 384: int4 groups of 128; llama3: untied lm_head, llama3 rope.
LLAMA = dict(tiny_config("llama3"), num_hidden_layers=LAYERS, intermediate_size=384)
# q/k/v biases (QuantLinear's bias is offloaded too), tied embedding.
QWEN2 = dict(tiny_config("qwen2"), num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256,
             head_dim=32)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def needs_bnb(method: str | None) -> None:
    if method in ("nf4", "fp4"):
        pytest.importorskip("bitsandbytes")


def engine_config(quantization: str | None, config: dict = LLAMA, **kw) -> EngineConfig:
    spec = ModelSpec.from_config(config, name="tiny", source="catalog")
    return EngineConfig(spec=spec, num_blocks=64, block_size=BS, max_model_len=128,
                        quantization=quantization, seed=3, **kw)


def layer_sizes(config: EngineConfig) -> list[int]:
    return [planned_layer_bytes(layer, config.quantization) for layer in create_model(config).model.layers]


def offload_config(config: EngineConfig, num_layers: int) -> EngineConfig:
    return replace(config, cpu_offload_bytes=sum(layer_sizes(config)[:num_layers]))


# ---- the oracle: the loader before streaming ----------------------------------------------------

def quantize_after_load(config: EngineConfig, state: dict | None = None) -> LlamaForCausalLM:
    """The whole model in full precision first (seeded dummy weights, or `state`), then each
    decoder Linear made 4-bit, then the CPU weight layout: what load_model did before."""
    torch.set_default_dtype(torch.float32)
    model = LlamaForCausalLM(config.spec, max_positions=config.max_model_len)
    with torch.no_grad():
        if state is None:
            gen = torch.Generator().manual_seed(config.seed)
            for name, param in model.named_parameters():
                param.normal_(0.0, 0.02, generator=gen)
                if "norm" in name.rpartition(".")[0].rpartition(".")[2]:
                    param.add_(1.0)
        else:
            load_weights(model, state.items())
        for layer in model.model.layers if config.quantization else []:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, Linear):
                        q = quantize_weight(child.weight, config.quantization, child.bias,
                                            dtype=torch.float32)
                        q.shard_sizes = child.shard_sizes
                        setattr(parent, name, q)
    store_weights_input_major(model)
    return model.eval()


def assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """Same modules, same tensors byte for byte (parameters and buffers, 4-bit codes, scales,
    absmax, the rope cache), same strides."""
    assert [(n, type(m)) for n, m in got.named_modules()] == \
        [(n, type(m)) for n, m in want.named_modules()]
    got_t = dict(got.named_parameters()) | dict(got.named_buffers())
    want_t = dict(want.named_parameters()) | dict(want.named_buffers())
    assert sorted(got_t) == sorted(want_t)
    for name, tensor in want_t.items():
        assert got_t[name].dtype == tensor.dtype and got_t[name].stride() == tensor.stride(), name
        assert torch.equal(got_t[name], tensor), name
    for (name, m), (_, w) in zip(got.named_modules(), want.named_modules()):
        if isinstance(m, (Linear, QuantLinear)):
            assert m.shard_sizes == w.shard_sizes, name


# ---- streaming load ---------------------------------------------------------------------------

@pytest.mark.parametrize("quantization", [None, "int4", "nf4"])
def test_streamed_dummy_load_equals_quantize_after_load(quantization):
    needs_bnb(quantization)
    config = engine_config(quantization)
    assert_same_model(load_model(config), quantize_after_load(config))


def shuffled(tensors, seed: int):
    items = list(tensors)
    random.Random(seed).shuffle(items)
    return items


@pytest.mark.parametrize("quantization", ["int4", "nf4"])
def test_streamed_checkpoint_in_any_order_equals_quantize_after_load(tmp_path, quantization):
    """Tensors in a random order: fused q/k/v and gate/up parts and whole layers interleave, so
    several layers wait for their last part at once; each is finished when it is complete."""
    needs_bnb(quantization)
    state = random_state_dict(QWEN2, seed=5)
    folder = write_hf_folder(tmp_path, QWEN2, state, num_shards=3)
    config = engine_config(quantization, QWEN2, load_format="safetensors", model_path=str(folder))
    model = create_model(config)
    streaming = StreamingLoader(model, config)
    streaming.load(shuffled(iter_folder_tensors(folder), seed=1), source=folder)
    store_weights_input_major(model)
    assert streaming.max_in_flight > 1               # the order really interleaved layers
    assert_same_model(model.eval(), quantize_after_load(config, state))
    in_file_order = load_model(config)
    assert_same_model(in_file_order, quantize_after_load(config, state))


def dense_layer_linear_elements(model: LlamaForCausalLM) -> int:
    """Full-precision decoder Linear weights that exist right now (not on the meta device)."""
    return sum(m.weight.numel() for m in model.model.layers.modules()
               if isinstance(m, Linear) and m.weight is not None and not m.weight.is_meta)


@pytest.mark.parametrize("source", ["dummy", "safetensors"])
@pytest.mark.parametrize("quantization", ["int4", "nf4"])
def test_at_most_one_layer_is_in_full_precision(monkeypatch, tmp_path, source, quantization):
    """Counted independently of the loader's own bookkeeping: at every quantization, how many
    full-precision decoder weights exist in the model. Quantize-after-load would show all 5 layers."""
    needs_bnb(quantization)
    kw = {}
    if source == "safetensors":
        folder = write_hf_folder(tmp_path, LLAMA, random_state_dict(LLAMA, seed=2))
        kw = dict(load_format="safetensors", model_path=str(folder))
    config = engine_config(quantization, **kw)
    models, alive = [], []
    real_create, real_quantize = loader.create_model, loader.quantized_linear

    def create(cfg):
        models.append(real_create(cfg))
        return models[-1]

    def quantize(linear, method, dtype, *group):
        alive.append(dense_layer_linear_elements(models[0]))
        return real_quantize(linear, method, dtype, *group)

    monkeypatch.setattr(loader, "create_model", create)
    monkeypatch.setattr(loader, "quantized_linear", quantize)
    load_model(config)
    with torch.device("meta"):
        layer = LlamaForCausalLM(config.spec).model.layers[0]
    per_layer = sum(m.weight.numel() for m in layer.modules() if isinstance(m, Linear))
    assert len(alive) == 4 * LAYERS
    assert max(alive) == per_layer                     # one layer, never two
    assert dense_layer_linear_elements(models[0]) == 0


# ---- CPU offload --------------------------------------------------------------------------------

def run_steps(runner: ModelRunner, steps: int = 3) -> torch.Tensor:
    """Logits of a prefill of three prompts and `steps` greedy decode steps (several forwards, so
    the staging buffers cycle across steps)."""
    vocab = runner.config.spec.vocab_size
    gen = torch.Generator().manual_seed(7)
    seqs = [FakeSeq(torch.randint(0, vocab, (n,), generator=gen).tolist()) for n in (11, 5, 17)]
    pool = BlockPool(runner.config.num_blocks, seed=1)
    for seq in seqs:
        pool.grow(seq, len(seq.token_ids) + steps + 1, BS)
    logits = runner.execute([Item(seq, len(seq.token_ids)) for seq in seqs])
    out = [logits]
    for _ in range(steps):
        for seq, row in zip(seqs, logits):
            seq.num_computed_tokens = len(seq.token_ids)
            seq.token_ids.append(int(row.argmax()))
        logits = runner.execute([Item(seq, 1) for seq in seqs])
        out.append(logits)
    return torch.cat(out).cpu()


@pytest.fixture
def unpacked(monkeypatch):
    """No oneDNN-packed CPU copies (runtime/cpu_weights.py): the loader skips them when offloading,
    so the reference without offload must compute on the same plain weights to be bit-equal."""
    from pagedeploy.runtime import cpu_weights
    monkeypatch.setattr(cpu_weights, "pack_cpu_weights", lambda model: 0)


@pytest.mark.parametrize("quantization,num_layers", [
    (None, 3), (None, LAYERS), ("int4", 1), ("int4", 3), ("nf4", 2), ("nf4", 4)])
def test_outputs_with_offload_equal_outputs_without_bit_for_bit(unpacked, quantization, num_layers):
    needs_bnb(quantization)
    config = engine_config(quantization, QWEN2)
    want = run_steps(ModelRunner(config))
    runner = ModelRunner(offload_config(config, num_layers))
    assert runner.model.offloader.num_layers == num_layers
    got = run_steps(runner)
    assert want.abs().max() > 0.05                    # not degenerate
    assert torch.equal(got, want)


def test_offloaded_layers_compute_from_the_staging_buffers():
    config = offload_config(engine_config("int4"), 3)
    model = load_model(config)
    offloader = model.offloader
    spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in offloader.staging]
    for index, layer in enumerate(model.model.layers):
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            inside = [lo <= t.data_ptr() < hi for lo, hi in spans]
            if index >= 3 or name.endswith(".code"):   # resident, and the bnb codebook
                assert not any(inside), (index, name)
            else:
                assert inside[index % 2] and t.is_contiguous(), (index, name)


def test_copies_follow_the_two_buffers_one_layer_ahead(monkeypatch):
    """Three offloaded layers, buffers 0 and 1: after layer 0 computes, layer 2 is copied into its
    buffer; after layer 2, layer 0 for the next step. Layer 1 never leaves buffer 1."""
    copies = []
    real_copy = LayerOffloader._copy
    monkeypatch.setattr(LayerOffloader, "_copy",
                        lambda self, index, b: copies.append((index, b)) or real_copy(self, index, b))
    runner = ModelRunner(offload_config(engine_config(None), 3))
    assert copies == [(0, 0), (1, 1)]                 # at install
    run_steps(runner, steps=2)                        # three forwards
    assert copies == [(0, 0), (1, 1)] + [(2, 0), (0, 0)] * 3


def test_offloaded_bytes_equal_the_plan():
    config = engine_config("nf4", QWEN2)
    profile = build_profile({"model": "tiny", "quantization": "nf4"}, {}, "test.yaml", ".")
    layers = plan_weights(profile, config.spec, "float32").layer_bytes
    profile = replace(profile, cpu_offload_gb=offload_gb_for(layers, 3))
    weights = plan_weights(profile, config.spec, "float32", offload=True)
    assert (weights.layers_offloaded, weights.staging_bytes) == (3, 2 * max(layers[:3]))
    model = load_model(replace(config, cpu_offload_bytes=weights.cpu_bytes))
    offloader = model.offloader
    assert offloader.num_layers == weights.layers_offloaded
    assert offloader.offloaded_bytes == weights.cpu_bytes == sum(layers[:3])
    # Staging: the plan's two largest-layer buffers plus the 256-byte alignment of each tensor.
    assert 0 <= offloader.staging_bytes - weights.staging_bytes <= 2 * 16 * 256
    assert weights.cpu_bytes <= offloader.host_bytes <= weights.cpu_bytes + 3 * 64 * 256
    line, = offload_lines(offloader, SimpleNamespace(weights=weights))   # what `deploy up` prints
    assert f"3 layers, {weights.cpu_bytes:,} bytes" in line
    assert f"(plan 3 layers, {weights.cpu_bytes:,} bytes)" in line


def test_a_runtime_that_cannot_match_the_plan_fails_loudly():
    config = engine_config("int4")
    with pytest.raises(AssertionError, match="whole layers give"):
        load_model(replace(config, cpu_offload_bytes=sum(layer_sizes(config)[:2]) - 1))


def test_the_70b_profile_offloads_and_runs_eager():
    profile = load_profile(ROOT / "profiles" / "llama-3-70b-7gb.yaml", ["enforce_eager=false"])
    spec = resolve_model(profile)
    p = plan(profile, spec, resolve_target(profile))
    assert p.fits and p.weights.layers_offloaded == 79
    assert p.cuda_graph_bytes == 0                    # offload runs eager: no graph pool
    assert p.weights.staging_bytes == 2 * max(p.weights.layer_bytes)
    assert p.used_bytes == p.non_kv_bytes + p.kv_cache.bytes <= p.budget_bytes
    config = build_engine_config(profile, spec, p)
    assert config.enforce_eager and config.cpu_offload_bytes == p.weights.cpu_bytes


# ---- bitsandbytes: bounded dequantization scratch ------------------------------------------------

def test_bnb_row_slices_are_weights_of_their_own():
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(4)
    w = bnb_module.quantize_bnb(torch.randn(48, 96, generator=g), "nf4")   # 96 = 1.5 blocks per row
    whole = bnb_module.dequantize_bnb(w)
    for start, stop in [(0, 2), (2, 30), (30, 48)]:
        assert torch.equal(bnb_module.dequantize_bnb(bnb_module.row_slice(w, start, stop)),
                           whole[start:stop])


def test_bnb_matmul_in_row_chunks_equals_one_call(monkeypatch):
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(5)
    w = bnb_module.quantize_bnb(torch.randn(160, 96, generator=g), "nf4")
    x, bias = torch.randn(9, 96, generator=g), torch.randn(160, generator=g)
    whole = bnb_module.bnb_matmul(x, w, bias)
    monkeypatch.setattr(bnb_module, "dequant_chunk_rows", lambda w, x: 34)   # 34·96 = 51 blocks
    chunked = bnb_module.bnb_matmul(x, w, bias)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


# ---- on the GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("quantization", [None, "int4", "nf4"])
def test_cuda_offload_equals_no_offload_and_the_host_copy_is_pinned(quantization):
    needs_bnb(quantization)
    config = engine_config(quantization, QWEN2, device="cuda", dtype="bfloat16")
    want = run_steps(ModelRunner(config))
    runner = ModelRunner(offload_config(config, 3))
    assert runner.model.offloader.host.data.is_pinned()
    assert torch.equal(run_steps(runner), want)


# The decoder layers are most of the model, as in real ones (a small vocabulary).
MID = dict(tiny_config("llama3"), hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
           num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=4096)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("quantization", ["int4", "nf4"])
def test_cuda_load_peak_is_the_4bit_model_plus_about_one_layer(quantization):
    needs_bnb(quantization)
    config = engine_config(quantization, MID, device="cuda", dtype="bfloat16")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = load_model(config)
    peak = torch.cuda.max_memory_allocated() - before
    loaded = torch.cuda.memory_allocated() - before
    with torch.device("meta"):
        dense = LlamaForCausalLM(config.spec)
    dense_layer = sum(p.numel() for p in dense.model.layers[0].parameters()) * 2   # bf16
    dense_model = sum(p.numel() for p in dense.parameters()) * 2
    scratch = 4 * (2 * 4096 * 1024) * 4               # quantizer scratch: ≤ 4 fp32 copies of gate_up
    assert peak <= loaded + dense_layer + scratch, (peak, loaded, dense_layer)
    assert peak < 0.6 * dense_model                   # the bf16 model never existed at once
    del model


def test_offloader_sizes_layers_like_the_plan_for_a_q4_gguf(smollm2_gguf_path):
    """A 4-bit GGUF makes int4 use group 32 (ModelSpec.int4_group): the offloader's per-layer
    bytes, which pick the layers to move, must follow it as the plan does."""
    from pagedeploy.launcher.gguf_meta import spec_from_gguf

    spec = spec_from_gguf(smollm2_gguf_path)
    assert spec.int4_group == 32
    config = EngineConfig(spec=spec, num_blocks=8, block_size=BS, max_model_len=128, quantization="int4")
    profile = build_profile({"model": smollm2_gguf_path, "quantization": "int4"}, {}, "test.yaml", ".")
    planned = plan_weights(profile, spec, "float32").layer_bytes
    ours = [planned_layer_bytes(layer, "int4", spec.int4_group) for layer in create_model(config).model.layers]
    assert ours == planned
    assert ours != [planned_layer_bytes(layer, "int4") for layer in create_model(config).model.layers]
