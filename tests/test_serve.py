"""The OpenAI-compatible server, end to end: a real uvicorn on 127.0.0.1 and the official `openai` client.

Two servers run in threads for the module: ``server`` (batch 8, prompt and memory limits set) and
``small`` (one cache row, a queue of one, an API key) for the auth and queue-full cases. Requests use
``temperature=0`` and ``ignore_eos`` (an extra body field) so lengths and texts are deterministic.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from vist2.engine import Engine
from vist2.serve import add_parser, main
from vist2.serve.app import Server, create_app

FIXED = {"ignore_eos": True}  # extra body: exact lengths from a random model
KEY = "test-key-123"
JSON = {"Content-Type": "application/json"}


class LiveServer:
    """uvicorn in a thread on a socket bound to a free port of 127.0.0.1."""

    def __init__(self, app, api_key: str | None = None, **config):
        self.app, self.api_key = app, api_key  # the key /metrics needs (any key set protects it)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        out = {}
        auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        for line in httpx.get(self.url + "/metrics", headers=auth).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """Poll /metrics until nothing is queued or running (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["vist2_queue_depth"] == 0 and m["vist2_running_requests"] == 0:
                return m
            assert time.monotonic() < deadline, f"still busy: {m['vist2_queue_depth']=} {m['vist2_running_requests']=}"
            time.sleep(0.1)

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="module")
def server(tiny_dir):
    engine = Engine.from_pretrained(tiny_dir, max_batch=8, max_cache_tokens=1024)
    s = LiveServer(create_app(engine, "tiny", max_queue=64, max_prompt_tokens=2000, max_tokens_limit=100_000))
    yield s
    s.close()


@pytest.fixture(scope="module")
def small(tiny_dir):
    engine = Engine.from_pretrained(tiny_dir, max_batch=1)
    s = LiveServer(create_app(engine, "tiny", api_key=KEY, max_queue=1, max_tokens_limit=100_000), api_key=KEY)
    yield s
    s.close()


def complete(client, prompt="Once upon a time", max_tokens=8, **kw):
    extra = {**FIXED, **kw.pop("extra_body", {})}
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body=extra, **kw)


def assert_serving(s: LiveServer, **client_kw):
    r = complete(s.client(**client_kw), max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


# -- happy paths ----------------------------------------------------------------------------


def test_models_health_metrics(server):
    [card] = server.client().models.list().data
    assert card.id == "tiny" and card.chunk_tokens == 64 and card.visual_tokens_per_chunk == 16
    assert card.default_mode == "gcc" and card.max_cache_tokens == 1024
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert "vist2_time_to_first_token_seconds_bucket" in httpx.get(server.url + "/metrics").text


def test_completion(server):
    client = server.client()
    r = complete(client)
    [c] = r.choices
    assert r.object == "text_completion" and r.model == "tiny" and c.finish_reason == "length" and c.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 8, 12)
    comp = r.usage.compression
    assert comp["mode"] == "gcc" and comp["kv_entries_uncompressed"] == 4 + 8 - 1
    assert complete(client).choices[0].text == c.text  # greedy: reproducible


def test_chat(server):
    r = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=6, temperature=0, extra_body=FIXED)
    [c] = r.choices
    assert r.object == "chat.completion" and c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens > 5  # the chat template wraps the messages


