"""The dry-run memory plan: plan(profile, spec, gpu) -> MemoryPlan, a pure function (no torch, no GPU).

Every term is separate (README "Memory plan" documents each formula):
  budget   = total × gpu_memory_utilization            (total when kv_cache_memory_bytes is set)
  KV pool  = budget − weights on the device − activation peak − CUDA context − CUDA graphs − reserve
  blocks   = floor(KV pool / block bytes); the runtime allocates exactly this many.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pagedeploy.quant.formats import bnb_weight_bytes, int4_group_size, int4_weight_bytes
from pagedeploy.runtime.config import cuda_graph_batch_sizes

from .errors import UserError
from .gpus import GiB, MiB, GpuSpec
from .model_spec import ModelSpec
from .profile import Profile, check_against_model

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

CUDA_CONTEXT_BYTES = 896 * MiB     # CUDA context, cuBLAS workspace, loaded kernels: `deploy up`
                                   # measured 0.75-0.81 GiB outside torch on the H100 (PERF run 10)
GPU_RESERVE_BYTES = 256 * MiB      # allocator fragmentation, sampler scratch, request tensors
CPU_RESERVE_BYTES = 1 * GiB        # interpreter, torch libraries, tokenizer, HTTP server
GRAPH_BYTES_PER_LAYER = 218_000    # CUDA-graph pool per captured graph per layer:
GRAPH_BYTES_PER_HIDDEN = 67        #   218,000 + 67 × hidden bytes (fit, see cuda_graph_bytes)


@dataclass
class WeightsPlan:
    dtype: str                    # compute dtype the weights are held in (unless 4-bit)
    quantization: str | None
    total_bytes: int              # all weights as the runtime holds them, per GPU
    gpu_bytes: int
    cpu_bytes: int                # offloaded whole layers, exact
    layers_offloaded: int
    quant_scale_bytes: int        # part of gpu_bytes: 4-bit absmax / scales of on-device layers
    staging_bytes: int = 0        # GPU buffers the offloaded layers are copied into each forward
    packed_bytes: int = 0         # CPU float32: oneDNN-packed copies of the GEMM weights
    lm_head_quantized: bool = False   # quantize_lm_head: the lm_head is 4-bit too
    layer_bytes: list[int] = field(repr=False, default_factory=list)


@dataclass
class KVCachePlan:
    dtype: str
    bytes_per_token: int
    block_size: int
    block_bytes: int
    budget_bytes: int             # what was left for the pool (or kv_cache_memory_bytes)
    num_blocks: int
    tokens: int
    swap_blocks: int

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.block_bytes


@dataclass
class Fix:
    field: str
    value: object
    text: str
    fits: bool
    frees_bytes: int = 0


@dataclass
class MemoryPlan:
    model: str
    gpu: GpuSpec
    device: str                   # "cuda" | "cpu"
    dtype: str
    total_bytes: int
    gpu_memory_utilization: float
    budget_bytes: int
    weights: WeightsPlan
    activation_peak_bytes: int
    cuda_context_bytes: int
    cuda_graph_bytes: int
    runtime_reserve_bytes: int
    kv_cache: KVCachePlan
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    tensor_parallel_size: int
    fits: bool = False
    reason: str = ""              # "" | "weights" | "no_kv" | "request" | "kv_memory"
    verdict: str = ""
    fixes: list[Fix] = field(default_factory=list)

    @property
    def non_kv_bytes(self) -> int:
        return (self.weights.gpu_bytes + self.weights.staging_bytes + self.weights.packed_bytes
                + self.activation_peak_bytes
                + self.cuda_context_bytes + self.cuda_graph_bytes + self.runtime_reserve_bytes)

    @property
    def used_bytes(self) -> int:
        return self.non_kv_bytes + self.kv_cache.bytes

    @property
    def max_concurrency(self) -> float:
        return self.kv_cache.tokens / self.max_model_len

    @property
    def blocks_per_request(self) -> int:
        return math.ceil(self.max_model_len / self.kv_cache.block_size)


# ---------------------------------------------------------------- public

def plan(profile: Profile, spec: ModelSpec, gpu: GpuSpec) -> MemoryPlan:
    """The memory plan, its verdict and (when it does not fit) fixes with numbers."""
    from .plan_fixes import find_fixes   # the fixes re-plan through plan_terms: a cycle at import

    result = plan_terms(profile, spec, gpu)
    if not result.fits:
        result.fixes = find_fixes(profile, spec, gpu, result)
    return result


def plan_terms(profile: Profile, spec: ModelSpec, gpu: GpuSpec) -> MemoryPlan:
    """Every term and the verdict, without fixes."""
    device = gpu.device
    dtype = resolve_dtype(profile, spec, device)
    max_model_len = check_against_model(profile, spec.max_position_embeddings, spec.name)
    tp = profile.tensor_parallel_size
    fixed_kv = profile.kv_cache_memory_bytes
    budget = gpu.total_bytes if fixed_kv else int(gpu.total_bytes * profile.gpu_memory_utilization)
    on_gpu = device == "cuda"
    weights = plan_weights(profile, spec, dtype, offload=on_gpu)
    if device == "cpu" and dtype == "float32" and not profile.quantization:
        weights.packed_bytes = cpu_packed_bytes(spec)
    result = MemoryPlan(
        model=spec.name, gpu=gpu, device=device, dtype=dtype, total_bytes=gpu.total_bytes,
        gpu_memory_utilization=profile.gpu_memory_utilization, budget_bytes=budget,
        weights=weights,
        activation_peak_bytes=activation_peak_bytes(spec, profile, DTYPE_BYTES[dtype]),
        cuda_context_bytes=CUDA_CONTEXT_BYTES if on_gpu else 0,
        # CPU offload runs eager (launcher/engine_config.py): no graph pool then
        cuda_graph_bytes=cuda_graph_bytes(spec, profile) if on_gpu and not weights.cpu_bytes else 0,
        runtime_reserve_bytes=GPU_RESERVE_BYTES if on_gpu else CPU_RESERVE_BYTES,
        kv_cache=None,  # filled below: it is what the other terms leave
        max_model_len=max_model_len, max_num_seqs=profile.max_num_seqs,
        max_num_batched_tokens=profile.max_num_batched_tokens, tensor_parallel_size=tp)
    kv_budget = fixed_kv if fixed_kv else budget - result.non_kv_bytes
    result.kv_cache = plan_kv_cache(profile, spec, dtype, kv_budget, device)
    judge(result, fixed_kv is not None)
    return result


def resolve_dtype(profile: Profile, spec: ModelSpec, device: str) -> str:
    """auto: the checkpoint's dtype; a float32 checkpoint (a GGUF's dequantized weights) computes
    in bfloat16 on a GPU, as vLLM does, and stays float32 on a CPU (exact, and fast enough)."""
    if profile.dtype != "auto":
        return profile.dtype
    dtype = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32",
             "fp32": "float32"}.get(spec.torch_dtype, spec.torch_dtype)
    if dtype not in DTYPE_BYTES or (dtype == "float32" and device == "cuda"):
        return "bfloat16"
    return dtype


def kv_dtype(profile: Profile, dtype: str) -> str:
    return dtype if profile.kv_cache_dtype == "auto" else profile.kv_cache_dtype


# ---------------------------------------------------------------- weights

def linear_bytes(spec: ModelSpec, params: int, dtype_bytes: int,
                 quantization: str | None) -> tuple[int, int]:
    """(bytes, of which scale bytes) of one decoder layer's `params` linear weights.

    4-bit: exactly what the runtime's QuantLinear layers store (quant/formats.py), tensor by tensor
    as the runtime fuses them: bnb counts its 64-weight blocks over each flat tensor, and int4's
    group (spec.int4_group: 128, or 32 for a 4-bit GGUF; else the largest of 64, 32 that divides)
    follows each tensor's in_features."""
    if quantization is None:
        return params * dtype_bytes, 0
    shapes = layer_linear_shapes(spec)
    total = sum(quantized_tensor_bytes(out, inp, quantization, spec.int4_group) for out, inp in shapes)
    codes = sum(math.ceil(out * inp / 2) for out, inp in shapes)
    return total, total - codes


