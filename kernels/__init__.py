"""The runtime's kernels: Triton on CUDA tensors, the torch reference everywhere else.

Contracts in docs/CONTRACTS.md. Triton modules are imported lazily on the first CUDA call, so
importing this package has no side effects (transformers and bitsandbytes probe for packages
named `kernels`; see DESIGN.md) but one: Triton's fp-fusion default is pinned on.
"""
from __future__ import annotations

import importlib
import os

# Every Triton kernel here (and in quant/) was written, checked and measured with fma contraction,
# Triton's default through 3.9. 3.10 turns that default off, and 3.9 warns on each compile until
# it is set. A user's own setting wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from .reference import (apply_rotary_ref, fused_linear_ref, paged_attention_ref,
                        qk_norm_rope_store_ref, rms_norm_ref, silu_and_mul_ref, stage_decode_inputs_ref,
                        store_kv_ref)

GEMV_MAX_ROWS = 4   # rows of x up to which fused_linear has a Triton kernel (cuBLAS wins above)
ARGMAX_MAX_ROWS = 4  # rows up to which argmax splits rows across programs (torch's wins above)

_TRITON = {  # function name -> module of the same-signature Triton implementation
    "store_kv": "triton_cache",
    "paged_attention": "triton_attention",
    "rms_norm": "triton_norm",
    "apply_rotary": "triton_rotary",
    "qk_norm_rope_store": "triton_fused",
    "silu_and_mul": "triton_fused",
    "fused_linear": "triton_gemv",
    "argmax": "triton_argmax",
    "stage_decode_inputs": "triton_stage",
}
_resolved: dict = {}


def _triton(name: str, fallback):
    """The Triton implementation of `name`, or `fallback` when it cannot be imported."""
    if name not in _resolved:
        try:
            module = importlib.import_module(f"{__name__}.{_TRITON[name]}")
            _resolved[name] = getattr(module, name)
        except ImportError:
            _resolved[name] = fallback
    return _resolved[name]


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    fn = _triton("store_kv", store_kv_ref) if k.is_cuda else store_kv_ref
    return fn(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
                    sliding_window=None, **hints):
    """`hints` (num_decodes, max_context_len) are host-side facts that spare the Triton kernel a
    device sync; the reference reads what it needs from the tensors and ignores them."""
    args = (q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
            sliding_window)
    if q.is_cuda:
        fn = _triton("paged_attention", None)
        if fn is not None:
            return fn(*args, **hints)
    return paged_attention_ref(*args)


def warm_up_attention(num_heads, num_kv_heads, head_dim, block_size, dtype, device, sliding_window=None):
    """Compile the Triton attention variants a model can launch (CUDA only; nothing elsewhere)."""
    if device.type == "cuda" and _triton("paged_attention", None) is not None:
        importlib.import_module(f"{__name__}.triton_attention").warm_up(
            num_heads, num_kv_heads, head_dim, block_size, dtype, device, sliding_window)


def rms_norm(x, weight, eps, residual=None):
    fn = _triton("rms_norm", rms_norm_ref) if x.is_cuda else rms_norm_ref
    return fn(x, weight, eps, residual)


def apply_rotary(q, k, positions, cos_sin_cache):
    fn = _triton("apply_rotary", apply_rotary_ref) if q.is_cuda else apply_rotary_ref
    return fn(q, k, positions, cos_sin_cache)


def qk_norm_rope_store(qkv, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache,
                       k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim, early_launch=False):
    """q [T, H, D] from the qkv projection's output: optional q/k RMSNorm, rotary, k/v stored.
    early_launch: the Triton kernel's launch hint (triton_fused.qk_norm_rope_store)."""
    ref = qk_norm_rope_store_ref
    fn = _triton("qk_norm_rope_store", ref) if qkv.is_cuda else ref
    args = (qkv, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, k_cache, v_cache,
            slot_mapping, num_heads, num_kv_heads, head_dim)
    return fn(*args) if fn is ref else fn(*args, early_launch=early_launch)


def silu_and_mul(x):
    fn = _triton("silu_and_mul", silu_and_mul_ref) if x.is_cuda else silu_and_mul_ref
    return fn(x)


def fused_linear(x, weight, bias=None, **fusions):
    """(act(rmsnorm(x + residual) W^T + b), residual out) for x [M, K]; `fusions` are norm_weight,
    eps, residual and silu_mul as in fused_linear_ref. On CUDA, M must be <= GEMV_MAX_ROWS and x,
    weight and norm_weight must share one dtype: callers check (the model falls back to the
    unfused layers otherwise)."""
    fn = _triton("fused_linear", fused_linear_ref) if x.is_cuda else fused_linear_ref
    return fn(x, weight, bias, **fusions)


def argmax(logits):
    """int64 [B]: each row's largest value's index, the first among equals, of logits [B, V] (as
    `logits.argmax(-1)`, which is the reference; rows free of NaN). Triton for a few CUDA rows."""
    if logits.is_cuda and logits.shape[0] <= ARGMAX_MAX_ROWS:
        fn = _triton("argmax", None)
        if fn is not None:
            return fn(logits)
    return logits.argmax(dim=-1)


def stage_decode_inputs(dst, src) -> None:
    """A decode batch into a CUDA graph's input buffers, padding included (one Triton launch on CUDA)."""
    ref = stage_decode_inputs_ref
    fn = _triton("stage_decode_inputs", ref) if src[0].is_cuda else ref
    return fn(dst, src)


__all__ = ["store_kv", "paged_attention", "rms_norm", "apply_rotary", "qk_norm_rope_store",
           "silu_and_mul", "fused_linear", "argmax", "stage_decode_inputs", "GEMV_MAX_ROWS", "ARGMAX_MAX_ROWS",
           "warm_up_attention", "store_kv_ref", "paged_attention_ref", "rms_norm_ref",
           "apply_rotary_ref", "qk_norm_rope_store_ref", "silu_and_mul_ref", "fused_linear_ref",
           "stage_decode_inputs_ref"]
