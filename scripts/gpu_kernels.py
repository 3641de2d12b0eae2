"""Check every Triton kernel against its torch reference and time it, in one GPU run.

    python3 scripts/gpu_kernels.py            # on the GPU machine; full log in $OUT/kernels.log
    TRITON_INTERPRET=1 python scripts/gpu_kernels.py --quick   # tiny sizes, on the CPU: smoke test

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
from test_kernels_triton import attention_case, qkv_views  # noqa: E402  (shared case builders)

from pagedeploy.kernels import reference as ref  # noqa: E402
from pagedeploy.kernels.triton_attention import decode_splits, paged_attention  # noqa: E402
from pagedeploy.kernels.triton_cache import store_kv  # noqa: E402
from pagedeploy.kernels.triton_norm import rms_norm  # noqa: E402
from pagedeploy.kernels.triton_rotary import apply_rotary  # noqa: E402

MODELS = {"qwen3-0.6b": (16, 8, 128, 1024), "llama-3-8b": (32, 8, 128, 4096)}  # H, KH, D, hidden
LOG: list[str] = []
TABLE: list[str] = []


def log(line: str = "") -> None:
    print(line, flush=True)
    LOG.append(line)


def bench(fn, quick: bool) -> float:
    """Median milliseconds per call."""
    if quick:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median")


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


def decode_one(name, h, kh, d, bs, batch, ctx_lens, dtype, device, quick, ceiling, label):
    case = attention_case([1] * batch, ctx_lens, h, kh, d, bs, dtype, device, seed=batch)
    max_ctx = max(ctx_lens)
    expect = ref.paged_attention_ref(**upcast(case))
    err = rel_err(paged_attention(**case, max_context_len=max_ctx), expect)
    ms = bench(lambda: paged_attention(**case, max_context_len=max_ctx), quick)
    elem = torch.finfo(dtype).bits // 8
    nbytes = 2 * sum(ctx_lens) * kh * d * elem + 2 * batch * h * d * elem
    splits = decode_splits(batch, kh, max_ctx, case["q"].device)
    tries = []
    for s in (1, 2, 4, 8, 16, 32) if batch <= 64 else ():  # what the split heuristic missed
        if s != splits and s <= max(1, max_ctx // 64):
            t = bench(lambda: paged_attention(**case, max_context_len=max_ctx, num_splits=s), quick)
            tries.append((t, s))
    best = min(tries + [(ms, splits)])
    log(f"  splits tried (ms, splits): {[(round(t, 4), s) for t, s in sorted(tries)]}")
    ref_ms = bench(lambda: ref.paged_attention_ref(**case), quick) if batch <= 64 else float("nan")
    row(f"decode {name} bs{bs} B{batch} {label}", ms, nbytes, err, ceiling,
        f"splits {splits} (best {best[1]}: {best[0] * 1e3:.1f} us) ref {ref_ms * 1e3:.0f} us")


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


def small_kernel_runs(device, dtype, quick, ceiling):
    elem = torch.finfo(dtype).bits // 8
    tokens = (5, 9) if quick else (256, 8192)
    models = {"tiny": (4, 2, 32, 64)} if quick else MODELS
    gen = torch.Generator().manual_seed(0)
    for name, (h, kh, d, hidden) in models.items():
        for t in tokens:
            x = torch.randn(t, hidden, generator=gen).to(device, dtype)
            r = torch.randn(t, hidden, generator=gen).to(device, dtype)
            w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
            expect = ref.rms_norm_ref(x.float(), w.float(), 1e-6, r.float())[0]
            err = rel_err(rms_norm(x, w, 1e-6, r)[0], expect)
            ms = bench(lambda: rms_norm(x, w, 1e-6, r), quick)
            ref_ms = bench(lambda: ref.rms_norm_ref(x, w, 1e-6, r), quick)
            row(f"rms_norm+residual {name} T{t}", ms, 4 * t * hidden * elem, err, ceiling,
                f"ref {ref_ms * 1e3:.0f} us")

            _, q, k, v = qkv_views(t, h, kh, d, dtype, device, gen)
            angles = torch.arange(4096)[:, None] * (1e4 ** (-torch.arange(0, d, 2) / d))[None]
            cache = torch.cat((angles.cos(), angles.sin()), -1).float().to(device)
            pos = torch.randint(0, 4096, (t,), generator=gen).to(device)
            q_ref, k_ref = ref.apply_rotary_ref(q.float(), k.float(), pos, cache)
            q2, k2 = apply_rotary(q.clone(), k.clone(), pos, cache)
            err = max(rel_err(q2, q_ref), rel_err(k2, k_ref))
            ms = bench(lambda: apply_rotary(q, k, pos, cache), quick)
            row(f"rotary {name} T{t}", ms, 2 * t * (h + kh) * d * elem + t * d * 4, err, ceiling)

            bs, nb = 16, t // 16 + 64
            k_cache = torch.randn(nb, bs, kh, d, generator=gen).to(device, dtype)
            v_cache = torch.randn_like(k_cache)
            slots = torch.randperm(nb * bs, generator=gen)[:t].to(device)
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            ref.store_kv_ref(k, v, k_ref, v_ref, slots)
            store_kv(k, v, k_cache, v_cache, slots)
            err = 0.0 if torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref) else float("nan")
            ms = bench(lambda: store_kv(k, v, k_cache, v_cache, slots), quick)
            row(f"store_kv {name} T{t}", ms, 4 * t * kh * d * elem, err, ceiling)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU interpreter smoke)")
    parser.add_argument("--only", default="decode,prefill,small")
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    dtype = torch.float32 if args.quick else torch.bfloat16
    if not args.quick:
        import triton
        log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    ceiling = hbm_ceiling(device, args.quick)
    failed = 0
    sections = {"decode": decode_runs, "prefill": prefill_runs, "small": small_kernel_runs}
    for name in args.only.split(","):
        try:
            sections[name](device, dtype, args.quick, ceiling)
        except Exception:  # one broken section must not hide the others' numbers
            failed += 1
            log(traceback.format_exc())
            TABLE.append(f"{name}: FAILED (see log)")
    bad = [line for line in TABLE if "err nan" in line or "FAILED" in line]
    text = "\n".join(LOG + ["", "== summary (time, GB/s, % of copy ceiling, rel err) =="] + TABLE)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernels.log"), "w") as f:
            f.write(text + "\n")
    print("\n== summary (time, GB/s or TFLOP/s, % of ceiling, rel err vs fp32 ref) ==")
    print("\n".join(TABLE))
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
