"""Issue 6, batch 1: does the tensor-core int4 GEMV wait on x? (docs/PERF.md run 25)

The SASS of int4_mma's loop (gate_up, down) issues each block's loads of x's packed words at the
top of the iteration and its first MMA a few dozen instructions later. x was just written by the
program's own pack (or by pack_x) and is read once per program, so those loads go to L2 every
time, and the warps, two a scheduler, wait a round trip per block. Modes (int4_mma's knobs):
X_L1 1 asks L1 for the whole split's x after the pack, 2 for each block's one block ahead;
WEIGHTS_CG loads the weight stream with .cg, past L1, so it does not evict x.

Check: per Llama-3-8B linear (norm in front of qkv and gate_up, silu * up after gate_up), every
mode's output against the shipped mode's, bit for bit (the same sums in the same order), on the
in-kernel pack, with another weight in between. Kernels: µs a call per linear (CUDA graph with PDL, weights past L2),
and a layer's four linears (8 layers in one graph). Then `deploy bench --batch-1` decode tok/s,
shipped against the best chain mode, interleaved, a fresh engine each, and bf16.
`--floors`: only the kernels, shipped against FLOORS (int4_mma.FLOOR: wrong sums, timing floors).
`--chains`: int4_mma.CHAINS (chains' docstring), then end to end at the best chain mode.
`--e2e-floor`: end to end at FLOOR 2 against shipped (e2e_floor's docstring).
`--sweep`: launch shapes with more warps an SM (sweep's docstring).
Usage (device machine): python3 scripts/gpu_int4_xl1.py [REPS] [--kernels-only] [--floors | --sweep | --chains | --e2e-floor]
"""
from __future__ import annotations

import sys

import torch

import gpu_int4_b1 as B1
import gpu_int4_fold as F
from gpu_common import RunLog
from gpu_int4 import time_calls

from pagedeploy.quant import int4_gemv as G
from pagedeploy.quant import int4_mma

log = RunLog("int4_xl1.log")
MODES = {"shipped": (0, False, 0), "weights .cg": (0, True, 0), "x L1 split": (1, False, 0),
         "x L1 split, .cg": (1, True, 0), "x L1 ahead": (2, False, 0), "x L1 ahead, .cg": (2, True, 0)}
FLOORS = {"shipped": (0, False, 0), "floor: x in L1": (0, False, 1), "floor: weights in L1": (0, False, 2),
          "floor: both": (0, False, 3)}   # wrong sums: what x's loads, the weights' loads cost


def set_mode(name: str) -> None:
    int4_mma.X_L1, int4_mma.WEIGHTS_CG, int4_mma.FLOOR = {**MODES, **FLOORS}[name]


def check() -> bool:
    """Every mode bit-equal to the shipped one, per linear at its default launch (x packed in the
    kernel), three times each: a stale L1 line would show as a flip."""
    ok = True
    for name, (n, k, norm, silu), ws, x, fus, _, _ in B1.linear_cases(list(B1.SHAPES)):
        cfg = G.default_config(n, k, 128, silu, x.device)
        set_mode("shipped")
        expect = [t.clone() for t in G.int4_gemv(x, ws[0], silu_mul=silu, config=cfg, **fus) if t is not None]
        for mode in MODES:
            set_mode(mode)
            for w in (ws[0], ws[1], ws[0]):
                got = [t for t in G.int4_gemv(x, w, silu_mul=silu, config=cfg, **fus) if t is not None]
                same = all(torch.equal(a, b) for a, b in zip(got, expect)) == (w is ws[0])
                ok &= same
                if not same:
                    log(f"{name:8s} {mode}: DIFFER")
        del ws
        torch.cuda.empty_cache()
    set_mode("shipped")
    log(f"check: every mode bit-equal to shipped: {ok}")
    return ok


