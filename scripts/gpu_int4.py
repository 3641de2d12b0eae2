"""Check the int4 W4A16 kernels (quant/int4_triton.py) against the torch reference and time them
against bf16 cuBLAS, in one GPU run (issue 6, P3).

    python3 scripts/gpu_int4.py              # correctness, timings, end-to-end estimate ($OUT/int4.log)
    python3 scripts/gpu_int4.py --aot        # no GPU: compile for sm_90a, registers and loop instructions
    TRITON_INTERPRET=1 python scripts/gpu_int4.py --quick   # tiny sizes on the CPU: a smoke test

Correctness: ||y - exact|| / ||exact|| with `exact` the fp32 product of x and the dequantized weight;
the torch reference (`int4_matmul_reference`, which rounds the weight to x.dtype) gets the same
measure, and a path passes when its error is at most 1.5x the reference's (+1e-4). Times: one CUDA
graph replays the call on enough weight copies to overflow L2 (decode reads weights from HBM), median
of 5 timed batches. GB/s counts packed weights, scales, zeros, x and y once.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback

import torch

from pagedeploy.quant import int4_triton as K4
from pagedeploy.quant.int4 import Int4Weight, dequantize_int4, int4_matmul_reference
from pagedeploy.quant.int4_triton import KernelConfig as C

from gpu_common import RunLog  # noqa: E402  (scripts/)

SHAPES = {  # name: (N, K), per decoder layer; lm_head stays bf16 in both
    "llama qkv": (6144, 4096), "llama o": (4096, 4096), "llama gate_up": (28672, 4096),
    "llama down": (4096, 14336),
    "qwen qkv": (4096, 1024), "qwen o": (1024, 2048), "qwen gate_up": (6144, 1024), "qwen down": (1024, 3072),
}
MODELS = {"llama": (32, (128256, 4096)), "qwen": (28, (151936, 1024))}   # layers, lm_head (N, K)
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 2048)
L2_BYTES = 50 << 20
log = RunLog("int4.log")
TABLE: list[str] = []
QUICK = False


def device() -> str:
    return "cpu" if QUICK else "cuda"


def random_int4(N: int, K: int, group: int = 128, seed: int = 0) -> Int4Weight:
    """Random codes, scales ~0.01 and zeros ~ -8 scales, on the device (no quantization pass)."""
    g = torch.Generator(device=device()).manual_seed(seed)
    packed = torch.randint(-2 ** 31, 2 ** 31 - 1, (N, K // 8), generator=g, device=device(), dtype=torch.int32)
    scales = (torch.rand(N, K // group, generator=g, device=device()) * 0.01 + 0.005).half()
    zeros = (-8 * scales.float() + torch.randn(N, K // group, generator=g, device=device()) * 1e-3).half()
    return Int4Weight(packed, scales, zeros, (N, K), group)


def short(cfg: C | None) -> str:
    if cfg is None:
        return "default"
    if cfg.kind == "dense":
        return "dense"
    flags = "".join(f" {f}" for f, on in (("swap", cfg.swap_ab), ("nofold", not cfg.fold)) if on)
    return (f"{cfg.kind} m{cfg.block_m} n{cfg.block_n} k{cfg.block_k}x{cfg.unroll} split{cfg.split_k} "
            f"w{cfg.num_warps} st{cfg.num_stages}{flags}")


def rel(y: torch.Tensor, exact: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y.double() - exact.double()).norm() / exact.double().norm()).item()


# ---- correctness --------------------------------------------------------------------------------------

def check(label: str, M: int, N: int, K: int, group: int, dtype, cfg: C | None, bias: bool = True) -> bool:
    w = random_int4(N, K, group, seed=M + N)
    x = torch.randn(M, K, device=device()).to(dtype)
    b = torch.randn(N, device=device()).to(dtype) if bias else None
    y = K4.int4_matmul(x, w, b, config=cfg)
    y = K4.int4_matmul(x, w, b, config=cfg)   # twice: split-K counters must have re-armed
    exact = x.float() @ dequantize_int4(w).T + (0 if b is None else b.float())
    err, ref_err = rel(y, exact), rel(int4_matmul_reference(x, w, b), exact)
    ok = y.dtype == dtype and y.shape == (M, N) and err <= 1.5 * ref_err + 1e-4
    log(f"{'ok  ' if ok else 'FAIL'} {label:<34} M={M:<4} N={N:<5} K={K:<5} g{group:<3} {str(dtype)[6:]:<8} "
        f"err {err:.2e} (reference {ref_err:.2e}) {short(cfg)}")
    return ok


def check_graph(dtype) -> bool:
    """Split-K launches replayed from a CUDA graph: counters re-arm, new inputs flow through."""
    if QUICK:
        return True
    w = random_int4(4096, 4096, seed=7)
    cfgs = [K4.default_config(m, 4096, 4096, 128, torch.device("cuda")) for m in (1, 2, 8, 64)]
    xs = [torch.randn(m, 4096, device="cuda").to(dtype) for m in (1, 2, 8, 64)]
    for x, cfg in zip(xs, cfgs):
        K4.int4_matmul(x, w, config=cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = [K4.int4_matmul(x, w, config=cfg) for x, cfg in zip(xs, cfgs)]
    ok = True
    for rep in range(3):
        for x in xs:
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        for x, y, cfg in zip(xs, ys, cfgs):
            exact = x.float() @ dequantize_int4(w).T
            err, ref_err = rel(y, exact), rel(int4_matmul_reference(x, w), exact)
            ok &= err <= 1.5 * ref_err + 1e-4
    log(f"{'ok  ' if ok else 'FAIL'} CUDA graph replay x3, split-K configs {[c.split_k for c in cfgs]}")
    return ok


def check_cases(small: bool) -> list[tuple]:
    big = (256, 512) if small else (4096, 4096)
    cases = [  # label, M, N, K, group, config
        ("fma m1", 1, *big, 128, C("fma", 1, 64, 128, 4, unroll=2)),
        ("fma m1 no split", 1, 1000, 1024, 128, C("fma", 1, 128, 128, 1)),
        ("fma m2 group 32 (per-word scales)", 2, 520, 768, 32, C("fma", 2, 64, 128, 3)),
        ("fma m2 group 64 ragged K", 2, 1536, 576, 64, C("fma", 2, 32, 128, 2)),
        ("dot gemv swap", 5, *big, 128, C("dot", 16, 128, 128, 4, swap_ab=True)),
        ("dot gemv swap n64", 16, 1000, 1024, 128, C("dot", 16, 64, 128, 2, swap_ab=True)),
        ("dot gemv no fold group 64", 9, 1536, 576, 64, C("dot", 16, 64, 128, 2)),
        ("dot gemm", 64, *big, 128, C("dot", 64, 128, 128, 1)),
        ("dot gemm split ragged M,N", 200, 1000, 1024, 128, C("dot", 64, 128, 128, 2)),
        ("dot gemm no fold group 32", 40, 520, 768, 32, C("dot", 32, 64, 128, 1)),
        ("dense", 300, 1000, 1024, 128, C("dense")),
        ("dot gemv swap ragged K", 16, 1000, 1152, 128, C("dot", 16, 128, 128, 2, swap_ab=True)),
        ("dot gemm swap", 40, 1000, 1024, 128, C("dot", 32, 128, 128, 2, swap_ab=True)),
        ("fma m2 gate_up class", 2, 2048, 4096, 128, C("fma", 2, 256, 128, 2, 4, 3)),
        ("fma m1 gate_up class", 1, 2048, 4096, 128, C("fma", 1, 64, 128, 2, 2, 2, unroll=2)),
    ]
    if small:   # the interpreter: small shapes only
        cases = [(lab, min(M, 20), min(N, 72), min(K, 1024) if K % 256 == 0 else K, g, c)
                 for lab, M, N, K, g, c in cases]
    return cases


def correctness() -> int:
    log("\n== correctness (vs fp32 product of x and the dequantized weight) ==")
    small = QUICK
    cases = check_cases(small)
    failed = 0
    for dtype in (torch.float16,) if small else (torch.bfloat16, torch.float16):
        for label, M, N, K, group, cfg in cases:
            failed += not check(label, M, N, K, group, dtype, cfg, bias=M % 2 == 1)
        for M in ((1, 5, 40) if small else MS):   # the default dispatch
            failed += not check("default", M, *((72, 256) if small else (6144, 4096)), 128, dtype, None)
        failed += not check_graph(dtype)
    chunk = K4.DENSE_CHUNK_BYTES
    K4.DENSE_CHUNK_BYTES = 64 * 1024 * 2   # force several chunks of rows
    failed += not check("dense chunked", 600, 1000, 1024, 128, torch.bfloat16 if not small else torch.float16,
                        C("dense"))
    K4.DENSE_CHUNK_BYTES = chunk
    return failed


# ---- timing -------------------------------------------------------------------------------------------

def time_calls(fns) -> float:
    """Median microseconds per call: a CUDA graph replays all fns (distinct weights: no L2 reuse)."""
    for fn in fns:
        fn()
    if QUICK:
        t = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t) * 1e6 / len(fns)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    reps = max(1, int(4.0 / max(start.elapsed_time(end), 1e-3)))   # ~4 ms a batch
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (reps * len(fns)))
    return statistics.median(samples)


_WEIGHTS: dict = {}


def weights(N: int, K: int, nbytes: int, kind: str):
    """Enough copies of an (N, K) weight to overflow L2; cached per (shape, kind)."""
    copies = 1 if QUICK else max(1, min(64, -(-2 * L2_BYTES // nbytes)))
    key = (N, K, kind, copies)
    if key not in _WEIGHTS:
        if kind == "int4":
            _WEIGHTS[key] = [random_int4(N, K, seed=i) for i in range(copies)]
        else:
            _WEIGHTS[key] = [torch.randn(N, K, device=device()).to(torch.bfloat16) for _ in range(copies)]
    return _WEIGHTS[key]


def int4_bytes(M: int, N: int, K: int) -> int:
    return N * K // 2 + 4 * N * (K // 128) + 2 * M * (K + N)


def time_int4(M: int, N: int, K: int, cfg: C | None) -> float:
    ws = weights(N, K, int4_bytes(1, N, K), "int4")
    x = torch.randn(M, K, device=device()).to(torch.bfloat16)
    cfg = cfg or K4.default_config(M, N, K, 128, x.device)
    return time_calls([lambda w=w: K4.int4_matmul(x, w, config=cfg) for w in ws])


def time_bf16(M: int, N: int, K: int) -> float:
    ws = weights(N, K, 2 * N * K, "bf16")
    x = torch.randn(M, K, device=device()).to(torch.bfloat16)
    return time_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])


# ---- parallel compilation -------------------------------------------------------------------------------

def _compile_worker(jobs: list[tuple]) -> list[str]:
    """Run each job once in a fresh process: fills Triton's on-disk cache with the same specializations."""
    failures = []
    for job in jobs:
        try:
            if job[0] == "check":
                M, N, K, group, dtype, cfg, bias = job[1:]
                w, x = random_int4(N, K, group), torch.randn(M, K, device=device()).to(dtype)
                b = torch.randn(N, device=device()).to(dtype) if bias else None
                K4.int4_matmul(x, w, b, config=cfg)
            else:
                M, N, K, cfg = job[1:]
                w = weights(N, K, 1 << 40, "int4")[0]
                x = torch.randn(M, K, device=device()).to(torch.bfloat16)
                K4.int4_matmul(x, w, config=cfg or K4.default_config(M, N, K, 128, x.device))
        except Exception as e:  # noqa: BLE001
            failures.append(f"{job}: {str(e).splitlines()[0][:200]}")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return failures


