"""Issue 6, P3 at 64 in flight: int4 decode batches (2-64 rows) through quant/int4_mma_rows.py against
the paths before it (fma / dot / gemm by M), in one GPU run.

1. correctness: mma launches on Llama-3-8B's linears and ragged cases (bias, M not a multiple of 16,
   splits, two blocks in flight), error against the exact product within 1.5x the torch reference's
   (gpu_int4.check), and a CUDA-graph replay;
2. kernels: a layer's four linears in µs per M (CUDA graph over weight copies that overflow L2): the
   rule before (MMA_MAX_M = 0), the mma rule, a sweep of mma splits and blocks in flight, bf16 cuBLAS;
3. end to end (unless --kernels-only): `deploy bench` of the Llama-3-8B profile with 64 in flight
   (as scripts/gpu_p3.sh), int4 without and with the mma path, and bf16, a fresh engine each.

Usage (device machine): python3 scripts/gpu_int4_rows.py [--kernels-only] [--ms=2,8,16,32,64]
"""
from __future__ import annotations

import gc
import sys

import torch

import gpu_int4 as T
from gpu_common import RunLog

from pagedeploy.quant import int4_triton as K4
from pagedeploy.quant.int4_triton import KernelConfig as C

log = RunLog("int4_rows.log")
T.log = log
SHAPES = {name.split()[1]: nk for name, nk in T.SHAPES.items() if name.startswith("llama")}   # (N, K)
SHIPPED_MAX_M = K4.MMA_MAX_M
C64 = ["--concurrency", "64", "--num-requests", "128", "--input-len", "100:1024", "--output-len", "100:1024",
       "--seed", "0", "--ignore-eos"]


def correctness() -> int:
    cases = [(M, N, K, None) for M in (2, 3, 16, 17, 33, 64) for N, K in SHAPES.values()]
    cases += [(5, 2048, 4096, C("mma", 16, 64, 128, 4, ahead=2)), (40, 2048, 4096, C("mma", 48, 64, 128, 2)),
              (64, 4096, 14336, C("mma", 64, 64, 128, 7, ahead=2)), (9, 1024, 2048, C("mma", 16, 128, 128, 1, 8))]
    failed = 0
    for M, N, K, cfg in cases:
        for dtype in (torch.bfloat16, torch.float16) if cfg else (torch.bfloat16,):
            cfg_used = cfg or K4.default_config(M, N, K, 128, torch.device("cuda"))
            failed += not T.check(f"mma {cfg_used.kind}", M, N, K, 128, dtype, cfg_used)
    failed += not T.check_graph(torch.bfloat16)
    return failed


