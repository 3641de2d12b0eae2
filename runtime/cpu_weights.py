"""CPU weight preparation: the decoder's GEMMs on oneDNN-packed weights.

torch's CPU `F.linear` hands float32 GEMMs to MKL's sgemm, which on the AMD (Zen) dev machines is
poor at the small row counts of decode: at 8 rows it reaches 15-25 GFLOP/s, and the tied
49152 x 576 lm_head runs at 5-10 GFLOP/s, about the speed of eight separate GEMVs. oneDNN's JIT
kernels on a weight reordered once into their blocked layout do the same products 1.3-2x faster at
2-16 rows (the lm_head 4-5x), 5-15 % faster at hundreds of rows and about as fast at one row
(docs/PERF.md, issue 3). So, at load time, every float32 Linear and the tied lm_head get a packed
copy, and their CPU forward runs on it from two rows on.

The dense parameters stay as they are (shapes, names, values) because the loaders, the bench's
weight copy and the tests read and write them; a packed copy remembers which version of its dense
weight it was made from and is re-made on first use after an in-place write. The cost is a second
copy of those weights in host memory (+0.54 GB for SmolLM2-135M in float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks its blocked layout from the expected row count; 1 gives a layout as slow as MKL at
# 2+ rows, while any of 8, 64 or None is within noise of the best at 1 to 256 rows (measured).
PACK_FOR_ROWS = 64
# One row (batch-1 decode) stays on MKL and the dense input-major weight: there the packed path
# was no faster in microbenchmarks (-15 % to +10 % per shape) and up to a third slower in the model.
MIN_PACKED_ROWS = 2


def can_pack(weight: torch.Tensor) -> bool:
    """float32 CPU matrices only: a GPU weight never takes this path, and oneDNN's bf16 reorder
    refuses CPUs without AVX-512 or AVX-NE-CONVERT (ours), so bf16 was never measured here."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and torch.backends.mkldnn.is_available())


class PackedWeight:
    """A dense [out, in] weight's oneDNN-packed copy; call it as F.linear(x, weight, bias)."""

    def __init__(self, weight: torch.Tensor):
        self.pack(weight)

    def pack(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_FOR_ROWS)
        self.source = _identity(weight)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.numel() < MIN_PACKED_ROWS * x.shape[-1]:
            return F.linear(x, weight, bias)
        if _identity(weight) != self.source:   # a loader or test wrote the dense weight
            self.pack(weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def _identity(weight: torch.Tensor) -> tuple[int, int]:
    """Changes when the weight's storage is replaced or written in place (a weight created under
    inference_mode has no version counter: only a new storage shows there)."""
    return weight.data_ptr(), 0 if weight.is_inference() else weight._version


def pack_cpu_weights(model: nn.Module) -> int:
    """Give every packable `Linear` of the model, and the tied embedding that serves as its
    lm_head, a packed copy (`module.packed`: their forward and compute_logits use it); returns
    how many. The others (bf16) keep computing on their dense weights."""
    from pagedeploy.runtime.model import Linear

    heads = [module for module in model.modules() if isinstance(module, Linear)]
    if model.lm_head is None:
        heads.append(model.model.embed_tokens)
    packable = [module for module in heads if can_pack(module.weight)]
    for module in packable:
        module.packed = PackedWeight(module.weight)
    return len(packable)
