"""GPU end-to-end check, one call on the device machine (see docs/PERF.md for how it is run).

1. Correctness, random weights, float32: greedy tokens of our engine on CUDA (CUDA graphs on, and
   eager; tokens read one step late, the CUDA default, and at once; one prompt at a time, which
   takes the batch-1 fused-GEMV path) equal our engine on the CPU reference path and HF
   transformers `generate` on CUDA, for
   tiny Qwen3 / Llama-3 (llama3 rope) / Qwen2 (bias) / Mistral (window) configs and a Qwen3 with
   real head sizes. Also bf16 on CUDA vs HF bf16 (reported as the share of matching tokens).
2. The plan's CUDA-graph term against the measured pool of a Qwen3-0.6B runner.
Prints a table last; writes details to $OUT/e2e.json.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import hf_model_from_config, random_state_dict, tiny_config, write_hf_folder  # noqa: E402

from pagedeploy.launcher.model_spec import ModelSpec  # noqa: E402
from pagedeploy.runtime.config import EngineConfig  # noqa: E402
from pagedeploy.runtime.llm import LLM  # noqa: E402
from pagedeploy.runtime.sampling_params import SamplingParams  # noqa: E402

NEW_TOKENS = 32
REAL_HEADS = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=4096, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                  architectures=["Qwen3ForCausalLM"], model_type="qwen3", torch_dtype="float32",
                  use_sliding_window=False, bos_token_id=None, eos_token_id=None)


def prompts_for(vocab: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 33, 64, 100]
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# Every sampling feature at once, seeded: two runs must give the same tokens (on CUDA too).
SAMPLED = SamplingParams(n=2, temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, presence_penalty=0.5,
                         repetition_penalty=1.1, seed=7, logprobs=2, max_tokens=NEW_TOKENS, ignore_eos=True)


def ours(folder: Path, config: dict, device: str, dtype: str, eager: bool, prompts,
         params: SamplingParams = GREEDY, async_scheduling: bool | None = None,
         one_at_a_time: bool = False) -> list[list[int]]:
    spec = ModelSpec.from_config(config, source="folder", path=str(folder))
    cfg = EngineConfig(spec=spec, num_blocks=256, block_size=16, load_format="safetensors",
                       model_path=str(folder), device=device, dtype=dtype, enforce_eager=eager,
                       max_model_len=512, max_num_seqs=8, max_num_batched_tokens=256,
                       async_scheduling=async_scheduling)
    llm = LLM(cfg)
    if one_at_a_time:   # batch-1 decode steps: the fused GEMV path on CUDA
        outs = [o for p in prompts for o in llm.generate([p], params)]
    else:
        outs = llm.generate(prompts, params)
    del llm
    torch.cuda.empty_cache()
    return [c.token_ids for o in outs for c in o.outputs]


def hf(config: dict, state: dict, dtype: torch.dtype, prompts) -> list[list[int]]:
    model = hf_model_from_config(config, state).to("cuda", dtype)
    result = []
    with torch.inference_mode():
        for p in prompts:  # one at a time: no padding effects in the oracle
            ids = torch.tensor([p], device="cuda")
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
            result.append(out[0, len(p):].tolist())
    return result


def match_share(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of tokens equal up to each sequence's first difference (later ones follow from it)."""
    same = 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if u != v:
                break
            same += 1
    return same / sum(len(x) for x in a)


def check_model(name: str, config: dict) -> dict:
    state = random_state_dict(config, seed=0)
    prompts = prompts_for(config["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_hf_folder(Path(tmp), config, state)
        cpu = ours(folder, config, "cpu", "float32", True, prompts)
        gpu_graph = ours(folder, config, "cuda", "float32", False, prompts)
        gpu_eager = ours(folder, config, "cuda", "float32", True, prompts)
        gpu_sync = ours(folder, config, "cuda", "float32", False, prompts, async_scheduling=False)
        gpu_single = ours(folder, config, "cuda", "float32", False, prompts, one_at_a_time=True)
        bf16_single = ours(folder, config, "cuda", "bfloat16", False, prompts, one_at_a_time=True)
        sampled = [ours(folder, config, "cuda", "float32", False, prompts, SAMPLED) for _ in range(2)]
        gpu_bf16 = ours(folder, config, "cuda", "bfloat16", False, prompts)
    ref = hf(config, state, torch.float32, prompts)
    ref_bf16 = hf(config, state, torch.bfloat16, prompts)
    return {"model": name,
            "cuda graphs == cpu": gpu_graph == cpu, "cuda eager == cpu": gpu_eager == cpu,
            "cuda sync == cpu": gpu_sync == cpu, "cuda batch-1 == cpu": gpu_single == cpu,
            "seeded sampling repeats": sampled[0] == sampled[1],
            "cuda fp32 == hf cuda": gpu_graph == ref, "cpu == hf": cpu == ref,
            "bf16 share == hf bf16": round(match_share(gpu_bf16, ref_bf16), 3),
            "bf16 batch-1 share == hf bf16": round(match_share(bf16_single, ref_bf16), 3)}


def graph_memory() -> dict:
    """Measured CUDA-graph pool of a Qwen3-0.6B runner vs the plan's estimate."""
    from pagedeploy.launcher.catalog import catalog_config
    from pagedeploy.runtime.model_runner import ModelRunner

    spec = ModelSpec.from_config(catalog_config("qwen3-0.6b"), source="catalog")
    cfg = EngineConfig(spec=spec, num_blocks=4096, load_format="dummy", device="cuda",
                       dtype="bfloat16", enforce_eager=False, max_model_len=40960, max_num_seqs=1024)
    t = time.perf_counter()
    runner = ModelRunner(cfg)
    seconds = time.perf_counter() - t
    measured = runner.cuda_graph_bytes()
    del runner
    torch.cuda.empty_cache()
    return {"qwen3-0.6b graph pool bytes": measured, "runner start s": round(seconds, 1)}


def main() -> int:
    rows = []
    for name in ("qwen3", "llama3", "qwen2", "mistral"):
        rows.append(check_model(name, tiny_config(name)))
        print(rows[-1], flush=True)
    rows.append(check_model("qwen3-real-heads", dict(REAL_HEADS)))
    print(rows[-1], flush=True)
    try:
        memory = graph_memory()
    except Exception as exc:  # report, do not hide the correctness table
        memory = {"error": repr(exc)}
    out = os.environ.get("OUT")
    if out:
        Path(out, "e2e.json").write_text(json.dumps({"rows": rows, "memory": memory}, indent=1))
    print("\nmodel | " + " | ".join(k for k in rows[0] if k != "model"))
    for r in rows:
        print(r["model"] + " | " + " | ".join(str(v) for k, v in r.items() if k != "model"))
    print(memory)
    ok = all(r["cuda graphs == cpu"] and r["cuda eager == cpu"] and r["cuda sync == cpu"]
             and r["cuda batch-1 == cpu"] and r["seeded sampling repeats"]
             and r["cuda fp32 == hf cuda"] for r in rows)
    print("E2E", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
