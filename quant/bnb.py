"""NF4 / FP4 weights through bitsandbytes (an optional dependency: the `bnb` extra).

Format (bitsandbytes' own, so `bnb.matmul_4bit` runs it on CUDA and on the CPU): the weight is
flattened, cut into blocks of 64, each block scaled by an fp32 absmax (no double quantization: the
plan counts 0.5 + 4/64 B/param), two 4-bit codes per byte.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from .formats import BNB_BLOCK_SIZE, bnb_weight_bytes

QUANT_TYPES = ("nf4", "fp4")


def import_bnb(method: str = "nf4"):
    """bitsandbytes, or a one-sentence error saying how to install it."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as e:
        raise ImportError(f"quantization: {method} needs bitsandbytes: pip install 'pagedeploy[bnb]'") from e
    return bitsandbytes


@dataclass
class BnbWeight:
    packed: torch.Tensor      # uint8 [ceil(numel / 2), 1], bitsandbytes' layout
    state: Any                # bitsandbytes.functional.QuantState (absmax, shape, code, dtype, ...)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.state.shape)

    @property
    def quant_type(self) -> str:
        return self.state.quant_type

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.state.absmax.numel() * 4

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "BnbWeight":
        state = self.state
        moved = type(state)(absmax=state.absmax.to(device, non_blocking=non_blocking), shape=state.shape,
                            code=state.code.to(device), blocksize=state.blocksize,
                            quant_type=state.quant_type, dtype=state.dtype)
        return BnbWeight(self.packed.to(device, non_blocking=non_blocking), moved)


def quantize_bnb(w: torch.Tensor, quant_type: str = "nf4", dtype: torch.dtype | None = None) -> BnbWeight:
    """Quantize `w [out, in]` on its own device. `dtype` is the compute dtype the weight dequantizes
    to inside the matmul (default: w.dtype); the absmax is taken from w as given."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantization: unknown bitsandbytes type {quant_type!r} (use nf4 or fp4)")
    bnb = import_bnb(quant_type)
    packed, state = bnb.functional.quantize_4bit(
        w.contiguous(), blocksize=BNB_BLOCK_SIZE, quant_type=quant_type, compress_statistics=False)
    state.dtype = dtype or w.dtype
    weight = BnbWeight(packed, state)
    # The plan's byte formula is the contract; a bitsandbytes release that stores more must fail here.
    assert weight.nbytes == bnb_weight_bytes(w.numel()), (weight.nbytes, w.shape)
    return weight


def dequantize_bnb(w: BnbWeight) -> torch.Tensor:
    bnb = import_bnb(w.quant_type)
    if not _rows_split_blocks(w):
        return bnb.functional.dequantize_4bit(w.packed, w.state)
    # bitsandbytes 0.50's native CPU kernel (seen on AVX-512 hosts) takes a row that ends inside a
    # block as the start of a new block, and reads the wrong absmax from there on: as one flat row
    # the blocks are bitsandbytes' own again.
    state = copy.copy(w.state)
    state.shape = torch.Size((math.prod(w.shape),))
    return bnb.functional.dequantize_4bit(w.packed, state).view(w.shape)


def _rows_split_blocks(w: BnbWeight) -> bool:
    """On the CPU, a row of w is not a whole number of blocks (see dequantize_bnb)."""
    return not w.packed.is_cuda and w.shape[1] % w.state.blocksize != 0


def bnb_matmul(x: torch.Tensor, w: BnbWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(w)^T (+ bias) in x.dtype, on CUDA or the CPU."""
    bnb = import_bnb(w.quant_type)
    if w.state.dtype != x.dtype:   # the state decides the dequantized weight's dtype
        w.state.dtype = x.dtype
    bias = None if bias is None else bias.to(x.dtype)
    if _rows_split_blocks(w):   # bitsandbytes' CPU matmul dequantizes them wrongly
        return torch.nn.functional.linear(x, dequantize_bnb(w).to(x.dtype), bias)
    rows = dequant_chunk_rows(w, x)
    if rows >= w.shape[0]:
        return bnb.matmul_4bit(x, w.packed.t(), quant_state=w.state, bias=bias)
    parts = []
    for start in range(0, w.shape[0], rows):
        part = row_slice(w, start, min(start + rows, w.shape[0]))
        parts.append(bnb.matmul_4bit(x, part.packed.t(), quant_state=part.state,
                                     bias=None if bias is None else bias[start:start + rows]))
    return torch.cat(parts, dim=-1)


DEQUANT_CHUNK_BYTES = 64 * 2**20   # the most of a dequantized weight that exists at once on CUDA
FUSED_MAX_ROWS = 4                 # bitsandbytes' fused kernel always takes x of up to 4 rows


def dequant_chunk_rows(w: BnbWeight, x: torch.Tensor) -> int:
    """Output rows of `w` per matmul call. On CUDA, bitsandbytes dequantizes the whole weight for
    larger x (a prefill): 0.94 GB for Llama-3-70B's gate_up in bf16, which the memory plan does not
    hold. Calls on row slices bound that scratch to DEQUANT_CHUNK_BYTES. Slices start on whole
    64-weight blocks of the flat tensor, so each is a valid weight of its own."""
    out, inp = w.shape
    if not x.is_cuda or x.numel() // inp <= FUSED_MAX_ROWS:
        return out
    step = w.state.blocksize // math.gcd(inp, w.state.blocksize)
    rows = DEQUANT_CHUNK_BYTES // (inp * x.element_size()) // step * step
    return max(step, rows)


def row_slice(w: BnbWeight, start: int, stop: int) -> BnbWeight:
    """Rows start..stop-1 of `w` (start * in a multiple of the block size): views, no copies."""
    inp, block = w.shape[1], w.state.blocksize
    state = w.state
    sliced = type(state)(absmax=state.absmax[start * inp // block:-(-stop * inp // block)],
                         shape=torch.Size((stop - start, inp)), code=state.code, blocksize=block,
                         quant_type=state.quant_type, dtype=state.dtype)
    return BnbWeight(w.packed[start * inp // 2:-(-stop * inp // 2)], sliced)
