"""CPU offload and streaming 4-bit load on the GPU, one call on the device machine.

1. The seed case: profiles/llama-3-70b-7gb.yaml (Llama-3-70B architecture, dummy weights, bf16 +
   nf4, 79 of 80 layers in pinned CPU memory, a 7 GiB budget) built the way `deploy up` builds it
   (profile -> plan -> EngineConfig -> engine). Prints the load time, peak GPU memory (torch's
   max_memory_allocated, and what the driver says is used) beside the plan, host memory (the pinned
   offload buffer, RSS) and decode tok/s at batch 1 and 4.
2. Llama-3-8B dims, nf4 and int4, with and without cpu_offload_gb: greedy tokens must be equal
   (same seed, same weights), the load peak, and the decode speed of each.
3. bitsandbytes' dequantization scratch with and without the row chunks of quant/bnb.py.
Usage: python3 scripts/gpu_offload.py [70b] [8b] [bnb]   (all three by default)
Writes $OUT/gpu_offload.json; prints one line per figure as it goes.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "/tmp"))
GiB = 2**30
RESULTS: dict = {}


def log(key: str, value) -> None:
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)
    (OUT / "gpu_offload.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def gib(n: float) -> float:
    return round(n / GiB, 3)


def host_status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmLck", "VmPin"):
            fields[key] = gib(int(value.split()[0]) * 1024)
    return fields


def driver_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def engine_config(profile_path: str | None, data: dict | None = None, overrides=()):
    """profile -> spec -> plan -> EngineConfig, as `deploy up` does."""
    from pagedeploy.launcher.engine_config import build_engine_config
    from pagedeploy.launcher.gpus import resolve_target
    from pagedeploy.launcher.model_resolve import resolve_model
    from pagedeploy.launcher.plan import plan
    from pagedeploy.launcher.profile import build_profile, load_profile

    profile = load_profile(profile_path, list(overrides)) if profile_path else \
        build_profile(data, {}, "inline.yaml", str(ROOT))
    spec = resolve_model(profile)
    memory_plan = plan(profile, spec, resolve_target(profile))
    assert memory_plan.fits, memory_plan.verdict
    return build_engine_config(profile, spec, memory_plan), memory_plan


def build_llm(config):
    """The engine, its load time, and the torch peak of the load alone (before the KV pool)."""
    from pagedeploy.runtime import model_runner
    from pagedeploy.runtime.llm import LLM

    real_load, seen = model_runner.load_model, {}

    def load(cfg):
        model = real_load(cfg)
        torch.cuda.synchronize()
        seen["load_peak"] = torch.cuda.max_memory_allocated()
        seen["load_peak_reserved"] = torch.cuda.max_memory_reserved()
        seen["after_load"] = torch.cuda.memory_allocated()
        return model

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model_runner.load_model = load
    try:
        start = time.perf_counter()
        llm = LLM(config, tokenizer=None)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        model_runner.load_model = real_load
    return llm, seconds, seen


def prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def decode_speed(llm, batch: int, new_tokens: int, prompt_len: int, seed: int):
    """(greedy tokens, decode tok/s, prefill seconds). Decode speed from two runs on different
    prompts (the prefix cache must not help the second): max_tokens=1 (prefill and one sample)
    and max_tokens=new_tokens; the difference is new_tokens-1 decode steps."""
    from pagedeploy.runtime.sampling_params import SamplingParams

    vocab = llm.engine.config.spec.vocab_size
    warm = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate(prompts(vocab, batch, prompt_len, seed + 2000), warm)   # kernels, JIT, workspaces
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts(vocab, batch, prompt_len, seed + 1000), one)
    t_one = time.perf_counter() - start
    start = time.perf_counter()
    outs = llm.generate(prompts(vocab, batch, prompt_len, seed), many)
    t_many = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    assert all(len(t) == new_tokens for t in tokens)
    return tokens, round(batch * (new_tokens - 1) / (t_many - t_one), 2), round(t_one, 3)


def memory_report(prefix: str, memory_plan, seen: dict) -> None:
    p = memory_plan
    log(f"{prefix}.plan_total_gib", gib(p.used_bytes))
    log(f"{prefix}.plan_without_context_gib", gib(p.used_bytes - p.cuda_context_bytes - p.cuda_graph_bytes))
    log(f"{prefix}.plan_weights_gpu_gib", gib(p.weights.gpu_bytes))
    log(f"{prefix}.plan_staging_gib", gib(p.weights.staging_bytes))
    log(f"{prefix}.plan_kv_gib", gib(p.kv_cache.bytes))
    log(f"{prefix}.load_peak_allocated_gib", gib(seen["load_peak"]))
    log(f"{prefix}.load_peak_reserved_gib", gib(seen["load_peak_reserved"]))
    log(f"{prefix}.after_load_allocated_gib", gib(seen["after_load"]))
    log(f"{prefix}.peak_allocated_gib", gib(torch.cuda.max_memory_allocated()))
    log(f"{prefix}.peak_reserved_gib", gib(torch.cuda.max_memory_reserved()))
    log(f"{prefix}.driver_used_now_gib", gib(driver_used()))
    # The driver's peak: torch's reserved peak plus what the driver holds outside torch now
    # (CUDA context, cuBLAS and bitsandbytes workspaces): that part does not shrink.
    outside = driver_used() - torch.cuda.memory_reserved()
    log(f"{prefix}.reserved_now_gib", gib(torch.cuda.memory_reserved()))
    log(f"{prefix}.outside_torch_gib", f"{gib(outside)} (plan's CUDA context term {gib(p.cuda_context_bytes)})")
    log(f"{prefix}.driver_peak_estimate_gib", gib(torch.cuda.max_memory_reserved() + outside))
    log(f"{prefix}.within_plan", torch.cuda.max_memory_allocated() <= p.used_bytes - p.cuda_context_bytes
        and torch.cuda.max_memory_reserved() + outside <= p.used_bytes)


def offload_report(prefix: str, llm, memory_plan) -> None:
    off = getattr(llm.engine.runner.model, "offloader", None)
    if off is None:
        return
    w = memory_plan.weights
    log(f"{prefix}.offloaded_layers", f"{off.num_layers} (plan {w.layers_offloaded})")
    log(f"{prefix}.offloaded_bytes", f"{off.offloaded_bytes:,} (plan {w.cpu_bytes:,})")
    log(f"{prefix}.offloaded_equals_plan", off.offloaded_bytes == w.cpu_bytes)
    log(f"{prefix}.pinned_host_gib", gib(off.host_bytes))
    log(f"{prefix}.host_buffer_is_pinned", bool(off.host.data.is_pinned()))
    log(f"{prefix}.staging_gib", f"{gib(off.staging_bytes)} (plan {gib(w.staging_bytes)})")
    swap = getattr(llm.engine.runner, "swap_cache", None)
    log(f"{prefix}.swap_pool_host_gib", gib(swap.numel() * swap.element_size()) if swap is not None else 0)
    log(f"{prefix}.host", host_status())


def h2d_bandwidth(off) -> float:
    """GB/s of one offloaded layer's pinned region copied into its staging buffer (the same bytes
    that are there already, so the engine's state is untouched): the ceiling of offloaded decode."""
    region, target = off.layers[0].region, off.staging[0][:off.layers[0].region.numel()]
    target.copy_(region, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(region, non_blocking=True)
    torch.cuda.synchronize()
    return round(10 * region.numel() / (time.perf_counter() - start) / 1e9, 1)


def seed_case() -> None:
    config, memory_plan = engine_config(str(ROOT / "profiles" / "llama-3-70b-7gb.yaml"))
    log("70b.budget_gib", gib(memory_plan.budget_bytes))
    log("70b.verdict", memory_plan.verdict)
    llm, seconds, seen = build_llm(config)
    log("70b.load_seconds", round(seconds, 1))
    offload_report("70b", llm, memory_plan)
    off = llm.engine.runner.model.offloader
    log("70b.h2d_copy_gb_s", h2d_bandwidth(off))
    for batch in (1, 4):
        tokens, speed, prefill = decode_speed(llm, batch, new_tokens=10, prompt_len=64, seed=batch)
        log(f"70b.batch{batch}.decode_tok_s", speed)
        log(f"70b.batch{batch}.offloaded_gb_per_s_of_decode", round(off.offloaded_bytes * speed / batch / 1e9, 1))
        log(f"70b.batch{batch}.prefill_plus_one_token_s", prefill)
        log(f"70b.batch{batch}.tokens", tokens[0][:10])
    memory_report("70b", memory_plan, seen)
    log("70b.host_after", host_status())
    del llm
    torch.cuda.empty_cache()


def llama8b(method: str, offload_gb: float) -> dict:
    data = {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "load_format": "dummy", "dtype": "bfloat16",
            "quantization": method, "cpu_offload_gb": offload_gb, "gpu": "h100-80gb",
            "gpu_memory_utilization": 0.2, "max_model_len": 1024, "max_num_seqs": 4,
            "max_num_batched_tokens": 512, "enforce_eager": True, "swap_space": 0, "seed": 11}
    config, memory_plan = engine_config(None, data)
    prefix = f"8b.{method}.offload{offload_gb:g}"
    llm, seconds, seen = build_llm(config)
    log(f"{prefix}.load_seconds", round(seconds, 1))
    offload_report(prefix, llm, memory_plan)
    found = {}
    for batch in (1, 4):
        tokens, speed, _ = decode_speed(llm, batch, new_tokens=32, prompt_len=48, seed=batch)
        log(f"{prefix}.batch{batch}.decode_tok_s", speed)
        found[batch] = tokens
    memory_report(prefix, memory_plan, seen)
    del llm
    torch.cuda.empty_cache()
    return found


def small_check() -> None:
    for method in ("nf4", "int4"):
        try:
            without = llama8b(method, 0)
            with_offload = llama8b(method, 2)
            for batch in (1, 4):
                same = without[batch] == with_offload[batch]
                log(f"8b.{method}.batch{batch}.tokens_equal_with_offload", same)
                if not same:
                    log(f"8b.{method}.batch{batch}.tokens", {"without": without[batch][0][:16],
                                                              "with": with_offload[batch][0][:16]})
        except Exception as e:   # one method failing (bitsandbytes on CUDA 13) must not hide the other
            log(f"8b.{method}.error", f"{type(e).__name__}: {e}")
            traceback.print_exc()


def bnb_scratch() -> None:
    """bitsandbytes dequantizes the whole weight for a prefill-sized x; quant/bnb.py's row chunks
    bound that. Llama-3-70B's gate_up (57344 x 8192) at 512 tokens."""
    from pagedeploy.quant import bnb

    w = bnb.quantize_bnb(torch.randn(57344, 8192, device="cuda", dtype=torch.bfloat16) * 0.02, "nf4")
    x = torch.randn(512, 8192, device="cuda", dtype=torch.bfloat16)
    results = {}
    for mode in ("chunked", "whole"):
        real = bnb.dequant_chunk_rows
        if mode == "whole":
            bnb.dequant_chunk_rows = lambda w, x: w.shape[0]
        try:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            y = bnb.bnb_matmul(x, w)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                bnb.bnb_matmul(x, w)
            torch.cuda.synchronize()
            results[mode] = y
            log(f"bnb.gate_up_70b_m512.{mode}.scratch_gib", gib(torch.cuda.max_memory_allocated() - base))
            log(f"bnb.gate_up_70b_m512.{mode}.ms", round((time.perf_counter() - start) / 5 * 1000, 2))
        finally:
            bnb.dequant_chunk_rows = real
    diff = (results["chunked"].float() - results["whole"].float()).abs().max().item()
    log("bnb.gate_up_70b_m512.max_abs_diff", diff)


def main() -> None:
    parts = sys.argv[1:] or ["70b", "8b", "bnb"]
    log("device", torch.cuda.get_device_name())
    try:
        import bitsandbytes
        log("bitsandbytes", bitsandbytes.__version__)
    except Exception as e:
        log("bitsandbytes", f"not usable: {type(e).__name__}: {e}")
    steps = {"70b": seed_case, "8b": small_check, "bnb": bnb_scratch}
    for part in parts:
        try:
            steps[part]()
        except Exception as e:
            log(f"{part}.error", f"{type(e).__name__}: {e}")
            traceback.print_exc()


if __name__ == "__main__":
    main()
