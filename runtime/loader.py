"""Build the model and fill its weights: a local HF folder, a .gguf file, or seeded random (dummy).

Streaming: the decoder layers are created on the meta device (no memory) and filled one at a time.
A layer gets memory when its first tensor arrives and is finished (made 4-bit, offloaded) as soon
as its last one has, so the full-precision model never exists at once: peak device memory is the
finished layers plus about one layer in full precision (a 70B bf16 model is 140 GB, more than the
GPU and its host). Fused q/k/v and gate/up parts may arrive in any order: the layer's own fused
parameter is the buffer they collect in. Every format goes through `model.load_weight` with HF
tensor names, so the name mapping and the shape checks live in one place.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pagedeploy.quant.formats import INT4_GROUP_SIZE, int4_group_size
from pagedeploy.quant.linear import QuantLinear, quantize_weight
from pagedeploy.runtime.config import EngineConfig
from pagedeploy.runtime.model import STACKED_PARAMS, Linear, LlamaForCausalLM, rope_cos_sin_cache
from pagedeploy.runtime.offload import LayerOffloader

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_METHODS = ("nf4", "fp4", "int4")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


def load_model(config: EngineConfig) -> LlamaForCausalLM:
    """The model of config.spec on config.device in config.dtype, weights per config.load_format,
    its decoder linears 4-bit when config.quantization says so, and its first layers in CPU
    memory when config.cpu_offload_bytes says so (`model.offloader` then reports the bytes)."""
    check_quantization(config.quantization)   # before minutes of loading, not after
    device = torch.device(config.device)
    if config.cpu_offload_bytes and device.type == "cuda" and not config.enforce_eager:
        raise ValueError("cpu_offload_bytes needs enforce_eager: the offload hooks run on the host, "
                         "which a CUDA graph replay skips")
    model = create_model(config)
    offloader = None
    if config.cpu_offload_bytes:
        offloader = LayerOffloader.for_model(model, config.cpu_offload_bytes, config.quantization,
                                             device, config.spec.int4_group)
    loader = StreamingLoader(model, config, offloader)
    if config.load_format == "dummy":
        loader.fill_dummy(config.seed)
    else:
        loader.load(checkpoint_tensors(config), source=config.model_path)
    if config.quantize_lm_head:
        quantize_lm_head(model, config.quantization, torch_dtype(config.dtype), config.spec.int4_group)
    if device.type == "cpu":
        store_weights_input_major(model)   # 2-D parameters only: never the 4-bit buffers
        if offloader is None:   # (offloaded weights move through shared staging buffers)
            from pagedeploy.runtime.cpu_weights import pack_cpu_weights
            pack_cpu_weights(model)        # oneDNN copies of the fp32 linears and lm_head
    if device.type == "cuda":
        # Hand back the load's cached blocks before the staging buffers and the KV pool are
        # allocated: carved from a cached full-precision block, a staging buffer would strand the
        # rest of it.
        torch.cuda.empty_cache()
    if offloader is not None:
        offloader.install(model)
        model.offloader = offloader
    return model.eval()


def checkpoint_tensors(config: EngineConfig) -> Iterator[tuple[str, torch.Tensor]]:
    if config.load_format == "safetensors":
        return iter_folder_tensors(config.model_path)
    if config.load_format == "gguf":
        from pagedeploy.runtime.gguf_loader import iter_gguf_tensors
        return iter_gguf_tensors(config.model_path)
    raise ValueError(f"load_format {config.load_format!r} is not supported "
                     "(use gguf, safetensors or dummy)")


def check_quantization(method: str | None) -> None:
    """A user error for an unknown method or, for nf4/fp4, a missing bitsandbytes."""
    from pagedeploy.launcher.errors import UserError

    if method is None:
        return
    if method not in QUANT_METHODS:
        raise UserError(f"{method!r} is not supported", "use nf4, fp4 or int4",
                        field="quantization")
    if method != "int4":
        from pagedeploy.quant.bnb import import_bnb
        try:
            import_bnb(method)
        except ImportError:
            raise UserError(f"{method} needs bitsandbytes, which is not installed",
                            "pip install 'pagedeploy[bnb]', or use quantization: int4",
                            field="quantization") from None


class StreamingLoader:
    """Fills a model made by create_model layer by layer (see the module docstring).

    `max_in_flight` is the most layers that were in full precision at once: 1 for dummy weights
    and for checkpoints that store each layer's tensors together (HF shards and GGUF files do)."""

    def __init__(self, model: LlamaForCausalLM, config: EngineConfig,
                 offloader: LayerOffloader | None = None):
        self.model, self.layers = model, model.model.layers
        self.device = torch.device(config.device)
        self.quantization, self.dtype = config.quantization, torch_dtype(config.dtype)
        self.int4_group = config.spec.int4_group     # the plan's choice, from the same property
        self.offloader = offloader
        self.expected = expected_checkpoint_names(model)
        self.remaining = [sum(p.numel() for p in layer.parameters()) for layer in self.layers]
        self.loaded: set[str] = set()
        self.in_flight = self.max_in_flight = 0

    def load(self, tensors: Iterable[tuple[str, torch.Tensor]], source: str | Path) -> None:
        for name, tensor in tensors:
            self.add(name, tensor)
        check_missing(self.expected, self.loaded, source)
        assert not any(self.remaining), "every layer with all its tensors was finished"

    @torch.no_grad()
    def add(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy one HF-named tensor into place; False when the model has no use for it."""
        if name in self.loaded:
            return True
        index = self.layer_of(name)
        if index is not None:
            self.materialize(index)
        if not self.model.load_weight(name, tensor):
            return False
        self.loaded.add(name)
        if index is not None:
            self.filled(index, tensor.numel())
        return True

    @torch.no_grad()
    def fill_dummy(self, seed: int) -> None:
        """Seeded random weights at a realistic scale: N(0, 0.02) matrices and biases, norms ≈ 1,
        so dummy models give non-degenerate logits (as vLLM's dummy loader). One generator walks
        the parameters in order, so the values do not depend on streaming."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for name in [name for name, _ in self.model.named_parameters()]:
            index = self.layer_of(name)
            if index is not None:
                self.materialize(index)
            param = self.model.get_parameter(name)
            param.normal_(0.0, 0.02, generator=gen)
            if "norm" in name.rpartition(".")[0].rpartition(".")[2]:
                param.add_(1.0)
            if index is not None:
                self.filled(index, param.numel())

    def layer_of(self, name: str) -> int | None:
        match = _LAYER_NAME.match(name)
        index = int(match.group(1)) if match else None
        return index if index is not None and index < len(self.layers) else None

    def materialize(self, index: int) -> None:
        layer = self.layers[index]
        if next(layer.parameters()).is_meta:
            materialize(layer, self.device)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def filled(self, index: int, numel: int) -> None:
        self.remaining[index] -= numel
        if self.remaining[index] == 0:
            self.finish(index)

    def finish(self, index: int) -> None:
        """Layer `index` has all its weights: 4-bit now; to the host now when offloaded on CUDA
        (on the CPU, offload.install stores it after the CPU weight layout is applied)."""
        layer = self.layers[index]
        if self.quantization is not None:
            quantize_layer_linears(layer, self.quantization, self.dtype, self.int4_group)
        if self.offloader and index < self.offloader.num_layers and self.device.type == "cuda":
            self.offloader.store(index, layer)
            torch.cuda.empty_cache()   # the layer's device memory is all free: leave no fragments
        self.in_flight -= 1


@torch.no_grad()
def quantize_layer_linears(layer: nn.Module, method: str, dtype: torch.dtype,
                           int4_group: int = INT4_GROUP_SIZE) -> int:
    """Replace a decoder layer's Linears by 4-bit QuantLinears on the weights' own device, each
    full-precision weight dropped as soon as its 4-bit copy exists; returns how many. Norms (and
    everything outside the decoder layers) keep the compute dtype: the plan counts them so."""
    count = 0
    for parent in (layer.self_attn, layer.mlp):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, quantized_linear(child, method, dtype, int4_group))
                count += 1
    return count


def quantized_linear(linear: Linear, method: str, dtype: torch.dtype,
                     int4_group: int = INT4_GROUP_SIZE) -> QuantLinear:
    """The 4-bit copy of `linear`, fused q/k/v and gate/up kept as one weight: the forward splits
    the output by `shard_sizes`, so the replacement carries them."""
    quantized = quantized_weight(linear.weight.detach(), linear.bias, method, dtype, int4_group)
    quantized.shard_sizes = linear.shard_sizes
    linear.weight = None   # free the full-precision copy now, not when the layer is done
    return quantized


def quantized_weight(weight: torch.Tensor, bias: torch.Tensor | None, method: str,
                     dtype: torch.dtype, int4_group: int = INT4_GROUP_SIZE) -> QuantLinear:
    """A QuantLinear of `weight` [out, in]; int4's group as the plan has it (int4_group_size)."""
    group = int4_group_size(weight.shape[1], int4_group) if method == "int4" else None
    return quantize_weight(weight, method, bias, group, dtype=dtype)


@torch.no_grad()
def quantize_lm_head(model: LlamaForCausalLM, method: str | None, dtype: torch.dtype,
                     int4_group: int = INT4_GROUP_SIZE) -> None:
    """quantize_lm_head: the lm_head made 4-bit like the decoder linears. A tied model gets a 4-bit
    copy of the embedding as its own lm_head; the embedding stays dense for the token lookups."""
    if method is None:
        raise ValueError("quantize_lm_head needs a quantization method")
    if model.lm_head is None:
        model.lm_head = quantized_weight(model.model.embed_tokens.weight.detach(), None, method,
                                         dtype, int4_group)
    else:
        model.lm_head = quantized_linear(model.lm_head, method, dtype, int4_group)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def store_weights_input_major(model: LlamaForCausalLM) -> None:
    """On the CPU, keep every matrix [out, in] as a view of [in, out] storage.

    F.linear(x, w) then hands the BLAS a row-major [in, out] operand, which its small-batch
    (decode) path reads about 1.8x faster (measured on SmolLM2: gate_up 760 -> 378 us, lm_head
    12.5 -> 7.7 ms at one token). Shapes, names and values are unchanged; only strides differ.
    The tied embedding changes too: one row gather per token does not mind the layout.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.data = param.data.t().contiguous().t()


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def materialize(module: nn.Module, device: torch.device) -> None:
    """`module.to_empty(device)` for a module built on the meta device, with plain `torch.empty`:
    to_empty goes through torch's Python reference of empty_like, whose first call imports sympy
    (measured 3.6 s of a cold start on the GPU machine)."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
        for name, buf in sub._buffers.items():
            if buf is not None:
                sub._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device=device)


