"""Issue 6, the route after docs/PERF.md run 25: can Triton's Gluon run Hopper's wgmma with its A
operand from registers and B from shared memory, and can the int4 GEMV's decoded words be that A
operand without moving data? (Run 26: yes, with b K-major and swizzled.)
- wgmma_rs_kernel: a 64 x K @ K x 8 product, A loaded straight into wgmma's register layout, b in
  each of B_LAYOUTS. On the H200 (Triton 3.6) the unswizzled [K, 8] b is right at K 64 only, and
  the unswizzled K-major one never; the swizzled K-major ones are right (Triton 3.9 refuses the
  unswizzled K-major one).
- operand_kernel: one group's decoded and rearranged A stored from the operand layout (and from
  REARRANGED), for an exact check against group_operand.
- group_kernel: one group of int4 codes. A 64-row tile of 16 words a row is loaded 16 bytes a
  thread (each thread rows 16w + g and + 8, words 4t .. 4t + 3: the WORDS layout), decoded by
  int4_mma's LOP3s into fp16 1024 + code (odd codes 1024 + 16 code), and rearranged into the
  [64, 128] A operand; `convert_layout(..., assert_trivial=True)` proves that costs no data movement.
  Code j of word 4t + i lands at K = 32 i + 16 p + 8 h + 2 t + jj (p = j odd, h = j // 2 % 2,
  jj = j // 4), so x goes into shared memory in that order.
On a GPU machine: runs them and prints their errors against float64 products. Without a GPU:
compiles them for sm_90a and counts the PTX's wgmma and shared-memory instructions.
Usage: python3 scripts/gpu_gluon_probe.py"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper


@gluon.jit
def b_tile(b_ptr, K: gl.constexpr, KMAJOR: gl.constexpr, SWIZZLE: gl.constexpr):
    """b [K, 8] fp16 into shared memory for wgmma: as stored ([K, 8], N contiguous) or K-major (its
    transpose [8, K] stored, viewed as [K, 8]); SWIZZLE bytes."""
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=SWIZZLE, element_bitwidth=16, rank=2)
    if KMAJOR:
        blocked: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [1, 4], [1, 0])
        n = gl.arange(0, 8, layout=gl.SliceLayout(1, blocked))
        k = gl.arange(0, K, layout=gl.SliceLayout(0, blocked))
        bt = gl.load(b_ptr + k[None, :] * 8 + n[:, None])
        smem = gl.allocate_shared_memory(gl.float16, [8, K], layout, bt).permute((1, 0))
    else:
        blocked: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [4, 1], [1, 0])
        k = gl.arange(0, K, layout=gl.SliceLayout(1, blocked))
        n = gl.arange(0, 8, layout=gl.SliceLayout(0, blocked))
        b = gl.load(b_ptr + k[:, None] * 8 + n[None, :])
        smem = gl.allocate_shared_memory(gl.float16, [K, 8], layout, b)
    hopper.fence_async_shared()
    return smem


@gluon.jit
def wgmma_rs_kernel(a_ptr, b_ptr, c_ptr, K: gl.constexpr, KMAJOR: gl.constexpr, SWIZZLE: gl.constexpr):
    """c = a @ b for a [64, K] (loaded straight into wgmma's register A layout), b [K, 8] (through
    shared memory, b_tile), one warpgroup, the K steps issued async and waited once."""
    acc_layout: gl.constexpr = MMA_LAYOUT
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, a_layout))
    ks = gl.arange(0, K, layout=gl.SliceLayout(0, a_layout))
    a = gl.load(a_ptr + rows[:, None] * K + ks[None, :])
    acc = gl.zeros([64, 8], gl.float32, acc_layout)
    tok = hopper.warpgroup_mma(a, b_tile(b_ptr, K, KMAJOR, SWIZZLE), acc, is_async=True)
    acc = hopper.warpgroup_mma_wait(0, deps=[tok])
    cm = gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    cn = gl.arange(0, 8, layout=gl.SliceLayout(0, acc_layout))
    gl.store(c_ptr + cm[:, None] * 8 + cn[None, :], acc)


# one thread: rows 16w+g and 16w+g+8, words 4t..4t+3 of a group's 16 (a 16-byte load)
def words_layout(rows: int = 64) -> gl.DistributedLinearLayout:
    """WORDS for a [rows, 16] tile; at 128 rows each thread also has rows + 64 (two m64 tiles)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]] + ([[64, 0]] if rows == 128 else []),
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]], warp_bases=[[16, 0], [32, 0]], block_bases=[],
        shape=[rows, 16])


WORDS = gl.constexpr(words_layout())

