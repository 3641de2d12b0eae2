"""How a MemoryPlan is shown: a rich table with a one-line memory bar, or a stable JSON object.

The JSON shape is documented in README.md ("deploy plan --json"); keys are only ever added.
"""
from __future__ import annotations

from .gpus import GiB
from .model_spec import ModelSpec
from .plan import MemoryPlan
from .profile import Profile


def plan_to_json(p: MemoryPlan, profile: Profile, spec: ModelSpec) -> dict:
    w, kv = p.weights, p.kv_cache
    return {
        "fits": p.fits,
        "verdict": p.verdict,
        "reason": p.reason or None,
        "model": {"name": spec.name, "architecture": spec.architecture, "source": spec.source,
                  "path": spec.path, "num_params": spec.num_params,
                  "max_position_embeddings": spec.max_position_embeddings},
        "gpu": {"name": p.gpu.name, "total_bytes": p.total_bytes, "device": p.device,
                "bandwidth_bytes_per_s": p.gpu.bandwidth_bytes_per_s, "source": p.gpu.source},
        "dtype": p.dtype,
        "gpu_memory_utilization": p.gpu_memory_utilization,
        "budget_bytes": p.budget_bytes,
        "weights": {"gpu_bytes": w.gpu_bytes, "cpu_bytes": w.cpu_bytes,
                    "total_bytes": w.total_bytes, "layers_offloaded": w.layers_offloaded,
                    "quantization": w.quantization, "quant_scale_bytes": w.quant_scale_bytes,
                    "staging_bytes": w.staging_bytes, "packed_bytes": w.packed_bytes,
                    "lm_head_quantized": w.lm_head_quantized, "dtype": w.dtype},
        "activation_peak_bytes": p.activation_peak_bytes,
        "cuda_context_bytes": p.cuda_context_bytes,
        "cuda_graph_bytes": p.cuda_graph_bytes,
        "runtime_reserve_bytes": p.runtime_reserve_bytes,
        "kv_cache": {"bytes_per_token": kv.bytes_per_token, "block_size": kv.block_size,
                     "block_bytes": kv.block_bytes, "num_blocks": kv.num_blocks,
                     "tokens": kv.tokens, "swap_blocks": kv.swap_blocks, "bytes": kv.bytes,
                     "budget_bytes": kv.budget_bytes, "dtype": kv.dtype},
        "free_bytes": p.budget_bytes - p.used_bytes,
        "max_model_len": p.max_model_len,
        "max_num_seqs": p.max_num_seqs,
        "max_num_batched_tokens": p.max_num_batched_tokens,
        "max_concurrency": round(p.max_concurrency, 4),
        "fixes": [{"field": f.field, "value": f.value, "fits": f.fits,
                   "frees_bytes": f.frees_bytes, "text": f.text} for f in p.fixes],
        "settings": {k: ("***" if k == "api_key" and v else v)
                     for k, v in profile.settings().items()},
        "defaults": sorted(set(profile.settings()) - profile.explicit),
    }


def gib(n: int | float) -> str:
    return f"{n / GiB:,.2f}"


# (label, plan attribute getter, style, bar character)
_SEGMENTS = [
    ("weights", lambda p: p.weights.gpu_bytes + p.weights.staging_bytes + p.weights.packed_bytes,
     "magenta", "W"),
    ("activations", lambda p: p.activation_peak_bytes, "yellow", "A"),
    ("CUDA context", lambda p: p.cuda_context_bytes, "red", "C"),
    ("CUDA graphs", lambda p: p.cuda_graph_bytes, "bright_red", "G"),
    ("reserve", lambda p: p.runtime_reserve_bytes, "white", "R"),
    ("KV cache", lambda p: p.kv_cache.bytes, "green", "K"),
]


def memory_bar(p: MemoryPlan, width: int = 60) -> str:
    """One line of rich markup: each term's share of the budget (or of what is asked, when that
    is more), free space as dots."""
    scale = max(p.budget_bytes, p.used_bytes) / width
    parts, used_chars, running = [], 0, 0
    for _label, get, style, char in _SEGMENTS:
        running += get(p)
        # cumulative rounding keeps the bar's length true; a non-zero term shows at least once
        n = max(round(running / scale) - used_chars, 1 if get(p) else 0)
        parts.append(f"[{style}]{char * n}[/]")
        used_chars += n
    free = max(0, width - used_chars)
    over = "" if p.used_bytes <= p.budget_bytes else " [bold red]over budget[/]"
    return (f"[{''.join(parts)}{'·' * free}] {gib(p.used_bytes)} / {gib(p.budget_bytes)} GiB"
            f"{over}")


