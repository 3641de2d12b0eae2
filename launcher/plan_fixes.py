"""Fixes for a plan that does not fit: each one re-plans the profile with one value changed
(launcher/plan.py's plan_terms) and says what it frees and whether the plan then fits.
"""
from __future__ import annotations

import math
from dataclasses import replace

from .gpus import GiB, GpuSpec
from .model_spec import ModelSpec
from .plan import Fix, MemoryPlan, gib, offload_layers, plan_terms, plan_weights
from .profile import Profile


def find_fixes(profile: Profile, spec: ModelSpec, gpu: GpuSpec, p: MemoryPlan) -> list[Fix]:
    """Each change alone, re-planned, with its number and whether it makes the plan fit."""
    fixes = []
    if p.reason == "request":
        fixes.append(Fix("max_model_len", p.kv_cache.tokens, f"max_model_len: {p.kv_cache.tokens}"
                         " (the longest request the KV pool holds)", True))
    fixes += memory_fix(profile, spec, gpu, p)
    if profile.quantization is None:
        for quant in ("nf4", "int4"):
            fixes.append(change_fix(profile, spec, gpu, p, "quantization", quant,
                                    f"quantization: {quant}", "of weights"))
    elif not profile.quantize_lm_head:
        fixes.append(change_fix(profile, spec, gpu, p, "quantize_lm_head", True,
                                "quantize_lm_head: true", "of lm_head (it costs quality)"))
    fixes += offload_fix(profile, spec, gpu, p)
    if p.cuda_graph_bytes:
        fixes.append(change_fix(profile, spec, gpu, p, "enforce_eager", True,
                                "enforce_eager: true", "of CUDA graphs"))
    for key in ("max_num_batched_tokens", "max_num_seqs"):
        fixes += smaller_fix(profile, spec, gpu, p, key)
    return [f for f in fixes if f.fits or f.frees_bytes > 0]


def change_fix(profile, spec, gpu, p, key: str, value, text: str, what: str) -> Fix:
    alt = plan_terms(replace(profile, **{key: value}), spec, gpu)
    frees = p.non_kv_bytes - alt.non_kv_bytes
    tail = "and fits" if alt.fits else "(not enough alone)"
    return Fix(key, value, f"{text} frees {gib(frees)} {what} {tail}", alt.fits, frees)


def memory_fix(profile, spec, gpu, p) -> list[Fix]:
    """The gpu_memory_utilization (or kv_cache_memory_bytes) one max_model_len request needs."""
    need_kv = p.blocks_per_request * p.kv_cache.block_bytes
    if profile.kv_cache_memory_bytes is not None:
        room = (p.budget_bytes - p.non_kv_bytes) // p.kv_cache.block_bytes * p.kv_cache.block_bytes
        if room < need_kv:
            return []
        value = need_kv if p.reason == "request" else room
        return [Fix("kv_cache_memory_bytes", value, f"kv_cache_memory_bytes: {value} "
                    f"({gib(value)})", True)]
    needed = math.ceil((p.non_kv_bytes + need_kv) / p.total_bytes * 100) / 100
    while needed <= 1.0:
        if plan_terms(replace(profile, gpu_memory_utilization=needed), spec, gpu).fits:
            return [Fix("gpu_memory_utilization", needed,
                        f"gpu_memory_utilization: {needed:.2f}", True)]
        needed = round(needed + 0.01, 2)
    return []


def offload_gb_for(layer_bytes: list[int], count: int) -> float:
    """A cpu_offload_gb that moves exactly `count` layers (short and readable when possible)."""
    exact = sum(layer_bytes[:count]) / GiB
    for value in (math.floor(exact * 10) / 10, math.floor(exact * 100) / 100, exact):
        if offload_layers(layer_bytes, value)[0] == count:
            return value
    raise AssertionError("offload_layers must move `count` layers for their exact size")


def offload_fix(profile, spec, gpu, p) -> list[Fix]:
    """The smallest cpu_offload_gb that fits; and with nf4 too when 4-bit alone is short."""
    if p.device != "cuda":
        return []
    quants = [profile.quantization]
    if profile.quantization is None and not plan_terms(
            replace(profile, quantization="nf4"), spec, gpu).fits:
        quants.append("nf4")
    out = []
    for quant in quants:
        base = replace(profile, quantization=quant)
        layers = plan_weights(base, spec, p.dtype).layer_bytes
        values = (offload_gb_for(layers, n) for n in range(1, len(layers) + 1))
        for value in (v for v in values if v > profile.cpu_offload_gb):
            alt = plan_terms(replace(base, cpu_offload_gb=value), spec, gpu)
            if alt.fits:
                text = (f"cpu_offload_gb: {value:g} (moves {alt.weights.layers_offloaded} of "
                        f"{len(layers)} layers, {gib(alt.weights.cpu_bytes)}, to CPU memory)")
                key = "cpu_offload_gb" if quant == profile.quantization else \
                    "quantization+cpu_offload_gb"
                out.append(Fix(key, value, text if key == "cpu_offload_gb" else
                               f"quantization: {quant} with {text}", True,
                               p.weights.gpu_bytes - alt.weights.gpu_bytes))
                break
    return out


def smaller_fix(profile, spec, gpu, p, key: str) -> list[Fix]:
    """The largest halving of `key` that fits; else what one halving saves."""
    floor = profile.max_num_seqs if key == "max_num_batched_tokens" else 1
    candidates = []
    value = getattr(profile, key) // 2
    while value >= floor:
        candidates.append(value)
        value //= 2
    if not candidates:
        return []
    alts = [(v, plan_terms(replace(profile, **{key: v}), spec, gpu)) for v in candidates]
    value, alt = next(((v, a) for v, a in alts if a.fits), alts[0])
    frees = p.non_kv_bytes - alt.non_kv_bytes
    tail = "and fits" if alt.fits else "(not enough alone)"
    return [Fix(key, value, f"{key}: {value} frees {gib(frees)} {tail}", alt.fits, frees)]
