"""Build the model and fill its weights: a local HF folder, a .gguf file, or seeded random (dummy).

Every format ends in `load_weights(model, named_tensors)` with HF tensor names, so the name mapping
and the shape checks live in one place (LlamaForCausalLM.load_weight).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from pagedeploy.runtime.config import EngineConfig
from pagedeploy.runtime.model import STACKED_PARAMS, LlamaForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


def load_model(config: EngineConfig) -> LlamaForCausalLM:
    """The model of config.spec on config.device in config.dtype, weights per config.load_format."""
    model = create_model(config)
    if config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
    elif config.load_format == "safetensors":
        load_weights(model, iter_folder_tensors(config.model_path), source=config.model_path)
    elif config.load_format == "gguf":
        from pagedeploy.runtime.gguf_loader import iter_gguf_tensors
        load_weights(model, iter_gguf_tensors(config.model_path), source=config.model_path)
    else:
        raise ValueError(f"load_format {config.load_format!r} is not supported "
                         "(use gguf, safetensors or dummy)")
    return model.eval()


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def create_model(config: EngineConfig) -> LlamaForCausalLM:
    """Uninitialized parameters straight on the device (the rope cache stays fp32)."""
    with torch.device(config.device), _default_dtype(torch_dtype(config.dtype)):
        return LlamaForCausalLM(config.spec, max_positions=config.max_model_len)


def iter_folder_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) shard by shard, so peak host memory is one tensor, not the model."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)


def load_weights(model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]],
                 source: str | Path = "checkpoint") -> None:
    loaded = {name for name, tensor in tensors if model.load_weight(name, tensor)}
    missing = sorted(set(expected_checkpoint_names(model)) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{source} lacks {len(missing)} weights the model needs: {shown}")


def expected_checkpoint_names(model: LlamaForCausalLM) -> list[str]:
    """HF names of every tensor the model needs, fused parameters split back into their parts."""
    unfused: dict[str, list[str]] = {}
    for hf_part, (fused, _) in STACKED_PARAMS.items():
        unfused.setdefault(fused, []).append(hf_part)
    names = []
    for name, _ in model.named_parameters():
        module_name, _, param_name = name.rpartition(".")
        prefix, _, owner = module_name.rpartition(".")
        for part in unfused.get(owner, [owner]):
            names.append(".".join(filter(None, (prefix, part, param_name))))
    return names


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Seeded random weights at a realistic scale: N(0, 0.02) matrices and biases, norms ≈ 1,
    so dummy models give non-degenerate logits (as vLLM's dummy loader)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        param.normal_(0.0, 0.02, generator=gen)
        if "norm" in name.rpartition(".")[0].rpartition(".")[2]:
            param.add_(1.0)
