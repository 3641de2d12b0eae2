"""Where `deploy up`'s start-up time goes: imports, plan, engine construction (weights, KV pool,
kernel warm-up, CUDA-graph capture), as wall times and a cProfile of the engine construction.
Usage (device machine): python3 scripts/gpu_startup.py PROFILE; writes $OUT/startup.txt."""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

START = time.perf_counter()


def main(profile: str) -> None:
    import torch
    t_torch = time.perf_counter()
    torch.cuda.init()
    t_cuda = time.perf_counter()
    from pagedeploy.runtime.engine import LLMEngine
    from pagedeploy.runtime.llm import engine_config_from_profile
    config = engine_config_from_profile(profile)
    t_plan = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    LLMEngine(config)
    prof.disable()
    t_engine = time.perf_counter()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    report = (f"import torch {t_torch - START:.2f} s, CUDA init {t_cuda - t_torch:.2f} s, "
              f"profile + plan {t_plan - t_cuda:.2f} s, engine {t_engine - t_plan:.2f} s")
    open(os.path.join(os.environ.get("OUT", "."), "startup.txt"), "w").write(report + "\n" + text.getvalue())
    print(text.getvalue()[:7000])
    print(report)


if __name__ == "__main__":
    main(sys.argv[1])
