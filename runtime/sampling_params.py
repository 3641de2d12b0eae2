"""SamplingParams: how one request is sampled and when it stops (vLLM semantics)."""
from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamError(ValueError):
    """A user mistake in one sampling field; `param` names the field (the server reports it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0             # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1                      # -1 or 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16          # None: up to max_model_len
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None          # None = off; k = chosen token plus k top alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):   # OpenAI allows a single string
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def validate(self, max_logprobs: int) -> None:
        """Raise SamplingParamError with one sentence naming the field, the value and the fix."""
        _check(self.n >= 1, "n", f"n must be at least 1, got {self.n}.")
        _check(self.temperature >= 0.0, "temperature",
               f"temperature must be >= 0 (0 means greedy), got {self.temperature}.")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        _check(self.top_k >= -1, "top_k", f"top_k must be -1 or 0 (off) or a positive count, got {self.top_k}.")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}.")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be at least 1, got {self.max_tokens}.")
        _check(self.logprobs is None or 0 <= self.logprobs <= max_logprobs, "logprobs",
               f"logprobs must be between 0 and {max_logprobs}, got {self.logprobs}.")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               f"stop must be a list of non-empty strings, got {self.stop!r}.")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids!r}.")
        _check(self.seed is None or isinstance(self.seed, int), "seed",
               f"seed must be an integer, got {self.seed!r}.")


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamError(message, param)
