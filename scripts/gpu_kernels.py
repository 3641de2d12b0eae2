"""Check every Triton kernel against its torch reference and time it, in one GPU run.

    python3 scripts/gpu_kernels.py            # on the GPU machine; full log in $OUT/kernels.log
    TRITON_INTERPRET=1 python scripts/gpu_kernels.py --quick   # tiny sizes, on the CPU: smoke test
    python scripts/gpu_kernels.py --aot       # no GPU: compile the attention kernels for sm_90a

Correctness is ||out - ref|| / ||ref|| against the reference run in fp32 on upcast inputs. Times are
triton.testing.do_bench medians (it flushes L2 between runs, so small problems are not timed out of
the cache); GB/s counts each input read once and each output written once, and is compared with a
device-to-device copy measured at the start (the HBM ceiling, ~2.95 TB/s on an H100).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from kernel_checks import qkv_views  # noqa: E402  (shared case builders)
from test_kernels_attention import attention_case  # noqa: E402

from gpu_common import RunLog, compile_for_h100, ptxas_usage  # noqa: E402  (scripts/)

from pagedeploy.kernels import reference as ref  # noqa: E402
from pagedeploy.kernels.triton_attention import decode_splits, paged_attention  # noqa: E402
from pagedeploy.kernels.triton_cache import store_kv  # noqa: E402
from pagedeploy.kernels.triton_norm import rms_norm  # noqa: E402
from pagedeploy.kernels.triton_rotary import apply_rotary  # noqa: E402

MODELS = {"qwen3-0.6b": (16, 8, 128, 1024), "llama-3-8b": (32, 8, 128, 4096)}  # H, KH, D, hidden
L2_BYTES = 50 << 20  # H100 L2
log = RunLog("kernels.log")
TABLE: list[str] = []


def bench(fn, quick: bool) -> float:
    """Median milliseconds per call."""
    if quick:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median")


def bench_graph(make_fn, nbytes: float, quick: bool) -> float:
    """Median GPU milliseconds per call, without host launch cost (how the engine's CUDA-graph
    decode steps run them): one graph replays the call on enough distinct inputs to overflow L2,
    so small problems are read from HBM as in a real step."""
    copies = 2 if quick else max(1, min(32, int(2 * L2_BYTES // max(nbytes, 1))))
    fns = [make_fn(i) for i in range(copies)]
    for fn in fns:
        fn()  # compile and warm outside the capture
    if quick:
        return bench(lambda: [fn() for fn in fns], quick) / copies
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return bench(graph.replay, quick) / copies


def upcast(case: dict) -> dict:
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in case.items()}


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.double() - expect.double()).norm() / expect.double().norm()).item()


def row(name: str, ms: float, nbytes: float, err: float, ceiling: float, extra: str = "") -> None:
    gbs = nbytes / ms / 1e6
    line = (f"{name:<44} {ms * 1e3:>9.1f} us {gbs:>8.0f} GB/s {100 * gbs / ceiling:>5.1f}% "
            f"err {err:.1e} {extra}")
    log(line)
    TABLE.append(line)


def hbm_ceiling(device: str, quick: bool) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = (1 << 20) if quick else (1 << 30)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), quick)
    gbs = 2 * n / ms / 1e6
    log(f"copy {n >> 20} MiB: {ms * 1e3:.0f} us, {gbs:.0f} GB/s (the HBM ceiling used below)")
    return gbs


def decode_runs(device, dtype, quick, ceiling):
    batches, contexts, sizes = ((1, 3), (40, 100), (16,)) if quick else \
        ((1, 64, 256), (512, 4096), (16, 256))
    models = {"tiny": (4, 2, 32, 64)} if quick else MODELS
    for name, (h, kh, d, _) in models.items():
        for bs in sizes:
            for batch in batches:
                for ctx in contexts:
                    decode_one(name, h, kh, d, bs, batch, [ctx] * batch, dtype, device, quick,
                               ceiling, f"ctx {ctx}")
            lens = [random.Random(batch).randint(100, 2048) for _ in range(256 if not quick else 3)]
            decode_one(name, h, kh, d, bs, len(lens), lens, dtype, device, quick, ceiling,
                       "ctx 100-2048")
        for batch in batches[:2]:  # a CUDA graph captured for max_model_len sizes splits by it
            lens = [random.Random(batch).randint(100, 2048) for _ in range(batch)]
            decode_one(name, h, kh, d, 16, batch, lens, dtype, device, quick, ceiling,
                       "ctx 100-2048 bound 40960", bound=40960)


def decode_one(name, h, kh, d, bs, batch, ctx_lens, dtype, device, quick, ceiling, label,
               bound=None):
    """Graph-replay time (the table) and eager time with host launch cost (the log)."""
    def make(seed, **kw):
        case = attention_case([1] * batch, ctx_lens, h, kh, d, bs, dtype, device, seed=seed)
        out = torch.empty_like(case["q"])
        return lambda: paged_attention(**case, max_context_len=max_ctx, out=out, **kw)

    case = attention_case([1] * batch, ctx_lens, h, kh, d, bs, dtype, device, seed=batch)
    max_ctx = bound or max(ctx_lens)
    expect = ref.paged_attention_ref(**upcast(case))
    err = rel_err(paged_attention(**case, max_context_len=max_ctx), expect)
    elem = torch.finfo(dtype).bits // 8
    nbytes = 2 * sum(ctx_lens) * kh * d * elem + 2 * batch * h * d * elem
    ms = bench_graph(make, nbytes, quick)
    eager_ms = bench(lambda: paged_attention(**case, max_context_len=max_ctx), quick)
    splits = decode_splits(batch, kh, max_ctx, case["q"].device)
    tries = []
    for s in (1, 2, 4, 8, 16, 32, 64) if batch <= 64 else ():  # what the split heuristic missed
        if s != splits and s <= max(1, max_ctx // 32):
            tries.append((bench_graph(lambda i: make(i, num_splits=s), nbytes, quick), s))
    best = min(tries + [(ms, splits)])
    log(f"  splits tried (graph ms, splits): {[(round(t, 4), s) for t, s in sorted(tries)]}")
    ref_ms = bench(lambda: ref.paged_attention_ref(**case), quick) if batch <= 64 else float("nan")
    row(f"decode {name} bs{bs} B{batch} {label}", ms, nbytes, err, ceiling,
        f"splits {splits} (best {best[1]}: {best[0] * 1e3:.1f} us) eager {eager_ms * 1e3:.0f} us"
        f" ref {ref_ms * 1e3:.0f} us")


def prefill_runs(device, dtype, quick, ceiling, tflops_peak=760.0):
    """Fresh prompts and chunked prefill over a cached prefix; reported in TFLOP/s."""
    shapes = [("fresh 4x24", [24] * 4, [24] * 4), ("chunk 2x16/48", [16] * 2, [48] * 2)] if quick \
        else [("fresh 8x1024", [1024] * 8, [1024] * 8),
              ("fresh ragged 16x100-1024", *([random.Random(0).randint(100, 1024)
                                              for _ in range(16)],) * 2),
              ("chunk 4x512/4096", [512] * 4, [4096] * 4)]
    models = {"tiny": (4, 2, 32, 64)} if quick else MODELS
    for name, (h, kh, d, _) in models.items():
        for label, q_lens, ctx_lens in shapes:
            case = attention_case(q_lens, ctx_lens, h, kh, d, 16, dtype, device, seed=1)
            err = rel_err(paged_attention(**case), ref.paged_attention_ref(**upcast(case)))
            ms = bench(lambda: paged_attention(**case), quick)
            ref_ms = bench(lambda: ref.paged_attention_ref(**case), quick)
            # causal: query i of a sequence sees ctx - q_len + i + 1 keys; 2 matmuls, 2 flop/MAC
            keys = sum(q * (c - q) + q * (q + 1) / 2 for q, c in zip(q_lens, ctx_lens))
            tflops = 4 * keys * h * d / ms / 1e9
            line = (f"prefill {name} {label:<26} {ms * 1e3:>9.1f} us {tflops:>6.1f} TFLOP/s "
                    f"{100 * tflops / tflops_peak:>5.1f}% err {err:.1e} ref {ref_ms * 1e3:.0f} us")
            log(line)
            TABLE.append(line)
        mixed_one(name, h, kh, d, dtype, device, quick)


def mixed_one(name, h, kh, d, dtype, device, quick):
    """A continuous-batching step: decode rows first, then prefill chunks. With num_decodes the
    decode rows take the decode kernel; without, the prefill kernel does all rows."""
    n_dec, chunks = (3, [16, 9]) if quick else (60, [512, 300, 100, 37])
    rng = random.Random(3)
    ctx_lens = [rng.randint(100, 2048) for _ in range(n_dec)] + [c + 200 for c in chunks]
    case = attention_case([1] * n_dec + chunks, ctx_lens, h, kh, d, 16, dtype, device, seed=4)
    expect = ref.paged_attention_ref(**upcast(case))
    for hint in (None, n_dec):
        err = rel_err(paged_attention(**case, num_decodes=hint), expect)
        ms = bench(lambda: paged_attention(**case, num_decodes=hint), quick)
        line = (f"mixed {name} {n_dec} decodes + {len(chunks)} chunks, num_decodes={hint}: "
                f"{ms * 1e3:.1f} us err {err:.1e}")
        log(line)
        TABLE.append(line)


def tune_runs(device, dtype, quick, ceiling):
    """Tile sizes around launch_config's defaults, on a few representative shapes."""
    from pagedeploy.kernels.triton_attention import launch_config
    tiny = (4, 2, 32, 64)
    shapes = [  # label, (h, kh, d), bs, q_lens, ctx_lens
        ("decode qwen3 B256 ctx4096 bs16", MODELS["qwen3-0.6b"], 16, [1] * 256, [4096] * 256),
        ("decode llama B64 ctx4096 bs256", MODELS["llama-3-8b"], 256, [1] * 64, [4096] * 64),
        ("decode qwen3 B64 ctx100-2048 bs16", MODELS["qwen3-0.6b"], 16, [1] * 64,
         [random.Random(1).randint(100, 2048) for _ in range(64)]),
        ("prefill llama 8x1024", MODELS["llama-3-8b"], 16, [1024] * 8, [1024] * 8),
        ("chunk qwen3 4x512/4096", MODELS["qwen3-0.6b"], 16, [512] * 4, [4096] * 4),
    ]
    if quick:
        shapes = [("decode tiny", tiny, 16, [1] * 3, [70] * 3),
                  ("prefill tiny", tiny, 16, [20], [30])]
    for label, (h, kh, d, _), bs, q_lens, ctx_lens in shapes:
        case = attention_case(q_lens, ctx_lens, h, kh, d, bs, dtype, device, seed=2)
        decode = label.startswith("decode")
        default = launch_config(decode, h // kh)
        # the first run's sweep (docs/PERF.md, "Kernels") narrowed these to the close contenders
        variants = [dict(block_n=64, num_warps=4, num_stages=2),
                    dict(block_n=128, num_warps=4, num_stages=3),
                    dict(block_n=32, num_warps=4, num_stages=2)] if decode else \
            [dict(block_m=128, block_n=32, num_warps=8, num_stages=2),
             dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
             dict(block_m=128, block_n=32, num_warps=4, num_stages=3),
             dict(block_m=64, block_n=32, num_warps=4, num_stages=2),
             dict(block_m=128, block_n=64, num_warps=8, num_stages=3)]
        elem = torch.finfo(dtype).bits // 8
        nbytes = 2 * sum(ctx_lens) * kh * d * elem
        results = []
        for v in variants[:2] if quick else variants:
            try:
                fn = lambda: paged_attention(  # noqa: E731
                    **case, max_context_len=max(ctx_lens), tune=v)
                fn()
                results.append((bench(fn, quick), v))
            except Exception as e:  # e.g. out of shared memory for the biggest tiles
                log(f"  {label} {v}: {type(e).__name__}")
        results.sort(key=lambda r: r[0])
        for ms, v in results:
            log(f"  {label} {v}: {ms * 1e3:.1f} us, {nbytes / ms / 1e6:.0f} GB/s")
        best_ms, best = results[0]
        cur = [ms for ms, v in results if all(default[k] == v.get(k, default[k]) for k in default)]
        line = (f"tune {label:<34} default {cur[0] * 1e3 if cur else float('nan'):.1f} us, "
                f"best {best_ms * 1e3:.1f} us {best}")
        log(line)
        TABLE.append(line)


def small_kernel_runs(device, dtype, quick, ceiling):
    """rms_norm (+residual), rotary and store_kv at a decode batch and a prefill chunk."""
    tokens = (5, 9) if quick else (256, 8192)
    models = {"tiny": (4, 2, 32, 64)} if quick else MODELS
    for name, dims in models.items():
        for t in tokens:
            for kind in (norm_inputs, rotary_inputs, store_inputs):
                small_one(kind, name, t, dims, dtype, device, quick, ceiling)


def small_one(inputs, name, t, dims, dtype, device, quick, ceiling):
    label, nbytes, fn, check = inputs(t, *dims, dtype, device, seed=0)
    err = check()
    ms = bench_graph(lambda i: inputs(t, *dims, dtype, device, seed=i + 1)[2], nbytes, quick)
    eager_ms = bench(fn, quick)
    row(f"{label} {name} T{t}", ms, nbytes, err, ceiling, f"eager {eager_ms * 1e3:.0f} us")


def norm_inputs(t, h, kh, d, hidden, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(t, hidden, generator=gen).to(device, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    expect = lambda: ref.rms_norm_ref(x.float(), w.float(), 1e-6, r.float())[0]  # noqa: E731
    check = lambda: rel_err(rms_norm(x, w, 1e-6, r)[0], expect())  # noqa: E731
    nbytes = 4 * t * hidden * (torch.finfo(dtype).bits // 8)  # read x, r; write out, residual
    return "rms_norm+residual", nbytes, lambda: rms_norm(x, w, 1e-6, r), check


def rotary_inputs(t, h, kh, d, hidden, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    _, q, k, _ = qkv_views(t, h, kh, d, dtype, device, gen)
    angles = torch.arange(4096)[:, None] * (1e4 ** (-torch.arange(0, d, 2) / d))[None]
    cache = torch.cat((angles.cos(), angles.sin()), -1).float().to(device)
    pos = torch.randint(0, 4096, (t,), generator=gen).to(device)

    def check():
        q_ref, k_ref = ref.apply_rotary_ref(q.float(), k.float(), pos, cache)
        q2, k2 = apply_rotary(q.clone(), k.clone(), pos, cache)
        return max(rel_err(q2, q_ref), rel_err(k2, k_ref))
    nbytes = 2 * t * (h + kh) * d * (torch.finfo(dtype).bits // 8) + t * d * 4
    return "rotary", nbytes, lambda: apply_rotary(q, k, pos, cache), check


def store_inputs(t, h, kh, d, hidden, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    _, _, k, v = qkv_views(t, h, kh, d, dtype, device, gen)
    bs, nb = 16, t // 16 + 64
    k_cache = torch.randn(nb, bs, kh, d, generator=gen).to(device, dtype)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(nb * bs, generator=gen)[:t].to(device)

    def check():
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        ref.store_kv_ref(k, v, k_ref, v_ref, slots)
        store_kv(k, v, k_cache, v_cache, slots)
        same = torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        return 0.0 if same else float("nan")
    nbytes = 4 * t * kh * d * (torch.finfo(dtype).bits // 8)
    return "store_kv", nbytes, lambda: store_kv(k, v, k_cache, v_cache, slots), check


def aot_check() -> int:
    """Compile the attention kernels for sm_90a on a machine without a GPU (Triton's own ptxas):
    catches what the CPU interpreter lets through (run 1 lost a GPU call to a non-constexpr global)
    and prints registers, spills and shared memory. Needs no CUDA; Triton API as of 3.6-3.9."""
    from pagedeploy.kernels.triton_attention import _attention_kernel, launch_config
    names = _attention_kernel.arg_names
    ptr = {"q_ptr", "k_cache", "v_cache", "out_ptr", "block_tables", "context_lens",
           "query_start_loc", "part_out", "part_lse", "counters"}
    failed = 0
    variants = [(2, 128, 16, True, 1, False), (4, 128, 256, True, 32, True), (4, 128, 16, True, 4, False),
                (2, 128, 16, False, 1, False), (7, 64, 8, False, 1, True)]
    for qg, d, bs, decode, splits, window in variants:
        cfg = launch_config(decode, qg, splits=splits)
        consts = dict(QG=qg, HEAD_DIM=d, BLOCK_SIZE=bs, BLOCK_M=cfg["block_m"],
                      BLOCK_N=cfg["block_n"], NUM_SPLITS=splits, IS_DECODE=decode,
                      USE_WINDOW=window, NUM_HEADS=8 * qg, PDL=2, EARLY=False, PRE_WAIT=True,
                      QG_P2=1 << (qg - 1).bit_length(), MERGE_ROWS=True)
        args = [n for n in names if n not in consts]
        arg_types = {n: ("*i32" if n in ("block_tables", "context_lens", "query_start_loc") else
                         "*fp32" if n.startswith("part") else "*i32" if n == "counters" else
                         "*bf16" if n in ptr else
                         "fp32" if n == "qk_scale" else "i32") for n in args}
        # what the JIT infers at launch: pointers and strides are multiples of 16
        div16 = [n for n in args if n in ptr or n.startswith("stride")]
        label = f"qg{qg} d{d} bs{bs} decode={decode} splits={splits} window={window} {cfg}"
        try:
            kernel = compile_for_h100(_attention_kernel, arg_types, consts, div16,
                                      cfg["num_warps"], cfg["num_stages"])
        except Exception as e:  # noqa: BLE001  (report every variant)
            failed += 1
            log(f"FAIL {label}: {e}")
            continue
        info = ptxas_usage(kernel.asm["ptx"])
        log(f"ok   {label}: smem {kernel.metadata.shared} B, {info}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU interpreter smoke)")
    parser.add_argument("--only", default="small,decode,prefill,tune")
    parser.add_argument("--aot", action="store_true", help="compile for sm_90a only (no GPU)")
    args = parser.parse_args()
    if args.aot:
        return aot_check()
    device = "cpu" if args.quick else "cuda"
    dtype = torch.float32 if args.quick else torch.bfloat16
    if not args.quick:
        import triton
        log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    ceiling = hbm_ceiling(device, args.quick)
    failed = 0
    sections = {"decode": decode_runs, "prefill": prefill_runs, "small": small_kernel_runs,
                "tune": tune_runs}
    for name in args.only.split(","):
        try:
            sections[name](device, dtype, args.quick, ceiling)
        except Exception:  # one broken section must not hide the others' numbers
            failed += 1
            log(traceback.format_exc())
            TABLE.append(f"{name}: FAILED (see log)")
    bad = [line for line in TABLE if "err nan" in line or "FAILED" in line]
    log("\n== summary (time, GB/s or TFLOP/s, % of ceiling, rel err vs fp32 ref) ==")
    for line in TABLE:
        log(line)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
