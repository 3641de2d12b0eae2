"""build_engine_config(profile, spec, plan) -> EngineConfig: the plan's numbers handed to the runtime.

Nothing is re-derived here: num_blocks, swap blocks, the dtype, the device and the offloaded bytes
are the plan's. No torch import.
"""
from __future__ import annotations

from pagedeploy.runtime.config import EngineConfig

from .model_spec import ModelSpec
from .plan import MemoryPlan
from .profile import Profile


def build_engine_config(profile: Profile, spec: ModelSpec, plan: MemoryPlan) -> EngineConfig:
    """The plan must fit (the caller checks plan.fits and shows the fixes otherwise)."""
    tokenizer = str(profile.resolve_path(profile.tokenizer)) if profile.tokenizer else None
    return EngineConfig(
        spec=spec,
        num_blocks=plan.kv_cache.num_blocks,
        block_size=plan.kv_cache.block_size,
        load_format=load_format(profile, spec),
        model_path=spec.path,
        tokenizer=tokenizer,
        dtype=plan.dtype,
        kv_cache_dtype=plan.kv_cache.dtype,
        device=plan.device,
        num_swap_blocks=plan.kv_cache.swap_blocks,
        max_model_len=plan.max_model_len,
        max_num_seqs=profile.max_num_seqs,
        max_num_batched_tokens=profile.max_num_batched_tokens,
        enable_prefix_caching=profile.enable_prefix_caching,
        # CPU offload copies layers from hooks that run on the host each forward, which a CUDA
        # graph replay would skip; the plan counts no graph pool then.
        enforce_eager=profile.enforce_eager or plan.device == "cpu" or plan.weights.cpu_bytes > 0,
        max_seq_len_to_capture=profile.max_seq_len_to_capture,
        quantization=profile.quantization,
        quantize_lm_head=profile.quantize_lm_head,
        cpu_offload_bytes=plan.weights.cpu_bytes,
        seed=profile.seed,
        max_logprobs=profile.max_logprobs,
        served_model_name=profile.served_model_name or profile.model,
    )


def load_format(profile: Profile, spec: ModelSpec) -> str:
    """auto: what the files are (gguf / safetensors); a catalog model has only dummy weights,
    and resolve_model(profile) already refused it unless load_format is dummy."""
    if profile.load_format != "auto":
        return profile.load_format
    return {"gguf": "gguf", "folder": "safetensors"}.get(spec.source, "dummy")
