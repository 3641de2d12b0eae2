"""Issue 6, P3 at 64 in flight: the int4 `gemm` kernel (quant/int4_triton.py, 33 <= M < 192) in one
GPU run, Llama-3-8B's four linears, µs per call in a CUDA graph over weight copies that overflow L2.

    python3 scripts/gpu_int4_gemm.py sweep 64,128 [--fold]   # gemm launch shapes against the default and bf16
    python3 scripts/gpu_int4_gemm.py rows                     # default dispatch vs the dot GEMM and bf16, per M
    python3 scripts/gpu_int4_gemm.py once M qkv,down          # three launches a shape, for ncu (M = 1: the GEMV)

Every swept shape is first checked against the exact product (gpu_int4.check); $OUT/int4.log keeps all.
"""
from __future__ import annotations

import sys

import torch
import triton

import gpu_int4 as T

from pagedeploy.kernels.triton_launch import num_sms
from pagedeploy.quant import int4_triton as K4
from pagedeploy.quant.int4_triton import KernelConfig as C

SHAPES = {name.split()[1]: nk for name, nk in T.SHAPES.items() if name.startswith("llama")}   # (N, K)
BASES = [(64, 128, 8, 3), (64, 128, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3),
         (64, 128, 4, 3)]   # block_m, block_n, num_warps, num_stages
ROWS = (17, 24, 32, 48, 64, 96, 128, 160, 191)


def sweep(ms: list[int], fold: bool) -> None:
    total = {}
    for M in ms:
        for name, (N, K) in SHAPES.items():
            res = {"default": T.time_int4(M, N, K, None), "bf16": T.time_bf16(M, N, K)}
            for bm, bn, warps, stages in BASES:
                for split in (1, 2, 4, 8):
                    cfg = C("gemm", bm, bn, 128, split, warps, stages, fold=fold)
                    ok = T.check("gemm", M, N, K, 128, torch.bfloat16, cfg)
                    res[f"m{bm} n{bn} w{warps} st{stages} s{split}"] = T.time_int4(M, N, K, cfg) if ok else float("nan")
            best = min((k for k in res if k not in ("bf16", "default") and res[k] == res[k]), key=res.get)
            sums = total.setdefault(M, [0.0, 0.0, 0.0])
            for i, key in enumerate(("default", best, "bf16")):
                sums[i] += res[key]
            T.log(f"M={M} {name:8s} default {res['default']:7.2f} gemm best {res[best]:7.2f} ({best}) "
                  f"bf16 {res['bf16']:7.2f}  " + " ".join(f"[{k}]={v:.1f}" for k, v in res.items()))
    for M, (default, best, bf16) in total.items():
        T.log(f"M={M} layer: default {default:.1f} gemm {best:.1f} bf16 {bf16:.1f} us "
              f"-> int4/bf16 time {default / bf16:.2f} (gemm {best / bf16:.2f})")


def rows() -> None:
    """The layer's four linears per M: the default dispatch, the dot GEMM it replaced above
    DOT_MAX_M (32-row tiles, its old launch rule) and bf16 cuBLAS."""
    sms = num_sms(torch.device("cuda"), interpreter=4)
    for M in ROWS:
        t = {"default": 0.0, "dot": 0.0, "bf16": 0.0}
        for N, K in SHAPES.values():
            split = K4._split(triton.cdiv(M, 32) * triton.cdiv(N, 128), K // 128, sms, 1.5)
            t["default"] += T.time_int4(M, N, K, None)
            t["dot"] += T.time_int4(M, N, K, C("dot", 32, 128, 128, split, num_warps=4, num_stages=3))
            t["bf16"] += T.time_bf16(M, N, K)
        T.log(f"M={M:<4} layer us: default {t['default']:7.1f}  dot {t['dot']:7.1f}  bf16 {t['bf16']:7.1f}  "
              f"default/dot {t['default'] / t['dot']:.2f}  bf16/default {t['bf16'] / t['default']:.2f}")


def once(M: int, names: list[str]) -> None:
    """Three calls a shape, nothing else on the GPU: `ncu -k regex:_int4_ --launch-skip 2 --launch-count 1`."""
    from pagedeploy.quant.int4_gemv import int4_gemv
    for name in names:
        N, K = SHAPES[name]
        w = T.random_int4(N, K)
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        for _ in range(3):
            if M == 1:   # the batch-1 GEMV as decode runs gate_up: silu * up fused (no norm here)
                int4_gemv(x, w, silu_mul=name == "gate_up")
            else:
                K4.int4_matmul(x, w)
        torch.cuda.synchronize()


def main() -> None:
    mode, args = sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("--")]
    if mode == "sweep":
        sweep([int(m) for m in args[0].split(",")], "--fold" in sys.argv)
    elif mode == "rows":
        rows()
    else:
        once(int(args[0]), args[1].split(","))


if __name__ == "__main__":
    main()
