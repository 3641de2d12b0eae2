"""Issue 6, batch 1: the tensor-core int4 GEMV's scales and zeros in one 8-byte load a row and block
(int4_mma.WIDE_SCALES, shipped) against four 2-byte loads, in one run.

1. LAYERS copies of a Llama-3-8B layer's four int4 linears as the model runs them (gpu_int4_fold's
   chain: norm into qkv and gate_up, x packed in the GEMV), one CUDA graph, µs a layer per mode, and
   whether the outputs are bit-equal across modes (they must be: the same fp16 values).
2. `deploy bench --batch-1` decode tok/s, int4 in both modes, interleaved, a fresh engine each, and
   bf16 (gpu_int4_b1.interleaved_ab).
Usage (device machine): python3 scripts/gpu_int4_scales.py [REPS] [--kernels-only]
"""
from __future__ import annotations

import sys

import torch

import gpu_int4_b1 as B1
import gpu_int4_fold as F
from gpu_common import RunLog
from gpu_int4 import time_calls

from pagedeploy.quant import int4_mma

log = RunLog("int4_scales.log")
MODES = {"wide (shipped)": True, "2-byte loads": False}


def set_mode(wide: bool) -> None:
    int4_mma.WIDE_SCALES = wide


def chain_table() -> None:
    layers = F.make_layers()
    expect = None
    for name, wide in list(MODES.items()) * 2:   # twice: drift shows
        set_mode(wide)
        outs = [o.clone() for o in F.run_layer(layers[0])]
        expect = expect or outs
        same = all(torch.equal(a, b) for a, b in zip(outs, expect))
        us = time_calls([lambda layer=layer: F.run_layer(layer) for layer in layers])
        log(f"layer {name:16s} {us:7.2f} us  outputs {'equal' if same else 'DIFFER'} to the first mode's")
    set_mode(True)
    del layers
    torch.cuda.empty_cache()


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    chain_table()
    if "--kernels-only" in sys.argv:
        return 0
    rows = B1.interleaved_ab({name: (lambda wide=wide: set_mode(wide)) for name, wide in MODES.items()}, reps, log)
    set_mode(True)
    B1.log_speeds(rows["int4"] + rows["none"][:1], log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
