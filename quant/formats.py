"""Byte counts and group sizes of the 4-bit formats, as pure functions.

No torch here: the planner (`deploy plan`) imports this module to size quantized weights, and the
layers in linear.py must store exactly these bytes (tests check that they do).
"""
from __future__ import annotations

import math

INT4_GROUP_SIZE = 128          # the plan's default: 0.5 + 4/128 B/param with fp16 scale + zero
INT4_GROUP_FALLBACKS = (64, 32)
BNB_BLOCK_SIZE = 64            # bitsandbytes blocks; fp32 absmax each (no double quantization)


def int4_group_size(in_features: int, preferred: int = INT4_GROUP_SIZE) -> int:
    """The group size int4 uses for a layer with `in_features` inputs.

    Groups never straddle rows, so a dimension that 128 does not divide (SmolLM2's hidden size is 576)
    falls back to 64, then 32, instead of padding: the kernels stay mask-free along K."""
    for g in (preferred, *INT4_GROUP_FALLBACKS):
        if g <= preferred and in_features % g == 0:
            return g
    raise ValueError(f"quantization: int4 needs in_features divisible by 32, got {in_features}")


def int4_weight_bytes(out_features: int, in_features: int, group_size: int | None = None,
                      scale_bytes: int = 2) -> int:
    """Packed codes (0.5 B/param) plus one scale and one zero per group."""
    g = group_size or int4_group_size(in_features)
    return out_features * in_features // 2 + 2 * scale_bytes * out_features * (in_features // g)


def bnb_weight_bytes(numel: int, block_size: int = BNB_BLOCK_SIZE) -> int:
    """bitsandbytes NF4/FP4: two codes per byte plus an fp32 absmax per block of the flat tensor."""
    return math.ceil(numel / 2) + 4 * math.ceil(numel / block_size)
