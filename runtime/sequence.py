"""Sequence: one generated continuation of a request (a request with n > 1 has n of them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from .outputs import TokenLogprob
from .sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)   # identity semantics: sequences are used as dict keys and compared by `is`
class Sequence:
    seq_id: int
    token_ids: list[int]                 # prompt + output
    num_prompt_tokens: int
    params: SamplingParams
    request_id: str = ""
    index: int = 0                       # position among the request's n sequences
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0         # tokens whose K/V are in the cache
    # Tokens sampled on the device whose ids the host has not read yet (async scheduling): they
    # count as part of the sequence for scheduling, but token_ids holds only the known ones.
    num_pending: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of the computed full blocks
    num_cached_tokens: int = 0           # prompt tokens that came from the prefix cache on first admission
    fork_parent: "Sequence | None" = None  # n > 1: share this sibling's prompt blocks once it has them
    generator: torch.Generator | None = None   # per-request seed (None: global RNG)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    # detokenizer state
    text: str = ""                       # stable text decoded so far (may include a held-back tail)
    num_emitted_chars: int = 0           # characters of `text` already handed out
    num_emitted_tokens: int = 0          # output tokens already handed out
    num_emitted_logprobs: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self):
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens
        if self.params.logprobs is not None:
            self.logprobs = []

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        """Known plus pending tokens: what the scheduler plans with."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