def kernel_table(modes: dict) -> dict[str, float]:
    rows = {}
    for name, (n, k, norm, silu), ws, x, fus, _, _ in B1.linear_cases(B1.ONLY):
        cfg = G.default_config(n, k, 128, silu, x.device)
        for mode in modes:
            set_mode(mode)
            rows[(name, mode)] = time_calls([lambda w=w: G.int4_gemv(x, w, silu_mul=silu, config=cfg, **fus)
                                             for w in ws])
        log(f"{name:8s} " + "  ".join(f"{mode} {rows[(name, mode)]:6.2f}" for mode in modes))
        del ws
        torch.cuda.empty_cache()
    layers = F.make_layers()
    chain = {}
    for _ in range(2):   # twice, interleaved: drift between repeats shows
        for mode in modes:
            set_mode(mode)
            chain.setdefault(mode, []).append(time_calls([lambda layer=layer: F.run_layer(layer) for layer in layers]))
    for mode, us in chain.items():
        log(f"layer (4 linears) {mode:18s} " + " ".join(f"{u:6.2f}" for u in us) + " us")
    set_mode("shipped")
    del layers
    torch.cuda.empty_cache()
    log("\nus a call       " + " ".join(f"{m:>16s}" for m in modes))
    for name in B1.ONLY:
        log(f"{name:16s}" + " ".join(f"{rows[(name, m)]:16.2f}" for m in modes))
    log(f"{'layer chain':16s}" + " ".join(f"{min(chain[m]):16.2f}" for m in modes))
    return {m: min(us) for m, us in chain.items()}