def layer_linear_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's linears as runtime/model.py holds them: q/k/v fused into
    qkv_proj and gate/up into gate_up_proj, each quantized as one tensor."""
    q = spec.num_attention_heads * spec.head_dim
    kv = spec.num_key_value_heads * spec.head_dim
    hidden, inter = spec.hidden_size, spec.intermediate_size
    return [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter)]


def quantized_tensor_bytes(out: int, inp: int, quantization: str, int4_group: int = 128) -> int:
    if quantization != "int4":
        return bnb_weight_bytes(out * inp)
    if inp % 32:
        raise UserError(f"int4 needs every linear's in_features divisible by 32, this model has {inp}",
                        "use quantization: nf4", field="quantization")
    return int4_weight_bytes(out, inp, int4_group_size(inp, int4_group))


def plan_weights(profile: Profile, spec: ModelSpec, dtype: str,
                 offload: bool = True) -> WeightsPlan:
    """Per-GPU weight bytes and the whole layers cpu_offload_gb moves to CPU memory.
    Embeddings, lm_head (unless quantize_lm_head), norms and biases stay in the compute dtype;
    tensor parallelism divides the linear weights and the (vocab-parallel) embeddings, norms are
    replicated. On a CPU target there is nowhere to offload to (offload=False)."""
    wb, quant, tp = DTYPE_BYTES[dtype], profile.quantization, profile.tensor_parallel_size
    layers, other = spec.param_groups()
    layer_bytes, layer_scales = [], []
    for linear, small in layers:
        lin, scales = linear_bytes(spec, linear, wb, quant)
        layer_bytes.append(math.ceil(lin / tp) + small * wb)
        layer_scales.append(math.ceil(scales / tp))
    norm_params = spec.hidden_size
    head_delta, head_scales = lm_head_delta(profile, spec, wb)
    other_bytes = (math.ceil((other - norm_params) * wb / tp) + norm_params * wb
                   + math.ceil(head_delta / tp))
    offloaded, moved = offload_layers(layer_bytes, profile.cpu_offload_gb if offload else 0)
    total = sum(layer_bytes) + other_bytes
    return WeightsPlan(dtype=dtype, quantization=quant, total_bytes=total,
                       gpu_bytes=total - moved, cpu_bytes=moved, layers_offloaded=offloaded,
                       quant_scale_bytes=sum(layer_scales[offloaded:]) + math.ceil(head_scales / tp),
                       staging_bytes=offload_staging_bytes(layer_bytes[:offloaded]),
                       lm_head_quantized=bool(quant and profile.quantize_lm_head),
                       layer_bytes=layer_bytes)


def lm_head_delta(profile: Profile, spec: ModelSpec, dtype_bytes: int) -> tuple[int, int]:
    """(bytes added, of which scale bytes) by quantize_lm_head: the 4-bit lm_head replaces the
    dense one, or sits beside the embedding it was tied to (the token lookups stay dense)."""
    if not (profile.quantize_lm_head and profile.quantization):
        return 0, 0
    out, inp = spec.vocab_size, spec.hidden_size
    head = quantized_tensor_bytes(out, inp, profile.quantization, spec.int4_group)
    dense = 0 if spec.tie_word_embeddings else out * inp * dtype_bytes
    return head - dense, head - math.ceil(out * inp / 2)


def cpu_packed_bytes(spec: ModelSpec) -> int:
    """A float32 model on the CPU keeps a oneDNN-packed copy of every GEMM weight beside the dense
    one (runtime/cpu_weights.py): the decoder linears and the lm_head (the embedding when tied)."""
    layers, _ = spec.param_groups()
    return 4 * (sum(linear for linear, _ in layers) + spec.vocab_size * spec.hidden_size)


def offload_layers(layer_bytes: list[int], cpu_offload_gb: float) -> tuple[int, int]:
    """vLLM's rule: offload whole layers from layer 0 on while fewer than cpu_offload_gb GiB have
    moved (so the last layer may overshoot). Returns (layers moved, bytes moved)."""
    return layers_to_offload(layer_bytes, cpu_offload_gb * GiB)


def layers_to_offload(layer_bytes: list[int], target_bytes: float) -> tuple[int, int]:
    """The one rule shared with the runtime (runtime/offload.py), which passes the plan's exact
    cpu_bytes as the target and so moves exactly the planned layers."""
    moved, count = 0, 0
    while count < len(layer_bytes) and moved < target_bytes:
        moved += layer_bytes[count]
        count += 1
    return count, moved


def offload_staging_bytes(offloaded_layer_bytes: list[int]) -> int:
    """The runtime copies each offloaded layer into one of two GPU buffers (the next layer's copy
    fills the other while this one computes), each the size of the largest offloaded layer."""
    if not offloaded_layer_bytes:
        return 0
    return min(2, len(offloaded_layer_bytes)) * max(offloaded_layer_bytes)


# ---------------------------------------------------------------- activations and graphs

def activation_peak_bytes(spec: ModelSpec, profile: Profile, act_bytes: int) -> int:
    """Peak of one forward pass of max_num_batched_tokens tokens, or of the fp32 logits of the
    sequences that sample in one step, whichever is larger:

        forward = T × (2·hidden + 3·intermediate/tp + (q + 2·kv)/tp) × act_bytes
                  (residual + normed hidden, gate/up output + activation, fused q/k/v)
        logits  = min(max_num_seqs, T) × vocab × 4

    Calibrated on vLLM 0.26's measured peaks at T=16384, max_num_seqs=1024 (DESIGN.md):
    Llama-3-8B: forward 1.750 GiB vs vLLM 1.77 (-1.1 %); Qwen3-0.6B: forward 0.469 GiB vs 0.49
    (-4.3 %) but its fp32 logits (0.580 GiB) win, 18 % above vLLM, which keeps bf16 logits until
    sampling; our runner returns fp32 logits, so the larger figure is the honest one.
    """
    tp = profile.tensor_parallel_size
    tokens = profile.max_num_batched_tokens
    qkv = (spec.num_attention_heads // tp + 2 * kv_heads_per_gpu(spec, tp)) * spec.head_dim
    width = 2 * spec.hidden_size + 3 * spec.intermediate_size // tp + qkv
    forward = tokens * width * act_bytes
    logits = min(profile.max_num_seqs, tokens) * spec.vocab_size * 4
    return max(forward, logits)


def cuda_graph_bytes(spec: ModelSpec, profile: Profile) -> int:
    """0 with enforce_eager. Otherwise graphs × layers × (218,000 + 67 × hidden) bytes: a line
    through vLLM's measured pools (67 graphs): Llama-3-8B 0.98 GiB (this gives 0.983) and
    Qwen3-0.6B 0.50 GiB (0.501). An estimate until `deploy up` measures the real pool."""
    if profile.enforce_eager:
        return 0
    per_graph = spec.num_hidden_layers * (GRAPH_BYTES_PER_LAYER
                                          + GRAPH_BYTES_PER_HIDDEN * spec.hidden_size)
    return len(cuda_graph_batch_sizes(profile.max_num_seqs)) * per_graph


# ---------------------------------------------------------------- KV cache

def kv_heads_per_gpu(spec: ModelSpec, tp: int) -> int:
    return max(1, spec.num_key_value_heads // tp)


def kv_bytes_per_token(spec: ModelSpec, tp: int, dtype_bytes: int) -> int:
    """Σ over layers of K and V: 2 × kv heads on this GPU × head_dim × bytes."""
    return spec.num_hidden_layers * 2 * kv_heads_per_gpu(spec, tp) * spec.head_dim * dtype_bytes


def plan_kv_cache(profile: Profile, spec: ModelSpec, dtype: str, kv_budget: int,
                  device: str) -> KVCachePlan:
    cache_dtype = kv_dtype(profile, dtype)
    per_token = kv_bytes_per_token(spec, profile.tensor_parallel_size, DTYPE_BYTES[cache_dtype])
    block_bytes = profile.block_size * per_token
    num_blocks = max(0, kv_budget // block_bytes)
    # Swap space is host memory a GPU pool swaps into; on a CPU target the pool already is.
    swap = int(profile.swap_space * GiB) // block_bytes if device == "cuda" else 0
    return KVCachePlan(dtype=cache_dtype, bytes_per_token=per_token, block_size=profile.block_size,
                       block_bytes=block_bytes, budget_bytes=kv_budget, num_blocks=num_blocks,
                       tokens=num_blocks * profile.block_size, swap_blocks=swap)


# ---------------------------------------------------------------- verdict

def judge(p: MemoryPlan, fixed_kv: bool) -> None:
    where = "GPU" if p.device == "cuda" else "host RAM"
    kv = p.kv_cache
    if p.weights.gpu_bytes > p.budget_bytes:
        p.reason = "weights"
        p.verdict = (f"Does not fit: the weights alone ({gib(p.weights.gpu_bytes)} on the {where}) "
                     f"exceed the {gib(p.budget_bytes)} budget.")
    elif fixed_kv and p.used_bytes > p.budget_bytes:
        p.reason = "kv_memory"
        p.verdict = (f"Does not fit: kv_cache_memory_bytes ({gib(kv.budget_bytes)}) plus the rest "
                     f"({gib(p.non_kv_bytes)}) exceed the {where}'s {gib(p.budget_bytes)}.")
    elif kv.num_blocks == 0:
        p.reason = "no_kv"
        p.verdict = (f"Does not fit: weights, activations and overheads take "
                     f"{gib(p.non_kv_bytes)} of the {gib(p.budget_bytes)} budget, leaving no room "
                     f"for one KV block ({kv.block_bytes:,} bytes).")
    elif kv.num_blocks < p.blocks_per_request:
        p.reason = "request"
        p.verdict = (f"Does not fit: the KV pool holds {kv.tokens:,} tokens, fewer than one "
                     f"max_model_len request of {p.max_model_len:,} tokens.")
    else:
        p.fits, p.reason = True, ""
        p.verdict = (f"Fits: {kv.num_blocks:,} KV blocks of {kv.block_size} tokens hold "
                     f"{kv.tokens:,} tokens, {p.max_concurrency:.2f} requests of "
                     f"{p.max_model_len:,} tokens at once.")


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"
