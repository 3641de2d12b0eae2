"""OpenAI wire format, responses side: the JSON shapes of results and stream chunks.

Shapes follow the OpenAI API reference: /v1/completions answers `text_completion` objects whose
logprobs are {tokens, token_logprobs, top_logprobs, text_offset}; /v1/chat/completions answers
`chat.completion` / `chat.completion.chunk` objects whose logprobs are
{content: [{token, logprob, bytes, top_logprobs}], refusal}.
"""
from __future__ import annotations

from functools import lru_cache

from pagedeploy.runtime.outputs import CompletionOutput, RequestOutput, TokenLogprob

from .openai_protocol import GenerateRequest


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: the printable stand-in character -> its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenStrings:
    """Token id -> the text and the exact bytes logprobs report for it (cached per id).

    Decoding one id alone loses bytes when a token is part of a UTF-8 character; for byte-level
    BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM2) the token's own spelling gives the exact bytes.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self.byte_level = False
        if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
            first = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a", add_special_tokens=False))[0]
            self.byte_level = isinstance(first, str) and first.startswith("Ġ")

    def text(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._lookup(token_id)[1]

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._spell(token_id)
        return hit

    def _spell(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:   # dummy weights: ids only, spelled as vLLM does
            raw = f"token_id:{token_id}".encode()
        elif self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = byte_decoder()
            if isinstance(piece, str) and piece and all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
            else:
                raw = self.tokenizer.decode([token_id]).encode()
        else:
            raw = self.tokenizer.decode([token_id]).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseBuilder:
    """Turns RequestOutputs into OpenAI JSON for one GenerateRequest (whole or as stream chunks)."""

    def __init__(self, req: GenerateRequest, tokens: TokenStrings):
        self.req, self.tokens = req, tokens
        self.chat = req.kind == "chat"
        self._prompt_tokens: dict[int, int] = {}
        self._completion_tokens: dict[int, int] = {}
        self._text_offset: dict[int, int] = {}
        self._started: set[int] = set()
        self._done: set[int] = set()

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.req.id, "object": kind, "created": self.req.created,
                "model": self.req.model, "choices": choices}

    def usage(self) -> dict:
        return usage(sum(self._prompt_tokens.values()), sum(self._completion_tokens.values()))

    def _account(self, prompt_index: int, out: RequestOutput) -> None:
        self._prompt_tokens[prompt_index] = out.num_prompt_tokens
        for o in out.outputs:
            self._completion_tokens[self._choice_index(prompt_index, o)] = len(o.token_ids)

    def _choice_index(self, prompt_index: int, o: CompletionOutput) -> int:
        return prompt_index * self.req.params.n + o.index

    # whole response
    def response(self, finals: dict[int, RequestOutput]) -> dict:
        choices = []
        for p, out in sorted(finals.items()):
            self._account(p, out)
            for o in sorted(out.outputs, key=lambda o: o.index):
                choices.append(self._choice(self._choice_index(p, o), p, o, o.text, o.logprobs))
        body = self._envelope(choices, chunk=False)
        body["usage"] = self.usage()
        return body

    def _choice(self, index: int, prompt_index: int, o: CompletionOutput, text: str,
                logprobs: list[TokenLogprob] | None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": self._chat_logprobs(logprobs), "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason}
        if self.req.echo:
            text = self.req.prompt_texts[prompt_index] + text
        return {"index": index, "text": text, "logprobs": self._completion_logprobs(index, logprobs),
                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}

    # streaming
    def role_chunks(self) -> list[dict]:
        """Chat streams open each choice with the assistant role, before any token."""
        if not self.chat:
            return []
        choices = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(self.req.num_choices)]
        return [self._chunk([c]) for c in choices]

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[dict]:
        self._account(prompt_index, out)
        result = []
        for o in out.outputs:
            index = self._choice_index(prompt_index, o)
            if index in self._done or not (o.text_delta or o.token_ids_delta or o.finish_reason):
                continue
            if o.finish_reason:
                self._done.add(index)
            result.append(self._chunk([self._delta_choice(index, prompt_index, o)]))
        return result

    def _delta_choice(self, index: int, prompt_index: int, o: CompletionOutput) -> dict:
        text = o.text_delta
        if self.chat:
            return {"index": index, "delta": {"content": text} if text else {},
                    "logprobs": self._chat_logprobs(o.logprobs_delta), "finish_reason": o.finish_reason}
        if self.req.echo and index not in self._started:
            text = self.req.prompt_texts[prompt_index] + text
        self._started.add(index)
        return {"index": index, "text": text,
                "logprobs": self._completion_logprobs(index, o.logprobs_delta),
                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}

    def _chunk(self, choices: list[dict]) -> dict:
        body = self._envelope(choices, chunk=True)
        if self.req.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict:
        body = self._envelope([], chunk=True)
        body["usage"] = self.usage()
        return body

    # logprobs
    def _completion_logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self._text_offset.get(index, 0)
        for e in entries:
            token = self.tokens.text(e.token_id)
            result["tokens"].append(token)
            result["token_logprobs"].append(e.logprob)
            top: dict[str, float] = {}
            for t, lp in e.top:   # best first: two ids with one spelling keep the better logprob
                top.setdefault(self.tokens.text(t), lp)
            top.setdefault(token, e.logprob)
            result["top_logprobs"].append(top)
            result["text_offset"].append(offset)
            offset += len(token)
        self._text_offset[index] = offset
        return result

    def _chat_logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        return {"content": [dict(self._token_entry(e.token_id, e.logprob),
                                 top_logprobs=[self._token_entry(t, lp) for t, lp in e.top])
                            for e in entries], "refusal": None}

    def _token_entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.tokens.text(token_id), "logprob": logprob,
                "bytes": self.tokens.bytes(token_id)}
