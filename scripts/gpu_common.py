"""What the GPU check scripts (gpu_kernels.py, gpu_int4.py) share: a log that also appends each line
to a file under $OUT at once (a run cut short keeps what it measured), and compiling a Triton
kernel for the H100 (sm_90a) on a machine without a GPU. Triton API as of 3.6-3.9."""
from __future__ import annotations

import os
from collections.abc import Iterable


class RunLog:
    def __init__(self, filename: str):
        self.filename = filename
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], self.filename), "a") as f:
                f.write(line + "\n")


def triton_bin_dir() -> str:
    """Triton's bundled CUDA tools (ptxas, nvdisasm, cuobjdump)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_for_h100(fn, arg_types: dict[str, str], consts: dict, div16: Iterable[str],
                     num_warps: int, num_stages: int):
    """`fn` (a Triton or a Gluon kernel) compiled for sm_90a. arg_types: each runtime argument's
    Triton type ("*bf16", "i32", ...); consts: the constexpr values; div16: the arguments the JIT
    would see as multiples of 16 at launch (pointers, strides)."""
    import triton
    from triton.backends.compiler import GPUTarget
    if fn.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    else:
        from triton.compiler import ASTSource

    names = fn.arg_names
    signature = dict(arg_types) | {n: "constexpr" for n in consts}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn, signature, attrs=attrs, constexprs={(names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_usage(ptx: str) -> str:
    """Registers, spills and shared memory of a kernel's PTX as Triton's own ptxas reports them for sm_90a."""
    import subprocess
    import tempfile
    bin_dir = triton_bin_dir()
    ptxas = next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")
                  if os.path.exists(os.path.join(bin_dir, n))), "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    os.unlink(f.name)
    return " ".join(line.split("info    : ")[-1] for line in res.stderr.splitlines()
                    if "Used" in line or "spill" in line)


def sass_loop_ops(sass: str):
    """Opcode counts (a collections.Counter) of the longest loop in nvdisasm's SASS listing."""
    import re
    from collections import Counter
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    start, stop = max(loops, key=lambda se: se[1] - se[0])
    return Counter(m.group(1) for line in lines[start:stop + 1]
                   if (m := re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)))
