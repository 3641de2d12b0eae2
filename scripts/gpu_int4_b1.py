"""Issue 6, P3 at batch 1: the packed-fp16 int4 GEMV (quant/int4_gemv.py) against the route it
replaces (rms_norm, the fma kernel, silu_and_mul), kernel by kernel and end to end, in one run.

Kernels: Llama-3-8B's four decode linears as the model runs them (norm in front of qkv and gate_up,
silu * up after gate_up), each route captured in a CUDA graph over enough weight copies to overflow
L2 (PDL applies inside graphs), median microseconds per call; bf16 fused_linear for scale. Then
`deploy bench --batch-1` decode tok/s of Llama-3-8B dims with int4 through the new route (also with
quantize_lm_head), the old route (QuantLinear.uses_gemv off) and bf16, a fresh engine each, REPS
requests.
The kernel rows time the packed-fp16 GEMV (`mma=False`); the end-to-end "int4 new" row runs the
default route, int4_mma.py's tensor-core kernel since run 17 (scripts/gpu_int4_mma.py compares them).
Usage (device machine): python3 scripts/gpu_int4_b1.py [REPS] [--kernels-only] [--shapes=gate_up,down]
"""
from __future__ import annotations

import functools
import gc
import statistics
import sys

import torch

from gpu_common import RunLog
from gpu_int4 import L2_BYTES, random_int4, time_calls

from pagedeploy.kernels import rms_norm, silu_and_mul
from pagedeploy.kernels import triton_launch as launch
from pagedeploy.kernels.triton_gemv import fused_linear
from pagedeploy.quant import int4_gemv as G
from pagedeploy.quant.int4_triton import int4_matmul
from pagedeploy.quant.linear import QuantLinear

log = RunLog("int4_b1.log")
SHAPES = {  # name: (rows out, K, norm, silu)
    "qkv": (6144, 4096, True, False), "o": (4096, 4096, False, False),
    "gate_up": (14336, 4096, True, True), "down": (4096, 14336, False, False),
}


def variants(n: int, k: int, silu: bool) -> dict:
    """Launch shapes to time per linear: rows a program (and warps) and K splits."""
    out = {"default": G.default_config(n, k, 128, silu, torch.device("cuda"), mma=False)}
    for bn, nw in ((16, 2), (32, 2), (32, 4), (64, 4), (64, 8)):
        for split in (1, 2, 4, 8):
            out[f"bn{bn} w{nw} s{split}"] = G.Int4GemvConfig(bn, split, nw)
    return out


