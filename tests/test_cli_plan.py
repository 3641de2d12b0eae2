"""`deploy validate` / `deploy plan`: exit codes, the --json shape, what-ifs, one-line user errors,
no torch import and under a second."""
import json
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pagedeploy.launcher.cli import app
from pagedeploy.launcher.gpus import GiB

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
CPU_DEFAULT = str(ROOT / "profiles" / "cpu-default.yaml")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def plan_json(*args) -> dict:
    result = invoke("plan", *args, "--json")
    assert result.exit_code in (0, 3), result.output
    return json.loads(result.stdout)


def test_plan_imports_no_torch_and_runs_under_a_second():
    from pagedeploy.launcher.gguf_meta import read_gguf_meta
    from pagedeploy.launcher.model_resolve import packaged_weights

    gguf = packaged_weights("smollm2-135m-instruct")
    if gguf is not None:
        read_gguf_meta(gguf)          # a fresh machine parses the GGUF once, then caches it
    code = ("import sys\nfrom pagedeploy.launcher.cli import main\n"
            f"sys.argv = ['deploy', 'plan', {CPU_DEFAULT!r}, '--json']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "import pagedeploy.launcher.engine_config\n"
            "assert 'torch' not in sys.modules, 'deploy plan imported torch'\n"
            "sys.exit(code)\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["fits"] is True
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # CPU time is what the command costs; wall time also counts a busy machine's other work.
    assert cpu_seconds < 1.0, cpu_seconds
    assert wall < 5.0, wall


def test_json_shape_of_every_profile():
    for path in PROFILES:
        data = plan_json(path)
        assert data["fits"] is True, path
        assert set(data) >= {"fits", "gpu", "budget_bytes", "weights", "activation_peak_bytes",
                             "cuda_context_bytes", "cuda_graph_bytes", "kv_cache",
                             "max_concurrency", "fixes"}
        assert set(data["gpu"]) >= {"name", "total_bytes"}
        assert set(data["weights"]) >= {"gpu_bytes", "cpu_bytes"}
        assert set(data["kv_cache"]) >= {"bytes_per_token", "block_size", "block_bytes",
                                         "num_blocks", "tokens", "swap_blocks"}
        kv = data["kv_cache"]
        assert kv["tokens"] == kv["num_blocks"] * kv["block_size"]
        assert data["fixes"] == []


def test_cpu_default_plans_a_small_kv_pool_on_host_ram():
    data = plan_json(CPU_DEFAULT)
    assert data["gpu"]["name"] == "cpu" and data["dtype"] == "float32"
    assert 0.5 * GiB <= data["kv_cache"]["num_blocks"] * data["kv_cache"]["block_bytes"] <= GiB
    assert data["kv_cache"]["bytes_per_token"] == 46_080 and data["cuda_graph_bytes"] == 0
    assert "max_num_seqs" not in data["defaults"] and "seed" in data["settings"]


def test_what_if_gpu_and_set_without_a_gpu():
    base = plan_json(ROOT / "profiles" / "qwen3-8b-rtx4090.yaml")
    assert base["kv_cache"]["bytes_per_token"] == 147_456 and base["gpu"]["name"] == "rtx-4090"
    bigger = plan_json(ROOT / "profiles" / "qwen3-8b-rtx4090.yaml", "--gpu", "h100-80gb",
                       "--set", "max_model_len=8192")
    assert bigger["gpu"]["name"] == "h100-80gb" and bigger["max_model_len"] == 8192
    assert bigger["kv_cache"]["num_blocks"] > 5 * base["kv_cache"]["num_blocks"]


def test_does_not_fit_exits_3_with_fixes():
    result = invoke("plan", ROOT / "profiles" / "qwen3-8b-rtx4090.yaml", "--gpu", "rtx-3080-10gb")
    assert result.exit_code == 3
    assert "Does not fit" in result.stdout and "quantization: nf4" in result.stdout
    data = plan_json(ROOT / "profiles" / "qwen3-8b-rtx4090.yaml", "--set", "max_model_len=40960",
                     "--set", "gpu_memory_utilization=0.8")
    assert data["fits"] is False and data["reason"] == "request"
    fields = [f["field"] for f in data["fixes"]]
    assert {"max_model_len", "gpu_memory_utilization", "quantization", "enforce_eager"} <= \
        set(fields)


def test_table_output_has_terms_bar_and_verdict():
    result = invoke("plan", ROOT / "profiles" / "llama-3-70b-7gb.yaml")
    assert result.exit_code == 0, result.output
    for words in ("weights on GPU", "weights offloaded to CPU", "4-bit scales", "activation peak",
                  "CUDA context", "CUDA graphs", "KV cache pool", "swap blocks", "Fits:",
                  "settings (dim = default)", "max_logprobs=20"):
        assert words in result.stdout, words


def test_validate_ok():
    for path in PROFILES:
        result = invoke("validate", path)
        assert result.exit_code == 0 and result.stdout.startswith("ok:"), result.output


BAD = [
    ("model: qwen3-8b\ngpu: rtx-4090\n  x: [\n", "malformed YAML"),
    ("model: qwen3-8b\ngpu: rtx-4090\nmax_num_seqs: lots\n", "must be an integer"),
    ("model: qwen3-8b\ngpu: rtx-4090\nmax_modle_len: 4096\n", "did you mean 'max_model_len'"),
    ("model: qwen3-8b\ngpu: rtx-4090\ngpu_memory_utilization: 1.5\n", "(0, 1]"),
    ("model: qwen3-8b\ngpu: rtx-4090\nmax_model_len: -1\n", "max_model_len"),
    ("model: qwen3-8b\ngpu: rtx-4090\nblock_size: 12\n", "block_size"),
    ("model: qwen3-8b\ngpu: rtx-4090\nmax_model_len: 50000\n", "max_position_embeddings (40960)"),
    ("model: ./no/such/folder\ngpu: rtx-4090\n", "does not exist"),
    ("model: ./empty\ngpu: rtx-4090\n", "has no config.json"),
    ("model: qwen3-8b\ngpu: rtx-4090\npipeline_parallel_size: 4\n", "not supported"),
]


@pytest.mark.parametrize("text, words", BAD)
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_user_errors_exit_2_with_one_line(tmp_path, command, text, words):
    (tmp_path / "empty").mkdir()
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = invoke(command, path)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "fix:" in lines[0]
    assert lines[0].startswith(f"error: {path}:")


def test_bad_gpu_option_and_missing_file(tmp_path):
    result = invoke("plan", CPU_DEFAULT, "--gpu", "h100-80")
    assert result.exit_code == 2 and "--gpu" in result.stderr and "did you mean" in result.stderr
    result = invoke("plan", tmp_path / "missing.yaml")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_up_and_bench_forward_to_their_modules(monkeypatch):
    calls = {}
    up = types.ModuleType("pagedeploy.launcher.up")
    up.run_up = lambda *args: calls.setdefault("up", args) and 0
    bench = types.ModuleType("pagedeploy.launcher.bench")
    bench.run_bench = lambda profile, args: calls.setdefault("bench", (profile, args)) and 0
    monkeypatch.setitem(sys.modules, "pagedeploy.launcher.up", up)
    monkeypatch.setitem(sys.modules, "pagedeploy.launcher.bench", bench)
    assert invoke("up", CPU_DEFAULT, "--port", "9001", "--set", "seed=3").exit_code == 0
    assert calls["up"] == (CPU_DEFAULT, None, 9001, ["seed=3"])
    result = invoke("bench", CPU_DEFAULT, "--requests", "8", "--concurrency=4")
    assert result.exit_code == 0, result.output
    assert calls["bench"] == (CPU_DEFAULT, ["--requests", "8", "--concurrency=4"])


def test_bad_environment_switch_is_one_line_and_exit_2(monkeypatch):
    monkeypatch.setenv("PAGEDEPLOY_PDL", "yes")
    result = invoke("plan", CPU_DEFAULT)
    assert result.exit_code == 2
    assert "PAGEDEPLOY_PDL='yes' is not one of 0, 1, 2" in result.output
    assert "Traceback" not in result.output