def precompile(jobs: list[tuple]) -> None:
    t = time.time()
    n = max(1, min(14, (os.cpu_count() or 2) - 2))
    with mp.get_context("spawn").Pool(n) as pool:
        failures = sum(pool.map(_compile_worker, [jobs[i::n] for i in range(n)]), [])
    log(f"precompiled {len(jobs)} launches in {n} processes: {time.time() - t:.0f} s, {len(failures)} failed")
    for f in failures[:20]:
        log(f"  {f}")


def check_jobs() -> list[tuple]:
    """The launches correctness() makes (same dtypes, biases and shapes)."""
    jobs = []
    for dtype in (torch.bfloat16, torch.float16):
        for _label, M, N, K, group, cfg in check_cases(False):
            jobs.append(("check", M, N, K, group, dtype, cfg, M % 2 == 1))
        jobs += [("check", M, 6144, 4096, 128, dtype, None, M % 2 == 1) for M in MS]
    return jobs



# ---- bench and end-to-end estimate ------------------------------------------------------------------------

def bench() -> dict:
    """Default dispatch vs bf16 F.linear per shape and M."""
    log("\n== int4 (default dispatch) vs bf16 F.linear (cuBLAS), us per call; speedup = bf16 us / int4 us ==")
    log(f"{'shape':<14} {'M':>5} {'path':<6} {'int4 us':>9} {'bf16 us':>9} {'speedup':>8} "
        f"{'int4 GB/s':>9} {'TFLOP/s':>8}")
    times = {}
    for name, (N, K) in SHAPES.items():
        for M in MS if not QUICK else (1, 64):
            cfg = K4.default_config(M, N, K, 128, torch.device(device()))
            t4, t16 = time_int4(M, N, K, None), time_bf16(M, N, K)
            times[(name, M)] = (t4, t16)
            gbs, tflops = int4_bytes(M, N, K) / t4 / 1e3, 2 * M * N * K / t4 / 1e6
            log(f"{name:<14} {M:>5} {cfg.kind:<6} {t4:9.1f} {t16:9.1f} {t16 / t4:7.2f}x {gbs:9.0f} {tflops:8.1f}"
                f"  {short(cfg)}")
        TABLE.append(f"{name:<14} speedup " + " ".join(f"M{M}:{times[(name, M)][1] / times[(name, M)][0]:.2f}"
                                                        for M in MS if (name, M) in times)
                     + f" | M1 int4 {int4_bytes(1, N, K) / times[(name, 1)][0] / 1e3:.0f} GB/s")
    return times


