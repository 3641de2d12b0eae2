"""deploy bench: the workload generator, argument checks, and a whole run on a tiny model folder."""
import json

import pytest
from conftest import hf_model_from_config, random_state_dict, tiny_config
from paged_fakes import fake_engine

from pagedeploy.launcher.bench import BenchRequest, make_workload, parse_range, run_bench, run_ours
from pagedeploy.launcher.errors import UserError


def test_workload_totals_match_nano_vllm():
    workload = make_workload(256, (100, 1024), (100, 1024), seed=0)
    assert sum(len(r.prompt_token_ids) for r in workload) == 141_664
    assert sum(r.output_len for r in workload) == 150_245
    assert all(1 <= t <= 10000 for r in workload for t in r.prompt_token_ids)


def test_small_vocabularies_keep_the_same_lengths():
    big = make_workload(8, (5, 50), (5, 50), seed=1)
    small = make_workload(8, (5, 50), (5, 50), seed=1, vocab_size=160)
    assert [len(r.prompt_token_ids) for r in big] == [len(r.prompt_token_ids) for r in small]
    assert all(t < 160 for r in small for t in r.prompt_token_ids)


@pytest.mark.parametrize("text", ["abc", "10:5", "0:4", "3:x"])
def test_bad_ranges_are_user_errors(text):
    with pytest.raises(UserError, match="--input-len"):
        parse_range(text, "--input-len")
    assert parse_range("7", "--input-len") == (7, 7)


def test_concurrency_limits_requests_in_flight():
    engine = fake_engine(eos_bias=-30.0)
    seen = []
    step = engine.step

    def watched_step():
        seen.append(len(engine.requests))
        return step()
    engine.step = watched_step
    requests = [BenchRequest([1, 2, 3], 5) for _ in range(7)]
    result = run_ours(engine, requests, concurrency=3, ignore_eos=True, mode="concurrency-3")
    assert max(seen) == 3 and result.output_tokens == 35 and result.prompt_tokens == 21
    assert result.output_tok_s > 0
    engine.block_manager.check_all_free()


@pytest.mark.slow
def test_run_bench_end_to_end_on_a_tiny_folder(tmp_path, capsys):
    config = tiny_config("qwen3")
    folder = tmp_path / "tiny"
    hf_model_from_config(config, random_state_dict(config)).save_pretrained(str(folder))   # as HF writes it
    profile = tmp_path / "tiny.yaml"
    profile.write_text(f"model: {folder}\ndevice: cpu\ndtype: float32\nkv_cache_memory_bytes: 4000000\n"
                       "block_size: 16\nmax_model_len: 256\nmax_num_seqs: 8\nmax_num_batched_tokens: 256\n")
    out = tmp_path / "bench.json"
    code = run_bench(str(profile), ["--num-requests", "6", "--input-len", "5:40", "--output-len", "4:20",
                                    "--ignore-eos", "--concurrency", "3", "--engine", "both",
                                    "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    ours, hf = doc["results"]
    expected = sum(r.output_len for r in make_workload(6, (5, 40), (4, 20), 0, 160))
    assert ours["output_tokens"] == hf["output_tokens"] == expected
    assert doc["ratio_ours_over_hf"] == pytest.approx(ours["output_tok_s"] / hf["output_tok_s"])
    assert "ours / hf" in capsys.readouterr().out


@pytest.mark.slow
def test_dummy_weights_are_shared_with_the_hf_copy():
    import torch

    from pagedeploy.launcher.bench import load_hf_model
    from pagedeploy.launcher.model_spec import ModelSpec
    from pagedeploy.runtime.config import EngineConfig
    from pagedeploy.runtime.engine import LLMEngine
    from pagedeploy.runtime.sampling_params import SamplingParams

    spec = ModelSpec.from_config(tiny_config("llama3"), source="catalog")
    config = EngineConfig(spec=spec, num_blocks=32, block_size=16, load_format="dummy", max_model_len=256)
    engine = LLMEngine(config)
    hf = load_hf_model(config, engine)
    prompt = [5, 17, 42, 8, 99, 3]
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    ours = []
    while engine.has_unfinished():
        ours += [t for out in engine.step() for t in out.outputs[0].token_ids_delta]
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
