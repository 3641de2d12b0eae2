"""Profiles: schema validation with file:line:column errors, kebab-case vLLM configs, defaults,
aliases, --set overrides."""
from dataclasses import fields
from pathlib import Path

import pytest

from pagedeploy.launcher.errors import UserError
from pagedeploy.launcher.profile import (Profile, build_profile, load_profile, load_schema,
                                         schema_defaults)

PROFILES = sorted((Path(__file__).resolve().parent.parent / "profiles").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides=()) -> UserError:
    with pytest.raises(UserError) as info:
        load_profile(path, overrides)
    return info.value


def test_shipped_profiles_validate():
    names = {p.name for p in PROFILES}
    assert {"cpu-default.yaml", "qwen3-8b-rtx4090.yaml", "qwen3-0.6b-h100.yaml",
            "llama-3-8b-h100.yaml", "llama-3-70b-7gb.yaml"} <= names
    for path in PROFILES:
        profile = load_profile(path)
        assert profile.warnings == [], path
    cpu = load_profile(PROFILES[[p.name for p in PROFILES].index("cpu-default.yaml")])
    assert (cpu.device, cpu.dtype, cpu.enforce_eager, cpu.port, cpu.host) == \
        ("cpu", "float32", True, 8000, "127.0.0.1")
    assert 512 << 20 <= cpu.kv_cache_memory_bytes <= 1 << 30
    assert cpu.max_model_len <= 8192 and 16 <= cpu.max_num_seqs <= 32
    assert 1024 <= cpu.max_num_batched_tokens <= 2048


def test_schema_defaults_are_the_dataclass_defaults():
    schema = load_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    defaults = {f.name: f.default for f in fields(Profile) if f.name in schema["properties"]}
    for key, value in schema_defaults().items():
        assert defaults[key] == value, key
    assert set(defaults) == set(schema["properties"])


def test_defaults_filled_and_vllm_like(tmp_path):
    p = load_profile(write(tmp_path, "model: qwen3-8b\n"))
    assert (p.gpu_memory_utilization, p.block_size, p.swap_space, p.max_num_seqs) == (0.9, 16, 4, 256)
    assert (p.max_num_batched_tokens, p.enable_prefix_caching, p.enforce_eager) == (2048, True, False)
    assert (p.max_seq_len_to_capture, p.max_logprobs, p.seed, p.max_model_len) == (8192, 20, 0, None)
    assert p.explicit == {"model"}


def test_vllm_kebab_config_validates_with_one_warning(tmp_path):
    text = """\
model: Qwen/Qwen3-8B
served-model-name: [qwen, qwen3]
gpu-memory-utilization: 0.85
max-model-len: 16384
tensor-parallel-size: 1
enable-prefix-caching: true
swap-space: 8
disable-log-requests: true
trust-remote-code: true
enable-chunked-prefill: true
disable-custom-all-reduce: true
"""
    p = load_profile(write(tmp_path, text))
    assert (p.gpu_memory_utilization, p.max_model_len, p.swap_space) == (0.85, 16384, 8.0)
    assert p.served_model_name == "qwen"
    assert len(p.warnings) == 1 and "\n" not in p.warnings[0]
    for key in ("disable-log-requests", "trust-remote-code", "enable-chunked-prefill",
                "disable-custom-all-reduce"):
        assert key in p.warnings[0]


@pytest.mark.parametrize("written, dtype, quant", [
    ("dtype: half\nquantization: none", "float16", None),
    ("dtype: float\nquantization: bitsandbytes", "float32", "nf4"),
    ("dtype: bfloat16\nquantization: int4", "bfloat16", "int4"),
    ("dtype: auto\nquantization: null", "auto", None),
])
def test_aliases(tmp_path, written, dtype, quant):
    p = load_profile(write(tmp_path, f"model: qwen3-8b\n{written}\n"))
    assert (p.dtype, p.quantization) == (dtype, quant)


def test_set_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path, "model: qwen3-8b\nmax_model_len: 4096\n")
    p = load_profile(path, ["max-model-len=8192", "enforce_eager=true",
                            "gpu_memory_utilization=0.5", "gpu=rtx-4090"])
    assert (p.max_model_len, p.enforce_eager, p.gpu_memory_utilization, p.gpu) == \
        (8192, True, 0.5, "rtx-4090")
    e = error_of(path, ["max_model_len=-3"])
    assert e.field == "max_model_len" and "--set" in e.file
    assert "did you mean 'max_model_len'" in error_of(path, ["max_modellen=3"]).one_line()
    assert "key=value" in error_of(path, ["max_model_len"]).one_line()


