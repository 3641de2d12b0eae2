"""Our group-wise W4A16 format, its torch reference matmul, and GGUF 4-bit conversion.

Layout (chosen for the Triton kernels in int4_triton.py):

- `packed`: int32 `[out, in // 8]`, row-major like nn.Linear's weight. Nibble j (bits 4j..4j+3) of
  word c in row n holds the code of column 8c + j. A program that owns a few output rows streams
  whole contiguous rows (the GEMV path), and a K tile of 8·k columns is k consecutive words.
- `scales`, `zeros`: `[out, in // group_size]`, fp16 or bf16 (fp32 for Q4_K, whose scales are
  products that fp16 cannot hold exactly). Asymmetric: `w = code * scale + zero`, so `zero` is the
  value of code 0 (the group's minimum). This form is one fma in the kernel and takes GGUF Q4_0/Q4_1
  blocks exactly (Q4_1: scale = d, zero = m; Q4_0: scale = d, zero = -8 d).
- Groups run along the input dim and never straddle rows; `group_size` is a field (128 by default,
  32 for GGUF tensors).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

assert sys.byteorder == "little", "the int4 packing reads four bytes as one little-endian int32"

from .formats import INT4_GROUP_SIZE

_CHUNK_ELEMS = 1 << 24   # rows quantized at a time: bounds the fp32 scratch (64 MB) on big layers


@dataclass
class Int4Weight:
    packed: torch.Tensor          # int32 [out, in // 8]
    scales: torch.Tensor          # [out, in // group_size]
    zeros: torch.Tensor           # [out, in // group_size], same dtype as scales
    shape: tuple[int, int]        # (out, in) of the dense weight
    group_size: int

    def __post_init__(self):
        out, inp = self.shape
        groups = (out, inp // self.group_size)
        if inp % self.group_size or self.group_size % 8:
            raise ValueError(f"int4: in={inp} must be a multiple of group_size={self.group_size} (itself of 8)")
        if self.packed.dtype != torch.int32 or tuple(self.packed.shape) != (out, inp // 8):
            raise ValueError(f"int4: packed must be int32 {(out, inp // 8)}, "
                             f"got {self.packed.dtype} {tuple(self.packed.shape)}")
        if tuple(self.scales.shape) != groups or tuple(self.zeros.shape) != groups:
            raise ValueError(f"int4: scales and zeros must be {groups}")
        if self.zeros.dtype != self.scales.dtype:
            raise ValueError("int4: scales and zeros must share a dtype")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Int4Weight":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Int4Weight(move(self.packed), move(self.scales), move(self.zeros), self.shape, self.group_size)

    def rows(self, index: torch.Tensor) -> "Int4Weight":
        """The weight with its output rows reordered (e.g. the Q/K permutation of llama GGUFs)."""
        index = index.to(self.packed.device)
        return Int4Weight(self.packed[index].contiguous(), self.scales[index].contiguous(),
                          self.zeros[index].contiguous(), (len(index), self.shape[1]), self.group_size)


def concat_rows(weights: list[Int4Weight]) -> Int4Weight:
    """Stack weights along the output dim (fused qkv / gate_up from separate GGUF tensors)."""
    first = weights[0]
    if any(w.shape[1] != first.shape[1] or w.group_size != first.group_size for w in weights):
        raise ValueError("int4: concat_rows needs the same in_features and group_size")
    cat = lambda name: torch.cat([getattr(w, name) for w in weights])  # noqa: E731
    return Int4Weight(cat("packed"), cat("scales"), cat("zeros"),
                      (sum(w.shape[0] for w in weights), first.shape[1]), first.group_size)


# ---- packing ---------------------------------------------------------------------------------

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in 0..15, `[rows, cols]` (cols % 8 == 0) -> int32 `[rows, cols // 8]`."""
    c = codes.to(torch.uint8)
    # Byte b = codes 2b (low nibble) and 2b + 1 (high); four bytes read as a little-endian int32
    # put code j in bits 4j..4j+3. uint8 ops only: no int64 scratch, no signed overflow.
    pairs = c[:, 0::2] | (c[:, 1::2] << 4)
    return pairs.contiguous().view(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 `[rows, words]` -> uint8 codes `[rows, words * 8]` (the inverse of pack_int4)."""
    pairs = packed.contiguous().view(torch.uint8)
    return torch.stack([pairs & 0xF, pairs >> 4], dim=-1).flatten(-2)


# ---- quantize / dequantize / reference matmul -----------------------------------------------------

def quantize_int4(w: torch.Tensor, group_size: int = INT4_GROUP_SIZE,
                  scale_dtype: torch.dtype = torch.float16, search: bool = False) -> Int4Weight:
    """Asymmetric quantization of `w [out, in]` on w's device, a chunk of rows at a time.

    search=False: min-max. search=True also tries ranges shrunk toward zero, then refits scale and
    zero by least squares: never a larger squared error per group than min-max (both steps only
    lower it), ~20% lower on SmolLM2's layers, but ~10x the time, and perplexity there only moved
    from 34.8 to 33.3 (bf16: 24.8), so it is not the default."""
    out, inp = w.shape
    if inp % group_size or group_size % 8:
        raise ValueError(f"int4: in={inp} must be a multiple of group_size={group_size} (itself of 8)")
    rows = max(1, _CHUNK_ELEMS // inp)
    parts = [_quantize_rows(w[r:r + rows], group_size, scale_dtype, search) for r in range(0, out, rows)]
    packed, scales, zeros = (torch.cat(p) for p in zip(*parts))
    return Int4Weight(packed, scales, zeros, (out, inp), group_size)


_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_REFITS = 4


def _quantize_rows(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype, search: bool):
    out, inp = w.shape
    wg = w.float().view(out, inp // group_size, group_size)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale, zero = (hi - lo) / 15, lo
    if search:
        scale, zero = _search_range(wg, lo, hi)
        scale, zero = _refit(wg, scale, zero)
    # Round scale and zero to their stored dtype first, so the codes are chosen against the values
    # the kernel will actually use.
    scale, zero = scale.to(scale_dtype), zero.to(scale_dtype)
    codes = _codes(wg, scale.float(), zero.float()).to(torch.uint8)
    return pack_int4(codes.view(out, inp)), scale.squeeze(-1), zero.squeeze(-1)


def _codes(wg, scale, zero):
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (wg - zero).mul_(inv).round_().clamp_(0, 15)   # in place: one scratch tensor, not four


def _sq_err(wg, scale, zero):
    return _codes(wg, scale, zero).mul_(scale).add_(zero).sub_(wg).square_().sum(-1, keepdim=True)


def _search_range(wg, lo, hi):
    """Per group, the [lo, hi] shrink toward zero with the least squared error (1.0 = min-max)."""
    best = None
    for r in _SHRINK:
        scale, zero = (hi - lo) * r / 15, lo * r
        err = _sq_err(wg, scale, zero)
        if best is None:
            best = [err, scale, zero]
            continue
        better = err < best[0]
        best = [torch.where(better, new, old) for new, old in zip((err, scale, zero), best)]
    return best[1], best[2]


def _refit(wg, scale, zero):
    """Alternate: codes for (scale, zero), then the least-squares (scale, zero) for those codes."""
    n = wg.shape[-1]
    for _ in range(_REFITS):
        q = _codes(wg, scale, zero)
        sq, sqq = q.sum(-1, keepdim=True), q.square().sum(-1, keepdim=True)
        sw, sqw = wg.sum(-1, keepdim=True), (q * wg).sum(-1, keepdim=True)
        det = n * sqq - sq * sq
        new_scale = (n * sqw - sq * sw) / det.clamp_min(1e-30)
        ok = (det > 0) & (new_scale > 0)    # all codes equal: nothing to fit, keep the group
        zero = torch.where(ok, (sw - new_scale * sq) / n, zero)
        scale = torch.where(ok, new_scale, scale)
    return scale, zero


def dequantize_int4(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out, inp = w.shape
    q = unpack_int4(w.packed).view(out, inp // w.group_size, w.group_size).float()
    dense = q * w.scales.float().unsqueeze(-1) + w.zeros.float().unsqueeze(-1)
    return dense.view(out, inp).to(dtype)


def int4_matmul_reference(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(w)^T (+ bias) in x.dtype: the CPU path and the kernels' test oracle.

    Dequantizes in fp32 and rounds the weight to x.dtype once, as the kernels do before their dot."""
    weight = dequantize_int4(w, torch.float32).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# ---- GGUF 4-bit blocks -> Int4Weight ----------------------------------------------------------------
# Raw blocks are the bytes of a GGUF tensor (gguf's ReaderTensor.data: uint8 [out, bytes_per_row]),
# numpy or torch, on any device. The only intermediate is one uint8 code per weight, never floats.

_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}


