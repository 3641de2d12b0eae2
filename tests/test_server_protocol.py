"""The HTTP server over the real LLMEngine with a fake model (tests/paged_fakes.py): protocol
shapes, validation errors, auth, SSE, metrics, disconnect-aborts, /health while loading, drain.

One real uvicorn (in a thread, on a free 127.0.0.1 port) serves the whole module.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from paged_fakes import ByteTokenizer, FakePagedRunner, fake_config, reference_greedy

from pagedeploy.launcher.engine_thread import EngineThread
from pagedeploy.launcher.metrics import ServerMetrics
from pagedeploy.launcher.server import ServerSettings, build_app
from pagedeploy.runtime.engine import LLMEngine
from pagedeploy.runtime.sampling_params import SamplingParams

API_KEY = "sk-test-key"
MODEL = "fake-model"
MAX_MODEL_LEN = 512


class ChatByteTokenizer(ByteTokenizer):
    """The byte tokenizer plus what the server uses: a chat template and token spelling."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def convert_ids_to_tokens(self, ids):
        one = isinstance(ids, int)
        pieces = [self.decode([t], skip_special_tokens=False) for t in ([ids] if one else ids)]
        return pieces[0] if one else pieces


class SlowRunner(FakePagedRunner):
    """A step takes a little while, as a real model's does, so a client can leave mid-stream."""
    delay_s = 0.004

    def execute(self, items, pending=None, float32=True):
        time.sleep(self.delay_s)
        return super().execute(items, pending, float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving `app` from a daemon thread (signals stay with pytest's main thread)."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = 30.0) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert self.thread.is_alive(), "uvicorn exited during start-up"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout_s} s")


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in Prometheus text (all label sets)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} missing from /metrics"
    return total


@pytest.fixture(scope="module")
def fake():
    config = fake_config(num_blocks=160, block_size=4, max_model_len=MAX_MODEL_LEN, max_num_seqs=16,
                         served_model_name=MODEL)
    engine = LLMEngine(config, runner=SlowRunner(config), tokenizer=ChatByteTokenizer())
    metrics = ServerMetrics(MODEL)
    thread = EngineThread(lambda: engine, metrics)
    settings = ServerSettings(MODEL, MAX_MODEL_LEN, config.spec.vocab_size, max_logprobs=5,
                              pool_tokens=160 * 4, api_key=API_KEY)
    thread.start()
    server = ThreadServer(build_app(thread, settings, metrics)).start()
    wait_ready(server.url, 10)
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def url(fake):
    return fake[0].url


def post(url: str, path: str, body, key: str | None = API_KEY, timeout: float = 30) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers=headers, timeout=timeout)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- basics ----------------------------------------------------------------------------------

def test_health_models_and_auth(url):
    assert httpx.get(url + "/health").json() == {"status": "ready"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
    card = r.json()["data"][0]
    assert r.json()["object"] == "list" and card["id"] == MODEL and card["object"] == "model"
    assert card["max_model_len"] == MAX_MODEL_LEN
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=None)
    assert r.status_code == 401


def test_completion_matches_reference_greedy(url):
    prompt = "Hello paged world"
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                      "temperature": 0, "ignore_eos": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == MODEL and isinstance(body["created"], int)
    choice = body["choices"][0]
    expected = reference_greedy(list(prompt.encode()), 12, ignore_eos=True)
    lp = choice["logprobs"]
    assert lp["tokens"] == [ChatByteTokenizer().convert_ids_to_tokens(t) for t in expected]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 12
    # k alternatives plus the pick; byte tokens >= 128 all spell "\ufffd", so keys may merge
    assert all(1 <= len(top) <= 3 and top[tok] == p for top, tok, p in
               zip(lp["top_logprobs"], lp["tokens"], lp["token_logprobs"]))
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}