def gemv_only(x, w, silu: bool):
    """The packed-fp16 GEMV launch of int4_gemv alone, on x packed once beforehand."""
    if id(x) not in _PACKED:
        _PACKED[id(x)] = G.pack_x(x)
    real = G.pack_x
    G.pack_x = lambda *a, **k: _PACKED[id(x)]
    cfg = G.default_config(w.shape[0] // 2 if silu else w.shape[0], w.shape[1], 128, silu, x.device, mma=False)
    try:
        return G.int4_gemv(x, w, silu_mul=silu, config=cfg)
    finally:
        G.pack_x = real


_PACKED: dict = {}


def copies(nbytes: int) -> int:
    return max(1, min(64, -(-2 * L2_BYTES // nbytes)))


def linear_cases(only: list[str]):
    """Per Llama-3-8B linear named in `only`, as the decoder runs it: (name, (rows out, K, norm,
    silu), int4 weight copies that overflow L2, x [1, K], the norm's fusion arguments (empty without
    a norm), the norm weight, the residual). x, residual and norm weight are random."""
    bf = torch.bfloat16
    x = torch.randn(1, 14336, device="cuda").to(bf)
    res = torch.randn(1, 4096, device="cuda").to(bf)
    nw = (1 + 0.1 * torch.randn(4096, device="cuda")).to(bf)
    for name, (n, k, norm, silu) in SHAPES.items():
        if name in only:
            rows = 2 * n if silu else n
            ws = [random_int4(rows, k, seed=i) for i in range(copies(rows * k // 2))]
            fus = dict(norm_weight=nw, eps=1e-6, residual=res) if norm else {}
            yield name, (n, k, norm, silu), ws, x[:, :k], fus, nw, res


def unfused(x, w, norm_weight, residual, norm: bool, silu: bool):
    """The route the batch-1 kernels replace: rms_norm, the fma kernel, silu_and_mul."""
    h = rms_norm(x, norm_weight, 1e-6, residual)[0] if norm else x
    y = int4_matmul(h, w)
    return silu_and_mul(y) if silu else y


def kernel_table() -> dict:
    bf = torch.bfloat16
    table = {}
    for name, (n, k, norm, silu), ws, xk, fus, nw, res in linear_cases(ONLY):
        rows = 2 * n if silu else n
        fus = dict(fus, silu_mul=silu)
        old = functools.partial(unfused, xk, norm_weight=nw, residual=res, norm=norm, silu=silu)
        row = {"old": time_calls([lambda w=w: old(w) for w in ws])}
        pack_args = (nw, 1e-6, res) if norm else ()
        row["pack"] = time_calls([lambda: G.pack_x(xk, *pack_args)] * len(ws))
        row["gemv only"] = time_calls([lambda w=w: gemv_only(xk, w, silu) for w in ws])
        launch.PDL_MODE = 0
        row["no pdl"] = time_calls([lambda w=w: G.int4_gemv(xk, w, **fus) for w in ws])
        launch.PDL_MODE = 2
        if silu:   # gate_up as one 2N-row stream (137 registers, not 255), silu * up launched after
            plain = dict(fus, silu_mul=False)
            split = G.default_config(rows, k, 128, False, xk.device, mma=False).split_k
            for bn, warps in ((32, 2), (32, 4), (64, 4)):
                cfg = G.Int4GemvConfig(bn, split, warps)
                row[f"2N bn{bn} w{warps} + silu_and_mul"] = time_calls(
                    [lambda w=w: silu_and_mul(G.int4_gemv(xk, w, config=cfg, **plain)[0]) for w in ws])
        for vname, cfg in variants(n, k, silu).items():
            row[vname] = time_calls([lambda w=w: G.int4_gemv(xk, w, config=cfg, **fus) for w in ws])
            a, b = G.int4_gemv(xk, ws[0], config=cfg, **fus)[0].float(), old(ws[0]).float()
            row[vname + " err"] = ((a - b).norm() / b.norm()).item()
        wb = [torch.randn(rows, k, device="cuda").to(bf) for _ in range(copies(2 * rows * k))]
        row["bf16"] = time_calls([lambda w=w: fused_linear(xk, w, **fus) for w in wb])
        table[name] = row
        log(f"{name:8s} " + " ".join(f"{key}={v:.4g}" for key, v in row.items()))
        del ws, wb
        torch.cuda.empty_cache()
    return table


def batch1_speeds(overrides: list[str], reps: int, tokens: list[int] | None = None) -> list[float]:
    """Batch-1 decode tok/s of `reps` requests on a fresh engine of the Llama-3-8B profile with
    `overrides` (as `deploy bench --batch-1`); `tokens`, if given, gets 64 greedy tokens of the
    bench's prompt."""
    from pagedeploy.launcher.bench import (BATCH1_OUTPUT, BATCH1_PROMPT, _warm_up_ours, batch1_ours,
                                           make_workload)
    from pagedeploy.runtime.engine import LLMEngine
    from pagedeploy.runtime.llm import engine_config_from_profile
    from pagedeploy.runtime.sampling_params import SamplingParams

    engine = LLMEngine(engine_config_from_profile("profiles/llama-3-8b-h100.yaml", overrides=overrides))
    _warm_up_ours(engine)
    request = make_workload(1, (BATCH1_PROMPT, BATCH1_PROMPT), (BATCH1_OUTPUT, BATCH1_OUTPUT), 0,
                            engine.config.spec.vocab_size)[0]
    speeds = [batch1_ours(engine, request).decode_tok_s for _ in range(reps)]
    if tokens is not None:
        engine.add_request("tokens", request.prompt_token_ids,
                           SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
        while engine.has_unfinished():
            tokens.extend(t for out in engine.step() if out.finished for t in out.outputs[0].token_ids)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return speeds


def interleaved_ab(modes: dict, reps: int, out: RunLog) -> dict[str, list]:
    """Batch-1 decode tok/s of int4, bf16, then int4 again, each of `modes` (name: a function that
    switches it on) in turn on a fresh engine, REPS requests each: {"int4": rows, "none": rows},
    rows (label, speeds) as log_speeds takes them. Each mode's 64 greedy tokens are compared with its
    own first run (they must repeat) and with the first mode's (reported: a near-tie may flip)."""
    rows, first = {"int4": [], "none": []}, {}
    base = next(iter(modes))
    for quant in ("int4", "none", "int4"):
        for name, switch_on in modes.items():
            switch_on()
            tokens: list[int] = []
            speeds = batch1_speeds([f"quantization={quant}"], reps, tokens)
            first.setdefault((quant, name), tokens)
            out(f"{quant} {name}: " + " ".join(f"{s:7.1f}" for s in speeds)
                + f"  tokens {'same' if tokens == first[(quant, name)] else 'DIFFER'} as its first run, "
                + f"{'same' if tokens == first.get((quant, base)) else 'other'} as {base}'s")
            rows[quant].append((f"{quant} {name}", speeds))
    return rows


def end_to_end(reps: int) -> list:
    rows, uses = [], QuantLinear.uses_gemv
    old_route = lambda self, x: False  # noqa: E731
    for name, keys, route in (("int4 new", ["quantization=int4"], uses),
                              ("int4 + head", ["quantization=int4", "quantize_lm_head=true"], uses),
                              ("int4 old", ["quantization=int4"], old_route),
                              ("bf16", ["quantization=none"], uses)):
        QuantLinear.uses_gemv = route
        speeds = batch1_speeds(keys, reps)
        rows.append((name, speeds))
        log(f"{name:10s} " + " ".join(f"{s:7.1f}" for s in speeds))
    QuantLinear.uses_gemv = uses
    return rows


def shapes_wanted() -> list[str]:
    """--shapes=qkv,down: the linears to time (all four by default)."""
    for arg in sys.argv:
        if arg.startswith("--shapes="):
            return arg.split("=", 1)[1].split(",")
    return list(SHAPES)


ONLY = shapes_wanted()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    table = kernel_table()
    log("\nus per call (CUDA graph, L2 overflowed); the best variant per shape")
    for name, row in table.items():
        times = {key: v for key, v in row.items()
                 if not key.endswith("err") and not key.startswith("2N")
                 and key not in ("old", "bf16", "pack", "gemv only", "no pdl")}
        best = min(times, key=times.get)
        log(f"{name:8s} old {row['old']:7.2f}  default {row['default']:7.2f}  "
            f"best {times[best]:7.2f} ({best})"
            f"  bf16 {row['bf16']:7.2f}  pack alone {row['pack']:5.2f}  GEMV alone {row['gemv only']:6.2f}"
            f"  default without PDL {row['no pdl']:6.2f}")
        for key in (key for key in row if key.startswith("2N")):
            log(f"{name:8s} {key} {row[key]:7.2f}")
    for col in ("old", "default", "bf16"):
        log(f"{'+'.join(table)} {col}: {sum(row[col] for row in table.values()):.2f} us")
    if "--kernels-only" in sys.argv:
        return
    log_speeds(end_to_end(int(args[0]) if args else 3))


def log_speeds(rows: list, out: RunLog = log) -> None:
    """Median (min-max) decode tok/s per route, and its ratio to the last row's (bf16), into `out`."""
    out("\nLlama-3-8B dims, batch-1 decode tok/s, median (min-max)")
    bf16 = statistics.median(rows[-1][1])
    for name, speeds in rows:
        med = statistics.median(speeds)
        out(f"{name:12s} {med:7.1f} ({min(speeds):.1f}-{max(speeds):.1f})  {med / bf16:.2f}x bf16")


if __name__ == "__main__":
    main()
