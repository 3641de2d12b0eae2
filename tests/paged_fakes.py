"""Test doubles for the paged runtime: a byte tokenizer and a fake "model" that really uses the
paged KV cache, so scheduling, block-table, prefix-cache and preemption bugs change its output.

FakePagedRunner stores each token id (and its position) into a slot pool through the block tables,
exactly as the real runner stores K/V, and computes the next-token logits only from what it reads
back through the block table. The reference `expected_logits(context)` needs no cache at all, so a
wrong slot, a corrupted shared block or a bad prefix hit shows up as a different token.
"""
from __future__ import annotations

import hashlib

import torch

from pagedeploy.launcher.model_spec import ModelSpec
from pagedeploy.runtime.config import EngineConfig

VOCAB = 260            # 256 byte tokens + specials
EOS_ID = 256
SPECIAL = {256: "<eos>", 257: "<pad>", 258: "<sep>", 259: "<x>"}


class ByteTokenizer:
    """Token id = one UTF-8 byte; multi-byte characters span several tokens (like byte BPE)."""
    eos_token_id = EOS_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for t in ids:
            if t < 256:
                buf.append(t)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(SPECIAL[t])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def expected_logits(context: list[int], eos_bias: float = -4.0) -> torch.Tensor:
    """Deterministic logits for the token after `context` (a pseudo-random function of it)."""
    digest = hashlib.blake2b(str(context).encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    logits = torch.randn(VOCAB, generator=g) * 3.0
    logits[257:] = -30.0           # never pad/sep/x
    logits[EOS_ID] += eos_bias
    return logits


class FakePagedRunner:
    def __init__(self, config: EngineConfig, eos_bias: float = -4.0):
        self.block_size = config.block_size
        slots = config.num_blocks * config.block_size
        self.cache_tokens = torch.full((slots,), -1, dtype=torch.long)
        self.cache_pos = torch.full((slots,), -1, dtype=torch.long)
        self.eos_bias = eos_bias
        self.num_calls = 0
        self.num_tokens = 0

    def _slot(self, block_table: list[int], pos: int) -> int:
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, items, pending=None, float32=True) -> torch.Tensor:
        """`pending`: the previous step's SampledTokens (async scheduling), whose device tensor
        holds the input tokens the host does not know yet, as the real runner reads them."""
        self.num_calls += 1
        rows = []
        for item in items:
            seq, start = item.seq, item.seq.num_computed_tokens
            self.num_tokens += item.num_new_tokens
            for pos in range(start, start + item.num_new_tokens):
                slot = self._slot(seq.block_table, pos)
                if pos < len(seq.token_ids):
                    token = seq.token_ids[pos]
                else:
                    assert pos == len(seq.token_ids) and seq.num_pending == 1, "input token unknown"
                    token = int(pending.token_ids[pending.row_of[seq.seq_id]])
                self.cache_tokens[slot] = token
                self.cache_pos[slot] = pos
            if item.need_logits:
                end = start + item.num_new_tokens
                context = []
                for pos in range(end):
                    slot = self._slot(seq.block_table, pos)
                    assert self.cache_pos[slot] == pos, "cache slot holds another position"
                    context.append(int(self.cache_tokens[slot]))
                rows.append(expected_logits(context, self.eos_bias))
        return torch.stack(rows) if rows else torch.empty(0, VOCAB)


def fake_spec() -> ModelSpec:
    return ModelSpec.from_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "eos_token_id": EOS_ID}, name="fake")


# test_engine.py runs every case both ways: sampled tokens read at once (as on the CPU) and one
# step late (async scheduling, as on CUDA).
ASYNC_SCHEDULING = False


def fake_config(**overrides) -> EngineConfig:
    values = dict(num_blocks=64, block_size=4, max_model_len=512, max_num_seqs=16,
                  max_num_batched_tokens=64, load_format="dummy", async_scheduling=ASYNC_SCHEDULING)
    values.update(overrides)
    return EngineConfig(spec=fake_spec(), **values)


def fake_engine(eos_bias: float = -4.0, **overrides):
    from pagedeploy.runtime.engine import LLMEngine
    config = fake_config(**overrides)
    return LLMEngine(config, runner=FakePagedRunner(config, eos_bias), tokenizer=ByteTokenizer())


def reference_greedy(prompt: list[int], max_tokens: int, eos_bias: float = -4.0,
                     ignore_eos: bool = False) -> list[int]:
    """What greedy decoding must produce, computed without any cache or scheduler."""
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        t = int(expected_logits(tokens, eos_bias).argmax())
        out.append(t)
        tokens.append(t)
        if t == EOS_ID and not ignore_eos:
            break
    return out


def run_to_completion(engine, max_steps: int = 100_000) -> dict:
    """Step until idle; returns request_id -> final RequestOutput."""
    finals = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return finals
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    raise AssertionError("engine did not finish")