def test_batch_prompts_token_ids_and_n(url):
    r = post(url, "/v1/completions", {"prompt": [[72, 105], [65, 66, 67]], "n": 2, "max_tokens": 5,
                                      "ignore_eos": True, "seed": 7, "echo": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"].startswith("Hi") and choices[2]["text"].startswith("ABC")
    assert r.json()["usage"]["completion_tokens"] == 20
    assert r.json()["usage"]["prompt_tokens"] == 5


def test_stop_string_and_finish_reason(url):
    # Generate once greedily, then ask to stop at a piece of that text.
    first = post(url, "/v1/completions", {"prompt": "abc", "max_tokens": 30, "temperature": 0,
                                          "ignore_eos": True}).json()["choices"][0]["text"]
    stop = next(first[i:i + 2] for i in range(3, len(first) - 2) if "\ufffd" not in first[i:i + 2])
    r = post(url, "/v1/completions", {"prompt": "abc", "max_tokens": 30, "temperature": 0,
                                      "ignore_eos": True, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == first[:first.index(stop)]


def test_stream_completion_with_usage(url):
    body = {"prompt": "stream me", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    full = post(url, "/v1/completions", dict(body, stream=False, stream_options=None)).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


def test_chat_and_chat_stream(url):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_completion_tokens": 6,
                                           "temperature": 0, "ignore_eos": True, "logprobs": True,
                                           "top_logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt = ChatByteTokenizer().apply_chat_template([{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hi"}])
    assert body["usage"]["prompt_tokens"] == len(prompt.encode())
    entries = choice["logprobs"]["content"]
    assert len(entries) == 6
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) == 3
               for e in entries)
    assert all(set(t) == {"token", "logprob", "bytes"} for t in entries[0]["top_logprobs"])
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                            "stream": True}) as s:
        events = sse_events(s)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == choice["message"]["content"] and events[-2]["choices"][0]["finish_reason"] == "length"


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,status,param,words", [
    ("/v1/completions", b"{not json", 400, None, ["JSON"]),
    ("/v1/completions", b"[1, 2]", 400, None, ["object"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", ["integer", "string"]),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", ["number"]),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", ["boolean"]),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", ["Missing"]),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", ["prompt"]),
    ("/v1/completions", {"prompt": [[1, 99999]]}, 400, "prompt", ["99999"]),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", ["gpt-4"]),
    ("/v1/completions", {"prompt": "x" * 500, "max_tokens": 100}, 400, "prompt", ["512", "600", "500", "100"]),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n", ["128"]),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs", ["5"]),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", ["top_p"]),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", 3]}, 400, "stop", ["stop"]),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", ["stream"]),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias", ["not supported"]),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", ["array"]),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ["at least one"]),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", ["robot"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", ["string"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", ["logprobs"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs", ["5"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 600}, 400,
     "messages", ["512", "600"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "other"}, 404, "model", []),
])
def test_user_errors(url, path, body, status, param, words):
    r = post(url, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]


def test_unknown_route_and_method_are_json(url):
    r = httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 405 and "error" in r.json()


# ---- cancellation and metrics ----------------------------------------------------------------

def _wait_idle_metrics(url: str, timeout_s: float = 5.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(url + "/metrics").text
        if metric(text, "pagedeploy:kv_cache_usage_perc") == 0 and \
                metric(text, "pagedeploy:num_requests_running") == 0:
            return text
        assert time.monotonic() < deadline, "blocks were not freed after the client left"
        time.sleep(0.02)


def test_stream_disconnect_aborts_and_frees_blocks(fake, url):
    server, engine = fake
    body = {"prompt": "a long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        busy = httpx.get(url + "/metrics").text
        assert metric(busy, "pagedeploy:kv_cache_usage_perc") > 0
    left = time.monotonic()
    _wait_idle_metrics(url)
    assert time.monotonic() - left < 1.0
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    # It stopped long before its 400 tokens (400 steps would take well over a second).
    assert not engine.has_unfinished()


def test_non_stream_disconnect_aborts(fake, url):
    server, engine = fake
    before = engine.stats().generation_tokens_total
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/v1/completions", {"prompt": "wait", "max_tokens": 450, "ignore_eos": True},
             timeout=0.3)
    _wait_idle_metrics(url)
    assert engine.stats().generation_tokens_total - before < 400


def test_metrics_exposition(url):
    post(url, "/v1/completions", {"prompt": "count me", "max_tokens": 4, "ignore_eos": True})
    text = httpx.get(url + "/metrics").text
    for name in ("pagedeploy:num_requests_running", "pagedeploy:num_requests_waiting",
                 "pagedeploy:kv_cache_usage_perc", "pagedeploy:num_preemptions_total",
                 "pagedeploy:prefix_cache_queries_total", "pagedeploy:prefix_cache_hits_total"):
        metric(text, name)
    assert metric(text, "pagedeploy:prompt_tokens_total") >= len("count me")
    assert metric(text, "pagedeploy:generation_tokens_total") >= 4
    assert metric(text, "pagedeploy:time_to_first_token_seconds_count") >= 1
    assert metric(text, "pagedeploy:inter_token_latency_seconds_count") >= 3
    assert metric(text, "pagedeploy:e2e_request_latency_seconds_count") >= 1
    assert 'model_name="fake-model"' in text


# ---- loading and draining (no HTTP server needed) -----------------------------------------------

def test_health_is_503_while_loading():
    from starlette.testclient import TestClient

    release = threading.Event()
    config = fake_config(served_model_name=MODEL)

    def load():
        assert release.wait(10)
        return LLMEngine(config, runner=FakePagedRunner(config), tokenizer=ChatByteTokenizer())

    thread = EngineThread(load, ServerMetrics(MODEL))
    thread.start()
    app = build_app(thread, ServerSettings(MODEL, 512, config.spec.vocab_size), ServerMetrics(MODEL))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        release.set()
        assert thread.ready.wait(10)
        assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert thread.state == "draining" and not thread._thread.is_alive()


def test_drain_lets_in_flight_requests_finish():
    config = fake_config(served_model_name=MODEL)
    thread = EngineThread(lambda: LLMEngine(config, runner=SlowRunner(config),
                                            tokenizer=ChatByteTokenizer()))
    thread.start()
    assert thread.ready.wait(10)

    async def main():
        params = SamplingParams(max_tokens=30, ignore_eos=True)

        async def consume():
            outs = [o async for o in thread.generate([("r1", [1, 2, 3], params)])]
            return outs[-1]

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.02)
        await thread.drain(timeout_s=10)
        return await task

    final = asyncio.run(main())
    assert final.finished and len(final.outputs[0].token_ids) == 30
    assert thread.state == "draining" and not thread._thread.is_alive()


