"""LLMEngine: the online core. add_request / step / abort; the server drives it from one thread.

One step = schedule a batch, run the model once on it, advance the sequences, sample the next
token of every sequence that reached its end, detokenize, apply stop conditions and release the
finished sequences' blocks. Not thread-safe by itself.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import Detokenizer, releasable_text_end
from .outputs import CompletionOutput, EngineStats, RequestOutput
from .sampler import SampledTokens, Sampler
from .sampling_params import SamplingParamError, SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .tokenizer import eos_token_ids


class RequestError(ValueError):
    """A request the engine refuses; the message is one user-facing sentence, `param` the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, runner=None, tokenizer=None):
        """`runner` and `tokenizer` default to the real ModelRunner and the model's tokenizer;
        tests pass their own."""
        self.config = config
        if tokenizer is None:
            from .tokenizer import load_tokenizer
            tokenizer = load_tokenizer(config)
        self.tokenizer = tokenizer           # None for dummy models without one: token ids only
        if runner is None:
            from .model_runner import ModelRunner
            runner = ModelRunner(config)
        self.runner = runner
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching,
                                          config.num_swap_blocks)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler()
        self.detokenizer = Detokenizer(tokenizer, set(eos_token_ids(config, tokenizer)), config.max_model_len)
        self.requests: dict[str, Request] = {}
        # False: step() returns only finished requests. Offline callers want no per-token deltas,
        # and building them for every running request is most of a large batch's host time.
        self.stream = True
        self._seq_ids = itertools.count()
        # Read a step's sampled tokens one step late, so the host's work overlaps the device's.
        # Only worth it where the model runs asynchronously to the host (CUDA).
        self.async_scheduling = config.async_scheduling
        self._in_flight: SampledTokens | None = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request_id {request_id!r} is already in use; give each request a unique id.",
                               "request_id")
        try:
            params.validate(self.config.max_logprobs)
        except SamplingParamError as e:
            raise RequestError(str(e), e.param) from None
        token_ids = self._prompt_token_ids(prompt)
        params = self._resolve_max_tokens(params, len(token_ids))
        self._check_fits_pool(len(token_ids) + params.max_tokens)
        seqs = [self._new_seq(request_id, token_ids, params, i) for i in range(params.n)]
        for seq in seqs[1:]:
            seq.fork_parent = seqs[0]
        for seq in seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = Request(request_id, prompt if isinstance(prompt, str) else None,
                                            token_ids, seqs)
        self.prompt_tokens_total += len(token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._output(req)

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch. With async scheduling the batch's sampled tokens are read on
        the next call, after that call has queued its own batch: the GPU computes step N while
        the host turns step N-1's tokens into outputs and schedules step N+1."""
        batch = self.scheduler.schedule()
        if batch.swap_out or batch.swap_in:    # KV blocks to/from the CPU swap pool, before the model runs
            self.runner.swap(batch.swap_out, batch.swap_in)
        seqs = [item.seq for item in batch.items if item.need_logits]   # those that sample
        logits = self._execute(batch, seqs) if batch else None
        changed = self._read_in_flight()
        if batch:
            self._advance(batch)
            sampled = self._sample(seqs, logits)
            if self.async_scheduling:
                self._in_flight = sampled
            else:
                self._append_sampled(sampled, changed)
        elif not changed:
            assert not self.scheduler.has_unfinished(), "scheduler stalled with requests left"
        return [self._output(req) for req in changed.values() if self.stream or req.finished]

    def _execute(self, batch, seqs: list[Sequence]) -> torch.Tensor:
        return self.runner.execute(batch.items, self._in_flight,
                                   float32=not self.sampler.argmax_only(seqs))

    def _advance(self, batch) -> None:
        """The batch's tokens are in the cache now: count them and hash the blocks they filled."""
        for item in batch.items:
            if item.seq.is_finished:     # finished by the tokens just read; its blocks are gone
                continue
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(item.seq)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> SampledTokens | None:
        assert logits.shape[0] == len(seqs), "the runner must return one logits row per need_logits item"
        if not seqs:
            return None
        for seq in seqs:
            seq.num_pending += 1
        return self.sampler.sample(logits, seqs)

    def _read_in_flight(self) -> dict[str, Request]:
        changed: dict[str, Request] = {}
        if self._in_flight is not None:
            self._append_sampled(self._in_flight, changed)
            self._in_flight = None
        return changed

    def _append_sampled(self, sampled: SampledTokens | None, changed: dict[str, Request]) -> None:
        if sampled is None:
            return
        result = sampled.resolve()
        for seq, token_id, logprob in zip(sampled.seqs, result.token_ids, result.logprobs):
            seq.num_pending -= 1
            if seq.is_finished:          # aborted, or stopped while this token was computed
                continue
            self._append(seq, token_id, logprob)
            changed[seq.request_id] = self.requests[seq.request_id]

    def _append(self, seq: Sequence, token_id: int, logprob) -> None:
        seq.append_token(token_id)
        if logprob is not None:
            seq.logprobs.append(logprob)
        self.generation_tokens_total += 1
        self.detokenizer.process(seq, token_id)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=bm.usage(), num_free_blocks=bm.num_free_blocks, num_blocks=bm.num_blocks,
            preemptions=self.scheduler.preemptions, prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            swap_outs=self.scheduler.swap_outs, swap_ins=self.scheduler.swap_ins,
            num_swapped=self.scheduler.num_swapped, num_swapped_blocks=bm.num_swapped_blocks,
            num_swap_blocks=bm.swap.num_blocks)

    # ---- outputs ----------------------------------------------------------------------------
    def _output(self, req: Request) -> RequestOutput:
        outputs = [self._completion(seq) for seq in req.seqs]
        finished = req.finished
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt_token_ids, outputs, finished,
                             req.seqs[0].num_cached_tokens, req.prompt)

    @staticmethod
    def _completion(seq: Sequence) -> CompletionOutput:
        end = releasable_text_end(seq)
        assert end >= seq.num_emitted_chars, "text already streamed was taken back"
        text_delta = seq.text[seq.num_emitted_chars:end]
        seq.num_emitted_chars = end
        output_ids = seq.output_token_ids
        ids_delta = output_ids[seq.num_emitted_tokens:]
        seq.num_emitted_tokens = len(output_ids)
        lp_delta = None
        if seq.logprobs is not None:
            lp_delta = seq.logprobs[seq.num_emitted_logprobs:]
            seq.num_emitted_logprobs = len(seq.logprobs)
        return CompletionOutput(seq.index, text_delta, ids_delta, lp_delta, seq.finish_reason,
                                seq.text[:end], output_ids, seq.logprobs, seq.stop_reason)

    # ---- admission checks -------------------------------------------------------------------
    def _prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"model {self.config.served_model_name!r} has no tokenizer (dummy weights); "
                                   "send the prompt as a list of token ids.", "prompt")
            token_ids = list(self.tokenizer.encode(prompt))
        else:
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise RequestError("prompt is empty; send at least one token of text.", "prompt")
        vocab = self.config.spec.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt has token id {bad[0]} outside the vocabulary [0, {vocab}); "
                               "send ids the model's tokenizer produced.", "prompt")
        return token_ids

    def _resolve_max_tokens(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        limit = self.config.max_model_len
        if prompt_len >= limit:
            raise RequestError(f"prompt has {prompt_len} tokens but max_model_len is {limit}; "
                               "shorten the prompt or raise max_model_len in the profile.", "prompt")
        if params.max_tokens is None:
            return dataclasses.replace(params, max_tokens=limit - prompt_len)
        if prompt_len + params.max_tokens > limit:
            raise RequestError(f"max_tokens {params.max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                               f"max_model_len {limit}; ask for at most {limit - prompt_len} tokens.",
                               "max_tokens")
        return params

    def _check_fits_pool(self, num_tokens: int) -> None:
        """A sequence that could never fit the pool alone would be preempted forever."""
        bm = self.block_manager
        if bm.blocks_for(num_tokens) > bm.num_blocks:
            raise RequestError(f"prompt + max_tokens = {num_tokens} tokens needs {bm.blocks_for(num_tokens)} KV "
                               f"blocks but the pool has {bm.num_blocks}; lower max_tokens or give the KV "
                               "cache more memory in the profile.", "max_tokens")

    def _new_seq(self, request_id: str, token_ids: list[int], params: SamplingParams, index: int) -> Sequence:
        seq = Sequence(next(self._seq_ids), list(token_ids), len(token_ids), params,
                       request_id=request_id, index=index)
        if params.seed is not None:
            # Sibling i of a seeded request gets its own stream, derived from (seed, i).
            seed = params.seed if index == 0 else hash((params.seed, index))
            seq.generator = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        return seq