def test_streaming_matches_non_streaming(server):
    client = server.client()
    full = complete(client, max_tokens=10).choices[0].text
    chunks = list(complete(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
                extra_body=FIXED)
    want = client.chat.completions.create(**chat).choices[0].message.content
    stream = list(client.chat.completions.create(**chat, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want
    assert stream[-1].choices[0].finish_reason == "length"


def test_n_seed_and_prompt_lists(server):
    client = server.client()
    kw = dict(model="tiny", prompt="Once", max_tokens=4, n=3, seed=7, temperature=1.0, extra_body=FIXED)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # seed + i: the choices differ
    assert a.usage.completion_tokens == 12 and a.usage.prompt_tokens == 1  # the prompt counts once
    r = complete(client, prompt=["Once upon a time", "Hello"], n=2, max_tokens=3)
    assert len(r.choices) == 4 and r.choices[0].text == r.choices[1].text  # prompt-major, greedy
    r = complete(client, prompt=[9707, 11, 1879], max_tokens=3)  # token ids
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 3


def test_stop_string(server):
    client = server.client()
    deltas = [ch.choices[0].text for ch in complete(client, max_tokens=8, stream=True)]
    full = "".join(deltas)
    stop = next(d for d in deltas[2:] if d.strip())
    r = complete(client, max_tokens=8, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.index(stop)]


def test_compression_mode_per_request(server):
    client = server.client()
    prompt = " the" * 300  # 300 tokens: several K=64 chunks
    usage = {m: complete(client, prompt=prompt, max_tokens=2, extra_body={"mode": m}).usage
             for m in ("gcc", "pcc", "none")}
    assert all(u.prompt_tokens == 300 for u in usage.values())
    for m in ("gcc", "pcc"):
        c = usage[m].compression
        assert c["mode"] == m and c["chunks_compressed"] >= 3 and c["visual_tokens"] == 16 * c["chunks_compressed"]
        assert c["kv_entries"] < c["kv_entries_uncompressed"] and c["kv_ratio"] < 0.5
    c = usage["none"].compression
    assert c["chunks_compressed"] == 0 and c["kv_entries"] == c["kv_entries_uncompressed"] == 301
    assert server.metrics()["vist2_kv_entries_saved_total"] > 0


# -- concurrency and disconnects ---------------------------------------------------------------


def test_16_parallel_streams(server):
    async def one(client, i):
        stream = await client.completions.create(
            model="tiny", prompt=f"Story number {i}:", max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=FIXED)
        text, usage = "", None
        async for ch in stream:
            text += "".join(c.text for c in ch.choices)
            usage = ch.usage or usage
        return text, usage

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(run())
    assert len(results) == 16 and all(u.completion_tokens == 6 and t for t, u in results)
    m = server.wait_idle()
    assert m["vist2_requests_finished_total{finish_reason=\"length\"}"] >= 16


def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.metrics().get('vist2_requests_finished_total{finish_reason="abort"}', 0)
    client = server.client()
    stream = complete(client, max_tokens=100_000, stream=True)  # minutes of work if never aborted
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert server.metrics()["vist2_running_requests"] == 1
    stream.close()  # the client goes away mid-stream
    m = server.wait_idle(timeout=20)
    assert m['vist2_requests_finished_total{finish_reason="abort"}'] == before + 1

    # a non-streaming client that gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=1.0,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 100_000, **FIXED})
    m = server.wait_idle(timeout=20)
    assert m['vist2_requests_finished_total{finish_reason="abort"}'] == before + 2
    assert_serving(server)


# -- errors ------------------------------------------------------------------------------------

BAD = [  # (endpoint, body, status, param)
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"prompt": "x", "mode": "zip"}, 400, "mode"),
    ("completions", {"prompt": "x", "stop": ["ok", 3]}, 400, "stop"),
    ("completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("completions", {"prompt": "x", "no_such_field": 1}, 400, "no_such_field"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": [10**9]}, 400, "prompt"),
    ("completions", {}, 400, "prompt"),
    ("completions", {"prompt": "x", "n": 100}, 400, "n"),  # more than the queue holds
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "system", "content": "no user"}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("completions", {"prompt": " the" * 2500}, 413, "prompt"),  # over --max-prompt-tokens 2000
    ("completions", {"prompt": " the" * 1500, "mode": "none"}, 413, "prompt"),  # over the KV memory limit 1024
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{s}-{p}-{i}" for i, (_, _, s, p) in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, endpoint, body, status, param):
    r = httpx.post(f"{server.url}/v1/{endpoint}", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert "Traceback" not in r.text
    assert httpx.get(server.url + "/health").status_code == 200


def test_error_classes_in_the_openai_client(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError):
        complete(client, extra_body={"top_k": -3})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    with pytest.raises(openai.APIStatusError) as e:
        complete(client, prompt=" the" * 2500)
    assert e.value.status_code == 413 and e.value.code == "context_length_exceeded"
    # a long prompt under the limits is fine in gcc: 1500 tokens are held in far fewer KV entries
    r = complete(client, prompt=" the" * 1500, max_tokens=2)
    assert r.usage.compression["kv_entries"] < 1024 < r.usage.prompt_tokens
    assert_serving(server)


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json_is_400(server, raw):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json() and "Traceback" not in r.text
    r = httpx.post(server.url + "/v1/completions", content=raw)  # no content type: refused before reading
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_unknown_route_and_method(server):
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_engine_failure_is_a_clean_500_and_the_server_recovers(server, monkeypatch):
    engine = server.app.state.bridge.engine
    real = engine._decode
    calls = []

    def fail_once(seqs):  # fault injection: the engine raises in the middle of a step, after prefill
        if not calls:
            calls.append(1)
            raise RuntimeError("injected failure")
        return real(seqs)

    with monkeypatch.context() as m:
        m.setattr(engine, "_decode", fail_once)
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4, **FIXED})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "injected failure" in r.json()["error"]["message"] and "Traceback" not in r.text
    server.wait_idle()
    assert_serving(server)


