"""`deploy up profiles/cpu-default.yaml` for real: one server process (SmolLM2-135M-Instruct on the
CPU) for the whole module, driven with the official `openai` package and with httpx.

The last test stops it with SIGTERM while a request is in flight: the request must finish and the
process must exit 0.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_server_protocol import free_port, metric, sse_events, wait_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-pagedeploy-test"
MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_gguf_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("up") / "up.log"
    # PYTHONSAFEPATH: `-m` would put the working directory (the checkout) on sys.path, whose
    # `kernels/` shadows the one transformers imports (conftest.py)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PAGEDEPLOY_TEST_KEY=API_KEY, COLUMNS="200",
               PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")
    cmd = [sys.executable, "-m", "pagedeploy.launcher.cli", "up", str(ROOT / "profiles/cpu-default.yaml"),
           "--port", str(port), "--set", "max_model_len=2048", "--set", "api_key_env=PAGEDEPLOY_TEST_KEY"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 240)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def url(server):
    return server[1]


@pytest.fixture(scope="module")
def client(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def test_startup_output(server):
    # /health turns ready a moment before the start-up lines reach the log: wait for the last one.
    deadline = time.monotonic() + 30
    while "Serving " not in (text := server[2].read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "KV cache: 1,092 blocks × 16 tokens = 17,472 tokens; max concurrency 8.53× at max_model_len 2,048" in text
    assert "Memory: KV cache 0.75 GiB allocated (plan 0.75 GiB)" in text
    assert f"http://127.0.0.1:{server[1].rsplit(':', 1)[1]}/v1" in text


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_says_paris(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens == r.usage.total_tokens - r.usage.prompt_tokens


def test_chat_stream_with_usage_matches_non_stream(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=10)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completions_n2_seed_and_logprobs(client):
    kw = dict(model=MODEL, prompt="The three primary colors are", max_tokens=6, temperature=1.0,
              n=2, seed=1234, logprobs=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]   # same seed, same samples
    assert a.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in a.choices)
    for choice in a.choices:
        lp = choice.logprobs
        # Byte-level BPE spelled exactly: the token strings rebuild the text.
        assert "".join(lp.tokens) == choice.text
        assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
        assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)
        assert all(p <= 0 for p in lp.token_logprobs)
    other = client.completions.create(**dict(kw, seed=99))
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_chat_logprobs_and_stop(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20,
                                       logprobs=True, top_logprobs=2, stop=["Paris"])
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and "Paris" not in choice.message.content
    assert choice.message.content.startswith("The capital of France is")
    entries = choice.logprobs.content
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in entries)
    assert entries[0].top_logprobs[0].logprob >= entries[0].top_logprobs[1].logprob


def test_completion_stream_token_ids_prompt(url):
    body = {"model": MODEL, "prompt": [[19556, 28, 1399, 3365]], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5,
                                                              "total_tokens": 9}
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert all(e["usage"] is None for e in events[:-2])


def test_auth_and_errors(url):
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(url + "/health").status_code == 200      # open: load balancers probe it
    cases = [
        ({"messages": QUESTION, "max_tokens": "many"}, 400, "max_tokens"),
        ({"messages": QUESTION, "model": "gpt-4o"}, 404, "model"),
        ({"messages": QUESTION, "max_tokens": 5000}, 400, "messages"),
        ({"messages": QUESTION, "n": 500}, 400, "n"),
        ({"messages": QUESTION, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ]
    for body, status, param in cases:
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth(), timeout=30)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param
    r = httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 5000},
                   headers=auth(), timeout=30)
    assert "2048" in r.json()["error"]["message"] and "5000" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b"{oops", headers=auth(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10).text


def test_disconnect_aborts_and_frees_blocks(url):
    body = {"model": MODEL, "prompt": "Write a very long story about a dragon.", "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):   # 3 tokens (each event is a data line and a blank line)
            next(lines)
        busy = _metrics(url)
        assert metric(busy, "pagedeploy:kv_cache_usage_perc") > 0
        assert metric(busy, "pagedeploy:num_requests_running") == 1
    deadline = time.monotonic() + 10
    while metric(_metrics(url), "pagedeploy:kv_cache_usage_perc") > 0:
        assert time.monotonic() < deadline, "the aborted request's blocks were not freed"
        time.sleep(0.05)
    text = _metrics(url)
    assert metric(text, "pagedeploy:num_requests_running") == 0
    generated = metric(text, "pagedeploy:generation_tokens_total")
    time.sleep(0.5)
    assert metric(_metrics(url), "pagedeploy:generation_tokens_total") == generated   # nothing runs on


def test_metrics_after_traffic(url):
    text = _metrics(url)
    assert metric(text, "pagedeploy:prompt_tokens_total") > 0
    assert metric(text, "pagedeploy:generation_tokens_total") > 0
    assert metric(text, "pagedeploy:time_to_first_token_seconds_count") > 0
    assert metric(text, "pagedeploy:inter_token_latency_seconds_count") > 0
    assert metric(text, "pagedeploy:e2e_request_latency_seconds_count") > 0
    # Every chat request above shares the system prompt: the prefix cache found some of it.
    assert metric(text, "pagedeploy:prefix_cache_hits_total") > 0
    assert metric(text, "pagedeploy:prefix_cache_queries_total") >= metric(text, "pagedeploy:prefix_cache_hits_total")
    success = [line for line in text.splitlines() if line.startswith("pagedeploy:request_success_total{")]
    assert any('finished_reason="stop"' in line and f'model_name="{MODEL}"' in line for line in success)


def test_sigterm_lets_in_flight_request_finish_then_exits_0(server):
    proc, url, log = server
    result = {}

    def request():
        body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 48, "ignore_eos": True}
        result["response"] = httpx.post(url + "/v1/completions", json=body, headers=auth(), timeout=120)

    t = threading.Thread(target=request)
    t.start()
    deadline = time.monotonic() + 30
    while metric(_metrics(url), "pagedeploy:num_requests_running") < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    r = result["response"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 48
    assert proc.wait(60) == 0
    assert "stopped" in log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
    assert json.loads(r.text)["choices"][0]["finish_reason"] == "length"