def bar_legend() -> str:
    return "  ".join(f"[{style}]{char}[/] {label}" for label, _g, style, char in _SEGMENTS) \
        + "  · free"


def term_rows(p: MemoryPlan, fixed_kv: bool) -> list[tuple[str, int, str]]:
    w, kv = p.weights, p.kv_cache
    quant = f", {w.quantization}" if w.quantization else ""
    quant += " (lm_head too)" if w.lm_head_quantized else ""
    rows = [
        ("total memory", p.total_bytes, f"{p.gpu.name} ({p.gpu.source})"),
        ("budget", p.budget_bytes, "total (kv_cache_memory_bytes set)" if fixed_kv
         else f"total × {p.gpu_memory_utilization:g}"),
        ("weights on " + ("GPU" if p.device == "cuda" else "CPU device"), w.gpu_bytes,
         f"{w.dtype}{quant}"),
    ]
    if w.quant_scale_bytes:
        rows.append(("  of which 4-bit scales", w.quant_scale_bytes, "per group of weights"))
    rows += [
        ("weights offloaded to CPU", w.cpu_bytes, f"{w.layers_offloaded} whole layers"),
    ]
    if w.staging_bytes:
        rows.append(("  offload staging on GPU", w.staging_bytes, "2 × the largest offloaded layer"))
    if w.packed_bytes:
        rows.append(("  packed GEMM copies", w.packed_bytes, "float32 oneDNN layout, CPU"))
    rows += [
        ("activation peak", p.activation_peak_bytes,
         f"{p.max_num_batched_tokens} tokens, {p.max_num_seqs} seqs"),
        ("CUDA context", p.cuda_context_bytes, "" if p.device == "cuda" else "CPU target"),
        ("CUDA graphs", p.cuda_graph_bytes, "enforce_eager" if not p.cuda_graph_bytes else
         "estimate"),
        ("runtime reserve", p.runtime_reserve_bytes, ""),
        ("KV cache pool", kv.bytes, f"{kv.num_blocks:,} blocks"),
        ("free", p.budget_bytes - p.used_bytes, "budget − the above"),
    ]
    return rows


def print_plan(p: MemoryPlan, profile: Profile, spec: ModelSpec, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    kv = p.kv_cache
    console.print(f"[bold]{profile.path}[/]: {spec.name} ({spec.source}, "
                  f"{spec.num_params / 1e9:.2f} B params) on {p.gpu.name}, {p.dtype}, "
                  f"tp={p.tensor_parallel_size}")
    table = Table(show_header=True, header_style="bold")
    for col, justify in (("term", "left"), ("bytes", "right"), ("GiB", "right"),
                         ("note", "left")):
        table.add_column(col, justify=justify)
    for label, n, note in term_rows(p, profile.kv_cache_memory_bytes is not None):
        table.add_row(label, f"{n:,}", gib(n), note)
    console.print(table)
    console.print(f"KV: {kv.bytes_per_token:,} B/token ({kv.dtype}) × block_size "
                  f"{kv.block_size} = {kv.block_bytes:,} B/block; {kv.num_blocks:,} blocks = "
                  f"{kv.tokens:,} tokens; max concurrency at max_model_len {p.max_model_len:,}: "
                  f"{p.max_concurrency:.2f}; swap blocks: {kv.swap_blocks:,}")
    console.print(memory_bar(p))
    console.print(bar_legend())
    print_settings(profile, console)
    style = "bold green" if p.fits else "bold red"
    console.print(f"[{style}]{p.verdict}[/]")
    for f in p.fixes:
        mark = "[green]✓[/]" if f.fits else "[yellow]·[/]"
        console.print(f"  {mark} {f.text}")


def print_settings(profile: Profile, console) -> None:
    """The profile's settings in one wrapped paragraph; defaults dimmed."""
    items = []
    for key, value in profile.settings().items():
        if key in ("api_key",) and value:
            value = "***"
        text = f"{key}={value}"
        items.append(text if key in profile.explicit else f"[dim]{text}[/]")
    console.print("settings (dim = default): " + "  ".join(items), highlight=False)
