"""Quality of the 4-bit formats on the real SmolLM2-135M: perplexity on a fixed text, and the GGUF
Q4_1 -> int4 conversion checked tensor by tensor against transformers' own dequantization.

All variants run fp32 activations, so only the weight format differs. Note that the "bf16" model
is itself a dequantized Q4_1 GGUF: re-quantizing it stacks a second 4-bit error on the first.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedeploy.quant.formats import bnb_weight_bytes, int4_weight_bytes
from pagedeploy.quant.int4 import dequantize_int4, int4_from_gguf
from pagedeploy.quant.linear import QuantLinear, quantize_linear, quantize_model_linears

TEXT = Path(__file__).parent / "data" / "ppl_text.txt"

# Measured (docs/PERF.md, "4-bit formats"): bf16 24.76, nf4 29.93 (+21%), int4 g128/g64 min-max 34.81 (+41%).
# The issue's +10% holds for int4 loaded straight from the GGUF's Q4_1 blocks (exact, +0%), not
# for re-quantizing this already-4-bit model; these bounds catch regressions of the formats.
MAX_RATIO = {"nf4": 1.30, "int4": 1.50}


def _perplexity(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        return math.exp(model(ids, labels=ids).loss.item())


def _with_layers(model, change):
    """A copy of the model whose decoder layers went through `change` (the fixture stays intact)."""
    twin = copy.deepcopy(model)
    change(twin.model.layers)
    return twin


def _round_bf16(layers):
    for mod in layers.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.weight.data = mod.weight.data.bfloat16().float()


@pytest.mark.slow
def test_perplexity_nf4_int4_vs_bf16(hf_smollm2, smollm2_tokenizer):
    pytest.importorskip("bitsandbytes")
    ids = torch.tensor([smollm2_tokenizer.encode(TEXT.read_text())])
    assert 600 <= ids.shape[1] <= 1000, ids.shape
    shapes = [tuple(m.weight.shape) for m in hf_smollm2.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    planned = {"bf16": sum(2 * o * i for o, i in shapes),
               "nf4": sum(bnb_weight_bytes(o * i) for o, i in shapes),
               "int4": sum(int4_weight_bytes(o, i) for o, i in shapes)}
    ppl = {}
    for name, change in [("bf16", _round_bf16),
                         ("nf4", lambda layers: quantize_model_linears(layers, "nf4")),
                         ("int4", lambda layers: quantize_model_linears(layers, "int4"))]:
        start = time.perf_counter()
        model = _with_layers(hf_smollm2, change)
        ppl[name] = _perplexity(model, ids)
        stored = sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))
        print(f"{name}: perplexity {ppl[name]:.3f} over {ids.shape[1]} tokens, decoder linears "
              f"{planned[name]:,} B ({time.perf_counter() - start:.1f} s)")
        assert name == "bf16" or stored == planned[name], (name, stored, planned[name])
    assert 10 < ppl["bf16"] < 40, ppl          # a sane model on plain English prose
    for name, ratio in MAX_RATIO.items():
        assert ppl["bf16"] < ppl[name] <= ratio * ppl["bf16"], ppl


@pytest.mark.slow
def test_runtime_int4_on_the_q4_gguf_keeps_perplexity(hf_smollm2, smollm2_tokenizer, smollm2_gguf_path):
    """`quantization: int4` on the default GGUF: the group follows the file's 32-weight Q4_1
    blocks (ModelSpec.int4_group), so the weights land back on their own grid: within the
    issue's +10% (measured +0.0%), stored bytes equal to the plan's."""
    from pagedeploy.launcher.gguf_meta import spec_from_gguf
    from pagedeploy.launcher.plan import quantized_tensor_bytes
    from pagedeploy.quant.formats import int4_group_size

    spec = spec_from_gguf(smollm2_gguf_path)
    assert spec.int4_group == 32
    ids = torch.tensor([smollm2_tokenizer.encode(TEXT.read_text())])
    shapes = [tuple(m.weight.shape) for m in hf_smollm2.model.layers.modules() if isinstance(m, torch.nn.Linear)]

    def quantize(layers):
        for name, mod in list(layers.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                group = int4_group_size(mod.in_features, spec.int4_group)
                setattr(layers.get_submodule(parent), child, quantize_linear(mod, "int4", group))

    base = _perplexity(_with_layers(hf_smollm2, _round_bf16), ids)
    model = _with_layers(hf_smollm2, quantize)
    stored = sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))
    assert stored == sum(quantized_tensor_bytes(o, i, "int4", spec.int4_group) for o, i in shapes)
    ppl = _perplexity(model, ids)
    assert ppl <= 1.10 * base
    # quantize_lm_head: the head (the tied embedding, Q8_0 in the file) as int4 g32 too, as the
    # runtime makes it (runtime/loader.quantize_lm_head); measured +4.5% over bf16 (docs/PERF.md)
    model.lm_head = quantize_linear(model.lm_head, "int4", int4_group_size(576, spec.int4_group))
    head_ppl = _perplexity(model, ids)
    print(f"int4 from the GGUF: perplexity {ppl:.3f}, with the int4 lm_head {head_ppl:.3f}, "
          f"bf16 {base:.3f}")
    assert ppl < head_ppl <= 1.10 * base


def _q_k_row_order(out_features: int, heads: int) -> torch.Tensor:
    """The row permutation transformers applies to llama GGUF q/k weights (undoing llama.cpp's)."""
    dim = out_features // heads // 2
    rows = np.arange(out_features).reshape(heads, dim, 2).swapaxes(2, 1).reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(rows))


@pytest.mark.slow
def test_gguf_q4_1_loads_into_int4_exactly(smollm2_gguf_path, hf_smollm2):
    """Every decoder linear of SmolLM2 (all Q4_1) converts to int4 g32 without a float copy and
    dequantizes to exactly the weights transformers loaded: the int4 path loses nothing here."""
    from gguf import GGUFReader

    cfg = hf_smollm2.config
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    checked = 0
    for t in GGUFReader(smollm2_gguf_path).tensors:
        layer, _, part = t.name.removeprefix("blk.").rpartition(".weight")[0].partition(".")
        if part not in parts:
            continue
        q = int4_from_gguf(t.data, t.tensor_type.name, (int(t.shape[1]), int(t.shape[0])))
        if part in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if part == "attn_q" else cfg.num_key_value_heads
            q = q.rows(_q_k_row_order(q.shape[0], heads))
        expected = hf_smollm2.model.layers[int(layer)].get_submodule(parts[part]).weight
        assert q.group_size == 32 and torch.equal(dequantize_int4(q), expected), t.name
        checked += 1
    assert checked == 7 * cfg.num_hidden_layers
