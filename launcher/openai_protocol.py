"""OpenAI wire format, requests side: parse and validate /v1/completions and /v1/chat/completions
bodies into a GenerateRequest (token ids + SamplingParams).

Every user mistake becomes a ProtocolError naming the field, which the server answers with an
OpenAI-style error body (never a 500). The response shapes live in openai_responses.py.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from pagedeploy.runtime.sampling_params import SamplingParamError, SamplingParams

MAX_N = 128              # OpenAI's own limit on n
MAX_PROMPTS = 128        # prompts in one batched /v1/completions request
MAX_TOP_LOGPROBS = 20    # OpenAI's limit on chat top_logprobs
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Accepted so clients that always send them work, but only at their "off" value.
UNSUPPORTED_UNLESS_EMPTY = ("logit_bias", "tools", "functions", "suffix")


class ProtocolError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ModelContext:
    """What validation needs to know about the served model."""
    name: str
    max_model_len: int
    max_logprobs: int
    vocab_size: int
    tokenizer: object
    pool_tokens: int | None = None   # KV blocks × block size: one sequence can never hold more
    chat_template: str | None = None  # the profile's template; None: the tokenizer's own


# ---- typed field access ----------------------------------------------------------------------

_KINDS = {
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "boolean": (lambda v: isinstance(v, bool), "a boolean"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "array": (lambda v: isinstance(v, list), "an array"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def json_type(value) -> str:
    for kind, (test, name) in _KINDS.items():
        if kind != "number" and test(value):
            return name
    return "a number" if _KINDS["number"][0](value) else "null"


def type_error(param: str, kind: str, value) -> ProtocolError:
    return ProtocolError(400, f"Invalid type for '{param}': expected {_KINDS[kind][1]}, but got "
                              f"{json_type(value)} instead.", param=param, code="invalid_type")


class Body:
    """A request body with typed getters; `null` counts as absent, as in the OpenAI API."""

    def __init__(self, data: dict):
        self.data = data

    def get(self, name: str, kind: str, default=None):
        value = self.data.get(name)
        if value is None:
            return default
        if not _KINDS[kind][0](value):
            raise type_error(name, kind, value)
        return float(value) if kind == "number" else value

    def require(self, name: str, kind: str):
        if self.data.get(name) is None:
            raise ProtocolError(400, f"Missing required parameter: '{name}'.", param=name,
                                code="missing_required_parameter")
        return self.get(name, kind)


def parse_json(raw: bytes) -> Body:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"We could not parse the JSON body of your request ({e}); "
                                 "send a JSON object.") from None
    if not isinstance(data, dict):
        raise ProtocolError(400, f"The request body must be a JSON object, got {json_type(data)}.")
    return Body(data)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ProtocolError(400, message, param=param)


# ---- requests --------------------------------------------------------------------------------

@dataclass
class GenerateRequest:
    """One validated HTTP request: one engine request per prompt, each with params.n choices."""
    kind: str                      # "completion" | "chat"
    id: str
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def engine_requests(self) -> list[tuple[str, list[int], SamplingParams]]:
        return [(f"{self.id}-{i}", ids, self.params) for i, ids in enumerate(self.prompts)]

    @staticmethod
    def prompt_index(engine_request_id: str) -> int:
        return int(engine_request_id.rsplit("-", 1)[1])

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


def check_model(body: Body, ctx: ModelContext) -> str:
    """The `model` field must name the served model; absent means the served one (as vLLM does)."""
    model = body.get("model", "string", ctx.name)
    if model != ctx.name:
        raise ProtocolError(404, f"The model `{model}` does not exist; this server serves "
                                 f"`{ctx.name}` (see GET /v1/models).", param="model",
                            code="model_not_found")
    return model


def _check_unsupported(body: Body) -> None:
    for name in UNSUPPORTED_UNLESS_EMPTY:
        _check(not body.data.get(name), name, f"'{name}' is not supported by this server; leave it out.")
    fmt = body.get("response_format", "object", {"type": "text"})
    _check(fmt.get("type") == "text", "response_format",
           f"response_format type {fmt.get('type')!r} is not supported; only 'text' is.")


def _stream_options(body: Body, stream: bool) -> bool:
    options = body.get("stream_options", "object")
    if options is None:
        return False
    _check(stream, "stream_options", "stream_options is only allowed when stream is true.")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise type_error("stream_options.include_usage", "boolean", include)
    return include


def _stop(body: Body) -> list[str]:
    stop = body.data.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ProtocolError(400, "Invalid type for 'stop': expected a string or an array of strings.",
                            param="stop", code="invalid_type")
    return stop


def _int_list(body: Body, name: str) -> list[int]:
    values = body.get(name, "array", [])
    for v in values:
        if not _KINDS["integer"][0](v):
            raise type_error(f"{name}[]", "integer", v)
    return values


def _sampling_params(body: Body, ctx: ModelContext, max_tokens: int | None,
                     logprobs: int | None) -> SamplingParams:
    n = body.get("n", "integer", 1)
    _check(1 <= n <= MAX_N, "n", f"n must be between 1 and {MAX_N}, got {n}.")
    best_of = body.get("best_of", "integer", n)
    _check(best_of == n, "best_of", f"best_of must equal n ({n}) on this server, got {best_of}.")
    params = SamplingParams(
        n=n,
        temperature=body.get("temperature", "number", 1.0),
        top_p=body.get("top_p", "number", 1.0),
        top_k=body.get("top_k", "integer", -1),
        min_p=body.get("min_p", "number", 0.0),
        presence_penalty=body.get("presence_penalty", "number", 0.0),
        frequency_penalty=body.get("frequency_penalty", "number", 0.0),
        repetition_penalty=body.get("repetition_penalty", "number", 1.0),
        seed=body.get("seed", "integer"),
        max_tokens=max_tokens,
        stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=body.get("ignore_eos", "boolean", False),
        logprobs=logprobs,
        skip_special_tokens=body.get("skip_special_tokens", "boolean", True),
        include_stop_str_in_output=body.get("include_stop_str_in_output", "boolean", False),
    )
    try:
        params.validate(ctx.max_logprobs)
    except SamplingParamError as e:
        raise ProtocolError(400, str(e), param=e.param) from None
    return params


def _max_tokens(body: Body, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = body.get(name, "integer")
        if value is not None:
            _check(value >= 1, name, f"{name} must be at least 1, got {value}.")
            return value
    return None


def _fit_context(ctx: ModelContext, prompt_len: int, max_tokens: int | None, what: str) -> int:
    """Resolve max_tokens against max_model_len (and the KV pool, when smaller); refuse with
    both numbers when prompt + completion does not fit."""
    limit, name = ctx.max_model_len, "maximum context length"
    if ctx.pool_tokens is not None and ctx.pool_tokens < limit:
        limit, name = ctx.pool_tokens, "KV cache (the most one sequence can hold)"
    if max_tokens is None:
        if prompt_len < limit:
            return limit - prompt_len
        max_tokens = 1
    if prompt_len + max_tokens > limit:
        raise ProtocolError(400, f"This model's {name} is {limit} tokens, but you requested "
                                 f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, "
                                 f"{max_tokens} for the completion); reduce the {what} or max_tokens.",
                            param=what, code="context_length_exceeded")
    return max_tokens


def _common(body: Body) -> tuple[bool, bool]:
    _check_unsupported(body)
    stream = body.get("stream", "boolean", False)
    return stream, _stream_options(body, stream)


def parse_completion(body: Body, ctx: ModelContext) -> GenerateRequest:
    model = check_model(body, ctx)
    stream, include_usage = _common(body)
    texts, prompts = _prompts(body, ctx)
    echo = body.get("echo", "boolean", False)
    logprobs = body.get("logprobs", "integer")
    _check(logprobs is None or 0 <= logprobs <= ctx.max_logprobs, "logprobs",
           f"logprobs must be between 0 and {ctx.max_logprobs}, got {logprobs}.")
    _check(not (echo and logprobs is not None), "echo",
           "echo together with logprobs is not supported (prompt logprobs are not computed).")
    requested = _max_tokens(body, ("max_tokens",))
    requested = 16 if requested is None else requested   # the OpenAI default for completions
    for ids in prompts:
        _fit_context(ctx, len(ids), requested, "prompt")
    params = _sampling_params(body, ctx, requested, logprobs)
    return GenerateRequest("completion", f"cmpl-{uuid.uuid4().hex}", model, prompts, texts, params,
                           stream, include_usage, echo)


def _prompts(body: Body, ctx: ModelContext) -> tuple[list[str], list[list[int]]]:
    """A string, an array of strings, an array of token ids, or an array of those arrays."""
    prompt = body.data.get("prompt")
    if prompt is None:
        raise ProtocolError(400, "Missing required parameter: 'prompt'.", param="prompt",
                            code="missing_required_parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(_KINDS["integer"][0](t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ProtocolError(400, "Invalid 'prompt': expected a non-empty string, array of strings, "
                                 "array of token ids or array of token-id arrays.", param="prompt",
                            code="invalid_type")
    _check(len(prompt) <= MAX_PROMPTS, "prompt",
           f"At most {MAX_PROMPTS} prompts per request, got {len(prompt)}.")
    texts, prompts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids = _tokenizer(ctx, "prompt").encode(p)
            texts.append(p)
        else:
            ids = _token_ids(p, ctx)
            texts.append(ctx.tokenizer.decode(ids) if ctx.tokenizer is not None else "")
        _check(len(ids) > 0, "prompt", "The prompt is empty; send at least one token.")
        prompts.append(list(ids))
    return texts, prompts


def _tokenizer(ctx: ModelContext, param: str):
    if ctx.tokenizer is None:
        raise ProtocolError(400, f"Model `{ctx.name}` has no tokenizer (dummy weights); send the "
                                 "prompt to /v1/completions as an array of token ids.", param=param)
    return ctx.tokenizer


def _token_ids(p, ctx: ModelContext) -> list[int]:
    if not isinstance(p, list) or not all(_KINDS["integer"][0](t) for t in p):
        raise ProtocolError(400, "Invalid 'prompt': a batch must be all strings or all token-id arrays.",
                            param="prompt", code="invalid_type")
    bad = [t for t in p if not 0 <= t < ctx.vocab_size]
    _check(not bad, "prompt", f"Token id {bad[0] if bad else 0} is out of range; "
                              f"ids must be in [0, {ctx.vocab_size}).")
    return p


def parse_chat(body: Body, ctx: ModelContext) -> GenerateRequest:
    model = check_model(body, ctx)
    stream, include_usage = _common(body)
    _check(body.data.get("tool_choice") in (None, "none"), "tool_choice",
           "tool_choice is not supported by this server; leave it out.")
    messages = _messages(body)
    text = _apply_chat_template(_tokenizer(ctx, "messages"), messages,
                                body.get("add_generation_prompt", "boolean", True), ctx.chat_template)
    ids = ctx.tokenizer.encode(text, add_special_tokens=False)
    _check(len(ids) > 0, "messages", "The messages render to an empty prompt.")
    max_tokens = _fit_context(ctx, len(ids), _max_tokens(body, ("max_completion_tokens", "max_tokens")),
                              "messages")
    logprobs = None
    if body.get("logprobs", "boolean", False):
        logprobs = body.get("top_logprobs", "integer", 0)
        limit = min(MAX_TOP_LOGPROBS, ctx.max_logprobs)
        _check(0 <= logprobs <= limit, "top_logprobs",
               f"top_logprobs must be between 0 and {limit}, got {logprobs}.")
    else:
        _check(body.data.get("top_logprobs") is None, "top_logprobs",
               "top_logprobs needs logprobs set to true.")
    params = _sampling_params(body, ctx, max_tokens, logprobs)
    return GenerateRequest("chat", f"chatcmpl-{uuid.uuid4().hex}", model, [ids], [text], params,
                           stream, include_usage)


def _messages(body: Body) -> list[dict]:
    messages = body.require("messages", "array")
    _check(len(messages) > 0, "messages", "messages must hold at least one message.")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _message(m, where: str) -> dict:
    if not isinstance(m, dict):
        raise type_error(where, "object", m)
    role = m.get("role")
    _check(role in CHAT_ROLES, f"{where}.role",
           f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}.")
    content = m.get("content")
    if isinstance(content, list):   # content parts: only text is understood by a text model
        parts = []
        for j, part in enumerate(content):
            ok = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            _check(ok, f"{where}.content[{j}]",
                   f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}.")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ProtocolError(400, f"Invalid type for '{where}.content': expected a string or an array "
                                 f"of text parts, but got {json_type(content)} instead.",
                            param=f"{where}.content", code="invalid_type")
    return {"role": CHAT_ROLES[role], "content": content}


def _apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool,
                         template: str | None) -> str:
    extra = {"chat_template": template} if template else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **extra)
    except ValueError as e:   # no template at all: a model problem, stated for the user
        raise ProtocolError(400, f"The model's chat template cannot render these messages: {e}",
                            param="messages") from None
    except Exception as e:    # jinja TemplateError raised by the template itself (role order, …)
        if type(e).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):
            raise ProtocolError(400, f"The model's chat template refused these messages: {e}",
                                param="messages") from None
        raise
