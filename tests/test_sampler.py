"""Sampler: greedy exactness, seeds independent of batching, truncation rules, penalties, logprobs."""
import pytest
import torch

from pagedeploy.runtime.sampler import Sampler
from pagedeploy.runtime.sampling_params import SamplingParams
from pagedeploy.runtime.sequence import Sequence

VOCAB = 50


def seq(params: SamplingParams, prompt=(1, 2, 3), output=(), seed=None) -> Sequence:
    s = Sequence(0, list(prompt) + list(output), len(prompt), params)
    if seed is not None:
        s.generator = torch.Generator().manual_seed(seed)
    return s


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_rows_are_the_exact_argmax_even_beside_random_rows():
    x = logits(4)
    seqs = [seq(SamplingParams(temperature=0.0)), seq(SamplingParams(temperature=1.0)),
            seq(SamplingParams(temperature=0.0)), seq(SamplingParams(temperature=0.7, top_p=0.5))]
    out = Sampler()(x, seqs).token_ids
    assert out[0] == int(x[0].argmax()) and out[2] == int(x[2].argmax())


def test_same_seed_gives_the_same_tokens_alone_and_batched():
    params = SamplingParams(temperature=1.0, seed=1234)
    s_alone, s_batched = seq(params, seed=1234), seq(params, seed=1234)
    got_alone, got_batched = [], []
    for step in range(30):
        x = logits(3, step)
        got_alone.append(Sampler()(x[1:2], [s_alone]).token_ids[0])
        others = [seq(SamplingParams(temperature=1.0)), seq(SamplingParams(temperature=0.9, seed=step))]
        got_batched.append(Sampler()(x, [others[0], s_batched, others[1]]).token_ids[1])
    assert got_alone == got_batched
    assert len(set(got_alone)) > 5          # it really samples


def test_temperature_sampling_follows_the_softmax():
    torch.manual_seed(0)
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-50.0] * (VOCAB - 4)])
    params = SamplingParams(temperature=0.5)
    s = seq(params)
    n = 8000
    tokens = Sampler()(x.expand(n, VOCAB), [s] * n).token_ids    # 8000 independent draws
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB).float()
    expected = torch.softmax(x[0] / 0.5, dim=-1)
    assert torch.allclose(counts / n, expected, atol=0.02)


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(temperature=1.0, top_k=3), {0, 1, 2}),
    (SamplingParams(temperature=1.0, top_p=0.8), {0, 1}),            # 0.53 + 0.29 reaches 0.8
    (SamplingParams(temperature=1.0, min_p=0.5), {0, 1}),            # p >= half the best
    (SamplingParams(temperature=1.0, top_k=1), {0}),
])
def test_truncation_keeps_only_the_allowed_tokens(params, allowed):
    torch.manual_seed(0)
    x = torch.tensor([[3.0, 2.4, 1.5, 1.0] + [0.0] * (VOCAB - 4)])
    x[0, 4:] = -5.0
    seen = {Sampler()(x, [seq(params)]).token_ids[0] for _ in range(400)}
    assert seen == allowed


def test_penalties_follow_vllm_semantics():
    x = torch.tensor([[2.0, -1.0, 0.5, 1.5] + [0.0] * (VOCAB - 4)])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0,
                            presence_penalty=0.5, frequency_penalty=0.25)
    s = seq(params, prompt=[0], output=[1, 1, 2])
    from pagedeploy.runtime.sampler import _apply_penalties
    got = _apply_penalties(x, [s])[0, :4]
    # repetition on prompt+output tokens (0, 1, 2): divide positive, multiply negative;
    # presence/frequency on output tokens only (1 twice, 2 once).
    expected = torch.tensor([2.0 / 2, -1.0 * 2 - 0.5 - 0.25 * 2, 0.5 / 2 - 0.5 - 0.25, 1.5])
    assert torch.allclose(got, expected)
    assert Sampler()(x, [s]).token_ids[0] == 3     # greedy after penalties


def test_logprobs_come_from_the_raw_distribution_with_sorted_alternatives():
    x = logits(2)
    seqs = [seq(SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5)),
            seq(SamplingParams(temperature=0.0))]
    out = Sampler()(x, seqs)
    raw = torch.log_softmax(x, dim=-1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0]
    assert lp.logprob == pytest.approx(float(raw[0, lp.token_id]), abs=1e-6)
    ids = [t for t, _ in lp.top]
    assert ids == raw[0].topk(3).indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(raw[0].topk(3).values.tolist(), abs=1e-6)
    assert out.logprobs[1] is None


def test_logprobs_zero_returns_only_the_chosen_token():
    out = Sampler()(logits(1), [seq(SamplingParams(temperature=0.0, logprobs=0))])
    assert out.logprobs[0].top == []
