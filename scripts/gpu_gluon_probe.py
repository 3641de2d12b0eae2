"""Issue 6, the route after docs/PERF.md run 25: can Triton's Gluon run Hopper's wgmma with its A
operand from registers and B from shared memory, asynchronously, and can the int4 GEMV's decoded
words be that A operand without moving data?
- wgmma_rs_kernel: a 64 x K @ K x 8 product, A loaded straight into wgmma's register layout.
- group_kernel: one group of int4 codes. A 64-row tile of 16 words a row is loaded 16 bytes a
  thread (each thread rows 16w + g and + 8, words 4t .. 4t + 3: the WORDS layout), decoded by
  int4_mma's LOP3s into fp16 1024 + code (odd codes 1024 + 16 code), and rearranged into the
  [64, 128] A operand; `convert_layout(..., assert_trivial=True)` proves that costs no data movement.
  Code j of word 4t + i lands at K = 32 i + 16 p + 8 h + 2 t + jj (p = j odd, h = j // 2 % 2,
  jj = j // 4), so x goes into shared memory in that order.
On a GPU machine: runs both and prints their errors against float64 products. Without a GPU:
compiles both for sm_90a and counts the PTX's wgmma and shared-memory instructions.
Usage: python3 scripts/gpu_gluon_probe.py"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper


@gluon.jit
def wgmma_rs_kernel(a_ptr, b_ptr, c_ptr, K: gl.constexpr):
    """c = a @ b for a [64, K] (loaded straight into wgmma's register A layout), b [K, 8] (through
    shared memory), one warpgroup, the K steps issued async and waited once."""
    M: gl.constexpr = 64
    N: gl.constexpr = 8
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, N, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    b_blocked: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [4, 1], [1, 0])
    b_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    rows = gl.arange(0, M, layout=gl.SliceLayout(1, a_layout))
    ks = gl.arange(0, K, layout=gl.SliceLayout(0, a_layout))
    a = gl.load(a_ptr + rows[:, None] * K + ks[None, :])
    bk = gl.arange(0, K, layout=gl.SliceLayout(1, b_blocked))
    bn = gl.arange(0, N, layout=gl.SliceLayout(0, b_blocked))
    b = gl.load(b_ptr + bk[:, None] * N + bn[None, :])
    b_smem = gl.allocate_shared_memory(gl.float16, [K, N], b_smem_layout, b)
    hopper.fence_async_shared()
    acc = gl.zeros([M, N], gl.float32, acc_layout)
    tok = hopper.warpgroup_mma(a, b_smem, acc, is_async=True)
    acc = hopper.warpgroup_mma_wait(0, deps=[tok])
    cm = gl.arange(0, M, layout=gl.SliceLayout(1, acc_layout))
    cn = gl.arange(0, N, layout=gl.SliceLayout(0, acc_layout))
    gl.store(c_ptr + cm[:, None] * N + cn[None, :], acc)


# one thread: rows 16w+g and 16w+g+8, words 4t..4t+3 of a group's 16 (a 16-byte load)
WORDS = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [0, 2], [8, 0]], lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
    warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 16]))

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


# A word tile's decoded codes, joined as [64, 16 (word 4t + i), jj, h, p] (code j = p + 2 h + 4 jj),
# go to [row, i, p, h, t, jj]: K = 32 i + 16 p + 8 h + 2 t + jj
OPERAND_SPLIT = gl.constexpr((64, 4, 4, 2, 2, 2))
OPERAND_PERM = gl.constexpr((0, 2, 5, 4, 1, 3))
MMA_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 16]))


@gluon.jit
def to_operand(c0, c4, c2, c6, c1, c5, c3, c7):
    """The 8 fp16 codes of each word of a [64, 16] word tile (WORDS layout), in the decode's order,
    as wgmma's [64, 128] register A operand (MMA_LAYOUT's): no data moves, or the compile fails."""
    a = gl.join(gl.join(gl.join(c0, c4), gl.join(c2, c6)), gl.join(gl.join(c1, c5), gl.join(c3, c7)))
    a = gl.reshape(gl.permute(gl.reshape(a, OPERAND_SPLIT), OPERAND_PERM), [64, 128])
    return gl.convert_layout(a, gl.DotOperandLayout(0, MMA_LAYOUT, 2), assert_trivial=True)


@gluon.jit
def group_kernel(w_ptr, b_ptr, c_ptr):
    acc_layout: gl.constexpr = MMA_LAYOUT
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, WORDS))
    cols = gl.arange(0, 16, layout=gl.SliceLayout(0, WORDS))
    words = gl.load(w_ptr + rows[:, None] * 16 + cols[None, :])
    # codes (p, h, j) of each word: p plane, h half of the k16 step, j pair element
    c0, c4, c2, c6, c1, c5, c3, c7 = gl.inline_asm_elementwise(
        DECODE, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words], dtype=[gl.float16] * 8, is_pure=True, pack=1)
    a = to_operand(c0, c4, c2, c6, c1, c5, c3, c7)
    b_blocked: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [4, 1], [1, 0])
    bk = gl.arange(0, 128, layout=gl.SliceLayout(1, b_blocked))
    bn = gl.arange(0, 8, layout=gl.SliceLayout(0, b_blocked))
    b = gl.load(b_ptr + bk[:, None] * 8 + bn[None, :])
    b_smem = gl.allocate_shared_memory(gl.float16, [128, 8],
                                       gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2), b)
    hopper.fence_async_shared()
    acc = gl.zeros([64, 8], gl.float32, acc_layout)
    tok = hopper.warpgroup_mma(a, b_smem, acc, is_async=True)
    acc = hopper.warpgroup_mma_wait(0, deps=[tok])
    cm = gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    cn = gl.arange(0, 8, layout=gl.SliceLayout(0, acc_layout))
    gl.store(c_ptr + cm[:, None] * 8 + cn[None, :], acc)


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


def compile_only():
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    div16 = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    sources = {"wgmma_rs_kernel": ASTSource(wgmma_rs_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32",
                                                             "K": "constexpr"}, constexprs={(3,): 64}, attrs=div16),
               "group_kernel": ASTSource(group_kernel, {"w_ptr": "*i32", "b_ptr": "*fp16", "c_ptr": "*fp32"},
                                         attrs=div16)}
    for name, src in sources.items():
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
        print(f"{name}: {ptx.count('wgmma.mma_async')} wgmma.mma_async, {ptx.count('st.shared')} st.shared, "
              f"{ptx.count('ld.shared')} ld.shared, {ptx.count('ld.global.v4')} ld.global.v4")


def run():
    torch.manual_seed(0)
    K = 64
    a = torch.randn(64, K, device="cuda", dtype=torch.float16)
    b = torch.randn(K, 8, device="cuda", dtype=torch.float16)
    c = torch.empty(64, 8, device="cuda", dtype=torch.float32)
    wgmma_rs_kernel[(1,)](a, b, c, K, num_warps=4)
    ref = a.float() @ b.float()
    print(f"triton {triton.__version__}: wgmma_rs_kernel max |c - a @ b| = {(c - ref).abs().max().item():.3g} "
          f"(|a @ b| up to {ref.abs().max().item():.3g})")
    words = torch.randint(-2**31, 2**31, (64, 16), dtype=torch.int64).to(torch.int32)
    b = torch.randn(128, 8, dtype=torch.float16) / 16
    c = torch.empty(64, 8, device="cuda", dtype=torch.float32)
    group_kernel[(1,)](words.cuda(), b.cuda(), c, num_warps=4)
    ref = group_operand(words) @ b.double()
    err = ((c.cpu().double() - ref).abs().max() / ref.abs().max()).item()
    print(f"group_kernel max |c - decode(words) @ b| / max |ref| = {err:.3g}")


if __name__ == "__main__":
    run() if torch.cuda.is_available() else compile_only()