# (profile text, field, line, column, words the message must hold)
BAD = [
    ("model: qwen3-8b\n  dtype: [bfloat16\n", None, 2, 8, "malformed YAML"),
    ("model: qwen3-8b\nmax_num_seqs: many\n", "max_num_seqs", 2, 15, "must be an integer"),
    ("model: qwen3-8b\nenforce_eager: 3\n", "enforce_eager", 2, 16, "must be a boolean"),
    ("model: qwen3-8b\nmax_modle_len: 5\n", "max_modle_len", 2, 1, "did you mean 'max_model_len'"),
    ("model: qwen3-8b\nfoo_bar: 1\n", "foo_bar", 2, 1, "unknown key"),
    ("model: qwen3-8b\ngpu_memory_utilization: 0\n", "gpu_memory_utilization", 2, 25, "(0, 1]"),
    ("model: qwen3-8b\ngpu_memory_utilization: 1.2\n", "gpu_memory_utilization", 2, 25, "(0, 1]"),
    ("model: qwen3-8b\ngpu-memory-utilization: -0.5\n", "gpu_memory_utilization", 2, 25, "(0, 1]"),
    ("model: qwen3-8b\nmax_model_len: 0\n", "max_model_len", 2, 16, "outside [1, inf)"),
    ("model: qwen3-8b\nmax_num_seqs: -4\n", "max_num_seqs", 2, 15, "outside [1, inf)"),
    ("model: qwen3-8b\nmax_num_batched_tokens: 0\n", "max_num_batched_tokens", 2, 25, "outside"),
    ("model: qwen3-8b\nblock_size: 48\n", "block_size", 2, 13, "8, 16, 32, 64, 128, 256"),
    ("model: qwen3-8b\npipeline_parallel_size: 2\n", "pipeline_parallel_size", 2, 25,
     "not supported"),
    ("model: qwen3-8b\ndtype: bfloat17\n", "dtype", 2, 8, "did you mean bfloat16"),
    ("model: qwen3-8b\ngpu: h100\n", "gpu", 2, 6, "did you mean h100-80gb"),
    ("model: qwen3-8b\ndevice: cpu\ngpu: l4\n", "gpu", 3, 6, "device is cpu"),
    ("model: qwen3-8b\nquantize_lm_head: true\n", "quantize_lm_head", 2, 19,
     "quantization is not set"),
    ("model: qwen3-8b\nmax_num_seqs: 512\nmax_num_batched_tokens: 256\n",
     "max_num_batched_tokens", 3, 25, "at least 512"),
    ("dtype: bfloat16\n", None, None, None, "'model' is missing"),
    ("", None, None, None, "empty"),
    ("- model: qwen3-8b\n", None, 1, 1, "mapping"),
    ("model: qwen3-8b\nport: 8000\nport: 9000\n", "port", 3, 1, "twice"),
    ("model: qwen3-8b\nmax_model_len: 4096\nmax-model-len: 8192\n", "max_model_len", 3, 1,
     "another spelling"),
]


@pytest.mark.parametrize("text, field, line, column, words", BAD)
def test_bad_input_is_one_located_line(tmp_path, text, field, line, column, words):
    path = write(tmp_path, text)
    e = error_of(path)
    assert (e.field, e.line, e.column) == (field, line, column)
    message = e.one_line()
    assert "\n" not in message and words in message and "fix:" in message
    location = ":".join(str(x) for x in (path, line, column) if x is not None)
    assert message.startswith(location + ":")


def test_missing_profile_file(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.yaml").one_line()


def test_relative_paths_resolve_against_the_profile(tmp_path):
    (tmp_path / "profiles").mkdir()
    p = load_profile(write(tmp_path / "profiles", "model: ../models/tiny\n"))
    assert p.resolve_path(p.model) == tmp_path / "profiles" / "../models/tiny"
    assert p.resolve_path("/abs/x") == Path("/abs/x")


def test_build_profile_from_a_dict():
    p = build_profile({"model": "qwen3-8b", "max-num-seqs": 8}, {}, "mem.yaml", ".")
    assert p.max_num_seqs == 8 and p.path == "mem.yaml"