def create_model(config: EngineConfig) -> LlamaForCausalLM:
    """Embeddings, final norm, lm_head and rope cache on the device, uninitialized; the decoder
    layers on the meta device, for StreamingLoader to materialize one at a time."""
    dtype, device = torch_dtype(config.dtype), torch.device(config.device)
    with torch.device("meta"), _default_dtype(dtype):
        model = LlamaForCausalLM(config.spec, max_positions=config.max_model_len)
    layers, model.model.layers = model.model.layers, nn.ModuleList()
    materialize(model, device)
    model.model.layers = layers
    with torch.device(device), _default_dtype(dtype):   # the rope cache stays fp32
        model.model.cos_sin_cache = rope_cos_sin_cache(config.spec, config.max_model_len).to(device)
    return model


def iter_folder_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) one at a time (peak host memory: one tensor), decoder layer by decoder
    layer across all the shards (safetensors files are random access): each layer is complete
    before the next one starts, however the checkpoint split its tensors between files."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors files")
    with ExitStack() as stack:
        shards = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        entries = [(name, shard) for shard in shards for name in shard.keys()]
        entries.sort(key=lambda entry: _layer_order(entry[0]))   # stable: file order within a layer
        for name, shard in entries:
            yield name, shard.get_tensor(name)


def _layer_order(name: str) -> int:
    match = _LAYER_NAME.match(name)
    return int(match.group(1)) if match else -1


def load_weights(model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]],
                 source: str | Path = "checkpoint") -> None:
    """Overwrite the weights of a model that is already whole (deploy bench's HF copy)."""
    loaded = {name for name, tensor in tensors if model.load_weight(name, tensor)}
    check_missing(expected_checkpoint_names(model), loaded, source)


def check_missing(expected: list[str], loaded: set[str], source: str | Path) -> None:
    missing = sorted(set(expected) - loaded)
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
