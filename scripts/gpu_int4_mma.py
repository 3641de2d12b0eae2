"""Issue 6, P3 at batch 1: the tensor-core int4 GEMV (quant/int4_mma.py) against the
packed-fp16 GEMV (quant/int4_gemv.py), kernel by kernel and end to end, in one run.

Kernels: Llama-3-8B's four decode linears with their fusions, µs per call in a CUDA graph over
weight copies that overflow L2 (as scripts/gpu_int4_b1.py), for the packed-fp16 GEMV's rule, the
default (mma) rule and a sweep of mma row tiles, warps, splits and blocks in flight; each with its
error against the unfused route (rms_norm, the fma kernel, silu_and_mul). End to end: `deploy bench
--batch-1` decode tok/s of Llama-3-8B dims, a fresh engine each, REPS requests: int4 through the
packed-fp16 GEMV, through int4_mma (also with quantize_lm_head, and with the sweep's best launch
per linear), bf16.
`--early`: the default launch only, with the early launches off, in pack_x only
(int4_pack.EARLY_LAUNCH) and in pack_x and the GEMV (int4_mma.EARLY_LAUNCH, as shipped), kernel by
kernel and end to end. Every other row runs the early launches as shipped. Since run 21 the default
launch packs x inside the GEMV (no pack_x), so pack_x's switch no longer changes it;
scripts/gpu_int4_fold.py compares the two routes.
Usage (device machine): python3 scripts/gpu_int4_mma.py [REPS] [--kernels-only] [--early] [--shapes=gate_up,down]
       python3 scripts/gpu_int4_mma.py --head   (the lm_head alone: bf16 routes, int4 launches)
"""
from __future__ import annotations

import functools
import sys

import torch

import gpu_int4_b1 as B1
from gpu_common import RunLog
from gpu_int4 import random_int4, time_calls

from pagedeploy.kernels.triton_gemv import fused_linear
from pagedeploy.quant import int4_gemv as G
from pagedeploy.quant import int4_mma, int4_pack

EARLY = "--early" in sys.argv
EARLY_MODES = {"no early": (False, False), "early pack_x": (True, False), "early both": (True, True)}
SHIPPED = (int4_pack.EARLY_LAUNCH, int4_mma.EARLY_LAUNCH)


def set_early(mode: str | None) -> None:
    """The early launches of `mode` (an EARLY_MODES key), or as shipped (None)."""
    int4_pack.EARLY_LAUNCH, int4_mma.EARLY_LAUNCH = EARLY_MODES[mode] if mode else SHIPPED


log = RunLog("int4_mma.log")
RULE = G.default_config
FP16_RULE = functools.partial(RULE, mma=False)   # the packed-fp16 GEMV's rule