def _blocks(raw, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():   # GGUFReader's memmap is read-only; we only ever read it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(raw))
    t = raw
    t = t.contiguous().view(torch.uint8)
    elems = 256 if qtype == "Q4_K" else 32
    out, inp = shape
    if inp % elems or t.numel() != out * inp // elems * _GGUF_BLOCK_BYTES[qtype]:
        raise ValueError(f"int4: {qtype} data of {t.numel()} bytes does not fit shape {shape}")
    return t.reshape(-1, _GGUF_BLOCK_BYTES[qtype])


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1)


def _legacy_codes(qs: torch.Tensor) -> torch.Tensor:
    # Q4_0/Q4_1: byte i holds element i (low nibble) and element i + 16 (high nibble).
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def int4_from_gguf_q4_0(raw, shape: tuple[int, int]) -> Int4Weight:
    """Q4_0 (w = d * (q - 8)) -> group-32 Int4Weight with fp16 scale d and zero -8 d, exactly."""
    b = _blocks(raw, "Q4_0", shape)
    d = _f16(b[:, :2])
    codes = _legacy_codes(b[:, 2:])
    return _assemble(codes, d, d * -8, shape, 32)


def int4_from_gguf_q4_1(raw, shape: tuple[int, int]) -> Int4Weight:
    """Q4_1 (w = d * q + m) -> group-32 Int4Weight with fp16 scale d and zero m, exactly."""
    b = _blocks(raw, "Q4_1", shape)
    codes = _legacy_codes(b[:, 4:])
    return _assemble(codes, _f16(b[:, :2]), _f16(b[:, 2:4]), shape, 32)