def end_to_end(times: dict) -> None:
    """Linear layers of one decode step: layers x (qkv + o + gate_up + down) + the bf16 lm_head."""
    log("\n== end-to-end estimate: linears of one forward (lm_head bf16 in both) ==")
    for model, (layers, (vocab, hidden)) in MODELS.items():
        for M in (1, 64):
            head = time_bf16(M, vocab, hidden)
            keys = [(n, M) for n in SHAPES if n.startswith(model)]
            t4 = layers * sum(times[k][0] for k in keys) + head
            t16 = layers * sum(times[k][1] for k in keys) + head
            line = (f"{model} M={M:<3} linears int4 {t4 / 1e3:7.3f} ms  bf16 {t16 / 1e3:7.3f} ms  "
                    f"int4 speedup {t16 / t4:5.2f}x  (lm_head {head / 1e3:.3f} ms; linears-only bound "
                    f"{M * 1e6 / t4:,.0f} tok/s int4, {M * 1e6 / t16:,.0f} bf16)")
            log(line)
            TABLE.append(line)


def hbm_ceiling() -> None:
    if QUICK:
        return
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    us = time_calls([lambda: dst.copy_(src)])
    log(f"copy 1 GiB: {us:.0f} us, {2 * src.numel() * 4 / us / 1e3:.0f} GB/s (read + write)")


def main() -> int:
    global QUICK, SHAPES, MODELS
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU interpreter smoke)")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--aot", action="store_true", help="compile for sm_90a only (no GPU)")
    args = parser.parse_args()
    if args.aot:
        from gpu_int4_aot import aot
        return aot()
    QUICK = args.quick
    if QUICK:   # the interpreter: the same code paths on tiny layers
        SHAPES = {name: (N // 64, max(128, K // 2048 * 128)) for name, (N, K) in SHAPES.items()}
        MODELS = {name: (2, (512, max(128, K // 2048 * 128))) for name, (_, (_, K)) in MODELS.items()}
    else:
        import triton
        log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}, "
            f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
        precompile(check_jobs() + [("time", M, N, K, None) for M in MS for N, K in SHAPES.values()])
    hbm_ceiling()
    failed = correctness()
    if not args.no_bench:
        end_to_end(bench())
    log(f"\n== summary: {failed} correctness failures ==")
    for line in TABLE:
        log(line)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        log(traceback.format_exc())
        raise
