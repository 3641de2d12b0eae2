"""How kernel launches coordinate: programmatic dependent launch, and arrival counters.

Programmatic dependent launch (PDL, sm_90+), for the decode kernels that CUDA graphs replay.

A kernel launched with PDL may start while the kernel before it in the stream is still running. It
must call `wait_previous` before it reads anything that kernel wrote or writes anything it reads;
what does not depend on it (weights) it may load before. `wait_previous` also lets the next kernel
launch at once, so along a chain of such kernels each launch hides behind the one before (docs/PERF.md,
run 12: the decode layers of Qwen3-0.6B at batch 1 run 1.2x faster).

Only CUDA-graph captures launch with PDL: there launch gaps are what is left, while eager callers may
order a kernel's inputs by events on other streams (CPU offload's copies), which PDL must not relax.
Every program of a PDL kernel calls `wait_previous`, so a kernel still completes after its
predecessor, and by induction after everything before it.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


# 2: wait, then let the next kernel launch at once; 1: wait only (the next launches as this one
# ends); 0: no PDL. For measuring (docs/PERF.md) and as a way out should a driver misbehave.
_mode = os.environ.get("PAGEDEPLOY_PDL", "2")
if _mode not in ("0", "1", "2"):
    raise ValueError(f"PAGEDEPLOY_PDL={_mode!r} is not one of 0, 1, 2: unset it, or 0 to turn "
                     "programmatic dependent launch off")
PDL_MODE = int(_mode)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device, interpreter: int) -> int:
    """Streaming multiprocessors of a CUDA device, for sizing grids; elsewhere (the CPU interpreter)
    `interpreter`, a small stand-in chosen by the caller so that its tests exercise splitting."""
    return _sm_count(_index(device)) if device.type == "cuda" else interpreter


def pdl_supported(device: torch.device) -> int:
    """The PDL mode kernels for `device` compile with: 0 unless it has the griddepcontrol
    instructions (Hopper and later)."""
    if device.type != "cuda" or PDL_MODE == 0:
        return 0
    return PDL_MODE if _capability(_index(device)) >= (9, 0) else 0


def pdl_launch(device: torch.device) -> dict:
    """Launch options: PDL while a CUDA graph is being captured on a GPU that has it."""
    return {"launch_pdl": True} if pdl_supported(device) and torch.cuda.is_current_stream_capturing() else {}


# Rotary + KV store and attention do nothing before their wait: on, they let the next kernel launch
# at once (wait_previous's EARLY), so it starts while they run. Measured at batch 1 (docs/PERF.md run
# 19): rotary's gives bf16 +1.1% and int4 -1 to -2% (the model asks for it on bf16 layers only);
# attention's adds nothing for bf16 and costs int4 too, so it is off. scripts/gpu_early_start.py A/Bs them.
EARLY_ROPE = True
EARLY_ATTENTION = False
# Split decode attention reads the metadata and asks L2 for its first K/V tile before its wait
# (int4 batch 1 +1-2%, docs/PERF.md run 21).
ATTENTION_PRE_WAIT = True


@triton.jit
def wait_previous(PDL: tl.constexpr, EARLY: tl.constexpr = False):
    """Wait until the previous kernel has finished and its writes are visible; let the next start.
    EARLY: let the next start before the wait, for a short kernel whose successor has work that does
    not depend on it (loading weights) to do meanwhile; the successor's own wait still orders it
    after this kernel and so after this one's predecessor."""
    if PDL == 2 and EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL >= 1:
        tl.extra.cuda.gdc_wait()
    if PDL == 2 and not EARLY:
        tl.extra.cuda.gdc_launch_dependents()


_COUNTERS = 1 << 16
_counters_by_device: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, needed: int = 0) -> torch.Tensor:
    """int32 counters, zero between launches, for kernels whose programs reduce in-launch (split-K,
    attention splits): each program bumps its output tile's counter, the last to arrive reduces and
    sets it back to zero (so no memset per launch, and CUDA-graph replays find them armed). Kernels
    of one stream use them one after the other; PDL kernels touch them only after wait_previous.
    `needed`: the tiles of the caller's launch, checked against the counters there are."""
    if device not in _counters_by_device:
        _counters_by_device[device] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    if needed > _COUNTERS:
        raise ValueError(f"a launch of {needed} reducing tiles exceeds the {_COUNTERS} arrival counters")
    return _counters_by_device[device]
