"""Profile: a YAML file validated against schemas/profile.schema.json, with every key's line and
column kept so that a mistake is reported where it was written.

kebab-case keys (a vLLM --config YAML) are the same keys as snake_case. vLLM keys we do not act on
are accepted with one warning line; keys nobody knows are an error with a did-you-mean.
No torch here.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import yaml

from .errors import UserError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "profile.schema.json"

# vLLM engine/server arguments that a vLLM config.yaml may carry and that pagedeploy does not act on.
VLLM_IGNORED_KEYS = frozenset("""
    disable_log_requests enable_log_requests disable_log_stats trust_remote_code
    disable_custom_all_reduce download_dir revision code_revision tokenizer_revision tokenizer_mode
    skip_tokenizer_init max_parallel_loading_workers distributed_executor_backend worker_use_ray
    ray_workers_use_nsight num_gpu_blocks_override num_lookahead_slots enable_chunked_prefill
    max_num_partial_prefills max_long_partial_prefills long_prefill_token_threshold
    scheduler_delay_factor preemption_mode guided_decoding_backend disable_sliding_window
    use_v2_block_manager enable_lora max_loras max_lora_rank lora_extra_vocab_size lora_dtype
    max_cpu_loras long_lora_scaling_factors fully_sharded_loras lora_modules enable_prompt_adapter
    prompt_adapters uvicorn_log_level allow_credentials allowed_origins allowed_methods
    allowed_headers ssl_keyfile ssl_certfile ssl_ca_certs ssl_cert_reqs root_path middleware
    response_role chat_template_content_format return_tokens_as_token_ids
    disable_frontend_multiprocessing enable_auto_tool_choice tool_call_parser tool_parser_plugin
    reasoning_parser enable_reasoning max_log_len disable_fastapi_docs enable_prompt_tokens_details
    enable_server_load_tracking enable_request_id_headers enable_force_include_usage config_format
    hf_overrides hf_config_path hf_token rope_scaling rope_theta compilation_config
    kv_transfer_config worker_cls generation_config override_generation_config enable_sleep_mode
    calculate_kv_scales additional_config model_impl limit_mm_per_prompt mm_processor_kwargs
    disable_mm_preprocessor_cache speculative_config speculative_model num_speculative_tokens
    ignore_patterns qlora_adapter_name_or_path otlp_traces_endpoint collect_detailed_traces
    override_pooler_config pooler_config task runner logits_processor_pattern
    multi_step_stream_outputs num_scheduler_steps cuda_graph_sizes scheduling_policy scheduler_cls
    disable_async_output_proc async_scheduling data_parallel_size enable_expert_parallel
    tokenizer_pool_size tokenizer_pool_type prefix_caching_hash_algo structured_outputs_config
    api_server_count uds log_config_file headless quantization_param_path model_loader_extra_config
    pt_load_map_location use_tqdm_on_load disable_cascade_attn mamba_ssm_cache_dtype
    max_seq_len_to_capture_override enable_log_outputs max_num_partial_prefills
    """.split())

DTYPE_ALIASES = {"half": "float16", "float": "float32"}


@lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def schema_defaults() -> dict:
    return {k: p.get("default") for k, p in load_schema()["properties"].items() if k != "model"}


@dataclass
class Profile:
    model: str
    served_model_name: str | None = None
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    quantize_lm_head: bool = False
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    cpu_offload_gb: float = 0.0
    swap_space: float = 4.0
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_seq_len_to_capture: int = 8192
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    device: str = "auto"
    gpu: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_key_env: str | None = None
    chat_template: str | None = None
    seed: int = 0
    max_logprobs: int = 20
    # Where the profile came from; not profile keys.
    path: str = "<profile>"
    base_dir: str = "."
    explicit: frozenset[str] = field(default_factory=frozenset)   # keys the user wrote or --set
    locations: dict = field(default_factory=dict, repr=False)     # key -> (line, column), 1-based
    warnings: list[str] = field(default_factory=list, repr=False)

    def error(self, key: str, what: str, fix: str = "") -> UserError:
        """A UserError pointing at `key` where it was written (or at --set, or at the file)."""
        file, line, column = self.locations.get(key, (self.path, None, None))
        return UserError(what, fix, file=file, line=line, column=column, field=key)

    def resolve_path(self, value: str) -> Path:
        """A path written in the profile: relative ones are relative to the profile's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def settings(self) -> dict:
        """The profile keys and their values (defaults included)."""
        names = [f.name for f in fields(self) if f.name not in _META_FIELDS]
        return {n: getattr(self, n) for n in names}


_META_FIELDS = {"path", "base_dir", "explicit", "locations", "warnings"}


def snake(key: str) -> str:
    return key.strip().replace("-", "_")


