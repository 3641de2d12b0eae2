"""Where a step's time goes on the GPU, for the offline workload of a profile.

Runs the nano-vllm workload (or its first N requests) with host-side phase timers around the
engine's parts, once with async scheduling and once without, then a torch.profiler window of a
few dozen steps (device time per kernel). Run on the device machine; writes under $OUT.
Usage: python3 scripts/gpu_profile.py PROFILE [NUM_REQUESTS [SKIP_STEPS]] (the profiler window
starts after SKIP_STEPS steps: 0 sees the prefill-heavy start, 40 the full decode batch).
"""
from __future__ import annotations

import collections
import os
import sys
import time

import torch

from pagedeploy.launcher.bench import make_workload
from pagedeploy.runtime.engine import LLMEngine
from pagedeploy.runtime.llm import engine_config_from_profile
from pagedeploy.runtime.sampling_params import SamplingParams

OUT = os.environ.get("OUT", ".")
_shifts = iter(range(0, 10_000, 1000))    # workload ids are < 10,001; vocabularies are larger


class PhaseTimer:
    """Wall time spent inside chosen methods, by name (patched on the instances)."""

    def __init__(self):
        self.seconds: collections.Counter = collections.Counter()

    def wrap(self, obj, method: str, name: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        setattr(obj, method, timed)


def add_workload(engine: LLMEngine, num_requests: int) -> None:
    """The workload, its token ids shifted by a fresh offset: no prefix-cache hits across runs."""
    work = make_workload(num_requests, (100, 1024), (100, 1024), 0, engine.config.spec.vocab_size)
    shift = next(_shifts)
    for i, r in enumerate(work):
        engine.add_request(f"{shift}-{i}", [t + shift for t in r.prompt_token_ids],
                           SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True))


def timed_run(engine: LLMEngine, num_requests: int, async_scheduling: bool) -> str:
    engine.async_scheduling = async_scheduling
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "prepare", "prepare")
    timer.wrap(engine.runner, "execute", "execute (prepare + launch)")
    timer.wrap(engine, "_read_in_flight", "read previous step (incl. wait)")
    timer.wrap(engine, "_advance", "advance + commit")
    timer.wrap(engine, "_sample", "sample (launch)")
    add_workload(engine, num_requests)
    torch.cuda.synchronize()
    start, steps, tokens = time.perf_counter(), 0, 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.outputs[0].token_ids) if out.finished else 0
        steps += 1
    seconds = time.perf_counter() - start
    for obj, method in ((engine.scheduler, "schedule"), (engine.runner, "prepare"), (engine.runner, "execute"),
                        (engine, "_read_in_flight"), (engine, "_advance"), (engine, "_sample")):
        delattr(obj, method)
    lines = [f"async={async_scheduling}: {tokens} output tokens, {steps} steps, {seconds:.2f} s, "
             f"{tokens / seconds:.0f} output tok/s, {seconds / steps * 1e3:.2f} ms/step"]
    for name, s in timer.seconds.most_common():
        lines.append(f"    {name:34s} {s:7.2f} s  {s / steps * 1e3:6.2f} ms/step")
    return "\n".join(lines)


def kernel_window(engine: LLMEngine, num_requests: int, skip: int, window: int = 30) -> str:
    """torch.profiler over `window` steps after `skip`."""
    from torch.profiler import ProfilerActivity, profile

    engine.async_scheduling = True
    add_workload(engine, num_requests)
    for _ in range(skip):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(window):
            engine.step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(OUT, "trace.json"))
    while engine.has_unfinished():
        engine.step()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def main(profile: str, num_requests: int, skip: int) -> None:
    engine = LLMEngine(engine_config_from_profile(profile))
    engine.stream = False
    add_workload(engine, 8)            # warm-up: compile kernels outside the timings
    while engine.has_unfinished():
        engine.step()
    report = [timed_run(engine, num_requests, False), timed_run(engine, num_requests, True)]
    kernels = kernel_window(engine, num_requests, skip)
    open(os.path.join(OUT, "kernels.txt"), "w").write(kernels)
    print(kernels[:6000])
    print("\n".join(report))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256, int(sys.argv[3]) if len(sys.argv) > 3 else 40)
