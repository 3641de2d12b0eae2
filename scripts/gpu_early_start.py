"""Issue 6, batch 1: early launch in the kernels that do nothing before their wait (rotary + KV
store, attention: kernels/triton_launch.EARLY_ROPE and EARLY_ATTENTION): off, rotary only, both;
int4 and bf16 Llama-3-8B dims, `deploy bench --batch-1` decode tok/s, REPS requests a fresh engine
each, in one run; the greedy tokens must not depend on when kernels launch. Then bf16 with 64 in
flight (the c64 workload of scripts/gpu_p3.sh), rotary's early launch off and on. The model asks for
rotary's on bf16 layers only, so for int4 "rope" runs as "off".
Usage (device machine): python3 scripts/gpu_early_start.py [REPS [MODE ...]]   (modes: off, rope, both)
"""
from __future__ import annotations

import gc
import sys

import torch

import gpu_int4_b1 as B1
from gpu_common import RunLog

from pagedeploy.kernels import triton_launch

log = RunLog("early_start.log")


def c64_bf16() -> float:
    """Output tok/s of the c64 workload, bf16, on a fresh engine (as `deploy bench`)."""
    from pagedeploy.launcher.bench import _requests, _warm_up_ours, parse_args, run_ours
    from pagedeploy.runtime.engine import LLMEngine
    from pagedeploy.runtime.llm import engine_config_from_profile

    ns = parse_args(["--concurrency", "64", "--num-requests", "128", "--input-len", "100:1024",
                     "--output-len", "100:1024", "--seed", "0", "--ignore-eos"])
    config = engine_config_from_profile("profiles/llama-3-8b-h100.yaml", overrides=["quantization=none"])
    engine = LLMEngine(config)
    _warm_up_ours(engine)
    requests, mode = _requests(ns, engine.config.spec.vocab_size)
    result = run_ours(engine, requests, ns.concurrency, True, mode)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result.output_tokens / result.seconds


def main(reps: int) -> None:
    rows, first_tokens = [], {}
    shipped = triton_launch.EARLY_ROPE, triton_launch.EARLY_ATTENTION
    for early in sys.argv[2:] or ("off", "rope", "off", "rope"):   # interleaved: drift shows
        for name, keys in (("int4", ["quantization=int4"]), ("bf16", ["quantization=none"])):
            triton_launch.EARLY_ROPE, triton_launch.EARLY_ATTENTION = early != "off", early == "both"
            tokens: list[int] = []
            speeds = B1.batch1_speeds(keys, reps, tokens)
            same = first_tokens.setdefault(name, tokens) == tokens
            log(f"{name} early={early}: greedy tokens {'equal' if same else 'DIFFER'} (64, first run's)")
            rows.append((f"{name} early={early}", speeds))
            log(f"{name} early={early}: " + " ".join(f"{s:7.1f}" for s in speeds))
    triton_launch.EARLY_ATTENTION = False
    B1.log_speeds(rows, log)
    for rope in (False, True):
        triton_launch.EARLY_ROPE = rope
        log(f"c64 bf16 early rope={rope}: {c64_bf16():.1f} output tok/s")
    triton_launch.EARLY_ROPE, triton_launch.EARLY_ATTENTION = shipped


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
