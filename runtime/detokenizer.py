"""Incremental detokenization and the stop conditions that depend on tokens and text.

Text is decoded from a small window of recent tokens (TGI/vLLM's prefix/read offsets): a token
that ends inside a multi-byte character decodes to U+FFFD, so nothing is emitted until the
character is complete. Text that could still grow into a stop string is held back, and the stop
string itself is never returned (unless include_stop_str_in_output).
"""
from __future__ import annotations

from .sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def process(self, seq: Sequence, token_id: int) -> None:
        """Take the sequence's newest token (already appended): update text, maybe finish it."""
        p = seq.params
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            # The stop token stays in token_ids but not in the text (it is usually special).
            if p.include_stop_str_in_output and token_id in p.stop_token_ids:
                seq.text += self._decode_new(seq, p.skip_special_tokens)
            # stop_reason names a user-given stop token, as vLLM's does; EOS leaves it None.
            self._finish(seq, "stop", token_id if token_id in p.stop_token_ids else None)
            return
        seq.text += self._decode_new(seq, p.skip_special_tokens)
        if p.stop and self._check_stop_strings(seq):
            return
        if seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, "length", None)

    def _decode_new(self, seq: Sequence, skip_special: bool) -> str:
        if self.tokenizer is None:
            return ""            # a dummy model without a tokenizer: token ids only
        ids = seq.token_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip_special)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""            # an incomplete character (or nothing visible yet): wait
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return full[len(prefix):]

    def _check_stop_strings(self, seq: Sequence) -> bool:
        p = seq.params
        # Only the new text (plus a stop string's length of overlap) can contain a new match.
        start = max(0, seq.num_emitted_chars - max(len(s) for s in p.stop))
        best = None
        for stop in p.stop:
            pos = seq.text.find(stop, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is None:
            return False
        pos, stop = best
        seq.text = seq.text[:pos + len(stop)] if p.include_stop_str_in_output else seq.text[:pos]
        self._finish(seq, "stop", stop)
        return True

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason


def releasable_text_end(seq: Sequence) -> int:
    """How much of seq.text can be handed out: all of it once finished, else all but a tail that
    is a prefix of some stop string (it might still become one)."""
    if seq.finish_reason is not None or not seq.params.stop:
        return len(seq.text)
    hold = 0
    for stop in seq.params.stop:
        for k in range(min(len(stop) - 1, len(seq.text)), hold, -1):
            if seq.text.endswith(stop[:k]):
                hold = k
                break
    return len(seq.text) - hold