def sweep() -> None:
    """Launch shapes at more warps an SM: 64 x 4 warps or 32 x 2 (the same tile a thread, half the
    registers a program), or (--wide) 128 x 4 (two rows' tiles a thread share x's operands, as
    gate_up's two streams do) and 128 x 8, one or two blocks ahead, every split that divides the blocks up to 8
    programs an SM; gate_up also as one plain 2N-row stream (no silu: what a row-interleaved gate_up
    with silu * up in its epilogue would cost). µs a call and registers."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = list(B1.linear_cases(B1.ONLY))
    for name, (n, k, norm, silu), ws, x, fus, _, _ in cases:
        for plain in ((False, True) if silu else (False,)):
            rows, s_mul = (2 * n, False) if plain else (n, silu)
            label = name + (" as 2N plain" if plain else "")
            blocks = k // 512
            best = (1e9, "")
            for bn, warps in (((64, 4), (128, 4), (128, 8)) if "--wide" in sys.argv else ((64, 4), (32, 2))):
                tiles = rows // bn * (2 if s_mul else 1)
                for ahead in (1, 2):
                    for split in (d for d in range(1, blocks // 2 + 1) if blocks % d == 0 and tiles * d <= 8 * sms):
                        cfg = G.Int4GemvConfig(bn, split, warps, mma=True, ahead=ahead, **G.pack_in_kernel(blocks, split))
                        regs = []
                        launch = int4_mma.launch
                        int4_mma.launch = lambda *a, **kw: regs.append(launch(*a, **kw).n_regs)
                        try:
                            G.int4_gemv(x, ws[0], silu_mul=s_mul, config=cfg, **fus)
                        finally:
                            int4_mma.launch = launch
                        us = time_calls([lambda w=w: G.int4_gemv(x, w, silu_mul=s_mul, config=cfg, **fus) for w in ws])
                        per_sm = min(65536 // (regs[0] * 32 * warps), 32 // warps) if regs else 0
                        log(f"{label:18s} bn{bn} w{warps} ahead {ahead} split {split:2d}: {us:6.2f} us  "
                            f"{regs[0] if regs else '?'} registers ({per_sm} programs an SM fit, "
                            f"the grid gives {tiles * split / sms:.1f})")
                        best = min(best, (us, f"bn{bn} w{warps} ahead {ahead} split {split}"))
            log(f"{label:18s} best {best[0]:6.2f} us ({best[1]})")
        del ws
        torch.cuda.empty_cache()


def e2e_floor(reps: int) -> None:
    """`deploy bench --batch-1` decode tok/s with every int4 GEMV at FLOOR 2 (its weights L1 hits:
    wrong tokens, a valid time) against shipped, int4 and int4 + quantize_lm_head, interleaved, a
    fresh engine each; bf16 for the ratio. What the GEMV could give if DRAM cost it nothing."""
    rows = []
    for rnd in range(2):
        for keys in (["quantization=int4"], ["quantization=int4", "quantize_lm_head=true"]):
            for mode in ("shipped", "floor: weights in L1"):
                set_mode(mode)
                speeds = B1.batch1_speeds(keys, reps)
                rows.append((("int4+head" if len(keys) > 1 else "int4") + (" floor" if "floor" in mode else ""),
                             speeds))
                log(f"{' '.join(keys)} {mode}: " + " ".join(f"{v:7.1f}" for v in speeds))
        set_mode("shipped")
        if rnd == 0:
            bf16 = ("bf16", B1.batch1_speeds(["quantization=none"], reps))
            log("bf16: " + " ".join(f"{v:7.1f}" for v in bf16[1]))
    B1.log_speeds(rows + [bf16], log)


REAL_LAUNCH = int4_mma.launch


def set_chains(gate_up: int, others: int) -> None:
    """int4_mma.CHAINS per launch: `gate_up` for the silu * up launches, `others` for the rest."""
    def launch(*args, **kw):
        int4_mma.CHAINS = gate_up if args[12] else others   # launch's silu_mul
        return REAL_LAUNCH(*args, **kw)
    int4_mma.launch = launch if (gate_up, others) != (2, 2) else REAL_LAUNCH
    int4_mma.CHAINS = 2


def chains() -> dict:
    """A group's MMAs in 2 (shipped), 4 or 8 independent chains, per linear at its shipped launch
    (and gate_up as one 2N-row stream): error against the 2-chain output, µs a call, registers;
    then a layer's four linears."""
    for name, (n, k, norm, silu), ws, x, fus, _, _ in B1.linear_cases(B1.ONLY):
        shapes = [(name, silu, G.default_config(n, k, 128, silu, x.device))]
        if silu:
            shapes += [(name + " 2N plain a" + str(a), False, G.Int4GemvConfig(64, 1, 4, mma=True, ahead=a,
                                                                               **G.pack_in_kernel(k // 512, 1)))
                       for a in (1, 2)]
        for label, s_mul, cfg in shapes:
            set_chains(2, 2)
            ref = G.int4_gemv(x, ws[0], silu_mul=s_mul, config=cfg, **fus)[0].float()
            for ch in (2, 4, 8):
                set_chains(ch, ch)
                regs = []
                int4_mma.launch = lambda *a, **kw: regs.append(REAL_LAUNCH(*a, **kw).n_regs)
                out = G.int4_gemv(x, ws[0], silu_mul=s_mul, config=cfg, **fus)[0].float()
                int4_mma.launch = REAL_LAUNCH
                again = G.int4_gemv(x, ws[0], silu_mul=s_mul, config=cfg, **fus)[0].float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = time_calls([lambda w=w: G.int4_gemv(x, w, silu_mul=s_mul, config=cfg, **fus) for w in ws])
                log(f"{label:16s} chains {ch}: {us:6.2f} us  {regs[0]} registers  rel. diff to 2 chains "
                    f"{err:.1e}  repeat {'equal' if torch.equal(out, again) else 'DIFFER'}")
        del ws
        torch.cuda.empty_cache()
    set_chains(2, 2)
    layers = F.make_layers()
    table = {}
    for _ in range(2):
        for gu, other in ((2, 2), (4, 4), (4, 8), (2, 8), (2, 4)):
            set_chains(gu, other)
            table.setdefault((gu, other), []).append(
                time_calls([lambda layer=layer: F.run_layer(layer) for layer in layers]))
    set_chains(2, 2)
    for (gu, other), us in table.items():
        log(f"layer (4 linears), chains gate_up {gu} others {other}: " + " ".join(f"{u:6.2f}" for u in us) + " us")
    del layers
    torch.cuda.empty_cache()
    return {key: min(us) for key, us in table.items()}


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    if "--e2e-floor" in sys.argv:
        e2e_floor(reps)
        return 0
    if "--chains" in sys.argv:
        table = chains()
        best = min(table, key=table.get)
        if "--kernels-only" in sys.argv or best == (2, 2):
            return 0
        modes = {"2 chains": lambda: set_chains(2, 2), f"chains {best}": lambda: set_chains(*best)}
        rows = B1.interleaved_ab(modes, reps, log)
        set_chains(2, 2)
        B1.log_speeds(rows["int4"] + rows["none"][:1], log)
        return 0
    if "--sweep" in sys.argv:
        sweep()
        return 0
    if "--floors" in sys.argv:
        kernel_table(FLOORS)
        return 0
    if not check():
        return 1
    chain = kernel_table(MODES)
    if "--kernels-only" in sys.argv:
        return 0
    best = min((m for m in MODES if m != "shipped"), key=chain.get)
    modes = {"shipped": lambda: set_mode("shipped"), best: lambda: set_mode(best)}
    rows = B1.interleaved_ab(modes, reps, log)
    set_mode("shipped")
    B1.log_speeds(rows["int4"] + rows["none"][:1], log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
