"""Where a step's time goes on the GPU, for the offline workload of a profile.

Runs the nano-vllm workload (or its first N requests) with host-side phase timers around the
engine's parts, once with async scheduling and once without, then a torch.profiler window of a
few dozen steps (device time per kernel). Run on the device machine; writes under $OUT.
Usage: python3 scripts/gpu_profile.py PROFILE [NUM_REQUESTS [SKIP_STEPS]] (the profiler window
starts after SKIP_STEPS steps: 0 sees the prefill-heavy start, 40 the full decode batch).
       python3 scripts/gpu_profile.py PROFILE --batch-1: one request's decode steps, kernel by kernel
(GPU time per step of each kernel, and the idle gaps between kernels inside a step).
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


def batch1_window(engine: LLMEngine, steps: int = 20) -> str:
    """Kernels of `steps` batch-1 decode steps (128-token prompt): per-step GPU time by kernel, and
    how much of the steps' span the GPU sat idle between kernels (launch gaps)."""
    import json

    from torch.profiler import ProfilerActivity, profile

    engine.async_scheduling = True
    engine.add_request("b1", list(range(1000, 1128)),
                       SamplingParams(temperature=0.0, max_tokens=steps + 40, ignore_eos=True))
    for _ in range(20):                 # prefill and the first decodes, outside the window
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    path = os.path.join(OUT, "trace-b1.json")
    prof.export_chrome_trace(path)
    events = sorted((e for e in json.load(open(path))["traceEvents"]
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    by_name: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        by_name[e["name"][:90]] += e["dur"]
        count[e["name"][:90]] += 1
    busy = sum(e["dur"] for e in events)
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    lines = [f"batch-1: {steps} steps in {wall * 1e3:.1f} ms wall ({wall / steps * 1e6:.0f} us/step); "
             f"{len(events) / steps:.0f} GPU ops/step; busy {busy / steps:.0f} us/step of a "
             f"{span / steps:.0f} us/step span (idle {100 * (1 - busy / span):.0f}%)",
             f"{'us/step':>8} {'n/step':>6} {'us each':>8}  kernel"]
    for name, us in by_name.most_common(30):
        lines.append(f"{us / steps:8.1f} {count[name] / steps:6.1f} {us / count[name]:8.2f}  {name}")
    return "\n".join(lines)


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


def batch1_main(profile: str) -> None:
    engine = LLMEngine(engine_config_from_profile(profile))
    engine.stream = False
    add_workload(engine, 4)            # warm-up: compile kernels outside the timings
    while engine.has_unfinished():
        engine.step()
    phases = timed_run(engine, 1, True)   # host phases with one request alone (the workload's first)
    report = phases + "\n" + batch1_window(engine)
    open(os.path.join(OUT, f"b1-{os.path.basename(profile)}.txt"), "w").write(report)
    print(report)


if __name__ == "__main__":
    if sys.argv[2:3] == ["--batch-1"]:
        batch1_main(sys.argv[1])
    else:
        main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256,
             int(sys.argv[3]) if len(sys.argv) > 3 else 40)