def int4_from_gguf_q4_k(raw, shape: tuple[int, int]) -> Int4Weight:
    """Q4_K super-blocks (256 = 8 sub-blocks of 32, 6-bit scales and mins) -> group-32 Int4Weight.

    Scales d*sc and zeros -dmin*m are stored in fp32, where they are exact (fp16 is not)."""
    b = _blocks(raw, "Q4_K", shape)
    d, dmin = _f16(b[:, :2]).float(), _f16(b[:, 2:4]).float()
    sc, mn = _q4_k_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    # Each 32-byte chunk c: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
    codes = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 32)
    scales = (d.unsqueeze(-1) * sc.float()).reshape(-1)
    zeros = (-dmin.unsqueeze(-1) * mn.float()).reshape(-1)
    return _assemble(codes, scales, zeros, shape, 32)


def _q4_k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> eight 6-bit scales and eight 6-bit mins (the layout of ggml's get_scale_min_k4)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _assemble(codes, scales, zeros, shape, group_size) -> Int4Weight:
    out, inp = shape
    groups = (out, inp // group_size)
    return Int4Weight(pack_int4(codes.reshape(out, inp)), scales.reshape(groups).contiguous(),
                      zeros.reshape(groups).contiguous(), (out, inp), group_size)


def int4_from_gguf(raw, ggml_type: str, shape: tuple[int, int]) -> Int4Weight:
    """Dispatch on the GGUF type name ("Q4_0", "Q4_1", "Q4_K"); shape is torch's (out, in)."""
    convert = {"Q4_0": int4_from_gguf_q4_0, "Q4_1": int4_from_gguf_q4_1, "Q4_K": int4_from_gguf_q4_k}
    if ggml_type not in convert:
        raise ValueError(f"int4: GGUF type {ggml_type} cannot load as int4 (supported: {', '.join(convert)})")
    return convert[ggml_type](raw, shape)
