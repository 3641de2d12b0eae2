"""`deploy bench profile.yaml [options]`: our engine against HF transformers `generate`, same
requests, same weights, same dtype and device, in the same run.

Modes:
  offline (default)   all --num-requests at once (our engine batches them continuously; HF runs
                      static batches of --hf-batch-size, padded, each to its longest output)
  --concurrency K     K requests in flight at a time (ours: a new one joins when one finishes;
                      HF: static batches of K)
  --batch-1           one 128-token prompt, 256 new tokens: time to first token and decode tok/s

The workload is nano-vllm's, drawn exactly so the totals match the GPU figures in docs/PERF.md:
rnd = random.Random(seed); per request a length rnd.randint(lo, hi), then that many ids
rnd.randint(1, 10000); after all prompts, each output length rnd.randint(lo, hi).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field

from .errors import UserError

BATCH1_PROMPT, BATCH1_OUTPUT = 128, 256


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class BenchResult:
    engine: str                      # "ours" | "hf"
    mode: str                        # "offline" | "concurrency-K" | "batch-1"
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    ttft_s: float | None = None      # batch-1: time to first token
    decode_tok_s: float | None = None
    # A later GPU issue fills this: achieved bytes/s (weights + KV read per step) over the GPU's.
    roofline_pct: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds

    def to_json(self) -> dict:
        return {**asdict(self), "output_tok_s": self.output_tok_s, "total_tok_s": self.total_tok_s}


# ---- workload -------------------------------------------------------------------------------
def parse_range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise UserError(f"{name} {text!r} is not a range", f"write it as MIN:MAX, e.g. {name} 100:1024") from None
    if not 1 <= lo_i <= hi_i:
        raise UserError(f"{name} {text!r} must satisfy 1 <= MIN <= MAX", f"e.g. {name} 100:1024")
    return lo_i, hi_i


def make_workload(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int],
                  seed: int, vocab_size: int | None = None) -> list[BenchRequest]:
    rnd = random.Random(seed)
    prompts = []
    for _ in range(num_requests):
        n = rnd.randint(*input_len)
        ids = [rnd.randint(1, 10000) for _ in range(n)]
        if vocab_size is not None and vocab_size <= 10000:   # tiny vocabularies: fold, same draws
            ids = [t % vocab_size for t in ids]
        prompts.append(ids)
    return [BenchRequest(p, rnd.randint(*output_len)) for p in prompts]


# ---- our engine -----------------------------------------------------------------------------
def run_ours(engine, requests: list[BenchRequest], concurrency: int | None, ignore_eos: bool,
             mode: str) -> BenchResult:
    from pagedeploy.runtime.sampling_params import SamplingParams

    pending = list(enumerate(requests))[::-1]
    in_flight, output_tokens = 0, 0
    limit = concurrency or len(requests)
    engine.stream = False                # throughput mode: only finished requests matter
    steps = 0
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and in_flight < limit:
            i, req = pending.pop()
            params = SamplingParams(temperature=0.0, max_tokens=req.output_len, ignore_eos=ignore_eos)
            engine.add_request(f"bench-{mode}-{i}", req.prompt_token_ids, params)
            in_flight += 1
        steps += 1
        for out in engine.step():
            if out.finished:
                in_flight -= 1
                output_tokens += len(out.outputs[0].token_ids)
    seconds = time.perf_counter() - start
    return BenchResult("ours", mode, len(requests), sum(len(r.prompt_token_ids) for r in requests),
                       output_tokens, seconds, extra={"preemptions": engine.stats().preemptions,
                                                      "steps": steps})


def batch1_ours(engine, request: BenchRequest) -> BenchResult:
    from pagedeploy.runtime.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
    engine.stream = True                 # the first streamed token times TTFT
    start = time.perf_counter()
    engine.add_request("bench-batch-1", request.prompt_token_ids, params)
    first = None
    while engine.has_unfinished():
        outs = engine.step()
        if first is None and outs:
            first = time.perf_counter()
    end = time.perf_counter()
    n = len(outs[0].outputs[0].token_ids)
    return _batch1_result("ours", request, n, start, first, end)


def _batch1_result(engine: str, request: BenchRequest, n: int, start: float, first: float,
                   end: float) -> BenchResult:
    return BenchResult(engine, "batch-1", 1, len(request.prompt_token_ids), n, end - start,
                       ttft_s=first - start, decode_tok_s=(n - 1) / (end - first))


# ---- HF transformers ------------------------------------------------------------------------
def load_hf_model(config, engine):
    """HF's model with our weights' source: the GGUF through HF's GGUF loader (converted once and
    cached), a folder as is, dummy weights copied from our model so both compute the same thing."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, config.dtype)
    if config.load_format == "gguf":
        folder = _hf_gguf_folder(config.model_path)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    elif config.load_format == "safetensors":
        model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=dtype)
    else:
        model = _hf_dummy_copy(config, engine, dtype)
    return model.to(config.device).eval()