def decode_asm(between: str = "") -> str:
    """PTX from one int32 word of 8 codes (operand $8) to 8 fp16 outputs in the order (c0, c4, c2,
    c6, c1, c5, c3, c7): int4_mma's LOP3s make fp16 1024 + code (odd codes 1024 + 16 code) in four
    fp16x2 registers a-d; `between` may change them (gpu_int4_wgmma's dequantizing fma)."""
    return "\n".join(["{", ".reg .b32 a, b, c, d, v;",
                      "lop3.b32 a, $8, 0x000f000f, 0x64006400, 0xea;", "shr.u32 v, $8, 8;",
                      "lop3.b32 b, v, 0x000f000f, 0x64006400, 0xea;",
                      "lop3.b32 c, $8, 0x00f000f0, 0x64006400, 0xea;",
                      "lop3.b32 d, v, 0x00f000f0, 0x64006400, 0xea;", between,
                      "mov.b32 {$0, $1}, a;", "mov.b32 {$2, $3}, b;", "mov.b32 {$4, $5}, c;",
                      "mov.b32 {$6, $7}, d;", "}"])


DECODE = gl.constexpr(decode_asm())


# A word tile's decoded codes, joined as [rows, 16 (word 4t + i), jj, h, p] (code j = p + 2 h + 4 jj),
# split as [rows, t, i, jj, h, p], go to [row, i, p, h, t, jj]: K = 32 i + 16 p + 8 h + 2 t + jj
OPERAND_SPLIT = gl.constexpr((4, 4, 2, 2, 2))
OPERAND_PERM = gl.constexpr((0, 2, 5, 4, 1, 3))
MMA_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 16]))


# what Triton 3.6 infers for rearrange's result: MMA_LAYOUT's A operand with its registers in another order
REARRANGED = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 16], [0, 8], [0, 1], [0, 32], [0, 64], [8, 0]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
    warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 128]))


@gluon.jit
def rearrange(c0, c4, c2, c6, c1, c5, c3, c7):
    """The 8 fp16 codes of each word of a [rows, 16] word tile (words_layout), in the decode's order,
    as the [rows, 128] A tile in K order."""
    a = gl.join(gl.join(gl.join(c0, c4), gl.join(c2, c6)), gl.join(gl.join(c1, c5), gl.join(c3, c7)))
    rows: gl.constexpr = c0.shape[0]
    return gl.reshape(gl.permute(gl.reshape(a, (rows, ) + OPERAND_SPLIT.value), OPERAND_PERM.value), [rows, 128])


@gluon.jit
def to_operand(c0, c4, c2, c6, c1, c5, c3, c7):
    """rearrange's A tile as wgmma's register A operand (MMA_LAYOUT's): no data moves, or the compile fails."""
    return gl.convert_layout(rearrange(c0, c4, c2, c6, c1, c5, c3, c7), gl.DotOperandLayout(0, MMA_LAYOUT, 2),
                             assert_trivial=True)


@gluon.jit
def decode_group(w_ptr):
    """One group's [64, 16] words (WORDS layout) decoded, in the order (c0, c4, c2, c6, c1, c5, c3,
    c7): code j of a word is plane p = j % 2, half h = j // 2 % 2 of the k16 step, pair element j // 4."""
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, WORDS))
    cols = gl.arange(0, 16, layout=gl.SliceLayout(0, WORDS))
    words = gl.load(w_ptr + rows[:, None] * 16 + cols[None, :])
    return gl.inline_asm_elementwise(DECODE, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words], dtype=[gl.float16] * 8,
                                     is_pure=True, pack=1)


@gluon.jit
def group_kernel(w_ptr, b_ptr, c_ptr, KMAJOR: gl.constexpr, SWIZZLE: gl.constexpr):
    acc_layout: gl.constexpr = MMA_LAYOUT
    c0, c4, c2, c6, c1, c5, c3, c7 = decode_group(w_ptr)
    a = to_operand(c0, c4, c2, c6, c1, c5, c3, c7)
    b_smem = b_tile(b_ptr, 128, KMAJOR, SWIZZLE)
    acc = gl.zeros([64, 8], gl.float32, acc_layout)
    tok = hopper.warpgroup_mma(a, b_smem, acc, is_async=True)
    acc = hopper.warpgroup_mma_wait(0, deps=[tok])
    cm = gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    cn = gl.arange(0, 8, layout=gl.SliceLayout(0, acc_layout))
    gl.store(c_ptr + cm[:, None] * 8 + cn[None, :], acc)


@gluon.jit
def operand_kernel(w_ptr, a_ptr, OPERAND: gl.constexpr):
    """a = one group's A tile, stored from wgmma's operand layout (OPERAND) or from REARRANGED."""
    c0, c4, c2, c6, c1, c5, c3, c7 = decode_group(w_ptr)
    if OPERAND:
        layout: gl.constexpr = gl.DotOperandLayout(0, MMA_LAYOUT, 2)
        a = to_operand(c0, c4, c2, c6, c1, c5, c3, c7)
    else:
        layout: gl.constexpr = REARRANGED
        a = gl.convert_layout(rearrange(c0, c4, c2, c6, c1, c5, c3, c7), layout, assert_trivial=True)
    m = gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    k = gl.arange(0, 128, layout=gl.SliceLayout(0, layout))
    gl.store(a_ptr + m[:, None] * 128 + k[None, :], a)