def test_api_key(small):
    for key in ("none", "wrong"):
        with pytest.raises(openai.AuthenticationError):
            small.client(api_key=key).models.list()
    r = httpx.post(small.url + "/v1/completions", content=b"{bad")  # the key is checked before the body
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(small.url + "/health").status_code == 200  # health and metrics stay open
    assert small.client(api_key=KEY).models.list().data[0].id == "tiny"
    assert_serving(small, api_key=KEY)


def test_queue_full_is_429_and_recovers(small):
    client = small.client(api_key=KEY)
    running = complete(client, max_tokens=100_000, stream=True)
    next(iter(running))  # holds the only cache row
    waiting = complete(client, max_tokens=100_000, stream=True)  # accepted: waits for the row
    assert small.metrics()["vist2_queue_depth"] == 1
    with pytest.raises(openai.RateLimitError) as e:
        complete(client, max_tokens=2)
    assert e.value.code == "queue_full" and e.value.response.headers["retry-after"]
    running.close()  # frees the row: the waiting stream starts
    next(iter(waiting))
    waiting.close()
    small.wait_idle(timeout=20)
    assert_serving(small, api_key=KEY)


# -- command line ---------------------------------------------------------------------------------


def test_cli_parser_and_user_errors(tmp_path, capsys):
    import argparse

    sub = argparse.ArgumentParser(prog="vist2").add_subparsers(dest="command")
    add_parser(sub)
    args = sub._name_parser_map["serve"].parse_args(["--model", "m"])
    assert (args.host, args.port, args.mode, args.max_queue) == ("127.0.0.1", 8000, "gcc", 256)
    assert callable(args.func)
    assert main(["--model", str(tmp_path)]) == 2
    assert "not a VIST2 checkpoint" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err


def test_sse_wire_format(server):
    """The raw stream: `data: {json}` events, OpenAI's chunk objects, and a final `data: [DONE]`."""
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True, **FIXED}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


# -- one request never harms another ------------------------------------------------------------

POISON = [  # (body, param): values the engine cannot take; each must be a 400 for its own request only
    ({"seed": 2**70}, "seed"),  # past int64: torch's manual_seed overflowed in the shared step
    ({"seed": 2**64 - 1, "n": 2}, "seed"),  # seed + 1 past 64 bits
    ({"temperature": 1e-45}, "temperature"),  # denormal: logits / t are inf
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"top_k": 10**30}, "top_k"),
    ({"no_repeat_ngram_size": 10**30}, "no_repeat_ngram_size"),
    ({"stop_token_ids": [2**70]}, "stop_token_ids"),
    ({"stream": "yes"}, "stream"),  # loose types: OpenAI rejects them rather than converting
    ({"max_tokens": "3"}, "max_tokens"),
    ({"max_tokens": 1e30}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),  # over --max-tokens-limit
    ({"max_tokens": 100_001}, "max_tokens"),
    ({"user": "u" * 100_000}, "user"),
]


