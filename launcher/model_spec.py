"""ModelSpec: the architecture facts the planner and the runtime need, read from config.json.

No torch here: `deploy plan` imports this module.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from pagedeploy.quant.formats import INT4_GROUP_SIZE

# Architectures our one Llama-family decoder implements (DESIGN.md decision 2).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
}

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blk|h)\.(\d+)\.")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

GGUF_4BIT_32 = {"Q4_0", "Q4_1", "Q4_K"}   # GGUF types quantized in blocks of 32 weights

@dataclass
class TensorInfo:
    """One weight tensor as a checkpoint header describes it (no data)."""
    name: str
    shape: tuple[int, ...]
    dtype: str          # safetensors dtype ("BF16", "F32", ...) or GGUF type ("Q4_1", "F32", ...)
    nbytes: int


@dataclass
class ModelSpec:
    name: str
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool        # Qwen2 has q/k/v biases
    qk_norm: bool               # Qwen3 normalizes q and k per head
    sliding_window: int | None
    torch_dtype: str            # checkpoint dtype: "bfloat16", "float16", "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    source: str = "config"      # "catalog" | "folder" | "gguf" | "config"
    path: str | None = None     # folder or .gguf file the weights live in
    tensors: list[TensorInfo] | None = None   # from checkpoint headers, when there are any
    config: dict = field(default_factory=dict, repr=False)  # the raw config.json

    @classmethod
    def from_config(cls, config: dict, name: str = "", **extra) -> "ModelSpec":
        """Parse a HF config.json dict. head_dim is read, never assumed to be hidden/heads
        unless the config leaves it out (as Llama 2 configs do)."""
        arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
        model_type = config.get("model_type", "llama")
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        rope_theta, rope_scaling = _rope_settings(config)
        return cls(
            name=name or config.get("_name_or_path", "") or model_type,
            architecture=arch,
            model_type=model_type,
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            config=config,
            **extra,
        )

    # Parameter counts by where they live; the planner turns them into bytes.
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def layer_linear_params(self) -> int:
        """Parameters of one decoder layer's linear weights (the part 4-bit quantizes)."""
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attn + mlp

    @property
    def layer_small_params(self) -> int:
        """Norms, biases and q/k norms of one layer: never quantized."""
        n = 2 * self.hidden_size
        if self.attention_bias:
            n += (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def num_params(self) -> int:
        per_layer = self.layer_linear_params + self.layer_small_params
        return (self.embedding_params + self.lm_head_params + self.hidden_size
                + self.num_hidden_layers * per_layer)

    @property
    def int4_group(self) -> int:
        """The group size int4 aims for: 32 for a GGUF stored in 32-weight 4-bit blocks (Q4_0, Q4_1,
        Q4_K's sub-blocks), so re-quantizing its dequantized weights lands on the source's own
        grid (SmolLM2's Q4_1: perplexity +0.0%, where group 64 gives +41%); 128 otherwise."""
        if self.source == "gguf" and any(t.dtype in GGUF_4BIT_32 for t in self.tensors):
            return 32
        return INT4_GROUP_SIZE

    def param_groups(self) -> tuple[list[tuple[int, int]], int]:
        """([(linear params, small params) per decoder layer], params outside the layers).

        From checkpoint headers when they describe unquantized tensors (exact; names decide where
        a tensor lives, 2-D tensors of a layer are its linear weights); otherwise from the counts
        above. A GGUF's shapes are the logical shapes, so its quantized tensors count too.
        """
        tensors = self.tensors
        usable = tensors and (self.source == "gguf"
                              or all(t.dtype in _FLOAT_DTYPES for t in tensors))
        if not usable:
            per_layer = (self.layer_linear_params, self.layer_small_params)
            other = self.embedding_params + self.lm_head_params + self.hidden_size
            return [per_layer] * self.num_hidden_layers, other
        layers = [[0, 0] for _ in range(self.num_hidden_layers)]
        other = 0
        for t in tensors:
            numel = math.prod(t.shape)
            match = _LAYER_INDEX.search(t.name)
            if match is None or int(match.group(1)) >= len(layers):
                other += numel
            else:
                layers[int(match.group(1))][0 if len(t.shape) >= 2 else 1] += numel
        return [tuple(pair) for pair in layers], other


def _rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config form: transformers 4 keeps `rope_theta` and
    `rope_scaling` at the top level; configs saved by transformers 5 nest both in `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta), scaling
