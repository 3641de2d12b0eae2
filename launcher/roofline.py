"""The memory roofline of a generation run: the least time a GPU needs to read what it must read.

Decode is bound by memory, not arithmetic: every engine step reads every weight once, and every
sequence that decodes reads its whole cached context (K and V of all layers). So a run that took
`steps` engine steps and generated the given output lengths must read at least

    bytes = steps × weight_bytes + Σ_requests Σ_{t < output_len} (prompt_len + t) × kv_bytes_per_token

and cannot finish faster than bytes / bandwidth. The bench reports that bound over the measured
time as "% of the roofline". The bandwidth is the GPU catalog's nominal figure (launcher/gpus.py,
e.g. 3.35 TB/s for the H100 80GB; a device-to-device copy measures about 3.0 TB/s there), so 100%
is not reachable in practice. Prefill's arithmetic and the writes are left out: the bound is a floor.
No torch here.
"""
from __future__ import annotations


def decode_kv_read_bytes(prompt_lens: list[int], output_lens: list[int], kv_bytes_per_token: int) -> int:
    """K/V bytes read by all decode steps: the t-th generated token of a request reads its
    prompt plus the t tokens generated before it."""
    tokens = sum(out * prompt + out * (out - 1) // 2 for prompt, out in zip(prompt_lens, output_lens))
    return tokens * kv_bytes_per_token


def roofline_seconds(weight_bytes: int, steps: int, kv_read_bytes: int, bandwidth_bytes_per_s: float) -> float:
    return (steps * weight_bytes + kv_read_bytes) / bandwidth_bytes_per_s


def roofline_percent(measured_s: float, weight_bytes: int, steps: int, kv_read_bytes: int,
                     bandwidth_bytes_per_s: float) -> float:
    return 100.0 * roofline_seconds(weight_bytes, steps, kv_read_bytes, bandwidth_bytes_per_s) / measured_s
