"""What the engine hands back: per-request outputs (deltas for streaming, totals) and engine stats."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Logprob of one sampled token under the raw model distribution, with the top alternatives."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token_id, logprob), best first


@dataclass
class CompletionOutput:
    index: int                                   # which of the request's n sequences
    text_delta: str                              # text added by this step
    token_ids_delta: list[int]                   # tokens added by this step
    logprobs_delta: list[TokenLogprob] | None    # one per token in token_ids_delta; None when not asked
    finish_reason: str | None                    # None while running, then "stop" | "length" | "abort"
    text: str                                    # all text so far
    token_ids: list[int]                         # all generated tokens so far
    logprobs: list[TokenLogprob] | None = None   # all logprobs so far
    stop_reason: str | int | None = None         # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0                   # prompt tokens served from the prefix cache
    prompt: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float                  # fraction of KV blocks in use (0..1)
    num_free_blocks: int
    num_blocks: int
    preemptions: int
    prefix_queries: int              # prompt tokens looked up in the prefix cache (as vLLM counts)
    prefix_hits: int                 # of which were found cached
    prompt_tokens_total: int
    generation_tokens_total: int
    swap_outs: int = 0               # preemptions that swapped the KV to the CPU pool (the rest recomputed)
    swap_ins: int = 0
    num_swapped: int = 0             # sequences waiting in the CPU pool now
    num_swapped_blocks: int = 0      # CPU blocks they hold
    num_swap_blocks: int = 0         # the CPU pool's size
