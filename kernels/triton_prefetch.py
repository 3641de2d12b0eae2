"""Ask L2 for the first weights each program of the next kernel will read (sm_90+).

A batch-1 decode linear on int4 weights is short (8-25 us on an H200) and spends a good part of
it ramping up and down: its DRAM traffic sags as its last programs finish and before the next
kernel's first loads arrive (docs/PERF.md, run 18: a layer's four linears take 58.5 us against
37.4 us for their bytes alone). Weights are static, so a kernel can ask L2 for the next linear's
weights while it runs. Which ones matters: that kernel ends with its slowest program, so asking for
a contiguous part of its weights (the whole of its first programs' rows) shortens nothing (run 20);
asking for the first bytes of *every* program's range lets every program start from L2.

The weights are `rows` rows of `pieces` equal ranges each (the next launch's K splits); a segment
is the first `take` bytes of one range. The programs of this kernel share the segments, a thread
each at a time: `cp.async.bulk.prefetch.L2` for the words (no register held, nothing returned, so
it cannot change a result) and `prefetch.global.L2` for the line of scales (and of zeros) that
range starts with. KEEP marks the lines evict_last, so that this kernel's streaming reads do not
push them out before the next kernel arrives.
"""
from __future__ import annotations

import triton
import triton.language as tl

_BULK = tl.constexpr("{ .reg .pred p; setp.ne.s32 p, $3, 0;\n"
                     "@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0; }")
_BULK_KEEP = tl.constexpr("{ .reg .pred p; .reg .b64 pol; setp.ne.s32 p, $3, 0;\n"
                          "createpolicy.fractional.L2::evict_last.b64 pol, 1.0;\n"
                          "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol;\nmov.u32 $0, 0; }")
_LINES = tl.constexpr("{ .reg .pred p; setp.ne.s32 p, $3, 0;\n"
                      "@p prefetch.global.L2 [$1];\n@p prefetch.global.L2 [$2];\nmov.u32 $0, 0; }")
_LINES_KEEP = tl.constexpr("{ .reg .pred p; setp.ne.s32 p, $3, 0;\n"
                           "@p prefetch.global.L2::evict_last [$1];\n@p prefetch.global.L2::evict_last [$2];\n"
                           "mov.u32 $0, 0; }")


@triton.jit
def prefetch_range_starts(w, s, z, rows, pieces, w_row, take, s_row, pid, programs,
                          THREADS: tl.constexpr, KEEP: tl.constexpr):
    """Program `pid` of `programs` asks for its share of the segments: the first `take` bytes
    (a multiple of 16; w_row / pieces is too) of each of the `pieces` ranges of each of the `rows`
    rows of w (`w_row` bytes a row), and the scale and zero lines each range starts with (rows of
    s and z: `s_row` bytes). THREADS: the threads of a program."""
    w8 = w.to(tl.pointer_type(tl.int8))
    s8 = s.to(tl.pointer_type(tl.int8))
    z8 = z.to(tl.pointer_type(tl.int8))
    segments = rows * pieces
    mine = pid * THREADS + tl.arange(0, THREADS)
    for first in range(0, segments, programs * THREADS):
        seg = first + mine
        on = (seg < segments).to(tl.int32)
        seg = tl.minimum(seg, segments - 1)
        r, j = seg // pieces, seg % pieces
        ws = w8 + r * w_row + j * (w_row // pieces)
        ss = r * s_row + j * (s_row // pieces)
        if KEEP:
            tl.inline_asm_elementwise(_BULK_KEEP, "=r,l,r,r", [ws, take, on], dtype=tl.int32, is_pure=False, pack=1)
            tl.inline_asm_elementwise(_LINES_KEEP, "=r,l,l,r", [s8 + ss, z8 + ss, on], dtype=tl.int32,
                                      is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(_BULK, "=r,l,r,r", [ws, take, on], dtype=tl.int32, is_pure=False, pack=1)
            tl.inline_asm_elementwise(_LINES, "=r,l,l,r", [s8 + ss, z8 + ss, on], dtype=tl.int32,
                                      is_pure=False, pack=1)