def test_context_limit_uses_the_smaller_of_model_len_and_pool():
    from pagedeploy.launcher.openai_protocol import Body, ModelContext, ProtocolError, parse_chat

    ctx = ModelContext(MODEL, 512, 5, 260, ChatByteTokenizer(), pool_tokens=100)
    messages = [{"role": "user", "content": "hi"}]
    req = parse_chat(Body({"messages": messages}), ctx)
    prompt_len = len(req.prompts[0])
    assert req.params.max_tokens == 100 - prompt_len   # the default fills what one sequence can hold
    with pytest.raises(ProtocolError) as e:
        parse_chat(Body({"messages": messages, "max_tokens": 100}), ctx)
    assert e.value.status == 400 and "100 tokens" in e.value.message and "KV cache" in e.value.message


def test_metrics_counters_follow_engine_totals():
    from pagedeploy.runtime.outputs import EngineStats

    m = ServerMetrics(MODEL)

    def stats(prompt, gen, preempt, queries, hits):
        return EngineStats(num_running=2, num_waiting=1, kv_usage=0.25, num_free_blocks=3, num_blocks=4,
                           preemptions=preempt, prefix_queries=queries, prefix_hits=hits,
                           prompt_tokens_total=prompt, generation_tokens_total=gen,
                           num_swapped=1, num_swapped_blocks=6, num_swap_blocks=8)

    m.update_engine(stats(10, 5, 1, 32, 16))
    m.update_engine(stats(10, 9, 3, 48, 16))
    text = m.render().decode()
    assert metric(text, "pagedeploy:prompt_tokens_total") == 10
    assert metric(text, "pagedeploy:generation_tokens_total") == 9
    assert metric(text, "pagedeploy:num_preemptions_total") == 3
    assert metric(text, "pagedeploy:prefix_cache_queries_total") == 48
    assert metric(text, "pagedeploy:prefix_cache_hits_total") == 16
    assert metric(text, "pagedeploy:kv_cache_usage_perc") == 0.25
    assert metric(text, "pagedeploy:num_requests_waiting") == 1
    assert metric(text, "pagedeploy:num_requests_swapped") == 1
    assert metric(text, "pagedeploy:cpu_cache_usage_perc") == 0.75


# ---- deploy up refusals (no weights loaded) -----------------------------------------------------

def test_up_refuses_multi_gpu_and_plans_that_do_not_fit(smollm2_gguf_path, capsys):
    from pathlib import Path

    from pagedeploy.launcher.errors import UserError
    from pagedeploy.launcher.up import EXIT_DOES_NOT_FIT, run_up

    profile = str(Path(__file__).resolve().parent.parent / "profiles" / "cpu-default.yaml")
    with pytest.raises(UserError) as e:
        run_up(profile, None, None, ["tensor_parallel_size=2"])
    assert "tensor_parallel_size" in e.value.one_line() and "\n" not in e.value.one_line()
    assert run_up(profile, None, None, ["kv_cache_memory_bytes=1000000"]) == EXIT_DOES_NOT_FIT
    assert "KV cache" in capsys.readouterr().out
    with pytest.raises(UserError) as e:
        run_up(profile, None, None, ["api_key_env=PAGEDEPLOY_SURELY_UNSET_VAR"])
    assert "PAGEDEPLOY_SURELY_UNSET_VAR" in e.value.one_line()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError) as e:
            run_up(profile, None, busy.getsockname()[1], [])
    assert "--port" in e.value.one_line()


def test_failed_load_is_reported_not_served():
    from starlette.testclient import TestClient

    def load():
        raise FileNotFoundError("weights.gguf is gone")

    thread = EngineThread(load)
    thread.start()
    assert thread.ready.wait(10)
    app = build_app(thread, ServerSettings(MODEL, 512, 260), ServerMetrics(MODEL))
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "failed"}
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and "failed" in r.json()["error"]["message"]
    assert isinstance(thread.load_error, FileNotFoundError)
