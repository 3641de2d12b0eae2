"""Batch-1 decode tok/s of both H100 profiles under rival choices, in one run (so machine-to-machine
spread, a few % on this device, does not decide between them): the greedy argmax as Triton's split
kernel (the default at up to kernels.ARGMAX_MAX_ROWS rows) or torch's reduction. Each choice gets a
fresh engine, the bench's warm-up, then REPS `deploy bench --batch-1` requests (128-token prompt,
256 new tokens). Run on the device machine.
Usage: python3 scripts/gpu_b1_ab.py [REPS]
"""
from __future__ import annotations

import gc
import statistics
import sys

import torch

from pagedeploy.launcher.bench import BATCH1_OUTPUT, BATCH1_PROMPT, _warm_up_ours, batch1_ours, make_workload
from pagedeploy.runtime import sampler
from pagedeploy.runtime.engine import LLMEngine
from pagedeploy.runtime.llm import engine_config_from_profile

ARGMAX = sampler.argmax
RULES = {"default": ARGMAX, "torch argmax": lambda x: x.argmax(dim=-1)}


def main(reps: int) -> None:
    table = []
    for profile in ("profiles/qwen3-0.6b-h100.yaml", "profiles/llama-3-8b-h100.yaml"):
        for name, rule in RULES.items():
            sampler.argmax = rule
            engine = LLMEngine(engine_config_from_profile(profile))
            _warm_up_ours(engine)
            request = make_workload(1, (BATCH1_PROMPT, BATCH1_PROMPT), (BATCH1_OUTPUT, BATCH1_OUTPUT), 0,
                                    engine.config.spec.vocab_size)[0]
            speeds = [batch1_ours(engine, request).decode_tok_s for _ in range(reps)]
            table.append((profile.split("/")[-1], name, speeds))
            print(f"{table[-1][0]:24s} {name:24s} " + " ".join(f"{s:7.1f}" for s in speeds), flush=True)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
    sampler.argmax = ARGMAX
    print("\nprofile                  rule               median decode tok/s (min-max)")
    for profile, name, speeds in table:
        print(f"{profile:24s} {name:24s} {statistics.median(speeds):8.1f} ({min(speeds):.1f}-{max(speeds):.1f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
