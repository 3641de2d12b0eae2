"""Read a .gguf file's metadata as a config.json-shaped dict, plus its tensor infos.

GGUFReader parses the whole tokenizer vocabulary in Python (about 6 s for SmolLM2), so the result
is cached as JSON keyed by the file's path, size and mtime: `deploy plan` must stay under a second.
No torch here.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .model_spec import ModelSpec, TensorInfo

GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


def cache_dir() -> Path:
    root = os.environ.get("PAGEDEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagedeploy")
    return Path(root)


def file_cache_key(path: str | os.PathLike) -> str:
    """Stable key of a file's identity: resolved path, size and mtime."""
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def read_gguf_meta(path: str | os.PathLike) -> dict:
    """{"config": {...config.json keys...}, "tensors": [...], "chat_template": str | None}."""
    cached = cache_dir() / "gguf-meta" / f"{file_cache_key(path)}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    meta = _parse_gguf(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(cached)
    return meta


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _parse_gguf(path) -> dict:
    from gguf import GGUFReader  # numpy only; slow, hence the cache

    r = GGUFReader(str(path))
    arch = _field(r, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(sorted(GGUF_ARCHITECTURES))})")
    hf_arch, model_type = GGUF_ARCHITECTURES[arch]
    a = lambda k, d=None: _field(r, f"{arch}.{k}", d)  # noqa: E731
    heads = a("attention.head_count")
    hidden = a("embedding_length")
    names = {t.name for t in r.tensors}
    tokens = r.fields.get("tokenizer.ggml.tokens")
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": a("attention.head_count_kv", heads),
        "head_dim": a("attention.key_length") or hidden // heads,
        "vocab_size": a("vocab_size") or (len(tokens.data) if tokens else None),
        "max_position_embeddings": a("context_length", 2048),
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": a("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",  # what the dequantized weights are computed in by default
        "bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
        "_name_or_path": _field(r, "general.name", Path(path).stem),
    }
    tensors = [
        # GGUF lists dims fastest-first; torch order is the reverse.
        {"name": t.name, "shape": [int(d) for d in reversed(t.shape.tolist())],
         "dtype": t.tensor_type.name, "nbytes": int(t.n_bytes)}
        for t in r.tensors
    ]
    return {"config": config, "tensors": tensors,
            "chat_template": _field(r, "tokenizer.chat_template")}


def spec_from_gguf(path: str | os.PathLike) -> ModelSpec:
    meta = read_gguf_meta(path)
    tensors = [TensorInfo(t["name"], tuple(t["shape"]), t["dtype"], t["nbytes"])
               for t in meta["tensors"]]
    return ModelSpec.from_config(meta["config"], source="gguf", path=str(path), tensors=tensors)
