"""QuantLinear: a 4-bit nn.Linear replacement, and the layer-by-layer model conversion.

The stored tensors are module buffers, so `module.to(device)`, pinning and state_dict treat them
like any weight (CPU offload moves whole decoder layers).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .formats import int4_group_size
from .int4 import Int4Weight, int4_matmul_reference, quantize_int4

METHODS = ("nf4", "fp4", "int4")


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored as an Int4Weight or a BnbWeight."""

    def __init__(self, weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if isinstance(weight, Int4Weight):
            self.method = "int4"
            self.group_size = weight.group_size
            self.register_buffer("packed", weight.packed)
            self.register_buffer("scales", weight.scales)
            self.register_buffer("zeros", weight.zeros)
        else:   # BnbWeight
            self.method = weight.quant_type
            self.register_buffer("packed", weight.packed)
            self.register_buffer("absmax", weight.state.absmax)
            self.register_buffer("code", weight.state.code, persistent=False)
            # Metadata only: qweight fills in absmax and code from the buffers at each call. Holding
            # them here too would keep a moved or offloaded layer's old copies alive.
            self._state = copy.copy(weight.state)
            self._forget_state_tensors()
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round scales, zeros or absmax: stored tensors follow the
        # device only; the bias follows the compute dtype like any parameter.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._forget_state_tensors()
        return self

    def _forget_state_tensors(self) -> None:
        if self.method != "int4":
            self._state.absmax = self._state.code = None

    @property
    def qweight(self):
        """The weight as its format's dataclass, on the buffers' current device."""
        if self.method == "int4":
            return Int4Weight(self.packed, self.scales, self.zeros, (self.out_features, self.in_features),
                              self.group_size)
        from .bnb import BnbWeight
        self._state.absmax, self._state.code = self.absmax, self.code
        return BnbWeight(self.packed, self._state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight
        if self.method != "int4":
            from .bnb import bnb_matmul
            return bnb_matmul(x, w, self.bias)
        if self.uses_gemv(x):
            from .int4_gemv import int4_gemv
            return int4_gemv(x, w, self.bias)[0]
        if x.is_cuda:
            from .int4_triton import int4_matmul
            return int4_matmul(x, w, self.bias)
        return int4_matmul_reference(x, w, self.bias)

    def uses_gemv(self, x: torch.Tensor) -> bool:
        """Batch-1 decode of an int4 weight on CUDA goes through int4_gemv (tensor cores for group
        128, packed fp16 math otherwise; the norm before and the activation after it fused by the
        model's norm_linear)."""
        return (self.method == "int4" and x.is_cuda and x.dim() == 2 and x.shape[0] == 1
                and x.dtype in (torch.float16, torch.bfloat16) and x.stride(-1) == 1)

    def weight_bytes(self) -> int:
        """Exact bytes of the stored weight: packed codes plus scales/zeros or absmax (no bias)."""
        tensors = (self.packed, self.scales, self.zeros) if self.method == "int4" else (self.packed, self.absmax)
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={self.method}{group}, bias={self.bias is not None}")


def quantize_linear(linear: nn.Linear, method: str, group_size: int | None = None,
                    dtype: torch.dtype | None = None) -> QuantLinear:
    """Quantize one nn.Linear on its own device. `dtype`: the compute dtype (default: the weight's)."""
    bias = None if linear.bias is None else linear.bias.detach()
    return quantize_weight(linear.weight.detach(), method, bias, group_size, dtype)


def quantize_weight(w: torch.Tensor, method: str, bias: torch.Tensor | None = None,
                    group_size: int | None = None, dtype: torch.dtype | None = None) -> QuantLinear:
    """A QuantLinear straight from a weight tensor `[out, in]` (e.g. one streamed from a checkpoint
    shard), quantized on w's device. int4 uses group 128, or the fallback of
    formats.int4_group_size where 128 does not divide `in`."""
    if method not in METHODS:
        raise ValueError(f"quantization: unknown method {method!r} (use one of {', '.join(METHODS)})")
    if bias is not None:
        bias = bias.to(dtype or w.dtype)
    if method == "int4":
        return QuantLinear(quantize_int4(w, group_size or int4_group_size(w.shape[1])), bias)
    from .bnb import quantize_bnb
    return QuantLinear(quantize_bnb(w, method, dtype=dtype), bias)


def quantize_model_linears(model: nn.Module, method: str, skip: tuple[str, ...] = ("lm_head", "embed"),
                           dtype: torch.dtype | None = None) -> list[str]:
    """Replace every nn.Linear whose name contains none of `skip` by a QuantLinear, in place and one
    at a time: each full-precision weight is dropped as soon as its 4-bit copy exists. Returns the
    names replaced."""
    names = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and not any(s in name for s in skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(getattr(parent, child), method, dtype=dtype))
    return names
