"""Weights from a .gguf file: dequantize, rename to HF names, undo llama.cpp's Q/K row permutation.

GGUFReader parses the whole vocabulary in Python and the numpy dequantizers are slow, so the first
load writes the dequantized fp32 tensors to a safetensors file under the cache dir, keyed by the
file's identity; later loads stream that file (about a second for SmolLM2-135M).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pagedeploy.launcher.gguf_meta import cache_dir, file_cache_key

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for tensors we
    do not use."""
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    if gguf_name == "rope_freqs.weight":   # llama3 rope scaling factors, kept under this name
        return gguf_name
    base, _, kind = gguf_name.rpartition(".")
    return f"{_TOP_NAMES[base]}.{kind}" if base in _TOP_NAMES else None


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of q/k rows (transformers' LlamaTensorProcessor):
    GGUF interleaves the two rotary halves of each head; HF keeps them as two blocks."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def dequantize_gguf(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .gguf as fp32 torch tensors under HF names, Q/K un-permuted for llama."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    heads = reader.fields[f"{arch}.attention.head_count"].contents()
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    kv_heads = kv_field.contents() if kv_field is not None else heads
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        w = dequantize(t.data, t.tensor_type)
        # Only llama-architecture GGUFs are permuted at conversion (as transformers assumes).
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = reverse_permute(w, heads if "q_proj" in name else kv_heads)
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32))
    return tensors


def gguf_weights_cache(path: str | Path) -> Path:
    """The cached safetensors file of the dequantized weights, written on first use."""
    cached = cache_dir() / "gguf-weights" / f"{file_cache_key(path)}.safetensors"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")   # concurrent first loads do not collide
        save_file(dequantize_gguf(path), str(tmp), metadata={"source": str(path)})
        tmp.replace(cached)
    return cached


def iter_gguf_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(gguf_weights_cache(path)), framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)
