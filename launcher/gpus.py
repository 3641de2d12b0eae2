"""GPU catalog, GPU detection, and the CPU target (host RAM).

Totals are what the CUDA driver reports (cudaMemGetInfo / torch.cuda.mem_get_info), which is below
the nominal size and below nvidia-smi's figure: the planner's budget is a fraction of that total.
The H100 and H200 figures were measured on our machines (79.18 GiB where nvidia-smi says 81,559
MiB; 139.80 GiB where it says 143,771 MiB); the others are nvidia-smi's MiB less the driver's
reserve as users report it, so treat them as close, not exact.
Bandwidths are the vendors' nominal figures (the measured copy rate is below them).

No torch at import: detection imports torch lazily, and only when a GPU may exist.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .profile import Profile

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    name: str
    total_bytes: int                 # as cudaMemGetInfo reports (host RAM for a CPU target)
    bandwidth_bytes_per_s: float     # nominal memory bandwidth
    device: str = "cuda"             # "cuda" | "cpu"
    source: str = "catalog"          # "catalog" | "detected" | "host"

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"


def _gpu(name: str, total_mib: int, tb_per_s: float) -> GpuSpec:
    return GpuSpec(name, total_mib * MiB, tb_per_s * 1e12)


# name -> spec; totals in MiB as the driver reports them.
CATALOG: dict[str, GpuSpec] = {g.name: g for g in [
    _gpu("rtx-3080-10gb", 9_987, 0.760),
    _gpu("rtx-3080-12gb", 11_768, 0.912),
    _gpu("rtx-3080-20gb", 19_744, 0.760),
    _gpu("rtx-3090", 24_253, 0.936),
    _gpu("rtx-4080", 15_952, 0.717),
    _gpu("rtx-4090", 24_210, 1.008),
    _gpu("rtx-5090", 32_112, 1.792),
    _gpu("t4", 14_930, 0.320),
    _gpu("a10g", 22_503, 0.600),
    _gpu("l4", 22_478, 0.300),
    _gpu("l40s", 45_495, 0.864),
    _gpu("a100-40gb", 40_337, 1.555),
    _gpu("a100-80gb", 81_050, 2.039),
    _gpu("h100-80gb", 81_080, 3.35),      # 79.18 GiB, measured with cudaMemGetInfo
    _gpu("h100-94gb", 95_320, 3.9),
    _gpu("h200", 143_155, 4.8),           # 139.80 GiB, measured with cudaMemGetInfo
    _gpu("b200", 182_624, 8.0),
]}

# Substrings of torch.cuda.get_device_name() -> catalog name (for the bandwidth of a detected GPU).
_DEVICE_NAMES = [
    ("3080", "rtx-3080-10gb"), ("3090", "rtx-3090"), ("4080", "rtx-4080"), ("4090", "rtx-4090"),
    ("5090", "rtx-5090"), ("t4", "t4"), ("a10g", "a10g"), ("l40s", "l40s"), ("l4", "l4"),
    ("a100", "a100-80gb"), ("h100 nvl", "h100-94gb"), ("h100", "h100-80gb"), ("h200", "h200"),
    ("b200", "b200"),
]


def lookup_gpu(name: str) -> GpuSpec:
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key in CATALOG:
        return CATALOG[key]
    close = [n for n in CATALOG if n.startswith(key)] or \
        difflib.get_close_matches(key, list(CATALOG), n=1, cutoff=0.5)
    fix = f"did you mean {' or '.join(close)}?" if close else f"use one of {', '.join(CATALOG)}"
    raise UserError(f"unknown GPU {name!r}", fix)


def host_memory_bytes(meminfo: str = "/proc/meminfo") -> int:
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no MemTotal in {meminfo}")


def cpu_target() -> GpuSpec:
    """Plan against host RAM (bandwidth: a typical dual-channel DDR figure, only for estimates)."""
    return GpuSpec("cpu", host_memory_bytes(), 50e9, device="cpu", source="host")


def gpu_may_exist() -> bool:
    """Cheap check before importing torch: an NVIDIA driver node or a visible device list."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def detect_gpu() -> GpuSpec | None:
    """The first visible CUDA GPU as the driver reports it, or None."""
    if not gpu_may_exist():
        return None
    import torch  # lazy: only here, only when a driver is present

    if not torch.cuda.is_available():
        return None
    _free, total = torch.cuda.mem_get_info(0)
    device_name = torch.cuda.get_device_name(0)
    lowered = device_name.lower()
    known = next((CATALOG[n] for s, n in _DEVICE_NAMES if s in lowered), None)
    bandwidth = known.bandwidth_bytes_per_s if known else 1e12
    return GpuSpec(device_name, int(total), bandwidth, source="detected")


def resolve_target(profile: "Profile", gpu_name: str | None = None) -> GpuSpec:
    """What to plan against: --gpu, else the profile's gpu:, else the device (detected GPU or
    host RAM)."""
    if gpu_name:
        try:
            return lookup_gpu(gpu_name)
        except UserError as e:
            raise e.at("--gpu", field="gpu") from None
    if profile.gpu:
        return lookup_gpu(profile.gpu)
    if profile.device == "cpu":
        return cpu_target()
    detected = detect_gpu()
    if detected is not None:
        return detected
    if profile.device == "cuda":
        raise profile.error("device", "device is cuda but no CUDA GPU is visible",
                            "set gpu: NAME (e.g. h100-80gb) for a dry-run plan, or device: cpu")
    return cpu_target()
