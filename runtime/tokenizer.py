"""Tokenizer (with its chat template) and the generation EOS ids, from a folder or a .gguf file.

Building a tokenizer from GGUF metadata takes transformers several seconds, so the result is
saved once with save_pretrained under the cache dir, keyed by the file's identity.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pagedeploy.launcher.gguf_meta import cache_dir, file_cache_key
from pagedeploy.runtime.config import EngineConfig


def load_tokenizer(config: EngineConfig):
    """A transformers tokenizer, or None when there is none (dummy catalog models work on token
    ids only)."""
    source = config.tokenizer
    if source is None or not Path(source).exists():
        return None
    from transformers import AutoTokenizer

    if str(source).endswith(".gguf"):
        folder = gguf_tokenizer_folder(source)
        return None if folder is None else AutoTokenizer.from_pretrained(str(folder))
    if not (Path(source) / "tokenizer_config.json").exists() and \
            not (Path(source) / "tokenizer.json").exists():
        return None
    return AutoTokenizer.from_pretrained(str(source))


def gguf_tokenizer_folder(path: str | Path) -> Path | None:
    """A save_pretrained folder of the GGUF's tokenizer, converted on first use; None when the
    file carries no tokenizer."""
    folder = cache_dir() / "gguf-tokenizer" / file_cache_key(path)
    if not (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        path = Path(path)
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception:
            if _has_tokenizer(path):
                raise
            return None
        tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        tok.save_pretrained(str(tmp))
        _publish(tmp, folder)
    return folder


def _has_tokenizer(path: Path) -> bool:
    from gguf import GGUFReader

    return "tokenizer.ggml.model" in GGUFReader(str(path)).fields


def _publish(tmp: Path, folder: Path) -> None:
    """Move a finished folder into place; a concurrent first use may have won the race."""
    try:
        tmp.replace(folder)
    except OSError:
        if not (folder / "tokenizer_config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def eos_token_ids(config: EngineConfig, tokenizer=None) -> list[int]:
    """The ids that end generation: generation_config.json first (as HF generate), then the
    model config's eos_token_id, then the tokenizer's."""
    ids = None
    model_path = config.model_path
    if model_path and Path(model_path).is_dir():
        gen_config = Path(model_path) / "generation_config.json"
        if gen_config.exists():
            ids = json.loads(gen_config.read_text()).get("eos_token_id")
    if ids is None:
        ids = config.spec.eos_token_id
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
