"""Helpers shared by the Triton kernel tests (test_kernels_*.py) and scripts/gpu_kernels.py: the
`gpu` marker, the error measure, random inputs drawn on the device, and the child process the CPU
cases run in under TRITON_INTERPRET=1. Not a test module: pytest collects nothing here.

The interpreter is chosen when a kernel is decorated, i.e. when its module is first imported, so
the CPU cases run in a child process (the test file run as a script with group names) and leave
the pytest process's Triton untouched; one child for all groups imports torch and Triton once.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import traceback
from typing import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed")


def on_gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(fn))


# ||out - ref|| / ||ref|| bound per dtype (refs run in fp32 on upcast inputs); one row may reach 4x.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    return ((out.double() - expect.double()).norm() / expect.double().norm()).item()


def randn(*shape, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """Random normals drawn on `device` (GPU-sized caches are too slow to draw on the CPU)."""
    dev_gen = torch.Generator(device).manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
    return torch.randn(*shape, generator=dev_gen, device=device).to(dtype)


def qkv_views(t: int, h: int, kh: int, d: int, dtype, device, gen):
    """q, k, v as strided views of one fused buffer, as a model's qkv projection leaves them."""
    qkv = randn(t, (h + 2 * kh) * d, gen=gen, device=device, dtype=dtype)
    q, k, v = qkv.split([h * d, kh * d, kh * d], dim=-1)
    return qkv, q.view(t, h, d), k.view(t, kh, d), v.view(t, kh, d)


def check_residual_out(r_out, x, residual, norm: bool) -> None:
    """The residual stream a fused linear returns, as rms_norm returns it: nothing without a norm,
    x itself without a residual, else x + residual rounded to the model dtype, exactly."""
    if not norm:
        assert r_out is None
    elif residual is not None:
        assert torch.equal(r_out, (x.float() + residual.float()).to(x.dtype))
    else:
        assert r_out is x


# --------------------------------------------------------------------------- CPU interpreter

CpuGroups = dict[str, Callable[[], object]]


def run_interpreter(test_file: str, groups: CpuGroups) -> None:
    """The pytest side: all of `test_file`'s CPU groups in one TRITON_INTERPRET=1 child."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file, *groups], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def run_cpu_groups(groups: CpuGroups, names: list[str]) -> int:
    """The child's side: runs the named groups, printing ok / FAIL each; the exit status."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_interpreter"
    failed = 0
    for name in names:
        try:
            groups[name]()
            print(f"ok   {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}")
    return 1 if failed else 0
