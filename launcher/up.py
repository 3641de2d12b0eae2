"""`deploy up profile.yaml`: validate, plan, bind, load (serving /health 503 meanwhile), serve.

The order matters to the user: every mistake that can be found without loading a weight is found
first (profile, model files, plan, API key, the port), and the port is bound before the model
loads, so `/health` answers 503 during the load instead of refusing connections.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .engine_thread import EngineThread
from .errors import UserError
from .metrics import ServerMetrics
from .plan import MemoryPlan
from .profile import Profile

EXIT_OK, EXIT_LOAD_FAILED, EXIT_USER_ERROR, EXIT_DOES_NOT_FIT = 0, 1, 2, 3
GRACEFUL_SHUTDOWN_S = 30   # SIGINT/SIGTERM: how long in-flight requests may take to finish


def run_up(profile_path: str, host: str | None, port: int | None, overrides: list[str]) -> int:
    """The exit code: 0 after a clean shutdown, 3 when the plan does not fit, 1 when loading
    failed. User mistakes raise UserError (the CLI prints one line, exit 2)."""
    from .engine_config import build_engine_config
    from .gpus import resolve_target
    from .model_resolve import resolve_model
    from .plan import plan as make_plan
    from .plan_report import print_plan
    from .profile import load_profile

    console = Console()
    profile = load_profile(profile_path, overrides)
    for line in profile.warnings:
        console.print(line, style="yellow", highlight=False)
    check_single_device(profile)
    spec = resolve_model(profile)
    memory_plan = make_plan(profile, spec, resolve_target(profile))
    print_plan(memory_plan, profile, spec, console)
    if not memory_plan.fits:
        return EXIT_DOES_NOT_FIT
    config = build_engine_config(profile, spec, memory_plan)
    api_key = resolve_api_key(profile)
    chat_template = read_chat_template(profile)
    host = host or profile.host
    port = profile.port if port is None else port
    sock = bind(host, port)
    return serve(config, memory_plan, sock, api_key, chat_template, console)


# ---- checks that need no weights -------------------------------------------------------------

def check_single_device(profile: Profile) -> None:
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(profile, key) > 1:
            raise profile.error(key, f"{key} {getattr(profile, key)} is not supported by deploy up "
                                     "(the runtime serves from one device)",
                                f"set {key}: 1, or use 4-bit quantization / cpu_offload_gb to fit")


def resolve_api_key(profile: Profile) -> str | None:
    if profile.api_key_env:
        key = os.environ.get(profile.api_key_env)
        if not key:
            raise profile.error("api_key_env", f"environment variable {profile.api_key_env} is "
                                               "not set or empty",
                                f"export {profile.api_key_env}=<key>, or remove api_key_env")
        return key
    return profile.api_key or None


def read_chat_template(profile: Profile) -> str | None:
    if not profile.chat_template:
        return None
    path = profile.resolve_path(profile.chat_template)
    if not path.is_file():
        raise profile.error("chat_template", f"chat template file {str(path)!r} does not exist",
                            "give the path of a Jinja template (relative to the profile's folder)")
    return path.read_text(encoding="utf-8")


def bind(host: str, port: int) -> socket.socket:
    """Bind now, before loading anything: a busy port is a one-line error, not a late crash."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}",
                        "pick another port with --port, or stop what is using it", field="port")
    # Listening already: clients that come early wait in the backlog instead of being refused.
    sock.listen(2048)
    return sock


# ---- serving ---------------------------------------------------------------------------------