def mma_variants(n: int, k: int, silu: bool) -> dict:
    """The packed-fp16 GEMV's rule ("fp16"), the default rule ("mma"), then row
    tiles x warps x the splits that divide the blocks of four groups x blocks in flight."""
    dev = torch.device("cuda")
    out = {"fp16": FP16_RULE(n, k, 128, silu, dev), "mma": RULE(n, k, 128, silu, dev)}
    if EARLY:
        return out
    blocks = k // 512
    for bn, nw in ((64, 4), (32, 2), (128, 8)):
        for split in (d for d in range(1, blocks // 2 + 1) if blocks % d == 0):
            for ahead in (1, 2):
                out[f"mma bn{bn} w{nw} s{split} a{ahead}"] = G.Int4GemvConfig(bn, split, nw, mma=True, ahead=ahead)
    return out


BEST: dict = {}   # (N, K, silu) -> the fastest mma config of the kernel table


def kernel_table() -> dict:
    table = {}
    for name, (n, k, norm, silu), ws, xk, fus, nw, res in B1.linear_cases(B1.ONLY):
        rows = 2 * n if silu else n
        fus = dict(fus, silu_mul=silu)

        ref = B1.unfused(xk, ws[0], nw, res, norm, silu).float()
        row = {}
        configs = mma_variants(n, k, silu)
        for vname, cfg in configs.items():
            row[vname] = time_calls([lambda w=w: G.int4_gemv(xk, w, config=cfg, **fus) for w in ws])
            out = G.int4_gemv(xk, ws[0], config=cfg, **fus)[0].float()
            row[vname + " err"] = ((out - ref).norm() / ref.norm()).item()
        wb = [torch.randn(rows, k, device="cuda").to(torch.bfloat16) for _ in range(B1.copies(2 * rows * k))]
        row["bf16"] = time_calls([lambda w=w: fused_linear(xk, w, **fus) for w in wb])
        swept = {key: row[key] for key in configs if key.startswith("mma ")}
        BEST[(n, k, silu)] = configs[min(swept, key=swept.get)] if swept else configs["mma"]
        if EARLY:   # the default launch again, under each early-launch mode
            for mode in EARLY_MODES:
                set_early(mode)
                row[mode] = time_calls([lambda w=w: G.int4_gemv(xk, w, config=configs["mma"], **fus) for w in ws])
            set_early(None)
        table[name] = row
        log(f"{name:8s} " + " ".join(f"{key}={v:.4g}" for key, v in row.items()))
        del ws, wb
        torch.cuda.empty_cache()
    return table


def end_to_end(reps: int) -> list:
    rows = []

    def best_rule(N, K, group, silu_mul, device):
        return BEST.get((N, K, silu_mul)) or RULE(N, K, group, silu_mul, device)
    int4 = ["quantization=int4"]
    bf16 = ("bf16", ["quantization=none"], RULE, None)
    runs = [("int4 fp16", int4, FP16_RULE, None), ("int4 mma", int4, RULE, None),
            ("mma + head", int4 + ["quantize_lm_head=true"], RULE, None), ("sweep best", int4, best_rule, None), bf16]
    if EARLY:
        runs = [(mode, int4, RULE, mode) for mode in EARLY_MODES] + [bf16]
    for name, keys, rule, mode in runs:
        G.default_config = rule
        set_early(mode)
        speeds = B1.batch1_speeds(keys, reps)
        rows.append((name, speeds))
        log(f"{name:12s} " + " ".join(f"{s:7.1f}" for s in speeds))
    G.default_config = RULE
    set_early(None)
    return rows


def head_table() -> None:
    """`--head`: Llama-3's lm_head (128,256 x 4096) at one row: bf16 through F.linear (cuBLAS, what
    the model runs) and through fused_linear (the bf16 GEMV), and int4 (quantize_lm_head) through
    the default rule and a few mma launches."""
    import torch.nn.functional as F
    n, k = 128256, 4096
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    wb = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for _ in range(2)]
    row = {"bf16 F.linear": time_calls([lambda w=w: F.linear(x, w) for w in wb]),
           "bf16 fused_linear": time_calls([lambda w=w: fused_linear(x, w)[0] for w in wb])}
    del wb
    wq = [random_int4(n, k, seed=i) for i in range(2)]
    configs = {"int4 rule": RULE(n, k, 128, False, x.device)}
    for split, ahead in ((1, 2), (2, 1), (2, 2), (4, 1)):
        configs[f"int4 mma s{split} a{ahead}"] = G.Int4GemvConfig(64, split, mma=True, ahead=ahead)
    configs["int4 fp16 GEMV"] = FP16_RULE(n, k, 128, False, x.device)
    for name, cfg in configs.items():
        row[name] = time_calls([lambda w=w: G.int4_gemv(x, w, config=cfg)[0] for w in wq])
    log("lm_head 128256 x 4096, one row, us: " + "  ".join(f"{key} {v:.1f}" for key, v in row.items()))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--head" in sys.argv:
        return head_table()
    table = kernel_table()
    log("\nus per call (CUDA graph, L2 overflowed); err against the unfused fma route")
    for name, row in table.items():
        times = {key: v for key, v in row.items() if key.startswith("mma") and not key.endswith("err")}
        best = min(times, key=times.get)
        log(f"{name:8s} fp16 GEMV {row['fp16']:7.2f} (err {row['fp16 err']:.2e})  mma rule {row['mma']:7.2f} "
            f"(err {row['mma err']:.2e})  best {times[best]:7.2f} ({best}, err {row[best + ' err']:.2e})"
            f"  bf16 {row['bf16']:7.2f}" + "".join(f"  {mode} {row[mode]:7.2f}" for mode in EARLY_MODES if EARLY))
    for col in ("fp16", "mma", "bf16") + (tuple(EARLY_MODES) if EARLY else ()):
        log(f"{'+'.join(table)} {col}: {sum(row[col] for row in table.values()):.2f} us")
    if "--kernels-only" in sys.argv:
        return
    B1.log_speeds(end_to_end(int(args[0]) if args else 3), log)


if __name__ == "__main__":
    main()