def group_operand(words: torch.Tensor) -> torch.Tensor:
    """group_kernel's A for words [64, 16] (int32): [64, 128] float64, as the kernel lays it out."""
    a = torch.empty(64, 128, dtype=torch.float64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    for word in range(16):
        t, i = divmod(word, 4)
        for j in range(8):
            code = ((w[:, word] >> (4 * j)) & 0xF).double()
            p, h, jj = j % 2, j // 2 % 2, j // 4
            a[:, 32 * i + 16 * p + 8 * h + 2 * t + jj] = 1024 + (16 * code if p else code)
    return a


# shared-memory layouts of b for wgmma: (K-major, swizzle bytes); Triton 3.6 gets (False, 0) wrong past K 64
B_LAYOUTS = ((False, 0), (True, 0), (True, 32), (True, 64), (True, 128))


def compile_only():
    from gpu_common import compile_for_h100
    for kmajor, swizzle in B_LAYOUTS:
        b_layout = dict(KMAJOR=kmajor, SWIZZLE=swizzle)
        builds = {"wgmma_rs_kernel K 128": (wgmma_rs_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"},
                                            dict(K=128, **b_layout)),
                  "group_kernel": (group_kernel, {"w_ptr": "*i32", "b_ptr": "*fp16", "c_ptr": "*fp32"}, b_layout)}
        for name, (fn, types, consts) in builds.items():
            try:
                ptx = compile_for_h100(fn, types, consts, types, num_warps=4, num_stages=1).asm["ptx"]
            except RuntimeError:   # Triton 3.9 refuses K-major b without a swizzle
                print(f"{name} (b K-major {kmajor}, swizzle {swizzle}): refused by this Triton")
                continue
            print(f"{name} (b K-major {kmajor}, swizzle {swizzle}): {ptx.count('wgmma.mma_async')} wgmma.mma_async, "
                  f"{ptx.count('st.shared')} st.shared, {ptx.count('ld.shared')} ld.shared, "
                  f"{ptx.count('ld.global.v4')} ld.global.v4")


def run():
    torch.manual_seed(0)
    print(f"triton {triton.__version__}")
    words = torch.randint(-2**31, 2**31, (64, 16), dtype=torch.int64).to(torch.int32)
    for operand in (False, True):
        a = torch.zeros(64, 128, device="cuda", dtype=torch.float16)
        operand_kernel[(1,)](words.cuda(), a, operand, num_warps=4)
        bad = (a.cpu().double() != group_operand(words)).sum().item()
        print(f"operand_kernel ({'wgmma operand' if operand else 'REARRANGED'} layout): {bad} of 8192 "
              f"elements differ from group_operand")
    for kmajor, swizzle in B_LAYOUTS:
        for K in (64, 128, 256):
            a = torch.randn(64, K, device="cuda", dtype=torch.float16)
            b = torch.randn(K, 8, device="cuda", dtype=torch.float16)
            c = torch.empty(64, 8, device="cuda", dtype=torch.float32)
            try:
                wgmma_rs_kernel[(1,)](a, b, c, K, kmajor, swizzle, num_warps=4)
            except Exception as e:   # a layout this Triton refuses
                print(f"wgmma_rs_kernel K {K} (b K-major {kmajor}, swizzle {swizzle}): {type(e).__name__}")
                continue
            ref = a.float() @ b.float()
            print(f"wgmma_rs_kernel K {K} (b K-major {kmajor}, swizzle {swizzle}): max |c - a @ b| = "
                  f"{(c - ref).abs().max().item():.3g} (|a @ b| up to {ref.abs().max().item():.3g})")
        b = torch.randn(128, 8, dtype=torch.float16) / 16
        c = torch.empty(64, 8, device="cuda", dtype=torch.float32)
        try:
            group_kernel[(1,)](words.cuda(), b.cuda(), c, kmajor, swizzle, num_warps=4)
        except Exception as e:
            print(f"group_kernel (b K-major {kmajor}, swizzle {swizzle}): {type(e).__name__}")
            continue
        ref = group_operand(words) @ b.double()
        err = ((c.cpu().double() - ref).abs().max() / ref.abs().max()).item()
        print(f"group_kernel (b K-major {kmajor}, swizzle {swizzle}): max |c - decode(words) @ b| / max |ref| = "
              f"{err:.3g}")


if __name__ == "__main__":
    run() if torch.cuda.is_available() else compile_only()