class Server(uvicorn.Server):
    """uvicorn, minus its habit of re-raising the caught signal after a graceful shutdown (which
    would turn a clean SIGINT/SIGTERM stop into exit code 130/143)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(config, memory_plan: MemoryPlan, sock: socket.socket, api_key: str | None,
          chat_template: str | None, console: Console) -> int:
    from pagedeploy.runtime.engine import LLMEngine

    from .server import ServerSettings, build_app

    metrics = ServerMetrics(config.served_model_name)
    engine = EngineThread(lambda: LLMEngine(config), metrics)
    settings = ServerSettings(
        model_name=config.served_model_name, max_model_len=config.max_model_len,
        vocab_size=config.spec.vocab_size, max_logprobs=config.max_logprobs,
        pool_tokens=config.num_blocks * config.block_size, api_key=api_key,
        model_root=config.model_path, chat_template=chat_template, drain_timeout_s=5.0)
    app = build_app(engine, settings, metrics)
    host, port = sock.getsockname()[:2]
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    engine.start()

    async def main() -> None:
        announce = asyncio.create_task(report_start(engine, server, memory_plan, host, port,
                                                    api_key is not None, console))
        try:
            await server.serve(sockets=[sock])
        finally:
            announce.cancel()

    asyncio.run(main())
    if engine.load_error is not None:
        return EXIT_LOAD_FAILED
    console.print("pagedeploy: stopped.", highlight=False)
    return EXIT_OK


async def report_start(engine: EngineThread, server: Server, memory_plan: MemoryPlan, host: str,
                       port: int, keyed: bool, console: Console) -> None:
    """Show a progress bar while the weights load, then the KV line, memory and the URL."""
    start = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"Loading {memory_plan.model} weights and allocating the KV pool "
                                 f"(/health answers 503 meanwhile)", total=None)
        while not engine.ready.is_set():   # polled: a waiting thread would delay a Ctrl+C exit
            await asyncio.sleep(0.1)
        progress.update(task, total=1, completed=1)
    if engine.load_error is not None:
        console.print(f"[bold red]error:[/] loading the model failed: {engine.load_error}", highlight=False)
        server.should_exit = True
        return
    console.print(f"Loaded in {time.monotonic() - start:.1f} s.", highlight=False)
    for line in startup_lines(engine.engine, memory_plan, host, port, keyed):
        console.print(line, highlight=False, soft_wrap=True)   # one line each, even in a log file


def startup_lines(engine, p: MemoryPlan, host: str, port: int, keyed: bool) -> list[str]:
    kv = p.kv_cache
    runner = engine.runner
    allocated = runner.kv_cache_bytes() if hasattr(runner, "kv_cache_bytes") else kv.bytes
    shown_host = f"[{host}]" if ":" in host else host
    return [
        f"KV cache: {kv.num_blocks:,} blocks × {kv.block_size} tokens = {kv.tokens:,} tokens; "
        f"max concurrency {p.max_concurrency:.2f}× at max_model_len {p.max_model_len:,}",
        f"Memory: KV cache {gib(allocated)} allocated (plan {gib(kv.bytes)}); {measured_memory(p)}",
        *device_memory_lines(runner, p),
        *offload_lines(getattr(getattr(runner, "model", None), "offloader", None), p),
        f"Serving {engine.config.served_model_name} at http://{shown_host}:{port}/v1 "
        f"(OpenAI API{'; Bearer key required' if keyed else ''}; /health, /metrics). Ctrl+C stops.",
    ]


def measured_memory(p: MemoryPlan) -> str:
    if p.device == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated()
        planned = p.used_bytes - p.cuda_context_bytes - p.cuda_graph_bytes
        return f"torch peak allocated {gib(peak)} (plan without CUDA context/graphs {gib(planned)})"
    packed = f" + packed copies {gib(p.weights.packed_bytes)}" if p.weights.packed_bytes else ""
    return (f"process RSS {gib(rss_bytes())} (plan: weights {gib(p.weights.gpu_bytes)}{packed} + "
            f"activations {gib(p.activation_peak_bytes)} + KV {gib(p.kv_cache.bytes)}, "
            f"reserve {gib(p.runtime_reserve_bytes)} not counted)")


def device_memory_lines(runner, p: MemoryPlan) -> list[str]:
    """What the driver sees against the plan's total, and the two terms the plan can only
    estimate: memory outside torch (context, libraries) and the CUDA-graph pool."""
    if p.device != "cuda":
        return []
    import torch

    free, total = torch.cuda.mem_get_info()
    outside = (total - free) - torch.cuda.memory_reserved()
    graphs = runner.cuda_graph_bytes() if hasattr(runner, "cuda_graph_bytes") else 0
    return [f"GPU in use {gib(total - free)} (plan {gib(p.used_bytes)}): outside torch {gib(outside)} "
            f"(plan's CUDA context {gib(p.cuda_context_bytes)}), CUDA graphs {gib(graphs)} "
            f"(plan {gib(p.cuda_graph_bytes)})"]


def offload_lines(offloader, p: MemoryPlan) -> list[str]:
    """Measured against planned: the bytes in CPU memory (equal by construction, so a difference
    is a bug worth seeing) and the GPU staging buffers they are copied through."""
    w = p.weights
    if offloader is None:
        return []
    return [f"CPU offload: {offloader.num_layers} layers, {offloader.offloaded_bytes:,} bytes "
            f"({gib(offloader.offloaded_bytes)}) in pinned CPU memory (plan {w.layers_offloaded} "
            f"layers, {w.cpu_bytes:,} bytes); host buffer {gib(offloader.host_bytes)}; "
            f"GPU staging {gib(offloader.staging_bytes)} (plan {gib(w.staging_bytes)})"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"
