"""paged_attention (kernels/triton_attention.py) against paged_attention_ref, on random ragged
batches: decode, fresh prefill, prefix hits, mixes, sliding windows and split contexts.

Like test_kernels_triton.py: full sizes on a CUDA GPU (marked `gpu`, skipped without one), bf16 and
fp16; small sizes, fp32, on the CPU under TRITON_INTERPRET=1 in a child process (this file run as a
script with group names; kernel_checks.py says why). Kernel modules are imported inside the checks
only, so collecting this file imports no Triton.
"""
from __future__ import annotations

import random
import sys

import pytest
import torch
from kernel_checks import (REL_TOL, needs_triton, on_gpu, qkv_views, randn, rel_err,
                           run_cpu_groups, run_interpreter)

from pagedeploy.kernels import reference as ref


def lengths(kind: str, num_seqs: int, max_ctx: int, rng: random.Random):
    """(q_lens, ctx_lens) of a ragged batch: decode, fresh prefill, prefix hit, or a mix
    ("mixed": interleaved; "split": decode rows first, the order num_decodes asks for)."""
    q_lens, ctx_lens = [], []
    for i in range(num_seqs):
        ctx = rng.randint(1, max_ctx)
        row = kind if kind not in ("mixed", "split") else ("decode", "prefill", "prefix")[i % 3]
        if kind == "split":
            row = "decode" if i < num_seqs // 2 else ("prefill", "prefix")[i % 2]
        q_len = {"decode": 1, "prefill": ctx, "prefix": rng.randint(1, ctx)}[row]
        q_lens.append(q_len)
        ctx_lens.append(ctx)
    return q_lens, ctx_lens