def _stream_tokens(server, max_tokens, out: dict, prompt="A long story:"):
    """A background stream: records the gaps between its events and how it ended."""
    gaps, n, last = [], 0, time.perf_counter()
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            **FIXED}) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["error"] = json.loads(r.read())["error"]
            return
        for line in r.iter_lines():
            if not line:
                continue
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if line == "data: [DONE]":
                out["done"] = True
                break
            obj = json.loads(line[6:])
            if "error" in obj:
                out["error"] = obj["error"]
                continue
            n += 1
            out["finish"] = obj["choices"][0]["finish_reason"] or out.get("finish")
            out["started"] = True
    out["events"], out["max_gap"] = n, max(gaps[1:], default=0.0)


def _background(server, max_tokens, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=_stream_tokens, args=(server, max_tokens, out), kwargs=kw, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not out.get("started"):
        assert t.is_alive() and time.monotonic() < deadline, out
        time.sleep(0.02)
    return t, out


def test_values_the_engine_cannot_take_fail_only_their_request(server):
    t, out = _background(server, 150)
    for body, param in POISON:
        r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 2, **FIXED, **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    t.join(120)
    assert out.get("error") is None and out["finish"] == "length" and out["done"], out
    assert out["events"] == 150  # ignore_eos: every token arrived (some deltas may be empty; none here dropped)
    assert_serving(server)


@pytest.mark.parametrize("raw,needle", [
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "NaN"),
    (b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', "Infinity"),
    (b'{"model": "tiny", "prompt": "a\\ud800b"}', "surrogate"),
    (b'{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "surrogate"),
])
def test_non_numbers_and_lone_surrogates_are_400(server, raw, needle):
    r = httpx.post(server.url + "/v1/completions", content=raw, timeout=30, headers=JSON)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert "<= 2" not in r.text and "\u2264 2" not in r.text


def test_chat_surrogate_marker_and_messages(server):
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud83d"}]}'
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, timeout=30, headers=JSON)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    # a system message may contain anything, the engine's own query marker included
    chat = server.client().chat.completions.create(
        model="tiny", max_tokens=2, temperature=0, extra_body=FIXED,
        messages=[{"role": "system", "content": "\x00VIST2_QUERY\x00 and text"}, {"role": "user", "content": "Hi"}])
    assert chat.usage.completion_tokens == 2
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["message"].count("response_format") == 1, r.text


def test_huge_prompt_is_refused_fast_while_streams_flow(server):
    """A 6 MB prompt used to be tokenized whole on the engine's thread (tens of seconds, every stream
    frozen). Now the body limit refuses it unread; nothing else waits for it."""
    t, out = _background(server, 120)
    for body in ({"prompt": "word " * 1_200_000},  # 6 MB: over the body limit
                 {"prompt": "word " * 150_000}):  # 750 kB: under it, but too long for 2000 tokens uncounted
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "max_tokens": 2, **body}, timeout=60)
        took = time.perf_counter() - t0
        assert r.status_code == 413 and r.json()["error"]["code"] in ("request_too_large", "context_length_exceeded")
        assert took < 5.0, took  # well under a second on an idle machine; before: 15-60 s
    t.join(120)
    assert out["finish"] == "length" and out["events"] == 120 and out.get("error") is None
    assert out["max_gap"] < 3.0, out["max_gap"]  # the concurrent stream never stalled for the huge prompt
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "user": "u" * 2_000_000})
    assert r.status_code == 413  # any field: the limit is on the body


def test_max_tokens_limit_caps_every_mode(tiny_dir):
    engine = Engine.from_pretrained(tiny_dir, max_batch=2)
    s = LiveServer(create_app(engine, "tiny", max_tokens_limit=6))
    try:
        client = s.client()
        assert client.models.list().data[0].id == "tiny"
        for mode in ("gcc", "pcc", "none"):
            with pytest.raises(openai.BadRequestError) as e:
                complete(client, max_tokens=7, extra_body={"mode": mode})
            assert e.value.body["param"] == "max_tokens" and "--max-tokens-limit" in e.value.body["message"]
            # chat without max_tokens: the default is capped too, so gcc stops at the limit
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               temperature=0, extra_body={**FIXED, "mode": mode})
            assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    finally:
        s.close()
    # the default: the model's positions (tiny: 8192)
    app = create_app(engine, "tiny")
    assert app.state.serving.max_tokens_limit == engine.model.config.text_config.max_position_embeddings


