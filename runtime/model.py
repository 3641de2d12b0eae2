"""One decoder for the Llama family (Llama 2/3, Qwen2/2.5, Qwen3, Mistral, SmolLM2), from ModelSpec.

Parameter names follow HF's (`model.layers.N.self_attn.o_proj.weight` ...) except the fused
projections: q/k/v live in `qkv_proj` and gate/up in `gate_up_proj`; `load_weight` maps HF names.
Attention reads and writes the paged KV cache through pagedeploy.kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedeploy.kernels import (fused_linear, paged_attention, qk_norm_rope_store, rms_norm,
                                silu_and_mul)
from pagedeploy.launcher.model_spec import ModelSpec
from pagedeploy.quant.linear import QuantLinear
from pagedeploy.runtime.cpu_weights import PackedWeight

# The batch-1 int4 qkv GEMV does the rotary and the KV store in its epilogue (Attention.rope_in_gemv;
# scripts/gpu_rope_gemv.py A/Bs it).
ROPE_IN_GEMV = True

# HF checkpoint name piece -> (our fused parameter's name piece, shard index)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


@dataclass
class AttentionMetadata:
    """What attention needs about the batch; the runner builds it once per step."""
    slot_mapping: torch.Tensor      # int64 [T]: cache slot of each new token
    block_tables: torch.Tensor      # int32 [B, max_blocks]
    context_lens: torch.Tensor      # int32 [B]: tokens in the cache after this step's store
    query_start_loc: torch.Tensor   # int32 [B + 1]
    num_decodes: int = 0            # the first num_decodes sequences have one new token each
    max_context_len: int = 0        # max of context_lens, known on the host


class Linear(nn.Module):
    """y = x W^T (+ b); weights created uninitialized (the loaders fill them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard_sizes: list[int] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.shard_sizes = shard_sizes or [out_features]
        self.packed: PackedWeight | None = None   # float32 on the CPU: runtime/cpu_weights.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x, self.weight, self.bias)
        if use_gemv(x, self):
            return fused_linear(x, self.weight, self.bias)[0]
        return F.linear(x, self.weight, self.bias)

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        """The rows of `param` (weight or bias) that fused shard `index` occupies."""
        start = sum(self.shard_sizes[:index])
        return param.narrow(0, start, self.shard_sizes[index])


def use_gemv(x: torch.Tensor, linear: nn.Module) -> bool:
    """Batch-1 decode on CUDA goes through kernels.fused_linear: a GEMV that also takes the norm
    before and the activation after it, one launch instead of three. At 2-4 rows cuBLAS is faster
    (docs/PERF.md, run 12); 4-bit linears (QuantLinear) have kernels of their own."""
    return (x.shape[0] == 1 and x.is_cuda and type(linear) is Linear and linear.packed is None
            and linear.weight.dtype == x.dtype)


def norm_linear(norm: "RMSNorm", linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
                silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """linear(norm(x + residual)), silu(gate) * up of it when silu_mul, and the new residual."""
    fusions = dict(norm_weight=norm.weight, eps=norm.eps, residual=residual, silu_mul=silu_mul)
    if norm.weight.dtype == x.dtype:
        if use_gemv(x, linear):
            return fused_linear(x, linear.weight, linear.bias, **fusions)
        if isinstance(linear, QuantLinear) and linear.uses_gemv(x):
            from pagedeploy.quant.int4_gemv import int4_gemv
            return int4_gemv(x, linear.qweight, linear.bias, **fusions)
    x, residual = norm(x, residual)
    y = linear(x)
    return (silu_and_mul(y) if silu_mul else y), residual


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.packed: PackedWeight | None = None   # as the tied lm_head, see Linear

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads = spec.num_attention_heads, spec.num_key_value_heads
        self.head_dim = spec.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(spec.hidden_size, q_size + 2 * kv_size, spec.attention_bias,
                               [q_size, kv_size, kv_size])
        self.o_proj = Linear(q_size, spec.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.scale = self.head_dim ** -0.5
        self.sliding_window = spec.sliding_window
        self.k_cache = self.v_cache = torch.empty(0)   # bound by the runner to its KV pool

    def project(self, norm: "RMSNorm", x: torch.Tensor, residual: torch.Tensor | None,
                positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [T, H, D], the new residual) of qkv_proj(norm(x + residual)), rotated, with k and v
        rotated and stored into the cache."""
        if self.rope_in_gemv(norm, x):
            from pagedeploy.kernels.triton_fused import RopeStore
            from pagedeploy.quant.int4_gemv import int4_gemv
            q = torch.empty(1, self.num_heads, self.head_dim, dtype=x.dtype, device=x.device)
            rope = RopeStore(q, positions, cos_sin_cache, self.k_cache, self.v_cache, meta.slot_mapping)
            return int4_gemv(x, self.qkv_proj.qweight, self.qkv_proj.bias, norm_weight=norm.weight,
                             eps=norm.eps, residual=residual, rope=rope)
        qkv, residual = norm_linear(norm, self.qkv_proj, x, residual)
        qk_norm = self.q_norm is not None   # Qwen3: per-head RMSNorm of q and k before rope
        # One kernel reads q, k, v out of the fused projection: (norm,) rope, k/v into the cache.
        q = qk_norm_rope_store(
            qkv, self.q_norm.weight if qk_norm else None,
            self.k_norm.weight if qk_norm else None, self.q_norm.eps if qk_norm else 0.0,
            positions, cos_sin_cache, self.k_cache, self.v_cache, meta.slot_mapping,
            self.num_heads, self.num_kv_heads, self.head_dim,
            # attention launched early helps a bf16 layer, not int4's (docs/PERF.md runs 19, 21)
            early_launch=not isinstance(self.o_proj, QuantLinear))
        return q, residual

    def rope_in_gemv(self, norm: "RMSNorm", x: torch.Tensor) -> bool:
        """Whether the batch-1 int4 qkv GEMV rotates and stores in its epilogue (ROPE_IN_GEMV):
        one launch fewer a layer. Not with q/k norms, which need a head's whole row."""
        return (ROPE_IN_GEMV and self.q_norm is None and isinstance(self.qkv_proj, QuantLinear)
                and self.qkv_proj.uses_gemv(x) and norm.weight.dtype == x.dtype)

    def forward(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """o_proj(attention) of `project`'s q."""
        t = q.shape[0]
        o = paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                            meta.query_start_loc, self.scale, self.sliding_window,
                            num_decodes=meta.num_decodes, max_context_len=meta.max_context_len)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        inter = spec.intermediate_size
        self.gate_up_proj = Linear(spec.hidden_size, 2 * inter, shard_sizes=[inter, inter])
        self.down_proj = Linear(inter, spec.hidden_size)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, residual, positions, cos_sin_cache, meta):
        q, residual = self.self_attn.project(self.input_layernorm, x, residual, positions, cos_sin_cache,
                                             meta)
        x = self.self_attn(q, meta)
        act, residual = norm_linear(self.post_attention_layernorm, self.mlp.gate_up_proj, x, residual,
                                    silu_mul=True)
        return self.mlp.down_proj(act), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int):
        super().__init__()
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(spec, max_positions),
                             persistent=False)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin_cache, meta)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int | None = None):
        super().__init__()
        self.spec = spec
        self.model = LlamaModel(spec, max_positions or spec.max_position_embeddings)
        if spec.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [T, hidden] of the batch's new tokens."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        if isinstance(head, QuantLinear):   # quantize_lm_head
            return head(hidden)
        if head.packed is not None:
            return head.packed(hidden, head.weight)
        return F.linear(hidden, head.weight)

    def load_weight(self, hf_name: str, tensor: torch.Tensor) -> bool:
        """Copy one HF-named checkpoint tensor into place; False when the name is not ours."""
        if hf_name == "lm_head.weight" and self.lm_head is None:
            return True   # tied checkpoints may still carry a copy of the embedding
        if hf_name == "rope_freqs.weight":   # llama.cpp's form of llama3 rope scaling
            self.model.cos_sin_cache.copy_(rope_cos_sin_cache(
                self.spec, self.model.cos_sin_cache.shape[0], freq_factors=tensor))
            return True
        module_name, _, param_name = hf_name.rpartition(".")
        owner, fused = module_name.rpartition(".")[2], None
        if owner in STACKED_PARAMS:
            new_owner, fused = STACKED_PARAMS[owner]
            module_name = module_name[: len(module_name) - len(owner)] + new_owner
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            return False
        param = getattr(module, param_name, None)
        if not isinstance(param, torch.Tensor):
            return False
        target = param if fused is None else module.shard(param, fused)
        if target.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        target.copy_(tensor)
        return True

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        for layer, k, v in zip(self.model.layers, k_caches, v_caches, strict=True):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v


def rope_parameters(spec: ModelSpec) -> tuple[float, dict]:
    """(theta, scaling dict) from either the transformers 4 or 5 way of writing them."""
    params = spec.config.get("rope_parameters") or {}
    theta = spec.config.get("rope_theta") or params.get("rope_theta") or spec.rope_theta
    scaling = dict(spec.rope_scaling or params)
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    return float(theta), scaling


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies as HF computes them (default, linear, llama3)."""
    theta, scaling = rope_parameters(spec)
    dim = spec.head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    kind = scaling["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope_scaling type {kind!r} of {spec.name} is not supported "
                     "(supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """transformers' _compute_llama3_parameters: long wavelengths slowed down by `factor`,
    short ones kept, a smooth blend in between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin_cache(spec: ModelSpec, max_positions: int,
                       freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [max_positions, head_dim] = cat(cos, sin) over the half dims (kernel contract), built on
    the CPU: under a meta-device context arange would take torch's Python reference path, whose
    first use imports sympy (seconds of start-up).
    `freq_factors` divide the frequencies, as GGUF files' rope_freqs tensor asks."""
    inv_freq = rope_inv_freq(spec)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float().to(inv_freq.device)
    freqs = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
