"""Server overhead: streaming clients against `deploy up` versus the offline engine on the same work.

    python scripts/bench_server.py [profiles/cpu-default.yaml] --concurrency 8,32 --requests 32 \
        --max-tokens 32 [--set key=value ...] [--out docs/PERF.md, "Server overhead"]

For each concurrency C the same requests (fixed prompts, ignore_eos, fixed max_tokens, seeded
sampling, so every run generates exactly the same number of tokens) are run twice:
- offline: one LLMEngine in this process, at most C requests in flight (a new one is added when
  one finishes), stepped in a plain loop;
- server: C asyncio clients with httpx, each streaming /v1/completions (SSE) one request after
  another, against a `deploy up` subprocess loaded from the same profile.
Throughput is generated tokens / wall time; the server keeps X% of the offline figure. The
offline/server pairs run back to back, `--repeat` times, and the best of each is kept, because a
busy shared machine makes single runs noisy. CPU seconds per token (the offline process versus the
server process, clients not counted) is also reported: it shows the server's own overhead even
when other jobs share the cores and wall-clock figures drift.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some facts about the planet Mars.",
    "Describe a busy market in the morning.",
    "What makes bread rise when it bakes?",
    "Give advice to someone learning to cook.",
    "Summarize the water cycle for a child.",
    "Tell me about the history of paper.",
]


@dataclass
class Result:
    mode: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    cpu_seconds: float                # CPU time of the process doing the serving (all its threads)
    mean_ttft_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def cpu_seconds(pid: int | None = None) -> float:
    """user + system CPU time of a whole process (every thread), from /proc."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workload(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# ---- offline -----------------------------------------------------------------------------------

def run_offline(engine, prompts: list[str], concurrency: int, max_tokens: int) -> Result:
    """In a worker thread, as the server steps its engine: torch ops issued from the main thread
    (two intra-op threads) ran 4-8x slower on the shared 2-core machine than the same ops from a
    worker thread, which would make the comparison about threading rather than about HTTP."""
    result: list[Result] = []
    worker = threading.Thread(target=lambda: result.append(
        _offline_loop(engine, prompts, concurrency, max_tokens)))
    worker.start()
    worker.join()
    return result[0]


def _offline_loop(engine, prompts: list[str], concurrency: int, max_tokens: int) -> Result:
    from pagedeploy.runtime.sampling_params import SamplingParams

    pending = list(enumerate(prompts))
    in_flight, tokens = 0, 0
    start, cpu = time.perf_counter(), cpu_seconds()
    while pending or engine.has_unfinished():
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt,
                               SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8,
                                              seed=i))
            in_flight += 1
        for out in engine.step():
            if out.finished:
                in_flight -= 1
                tokens += out.num_generated_tokens
    return Result("offline", concurrency, len(prompts), tokens, time.perf_counter() - start,
                  cpu_seconds() - cpu)


# ---- server ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(profile: str, overrides: list[str], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pagedeploy.launcher.cli", "up", profile, "--port", str(port)]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"deploy up exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server did not become ready")


async def stream_one(client: httpx.AsyncClient, url: str, i: int, prompt: str, max_tokens: int
                     ) -> tuple[int, float]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    sent, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"]:
                ttft = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, ttft or 0.0


async def run_clients(url: str, server_pid: int, prompts: list[str], concurrency: int,
                      max_tokens: int) -> Result:
    queue = list(enumerate(prompts))
    results: list[tuple[int, float]] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def worker():
            while queue:
                i, prompt = queue.pop(0)
                results.append(await stream_one(client, url, i, prompt, max_tokens))

        start, cpu = time.perf_counter(), cpu_seconds(server_pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds, cpu = time.perf_counter() - start, cpu_seconds(server_pid) - cpu
    tokens = sum(t for t, _ in results)
    return Result("server", concurrency, len(prompts), tokens, seconds, cpu,
                  sum(f for _, f in results) / len(results))


# ---- report ------------------------------------------------------------------------------------

def report(rows: list[tuple[Result, Result, float]], args, machine: str) -> str:
    lines = [
        "# Server overhead (CPU default profile)",
        "",
        f"`python scripts/bench_server.py {args.profile} --concurrency {args.concurrency} "
        f"--requests {args.requests} --max-tokens {args.max_tokens} --repeat {args.repeat}"
        + "".join(f" --set {o}" for o in args.set) + "`",
        "",
        f"Machine: {machine}. Work: {args.requests} completions of exactly {args.max_tokens} tokens "
        "(ignore_eos, temperature 0.8, seeded), the 8 prompts of the script in turn. Offline: one "
        "LLMEngine stepped in a loop with at most C requests in flight. Server: `deploy up` in its own "
        "process, C asyncio httpx clients each streaming /v1/completions (SSE, include_usage) one "
        f"request after another. Both step the engine from a worker thread. {args.repeat} back-to-back "
        "offline/server pairs per row: best throughput of each, and the median of the pairs' ratios.",
        "",
        "| concurrent clients | offline tok/s | server tok/s | best server / best offline | "
        "median pair ratio | offline CPU ms/token | server CPU ms/token | server mean TTFT |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for off, srv, median_ratio in rows:
        lines.append(f"| {srv.concurrency} | {off.tokens_per_s:.2f} | {srv.tokens_per_s:.2f} | "
                     f"{100 * srv.tokens_per_s / off.tokens_per_s:.1f}% | {100 * median_ratio:.1f}% | "
                     f"{1000 * off.cpu_seconds / off.tokens:.0f} | {1000 * srv.cpu_seconds / srv.tokens:.0f} | "
                     f"{srv.mean_ttft_s:.2f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", nargs="?", default=str(ROOT / "profiles/cpu-default.yaml"))
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="profile override key=value")
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pagedeploy.runtime.engine import LLMEngine
    from pagedeploy.runtime.llm import engine_config_from_profile

    prompts = workload(args.requests)
    engine = LLMEngine(engine_config_from_profile(args.profile, args.set))
    run_offline(engine, prompts[:2], 2, 4)   # warm-up
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.profile, args.set, port, Path("/tmp") / f"bench-server-{port}.log")
    try:
        wait_ready(url, proc)
        asyncio.run(run_clients(url, proc.pid, prompts[:2], 2, 4))   # warm-up
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            best_off = best_srv = None
            ratios = []
            for _ in range(args.repeat):
                off = run_offline(engine, prompts, c, args.max_tokens)
                srv = asyncio.run(run_clients(url, proc.pid, prompts, c, args.max_tokens))
                assert off.tokens == srv.tokens == args.requests * args.max_tokens, (off, srv)
                ratios.append(srv.tokens_per_s / off.tokens_per_s)
                print(f"C={c}: offline {off.tokens_per_s:.2f} tok/s {off.cpu_seconds:.1f} CPU s, server "
                      f"{srv.tokens_per_s:.2f} tok/s {srv.cpu_seconds:.1f} CPU s "
                      f"({100 * srv.tokens_per_s / off.tokens_per_s:.1f}%)", flush=True)
                best_off = off if best_off is None or off.tokens_per_s > best_off.tokens_per_s else best_off
                best_srv = srv if best_srv is None or srv.tokens_per_s > best_srv.tokens_per_s else best_srv
            rows.append((best_off, best_srv, statistics.median(ratios)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    machine = f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end"
    text = report(rows, args, machine)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