def test_graceful_shutdown(tiny_dir):
    """Shutdown: new requests get 503 JSON, in-flight ones get the grace period, the rest end cleanly."""
    engine = Engine.from_pretrained(tiny_dir, max_batch=3)
    s = LiveServer(create_app(engine, "tiny", max_queue=8, shutdown_grace=10.0))
    try:
        long_a, a = _background(s, 8000)  # would run for minutes
        nonstream = {}

        def post():
            nonstream["r"] = httpx.post(s.url + "/v1/completions", timeout=60,
                                        json={"model": "tiny", "prompt": "x", "max_tokens": 8000, **FIXED})

        ns = threading.Thread(target=post, daemon=True)
        ns.start()
        deadline = time.monotonic() + 30
        while s.metrics()["vist2_running_requests"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        short, short_out = _background(s, 24)  # the last row: finishes within the grace period
        waiting: dict = {}
        queued = threading.Thread(target=_stream_tokens, args=(s, 8000, waiting), daemon=True)
        queued.start()  # no row left while `short` runs: it waits in the queue
        while waiting.get("status") != 200:  # accepted (the stream's headers came)
            assert queued.is_alive() and time.monotonic() < deadline, waiting
            time.sleep(0.02)
        s.server.should_exit = True
        deadline = time.monotonic() + 10
        # uvicorn notices should_exit on its next tick; a completion posted before the drain begins is
        # accepted and waits for a row like any other, so wait for /health to say the drain began
        while httpx.get(s.url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "the drain did not begin"
            time.sleep(0.05)
        # during the grace period: refused at once with OpenAI's JSON
        r = httpx.post(s.url + "/v1/completions", timeout=10, json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable" and r.headers["retry-after"]
        for t in (long_a, queued, short, ns):
            t.join(40)
            assert not t.is_alive()
        s.thread.join(15)
        assert not s.thread.is_alive()  # uvicorn exited
        s.sock.close()
        assert short_out["finish"] == "length" and short_out["events"] == 24 and short_out["done"]  # not cut
        for out in (a, waiting):  # cut at the end of the grace period: an error event, then [DONE]
            assert out["error"]["type"] == out["error"]["code"] == "service_unavailable" and out["done"], out
        r = nonstream["r"]
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
    finally:
        s.close()  # a no-op once it exited; on a failure, no server is left running


def test_a_failing_row_fails_only_its_request(server, monkeypatch):
    """Defence in depth: whatever validation misses, one row's sampling failing ends that request only."""
    import vist2.engine.request as engine_module  # where a row builds its sampler

    real = engine_module.Sampler

    class Flaky(real):
        def __init__(self, params, *a, **kw):
            if params.seed == 4243:
                raise OverflowError("injected at admission")
            super().__init__(params, *a, **kw)

        def __call__(self, logits, history):
            if self.params.seed == 4242:
                raise RuntimeError("injected sampling failure")
            return super().__call__(logits, history)

    monkeypatch.setattr(engine_module, "Sampler", Flaky)
    t, out = _background(server, 80)
    for seed, needle in ((4242, "injected sampling failure"), (4243, "injected at admission")):
        r = httpx.post(server.url + "/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "x", "max_tokens": 4, "seed": seed, "n": 2, **FIXED})
        assert r.status_code == 500 and needle in r.json()["error"]["message"], r.text
    t.join(120)
    assert out.get("error") is None and out["finish"] == "length" and out["events"] == 80, out
    server.wait_idle()
    assert_serving(server)


def test_routes_leave_validation_to_the_body_parser(server):
    """FastAPI raises RequestValidationError only for parameters a route declares; the routes declare
    none but the raw request (bodies go through ``_parse``), so the app has no handler for it."""
    from vist2.serve.app import router

    routes = router.routes  # what create_app includes
    assert sorted(r.path for r in routes) == ["/health", "/metrics", "/v1/chat/completions", "/v1/completions",
                                              "/v1/models"]
    for r in routes:
        d = r.dependant
        declared = d.path_params + d.query_params + d.header_params + d.cookie_params + d.body_params
        assert not declared and not d.dependencies, (r.path, declared)
    # a query string changes nothing: the body is parsed as JSON all the same
    url = f"{server.url}/v1/completions?model=zzz&max_tokens=x"
    r = httpx.post(url, content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not valid JSON")


# -- hardening, round 2 ------------------------------------------------------------------------


def _spy_tokenizing(serving, monkeypatch) -> list[str]:
    """Record which tokenizer thread tokenizes each prompt (no call: refused before tokenizing)."""
    calls = []
    for name, (_, view) in serving._workers.items():
        real = view.request

        def spy(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(view, "request", spy, raising=False)
    return calls


@pytest.mark.parametrize("endpoint,body,param", [
    # 600k characters: under the body limit (~1.1 MB), over 2000 tokens x 128 characters (the longest token)
    ("chat/completions", {"messages": [{"role": "user", "content": "doc", "question": "q" * 600_000}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a" * 300_000},
                                                                    {"type": "text", "text": "b" * 300_000}]}]},
     "messages"),
    ("chat/completions", {"messages": [{"role": "system", "content": "s" * 300_000},
                                       {"role": "user", "content": "u" * 300_000}]}, "messages"),
    ("completions", {"prompt": ["short", "x" * 600_000]}, "prompt"),  # no prompt of the list is tokenized
    ("completions", {"prompt": [7] * 2001}, "prompt"),  # token ids: counted as they are
])
def test_every_text_field_passes_the_cheap_length_check(server, monkeypatch, endpoint, body, param):
    """A 1.9 MB ``question`` used to be tokenized (18-22 s, every stream stalled) before its 413, which
    named ``prompt``. Every field that becomes tokens is now counted before any tokenizing."""
    calls = _spy_tokenizing(server.app.state.serving, monkeypatch)
    t0 = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/{endpoint}", timeout=60, json={"model": "tiny", "max_tokens": 2, **body})
    took = time.perf_counter() - t0
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == param and "2000" in err["message"]
    assert calls == [] and took < 5.0, (calls, took)  # milliseconds when idle; never the tokenizer
    assert_serving(server)


def test_stop_strings_are_bounded(server):
    for stop in ("s" * 257, ["ok", "t" * 1000]):
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "stop": stop})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop" and "256" in r.text, r.text
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                         "stop": "s" * 256, **FIXED})
    assert r.status_code == 200, r.text