def mma_sweep(M: int, N: int, K: int) -> dict:
    """Splits up to 8 that divide the blocks, one block in flight; the rule's split with two."""
    blocks = K // 512
    out = {f"s{d} a1": C("mma", 16, 64, 128, d) for d in range(1, min(8, blocks // 2) + 1) if blocks % d == 0}
    rule = K4.mma_config(M, N, K, torch.cuda.get_device_properties(0).multi_processor_count)
    out[f"s{rule.split_k} a2"] = C("mma", 16, 64, 128, rule.split_k, ahead=2)
    return out


def kernels(ms: list[int]) -> list[str]:
    table = []
    for M in ms:
        layer = {"before": 0.0, "mma": 0.0, "best": 0.0, "bf16": 0.0}
        for name, (N, K) in SHAPES.items():
            K4.MMA_MAX_M = 0
            before = T.time_int4(M, N, K, None)
            K4.MMA_MAX_M = SHIPPED_MAX_M
            rule = K4.default_config(M, N, K, 128, torch.device("cuda"))
            mma = T.time_int4(M, N, K, rule) if rule.kind == "mma" else float("nan")
            sweep = {key: T.time_int4(M, N, K, cfg) for key, cfg in mma_sweep(M, N, K).items()}
            best = min(sweep, key=sweep.get)
            bf16 = T.time_bf16(M, N, K)
            for key, v in (("before", before), ("mma", mma), ("best", sweep[best]), ("bf16", bf16)):
                layer[key] += v
            log(f"M={M:<3} {name:8s} before {before:7.2f}  mma rule {mma:7.2f} (s{rule.split_k})  best "
                f"{sweep[best]:7.2f} ({best})  bf16 {bf16:7.2f}  " + " ".join(f"[{k}]={v:.2f}" for k, v in sweep.items()))
        table.append(f"M={M:<3} layer us: before {layer['before']:7.1f}  mma rule {layer['mma']:7.1f}  "
                     f"best {layer['best']:7.1f}  bf16 {layer['bf16']:7.1f}  bf16/mma {layer['bf16'] / layer['mma']:.2f}"
                     f"  bf16/before {layer['bf16'] / layer['before']:.2f}")
        log(table[-1])
    return table


def cache_ab(ms: list[int]) -> list[str]:
    """`--cache`: the mma rule with the weights through L1 and L2 ("") or L2 only (".cg")."""
    from pagedeploy.quant import int4_mma_rows
    table = []
    for M in ms:
        layer = {"before": 0.0, "": 0.0, ".cg": 0.0, "bf16": 0.0}
        for name, (N, K) in SHAPES.items():
            K4.MMA_MAX_M = 0
            row = {"before": T.time_int4(M, N, K, None)}
            K4.MMA_MAX_M = SHIPPED_MAX_M
            for cache in ("", ".cg"):
                int4_mma_rows.WEIGHT_CACHE = cache
                row[cache] = T.time_int4(M, N, K, K4.default_config(M, N, K, 128, torch.device("cuda")))
            row["bf16"] = T.time_bf16(M, N, K)
            for key in layer:
                layer[key] += row[key]
            log(f"M={M:<3} {name:8s} " + "  ".join(f"{k or 'L1'} {v:7.2f}" for k, v in row.items()))
        int4_mma_rows.WEIGHT_CACHE = ".cg"
        table.append(f"M={M:<3} layer us: " + "  ".join(f"{k or 'L1'} {v:7.1f}" for k, v in layer.items()))
        log(table[-1])
    return table


def c64(overrides: list[str]) -> float:
    """Output tok/s of the c64 workload on a fresh engine (as `deploy bench`)."""
    from pagedeploy.launcher.bench import _warm_up_ours, make_workload, parse_args, parse_range, run_ours
    from pagedeploy.runtime.engine import LLMEngine
    from pagedeploy.runtime.llm import engine_config_from_profile

    ns = parse_args(C64)
    engine = LLMEngine(engine_config_from_profile("profiles/llama-3-8b-h100.yaml", overrides=overrides))
    _warm_up_ours(engine)
    work = make_workload(ns.num_requests, parse_range(ns.input_len, "--input-len"),
                         parse_range(ns.output_len, "--output-len"), ns.seed, engine.config.spec.vocab_size)
    result = run_ours(engine, work, ns.concurrency, True, "c64")
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result.output_tokens / result.seconds


def end_to_end() -> list[str]:
    rows = []
    for name, keys, max_m in (("int4 before", ["quantization=int4"], 0), ("int4 mma", ["quantization=int4"], SHIPPED_MAX_M),
                              ("bf16", ["quantization=none"], SHIPPED_MAX_M)):
        K4.MMA_MAX_M = max_m
        rows.append((name, c64(keys)))
        log(f"c64 {name:12s} {rows[-1][1]:9.1f} output tok/s")
    K4.MMA_MAX_M = SHIPPED_MAX_M
    bf16 = rows[-1][1]
    return [f"c64 {name:12s} {v:9.1f} output tok/s  x bf16 {v / bf16:.3f}" for name, v in rows]


def main() -> int:
    ms = next((list(map(int, a.split("=")[1].split(","))) for a in sys.argv if a.startswith("--ms=")),
              [2, 4, 8, 16, 32, 48, 64])
    failed = correctness()
    log(f"correctness failures: {failed}")
    table = cache_ab(ms) if "--cache" in sys.argv else kernels(ms)
    if "--kernels-only" not in sys.argv:
        table += end_to_end()
    log("\n== summary ==")
    for line in table:
        log(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
