"""Ask L2 for a tensor's bytes ahead of the kernel that will read them (sm_90+).

A batch-1 decode linear on int4 weights is short (8-25 us on an H200) and spends a good part of
it ramping up and down: its DRAM traffic sags as its last programs finish and before the next
kernel's first loads arrive (docs/PERF.md, run 18: a layer's four linears take 58.5 us against
37.4 us for their bytes alone). Weights are static, so a kernel can ask L2 for the *next*
linear's weights while it runs; that kernel then finds some of them in L2. The asking is
`cp.async.bulk.prefetch.L2`: one instruction per range, issued by one thread, holding no
register and returning nothing, so it cannot change a result.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Bytes one instruction asks for: well under the 32-bit size field, small enough that a range
# spreads over L2's slices rather than queueing at one.
_CHUNK = tl.constexpr(32768)

# Thread 0 of the program only (the operands are uniform, so no lane loop); $0 is a dummy out.
_ASK = tl.constexpr("{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0;\n"
                    "@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0; }")
# The same, the lines marked evict_last, so that the current kernel's streaming reads do not push
# them out before the next kernel arrives.
_ASK_KEEP = tl.constexpr("{ .reg .pred p; .reg .b32 t; .reg .b64 pol; mov.u32 t, %tid.x;\n"
                         "setp.eq.u32 p, t, 0; createpolicy.fractional.L2::evict_last.b64 pol, 1.0;\n"
                         "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol;\nmov.u32 $0, 0; }")


@triton.jit
def prefetch_share(base, nbytes, pid, programs, KEEP: tl.constexpr):
    """Ask L2 for program `pid`'s share of the `nbytes` bytes from `base` (16-byte aligned, nbytes
    a multiple of 16), the range split evenly over `programs`. KEEP: mark the lines evict_last."""
    piece = tl.cdiv(nbytes, programs * 16) * 16
    start = pid * piece
    size = tl.minimum(piece, nbytes - start)
    ptr = base.to(tl.pointer_type(tl.int8)) + start
    for off in range(0, size, _CHUNK):
        n = tl.minimum(size - off, _CHUNK)
        if KEEP:
            tl.inline_asm_elementwise(_ASK_KEEP, "=r,l,r", [ptr + off, n], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(_ASK, "=r,l,r", [ptr + off, n], dtype=tl.int32, is_pure=False, pack=1)