def test_memory_limit_refusal_names_the_chat_field(server):
    """The engine's own memory check (1,500 tokens uncompressed > 1,024 entries) names ``messages`` for
    a chat request, not ``prompt``."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "mode": "none", "messages": [{"role": "user", "content": " the" * 1500}]})
    assert r.status_code == 413 and r.json()["error"]["param"] == "messages", r.text


def test_a_long_prompt_does_not_hold_up_short_ones(server, monkeypatch):
    """Short and long prompts are tokenized on threads of their own: while a long prompt is being
    tokenized (held here until released), short requests are answered."""
    from vist2.serve.serving import SHORT_PROMPT_CHARS

    serving = server.app.state.serving
    calls = _spy_tokenizing(serving, monkeypatch)
    _, view = serving._workers["long"]
    release, entered = threading.Event(), threading.Event()
    spy = view.request

    def slow(*a, **kw):
        entered.set()
        assert release.wait(60)
        return spy(*a, **kw)

    monkeypatch.setattr(view, "request", slow)
    out = {}

    def post_long():
        out["r"] = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": "word " * (SHORT_PROMPT_CHARS // 5 + 1), "max_tokens": 2, **FIXED})

    t = threading.Thread(target=post_long, daemon=True)
    t.start()
    assert entered.wait(30)
    try:
        for _ in range(3):
            assert_serving(server)  # served while the long prompt's tokenizing is still held
        assert calls == ["short"] * 3
    finally:
        release.set()
    t.join(120)
    assert calls == ["short"] * 3 + ["long"]
    assert out["r"].status_code == 413  # ~6,500 words: over --max-prompt-tokens 2000 once counted


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None, "application/jsonx"])
def test_bodies_must_be_declared_json(server, content_type):
    """A web page can POST these content types (or none) cross-site without a CORS preflight: refused
    before the body is read, so a page cannot make a keyless local server generate."""
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    for endpoint in ("completions", "chat/completions"):
        r = httpx.post(f"{server.url}/v1/{endpoint}", content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_cors_allow_list_and_metrics_key(tiny_dir):
    from fastapi.testclient import TestClient

    engine = Engine.from_pretrained(tiny_dir, max_batch=1)
    with pytest.raises(ValueError, match="protect_metrics"):
        create_app(engine, "tiny", protect_metrics=True)
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    auth = {"Authorization": f"Bearer {KEY}"}
    app = create_app(engine, "tiny", api_key=KEY, protect_metrics=True, cors_origins=["https://ok.example"])
    with TestClient(app) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=auth).text.count("vist2_queue_depth") >= 1
        assert c.get("/health").status_code == 200  # never behind the key
        r = c.options("/v1/chat/completions", headers={"Origin": "https://ok.example", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
        r = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = c.get("/v1/models", headers={"Origin": "https://ok.example", **auth})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
    with TestClient(create_app(engine, "tiny")) as c:  # the default: no CORS at all, /metrics open
        r = c.options("/v1/chat/completions", headers={"Origin": "https://ok.example", **preflight})
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
        assert c.get("/metrics").status_code == 200


def test_serve_flags_for_keys_and_origins(tmp_path, capsys):
    import argparse

    p = add_parser(argparse.ArgumentParser(prog="vist2").add_subparsers(dest="command"))
    args = p.parse_args(["--model", "m", "--cors-allow-origin", "https://a.example", "--cors-allow-origin", "*",
                         "--protect-metrics", "--prefill-budget", "64"])
    assert args.cors_allow_origin == ["https://a.example", "*"] and args.protect_metrics and args.prefill_budget == 64
    for argv, needle in ((["--protect-metrics"], "--protect-metrics needs --api-key"),
                         (["--cors-allow-origin", "evil.example"], "--cors-allow-origin"),
                         (["--prefill-budget", "0"], "--prefill-budget must be >= 1")):
        assert main(["--model", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_a_damaged_model_folder_is_one_line(tiny_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: not a readable safetensors file" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_prompts_are_planned_off_the_engine_thread(server, monkeypatch):
    """Cutting a prompt into chunks and counting its footprint runs on the tokenizer threads
    (Engine.plan); the engine thread only queues the planned request."""
    serving = server.app.state.serving
    threads = []
    for _, view in serving._workers.values():
        real = view.plan
        monkeypatch.setattr(view, "plan", lambda req, _real=real: threads.append(
            threading.current_thread().name) or _real(req), raising=False)
    engine = server.app.state.bridge.engine
    monkeypatch.setattr(engine, "plan", lambda req: pytest.fail("planned on the engine thread"), raising=False)
    r = complete(server.client(), prompt=" the" * 300, max_tokens=2, n=2)  # 300 tokens: chunks to cut
    assert r.usage.compression["chunks_compressed"] > 0 and len(r.choices) == 2
    r = server.client().chat.completions.create(model="tiny", max_tokens=2, temperature=0, extra_body=FIXED,
                                                messages=[{"role": "user", "content": "doc " * 200, "question": "q?"}])
    assert r.choices[0].finish_reason == "length"
    assert threads == ["vist2-tokenize-short_0"] * 2, threads  # once per prompt, not per choice


@pytest.mark.slow
def test_sigterm_drains_within_the_grace_and_exits_0(tiny_dir):
    """``vist2 serve`` under a service manager: SIGTERM mid-stream ends the stream after the grace
    period with a ``service_unavailable`` error event, and the process exits 0 (not 143) soon after."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "vist2.serve", "--model", str(tiny_dir), "--port", str(port),
                             "--served-model-name", "tiny", "--shutdown-grace", "1", "--log-level", "warning"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        s = type("S", (), {"url": url})()
        t, out = _background(s, 8000)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        took = time.perf_counter() - t0
        t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, rc
    assert 1.0 <= took < 6.0, took  # the 1 s grace, then out (was 6.4 s with a 3 s grace, and exit 143)
    assert out["error"]["code"] == "service_unavailable" and out["done"], out
