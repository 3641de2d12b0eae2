"""4-bit weight formats: bitsandbytes NF4/FP4, our group-wise int4 (W4A16) with Triton kernels,
GGUF 4-bit loading, and QuantLinear.

Names resolve lazily, so importing this package (e.g. the planner using `formats`) pulls in
neither torch nor triton nor bitsandbytes.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "formats": ("int4_group_size", "int4_weight_bytes", "bnb_weight_bytes"),
    "int4": ("Int4Weight", "concat_rows", "quantize_int4", "dequantize_int4", "int4_matmul_reference", "int4_from_gguf",
             "int4_from_gguf_q4_0", "int4_from_gguf_q4_1", "int4_from_gguf_q4_k"),
    "bnb": ("BnbWeight", "quantize_bnb", "dequantize_bnb", "bnb_matmul"),
    "linear": ("QuantLinear", "quantize_linear", "quantize_weight", "quantize_model_linears"),
    "int4_triton": ("int4_matmul",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