def attention_case(q_lens, ctx_lens, h, kh, d, bs, dtype, device, seed=0):
    """Random q and caches; each sequence's blocks are a random, non-contiguous pick of the pool."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs, total = len(q_lens), sum(q_lens)
    blocks = [-(-c // bs) for c in ctx_lens]
    width = max(blocks) + 2
    nb = sum(blocks) + 5
    perm = torch.randperm(nb, generator=gen).tolist()
    table = torch.randint(0, nb, (num_seqs, width), generator=gen, dtype=torch.int32)
    for b, n in enumerate(blocks):  # unused entries keep their random (valid) values
        table[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    _, q, _, _ = qkv_views(total, h, kh, d, dtype, device, gen)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return dict(q=q,
                k_cache=randn(nb, bs, kh, d, gen=gen, device=device, dtype=dtype),
                v_cache=randn(nb, bs, kh, d, gen=gen, device=device, dtype=dtype),
                block_tables=table.to(device),
                context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
                scale=d ** -0.5)


def check_attention(kind, num_seqs, max_ctx, h, kh, d, bs, dtype, device, seed=0,
                    window=None, ctx_lens=None, **hints):
    """ctx_lens: given decode contexts in place of random ones."""
    from pagedeploy.kernels.triton_attention import paged_attention
    q_lens, ctx_lens = ([1] * len(ctx_lens), ctx_lens) if ctx_lens else \
        lengths(kind, num_seqs, max_ctx, random.Random(seed))
    case = attention_case(q_lens, ctx_lens, h, kh, d, bs, dtype, device, seed)
    if kind == "split":
        hints["num_decodes"] = num_seqs // 2
    up = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
          for k, v in case.items()}
    expect = ref.paged_attention_ref(**up, sliding_window=window)
    out = torch.full_like(case["q"], float("nan"))  # every element must be written
    got = paged_attention(**case, sliding_window=window, out=out, **hints)
    assert got is out and torch.isfinite(out).all(), "unwritten or non-finite output"
    err = rel_err(out, expect)
    row_err = ((out.double() - expect.double()).norm(dim=-1)
               / expect.double().norm(dim=-1)).max().item()
    tol = REL_TOL[dtype]
    assert err < tol and row_err < 4 * tol, (err, row_err)
    return err


GPU_ATTENTION = [  # kind, seqs, max_ctx, h, kh, d, bs
    ("decode", 37, 3000, 8, 8, 64, 16),      # group 1
    ("decode", 64, 2048, 16, 8, 128, 16),    # Qwen3-0.6B
    ("decode", 5, 4096, 32, 8, 128, 256),    # Llama-3-8B, few sequences: split contexts
    ("decode", 3, 1500, 28, 4, 128, 32),     # group 7
    ("decode", 20, 700, 64, 8, 64, 128),     # group 8
    ("prefill", 6, 700, 16, 8, 128, 16),
    ("prefill", 4, 1100, 32, 8, 64, 256),
    ("prefix", 7, 1200, 8, 8, 128, 64),
    ("prefix", 5, 900, 28, 4, 64, 16),
    ("mixed", 11, 1000, 32, 4, 128, 128),
    ("mixed", 9, 800, 16, 8, 128, 16),
    ("mixed", 6, 300, 12, 6, 64, 32),        # group 2
    ("split", 12, 2000, 32, 8, 128, 16),     # decode kernel on the first half, prefill on the rest
    ("split", 7, 900, 28, 4, 64, 256),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_ATTENTION, ids=lambda c: "-".join(map(str, c)))
@on_gpu
def test_attention_gpu(dtype, case):
    check_attention(*case, dtype, "cuda")


@pytest.mark.parametrize("kind", ["decode", "prefix", "mixed", "split"])
@on_gpu
def test_attention_window_gpu(kind):
    check_attention(kind, 8, 1500, 16, 8, 128, 16, torch.bfloat16, "cuda", window=300)


@pytest.mark.parametrize("splits", [1, 2, 8, 32])
@on_gpu
def test_decode_splits_gpu(splits):
    check_attention("decode", 3, 5000, 32, 8, 128, 16, torch.bfloat16, "cuda", num_splits=splits)


@on_gpu
def test_decode_cuda_graph_gpu():
    """A decode step captured once replays correctly for new lengths: no host reads of tensors."""
    from pagedeploy.kernels.triton_attention import paged_attention
    case = attention_case([1] * 4, [900, 20, 3000, 1], 16, 8, 128, 16, torch.bfloat16, "cuda")
    out = torch.empty_like(case["q"])
    max_ctx = case["block_tables"].shape[1] * 16
    paged_attention(**case, out=out, max_context_len=max_ctx)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(**case, out=out, max_context_len=max_ctx)
    for lens in ([900, 20, 3000, 1], [17, 2999, 64, 256]):
        case["context_lens"].copy_(torch.tensor(lens, dtype=torch.int32))
        case["q"].copy_(torch.randn_like(case["q"]))
        out.fill_(float("nan"))
        graph.replay()
        up = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in case.items()}
        assert rel_err(out, ref.paged_attention_ref(**up)) < REL_TOL[torch.bfloat16]


# --------------------------------------------------------------------------- CPU interpreter

def check_short_contexts():
    """A grid of 4 splits sized for a 1024-token bound (a CUDA graph's max_model_len): contexts
    that need 4 splits (the last one short), 2, and 1 (written with no merge), and one token; then
    a merge of more splits than one load takes."""
    from pagedeploy.kernels.triton_attention import MIN_CHUNK, decode_splits
    assert MIN_CHUNK == 64 and decode_splits(4, 1, 1024, torch.device("cpu")) == 4
    for lens in ([200, 65, 64, 1], [129, 30, 256, 7]):
        check_attention("decode", 4, 0, 4, 1, 16, 16, torch.float32, "cpu", ctx_lens=lens,
                        max_context_len=1024)
    # group 16: the merge folds 4 splits a load, so 8 forced splits (some empty) take two
    check_attention("decode", 2, 0, 16, 1, 16, 16, torch.float32, "cpu", ctx_lens=[300, 5],
                    num_splits=8)


CPU_GROUPS = {  # small sizes for the interpreter (~1e4x slower than the GPU)
    "decode": lambda: [
        check_attention("decode", 5, 90, 4, 4, 16, 16, torch.float32, "cpu", seed=1),
        check_attention("decode", 3, 150, 8, 2, 32, 32, torch.float32, "cpu", seed=2),
        check_attention("decode", 4, 80, 6, 2, 16, 16, torch.float32, "cpu", seed=3, num_splits=4),
        check_attention("decode", 2, 200, 16, 2, 16, 64, torch.float32, "cpu", seed=4,
                        num_splits=2, window=50),
        check_attention("decode", 3, 60, 4, 2, 16, 8, torch.float32, "cpu", seed=12),  # bs 8
        check_short_contexts(),
    ],
    "prefill": lambda: [
        check_attention("prefill", 3, 40, 4, 2, 16, 16, torch.float32, "cpu", seed=5),
        check_attention("prefix", 4, 70, 6, 3, 32, 16, torch.float32, "cpu", seed=6),
        check_attention("mixed", 6, 50, 8, 1, 16, 32, torch.float32, "cpu", seed=7),
        check_attention("mixed", 4, 60, 4, 4, 16, 16, torch.float32, "cpu", seed=8, window=20),
        check_attention("prefix", 2, 50, 8, 2, 16, 16, torch.float32, "cpu", seed=9,
                        num_splits=2),
        check_attention("split", 5, 90, 4, 2, 16, 16, torch.float32, "cpu", seed=10),
        check_attention("split", 4, 70, 8, 2, 32, 32, torch.float32, "cpu", seed=11,
                        num_splits=4, window=30),
    ],
}


@needs_triton
def test_interpreter():
    """All CPU groups in one child process (importing torch and Triton once keeps it quick)."""
    run_interpreter(__file__, CPU_GROUPS)


if __name__ == "__main__":
    sys.exit(run_cpu_groups(CPU_GROUPS, sys.argv[1:]))
