"""EngineConfig: everything the runtime needs, already decided by the profile and the plan.

The runtime never re-derives a number the plan computed: num_blocks and num_swap_blocks come
from MemoryPlan, and the engine allocates exactly that many.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedeploy.launcher.model_spec import ModelSpec


MAX_CAPTURE_BATCH = 512


def cuda_graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes captured as CUDA graphs (vLLM's ladder: 1, 2, 4, then every 8 up to
    512). The runner captures exactly these and the plan sizes the graph pool by their count."""
    top = min(max_num_seqs, MAX_CAPTURE_BATCH)
    return [b for b in (1, 2, 4) if b <= top] + list(range(8, top + 1, 8))


@dataclass
class EngineConfig:
    spec: ModelSpec
    num_blocks: int                      # GPU (or CPU-device) KV blocks, from the plan
    block_size: int = 16
    load_format: str = "auto"            # "gguf" | "safetensors" | "dummy" ("auto": from spec.source)
    model_path: str | None = None        # folder or .gguf file; None for dummy weights
    tokenizer: str | None = None         # folder or .gguf holding the tokenizer; None: same as model_path
    dtype: str = "float32"               # compute dtype: "bfloat16" | "float16" | "float32"
    kv_cache_dtype: str = "auto"         # "auto" = dtype
    device: str = "cpu"                  # "cpu" | "cuda"
    num_swap_blocks: int = 0             # CPU swap pool, from the plan
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    max_seq_len_to_capture: int = 8192
    quantization: str | None = None      # None | "nf4" | "fp4" | "int4"
    quantize_lm_head: bool = False       # the lm_head in that format too
    cpu_offload_bytes: int = 0
    seed: int = 0
    max_logprobs: int = 20
    served_model_name: str = ""
    async_scheduling: bool | None = None   # None: on when the device is CUDA

    def __post_init__(self):
        if self.load_format == "auto":
            self.load_format = {"gguf": "gguf", "folder": "safetensors"}.get(self.spec.source, "dummy")
        if self.kv_cache_dtype == "auto":
            self.kv_cache_dtype = self.dtype
        if self.model_path is None:
            self.model_path = self.spec.path
        if self.tokenizer is None:
            self.tokenizer = self.model_path
        if self.async_scheduling is None:
            self.async_scheduling = self.device == "cuda"
        if not self.served_model_name:
            self.served_model_name = self.spec.name
        assert self.num_blocks > 0, "the plan must leave room for at least one KV block"