# ---------------------------------------------------------------- loading

def load_profile(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"profile file {str(path)!r} does not exist",
                        "pass the path of a YAML profile, e.g. profiles/cpu-default.yaml",
                        file=str(path))
    text = path.read_text(encoding="utf-8")
    data, locations = parse_yaml(text, str(path))
    return build_profile(data, locations, str(path), str(path.resolve().parent), overrides)


def parse_yaml(text: str, file: str) -> tuple[dict, dict]:
    """(raw mapping, raw key -> {"key"/"value": (file, line, column)}), 1-based positions."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise UserError("the profile is empty", "write at least `model: smollm2-135m-instruct`",
                            file=file)
        if not isinstance(node, yaml.MappingNode):
            raise UserError("the profile must be a mapping of keys to values",
                            "write `key: value` lines, e.g. `model: qwen3-8b`",
                            file=file, line=node.start_mark.line + 1,
                            column=node.start_mark.column + 1)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"malformed YAML: {problem}",
                        "check the indentation, colons and quotes on that line",
                        file=file, line=mark.line + 1 if mark else None,
                        column=mark.column + 1 if mark else None) from None
    finally:
        loader.dispose()
    locations: dict = {}
    for key_node, value_node in node.value:
        key, mark = key_node.value, value_node.start_mark
        if key in locations:
            raise UserError(f"key {key!r} is written twice", "keep one of them",
                            file=file, line=key_node.start_mark.line + 1,
                            column=key_node.start_mark.column + 1, field=str(key))
        key_mark = key_node.start_mark
        locations[key] = {"value": (file, mark.line + 1, mark.column + 1),
                          "key": (file, key_mark.line + 1, key_mark.column + 1)}
    return data, locations


def build_profile(data: dict, raw_locations: dict, file: str, base_dir: str,
                  overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    known = load_schema()["properties"]
    values, locations, ignored = {}, {}, []
    for raw_key, value in data.items():
        key = snake(str(raw_key))
        marks = raw_locations.get(raw_key, {})
        where = marks.get("value", (file, None, None))
        if key in known:
            if key in values:
                at = marks.get("key", where)
                raise UserError(f"{raw_key!r} repeats a key already given in another spelling",
                                "keep one of them", file=at[0], line=at[1], column=at[2],
                                field=key)
            values[key], locations[key] = value, where
        elif key in VLLM_IGNORED_KEYS:
            ignored.append(str(raw_key))
        else:
            raise unknown_key_error(str(raw_key), marks.get("key", where))
    for key, value, where in parse_overrides(overrides):
        values[key], locations[key] = value, where
    validate_values(values, locations, file)
    profile = Profile(**normalize(values), path=file, base_dir=base_dir,
                      explicit=frozenset(values), locations=locations)
    if ignored:
        profile.warnings.append(f"warning: {file}: accepted but ignored (pagedeploy does not act "
                                f"on them): {', '.join(ignored)}")
    check_semantics(profile)
    return profile


def unknown_key_error(raw_key: str, where: tuple) -> UserError:
    known = list(load_schema()["properties"])
    close = difflib.get_close_matches(snake(raw_key), known, n=1, cutoff=0.6)
    fix = (f"did you mean {close[0]!r}?" if close
           else "remove it; the keys are listed in schemas/profile.schema.json")
    return UserError(f"unknown key {raw_key!r}", fix, file=where[0], line=where[1],
                     column=where[2], field=raw_key)


def parse_overrides(overrides) -> list[tuple[str, object, tuple]]:
    """`--set key=value` pairs; the value is read as YAML (8192 is a number, true a boolean)."""
    out = []
    for item in overrides:
        where = (f"--set {item}", None, None)
        if "=" not in item:
            raise UserError(f"--set {item!r} has no '='", "write --set key=value, "
                            "e.g. --set max_model_len=8192", file="--set")
        raw_key, raw_value = item.split("=", 1)
        key = snake(raw_key)
        if key not in load_schema()["properties"]:
            raise unknown_key_error(raw_key, where)
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError:
            value = raw_value
        out.append((key, value, where))
    return out


# ---------------------------------------------------------------- validation

def validate_values(values: dict, locations: dict, file: str) -> None:
    from jsonschema import Draft202012Validator  # ~0.1 s; only when a profile is loaded

    errors = list(Draft202012Validator(load_schema()).iter_errors(values))
    if not errors:
        return
    first = min(errors, key=lambda e: (locations.get(_error_key(e), (file, 0, 0))[1] or 0))
    key = _error_key(first)
    where = locations.get(key, (file, None, None))
    what, fix = describe_schema_error(first, key)
    raise UserError(what, fix, file=where[0], line=where[1], column=where[2], field=key)


def _error_key(error) -> str | None:
    if error.validator == "required":
        return None
    return str(error.absolute_path[0]) if error.absolute_path else None


def describe_schema_error(error, key: str | None) -> tuple[str, str]:
    """(what is wrong, the fix) for one jsonschema error, in words a user reads."""
    if error.validator == "required":
        return ("the required key 'model' is missing",
                "add `model:` with a folder, a .gguf file or a catalog name such as qwen3-8b")
    prop = load_schema()["properties"][key]
    value = error.instance
    example = prop.get("default")
    if error.validator == "enum" or "enum" in prop and error.validator != "type":
        choices = [c for c in prop["enum"] if c is not None]
        close = [] if isinstance(value, (int, float)) else difflib.get_close_matches(
            str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        fix = f"did you mean {close[0]}?" if close else f"use one of {', '.join(map(str, choices))}"
        return f"{value!r} is not one of the accepted values", fix
    if error.validator == "type":
        wanted = error.validator_value
        wanted = [w for w in wanted if w != "null"] if isinstance(wanted, list) else [wanted]
        noun = " or ".join(_ARTICLE.get(w, w) for w in wanted)
        return (f"{value!r} is a {_yaml_type(value)} but must be {noun}",
                f"write {noun}" + (f", e.g. {key}: {example}" if example is not None else ""))
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        return f"{value!r} is outside {_range_text(prop)}", f"use a value in {_range_text(prop)}"
    if error.validator == "minLength":
        return "the value is empty", f"write a non-empty {key}"
    return error.message, "see schemas/profile.schema.json"


_ARTICLE = {"integer": "an integer", "number": "a number", "string": "a string",
            "boolean": "a boolean (true or false)", "array": "a list"}


def _yaml_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _range_text(prop: dict) -> str:
    low = ("(" + str(prop["exclusiveMinimum"]) if "exclusiveMinimum" in prop
           else "[" + str(prop["minimum"]) if "minimum" in prop else "(-inf")
    high = (str(prop["exclusiveMaximum"]) + ")" if "exclusiveMaximum" in prop
            else str(prop["maximum"]) + "]" if "maximum" in prop else "inf)")
    return f"{low}, {high}"


def normalize(values: dict) -> dict:
    """Schema defaults filled in; aliases mapped to one spelling."""
    out = {**schema_defaults(), **values}
    for key in ("dtype", "kv_cache_dtype"):
        out[key] = DTYPE_ALIASES.get(out[key], out[key])
    out["quantization"] = {"none": None, "bitsandbytes": "nf4"}.get(out["quantization"],
                                                                    out["quantization"])
    if isinstance(out["served_model_name"], list):
        out["served_model_name"] = out["served_model_name"][0] if out["served_model_name"] else None
    for key in ("gpu_memory_utilization", "cpu_offload_gb", "swap_space"):
        out[key] = float(out[key])
    return out


def check_semantics(profile: Profile) -> None:
    """Rules the schema cannot say."""
    if profile.pipeline_parallel_size > 1:
        raise profile.error("pipeline_parallel_size",
                            f"{profile.pipeline_parallel_size} is not supported (no pipeline "
                            "parallelism)", "set pipeline_parallel_size: 1")
    if profile.max_num_batched_tokens < profile.max_num_seqs:
        raise profile.error("max_num_batched_tokens",
                            f"{profile.max_num_batched_tokens} is below max_num_seqs "
                            f"({profile.max_num_seqs}), so a full decode batch cannot run",
                            f"raise max_num_batched_tokens to at least {profile.max_num_seqs} "
                            "or lower max_num_seqs")
    if profile.quantize_lm_head and profile.quantization is None:
        raise profile.error("quantize_lm_head", "true needs 4-bit weights, but quantization is not set",
                            "set quantization: int4 (or nf4), or remove quantize_lm_head")
    if profile.gpu is not None:
        from .gpus import lookup_gpu
        try:
            lookup_gpu(profile.gpu)
        except UserError as e:
            raise profile.error("gpu", e.what, e.fix) from None
        if profile.device == "cpu":
            raise profile.error("gpu", f"gpu {profile.gpu!r} is set but device is cpu",
                                "remove gpu: or set device: cuda")


def check_against_model(profile: Profile, max_position_embeddings: int, model_name: str) -> int:
    """The max_model_len the plan uses: the profile's, or the model's when unset."""
    if profile.max_model_len is None:
        return max_position_embeddings
    if profile.max_model_len > max_position_embeddings:
        raise profile.error("max_model_len",
                            f"{profile.max_model_len} is above {model_name}'s "
                            f"max_position_embeddings ({max_position_embeddings})",
                            f"set max_model_len to {max_position_embeddings} or less")
    return profile.max_model_len