def _hf_gguf_folder(path: str):
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from .gguf_meta import cache_dir, file_cache_key

    folder = cache_dir() / "hf-gguf" / file_cache_key(path)
    if not (folder / "config.json").exists():
        print(f"converting {path} with transformers' GGUF loader (once; cached in {folder}) ...")
        p = Path(path)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        # The weights are dequantized already; without this transformers refuses to save them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(str(tmp))
        tmp.replace(folder)
    return folder


def _hf_dummy_copy(config, engine, dtype):
    """An HF model of the same config; our dummy weights are overwritten with its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pagedeploy.runtime.loader import load_weights

    raw = {k: v for k, v in config.spec.config.items() if k not in ("model_type", "torch_dtype", "dtype")}
    hf_config = AutoConfig.for_model(config.spec.model_type, **raw)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    load_weights(engine.runner.model, model.state_dict().items(), source="the HF copy")
    return model


def run_hf(model, requests: list[BenchRequest], batch_size: int, ignore_eos: bool, eos_ids: list[int],
           mode: str) -> BenchResult:
    """Static batches, left-padded; a batch runs until its longest output is done (only the
    tokens each request asked for, up to its EOS, count as output)."""
    output_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        output_tokens += _hf_batch(model, requests[i:i + batch_size], ignore_eos, eos_ids)
    seconds = time.perf_counter() - start
    return BenchResult("hf", mode, len(requests), sum(len(r.prompt_token_ids) for r in requests),
                       output_tokens, seconds)


def _hf_batch(model, batch: list[BenchRequest], ignore_eos: bool, eos_ids: list[int]) -> int:
    import torch

    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        mask[row, width - len(r.prompt_token_ids):] = 1
    new = max(r.output_len for r in batch)
    eos = None if ignore_eos or not eos_ids else eos_ids
    with torch.inference_mode():
        out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)
    count = 0
    for row, r in enumerate(batch):
        tokens = out[row, width:width + r.output_len].tolist()
        stop = next((j + 1 for j, t in enumerate(tokens) if eos and t in eos), len(tokens))
        count += stop
    return count


def batch1_hf(model, request: BenchRequest) -> BenchResult:
    """TTFT = a 1-token generate (the prefill); decode rate from the full run minus that."""
    import torch

    ids = torch.tensor([request.prompt_token_ids], device=model.device)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=request.output_len,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        end = time.perf_counter()
    n = out.shape[1] - ids.shape[1]
    return _batch1_result("hf", request, n, start, start + ttft, end)


# ---- command --------------------------------------------------------------------------------
def parse_args(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deploy bench PROFILE", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", default="100:1024", help="prompt lengths MIN:MAX (uniform)")
    p.add_argument("--output-len", default="100:1024", help="output lengths MIN:MAX (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate the drawn output length")
    p.add_argument("--batch-1", action="store_true", help=f"one {BATCH1_PROMPT}-token prompt, "
                   f"{BATCH1_OUTPUT} new tokens: time to first token and decode tok/s")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at a time")
    p.add_argument("--hf-batch-size", type=int, default=8, help="HF static batch size in offline mode")
    p.add_argument("--engine", choices=["ours", "hf", "both"], default="ours")
    p.add_argument("--json", dest="json_path", default=None, help="write the results to this file")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override a profile key, e.g. --set dtype=bfloat16 (repeatable)")
    ns = p.parse_args(args)
    for name in ("num_requests", "concurrency", "hf_batch_size"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} is {value}", "give a positive number")
    return ns


def run_bench(profile_path: str, args: list[str]) -> int:
    import torch

    from pagedeploy.runtime.engine import LLMEngine
    from pagedeploy.runtime.llm import engine_config_from_profile
    from pagedeploy.runtime.tokenizer import eos_token_ids

    ns = parse_args(args)
    config = engine_config_from_profile(profile_path, ns.overrides)
    requests, mode = _requests(ns, config.spec.vocab_size)
    _check_fits(requests, config)
    print(f"bench: {config.served_model_name} ({config.load_format}, {config.dtype}, {config.device}, "
          f"{torch.get_num_threads()} threads), mode {mode}, {len(requests)} requests, "
          f"{sum(len(r.prompt_token_ids) for r in requests)} prompt tokens")
    engine = LLMEngine(config)
    results = []
    if ns.engine in ("ours", "both"):
        _warm_up_ours(engine)
        results.append(_measure_ours(engine, requests, ns, mode))
        _print(results[-1])
    if ns.engine in ("hf", "both"):
        hf = load_hf_model(config, engine)
        _warm_up_hf(hf)
        results.append(_measure_hf(hf, requests, ns, mode, eos_token_ids(config, engine.tokenizer)))
        _print(results[-1])
    ratio = _report_ratio(results)
    if ns.json_path:
        _write_json(ns.json_path, profile_path, config, mode, results, ratio)
    return 0


def _requests(ns: argparse.Namespace, vocab_size: int) -> tuple[list[BenchRequest], str]:
    if ns.batch_1:
        req = make_workload(1, (BATCH1_PROMPT, BATCH1_PROMPT), (BATCH1_OUTPUT, BATCH1_OUTPUT), ns.seed, vocab_size)
        return req, "batch-1"
    workload = make_workload(ns.num_requests, parse_range(ns.input_len, "--input-len"),
                             parse_range(ns.output_len, "--output-len"), ns.seed, vocab_size)
    return workload, f"concurrency-{ns.concurrency}" if ns.concurrency else "offline"


def _check_fits(requests: list[BenchRequest], config) -> None:
    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    if longest > config.max_model_len:
        raise UserError(f"the longest request needs {longest} tokens but max_model_len is {config.max_model_len}",
                        "shorten --input-len/--output-len or raise max_model_len with --set")


def _measure_ours(engine, requests, ns, mode) -> BenchResult:
    if ns.batch_1:
        result = batch1_ours(engine, requests[0])
    else:
        result = run_ours(engine, requests, ns.concurrency, ns.ignore_eos, mode)
    if engine.config.device == "cuda":
        result.roofline_pct = _roofline_pct(engine, requests, result)
    return result


def _roofline_pct(engine, requests: list[BenchRequest], r: BenchResult) -> float | None:
    """Measured time against the memory floor (launcher/roofline.py). Batch 1 counts its decode
    steps only (time to first token is reported on its own); the other modes the whole run."""
    from pagedeploy.launcher.gpus import detect_gpu
    from pagedeploy.launcher.roofline import decode_kv_read_bytes, roofline_percent

    gpu = detect_gpu()
    if gpu is None:
        return None
    runner = engine.runner
    cache = runner.kv_cache
    kv_per_token = cache.numel() // (cache.shape[2] * cache.shape[3]) * cache.element_size()
    weights = sum(t.numel() * t.element_size() for name, t in
                  [*runner.model.named_parameters(), *runner.model.named_buffers()] if "cos_sin" not in name)
    if r.decode_tok_s is not None:            # batch 1: decode of tokens 2..n
        n = r.output_tokens - 1
        kv = decode_kv_read_bytes([len(requests[0].prompt_token_ids) + 1], [n], kv_per_token)
        return roofline_percent(n / r.decode_tok_s, weights, n, kv, gpu.bandwidth_bytes_per_s)
    kv = decode_kv_read_bytes([len(q.prompt_token_ids) for q in requests], [q.output_len for q in requests],
                              kv_per_token)
    return roofline_percent(r.seconds, weights, r.extra["steps"], kv, gpu.bandwidth_bytes_per_s)


def _measure_hf(hf, requests, ns, mode, eos_ids) -> BenchResult:
    if ns.batch_1:
        return batch1_hf(hf, requests[0])
    return run_hf(hf, requests, ns.concurrency or ns.hf_batch_size, ns.ignore_eos, eos_ids, mode)


def _warm_up_ours(engine) -> None:
    """Prompts of several lengths: Triton specializes kernels on lengths (e.g. divisible by 16),
    so a first 128-token prefill would otherwise time a JIT compile, not the engine."""
    prompts = [list(range(1, n + 1)) for n in (4, 37, BATCH1_PROMPT)]
    run_ours(engine, [BenchRequest(p, 4) for p in prompts], None, True, "warm-up")
    run_ours(engine, [BenchRequest(prompts[-1][::-1], 4)], None, True, "warm-up")   # a batch of one


def _warm_up_hf(model) -> None:
    _hf_batch(model, [BenchRequest([1, 2, 3, 4], 4)], True, [])


def _print(r: BenchResult) -> None:
    line = (f"  {r.engine:>4}: {r.output_tokens} output tokens in {r.seconds:.2f} s = "
            f"{r.output_tok_s:.1f} output tok/s, {r.total_tok_s:.1f} total tok/s")
    if r.ttft_s is not None:
        line += f"; time to first token {r.ttft_s * 1000:.0f} ms, decode {r.decode_tok_s:.1f} tok/s"
    if r.roofline_pct is not None:
        line += f"; {r.roofline_pct:.0f}% of the roofline"
    print(line)


def _report_ratio(results: list[BenchResult]) -> float | None:
    by_engine = {r.engine: r for r in results}
    if len(by_engine) < 2:
        return None
    ours, hf = by_engine["ours"], by_engine["hf"]
    key = "decode_tok_s" if ours.decode_tok_s is not None else "output_tok_s"
    ratio = getattr(ours, key) / getattr(hf, key)
    print(f"  ours / hf: {ratio:.2f}x ({key.replace('_', ' ')})")
    return ratio


def _write_json(path: str, profile_path: str, config, mode: str, results: list[BenchResult],
                ratio: float | None) -> None:
    import torch

    doc = {"profile": profile_path, "model": config.served_model_name, "dtype": config.dtype,
           "device": config.device, "threads": torch.get_num_threads(), "mode": mode,
           "results": [r.to_json() for r in results], "ratio_ours_over_hf": ratio}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"  wrote {path}")
