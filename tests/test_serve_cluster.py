"""``vist2 serve --replicas``: conversation routing (pure, fast) and a local Ray Serve application of two
tiny-model replicas driven with the official ``openai`` client (slow: Ray and two replicas start once for
the module, on a local Ray of 2 CPUs without a dashboard).

The cluster tests skip cleanly when ``ray[serve]`` is not installed (``pip install -e ".[cluster]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from vist2.serve.router import FIRST_CHUNK_CHARS, conversation_key, preferred_replica, rank_replicas

CHAT = "/v1/chat/completions"


def _chat(*messages) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": r, "content": c} for r, c in messages]}).encode()


# -- the routing policy (no Ray) ------------------------------------------------------------------


def test_conversation_key():
    system, hello, other = ("system", "Be brief."), ("user", "Hello"), ("user", "Something else")
    turn1 = conversation_key({}, CHAT, _chat(system, hello))
    turn3 = conversation_key({}, CHAT, _chat(system, hello, ("assistant", "Hi!"), ("user", "And then?")))
    assert turn1 is not None and turn1 == turn3  # a chat keeps its key as it grows
    assert conversation_key({}, CHAT, _chat(system, other)) != turn1  # a shared system prompt does not key it
    assert conversation_key({"x-session-id": "abc"}, CHAT, _chat(system, other)) == "session:abc"
    # completions: keyed by the prompt's first chunk of text, or of token ids
    doc = "word " * 200
    assert conversation_key({}, "/v1/completions", json.dumps({"prompt": doc + "Q1?"}).encode()) == \
        conversation_key({}, "/v1/completions", json.dumps({"prompt": doc + "Q2?"}).encode())
    assert conversation_key({}, "/v1/completions", json.dumps({"prompt": "x" + doc}).encode()) != \
        conversation_key({}, "/v1/completions", json.dumps({"prompt": doc}).encode())
    ids = list(range(100))
    assert conversation_key({}, "/v1/completions", json.dumps({"prompt": ids}).encode()) == \
        conversation_key({}, "/v1/completions", json.dumps({"prompt": ids[:64] + [7]}).encode())
    assert len(doc) > FIRST_CHUNK_CHARS
    for path, body in (("/v1/models", b""), (CHAT, b"not json"), (CHAT, b"[1]"), (CHAT, b'{"messages": []}'),
                       ("/v1/completions", b'{"prompt": ""}')):
        assert conversation_key({}, path, body) is None


def test_rank_replicas_keeps_keys_and_falls_back_when_overloaded():
    replicas = ["r0", "r1", "r2"]
    keys = [f"session:{i}" for i in range(300)]
    owner = {k: preferred_replica(k, replicas) for k in keys}
    counts = {r: list(owner.values()).count(r) for r in replicas}
    assert all(60 < c < 140 for c in counts.values()), counts  # spread evenly
    # losing a replica moves only the keys that were on it
    moved = [k for k in keys if owner[k] != "r2" and preferred_replica(k, ["r0", "r1"]) != owner[k]]
    assert moved == []
    key = keys[0]
    first = owner[key]
    others = [r for r in replicas if r != first]
    assert rank_replicas(key, replicas, {}, overload_at=4) == [[first], others]
    # busy but under the threshold, or everyone as busy: stays
    assert rank_replicas(key, replicas, {first: 3}, overload_at=4)[0] == [first]
    assert rank_replicas(key, replicas, {r: 9 for r in replicas}, overload_at=4)[0] == [first]
    # overloaded while another replica has room: the others first (Ray picks the least loaded of a rank)
    assert rank_replicas(key, replicas, {first: 4, others[0]: 6}, overload_at=4) == [others, [first]]
    assert rank_replicas(None, replicas, {}, overload_at=4) == [replicas]
    assert rank_replicas(key, [], {}, overload_at=4) == []


def test_metrics_of_all_replicas_on_one_page():
    pytest.importorskip("ray.serve")
    from vist2.serve.cluster import merge_metrics
    from vist2.serve.metrics import ServerMetrics

    a, b = ServerMetrics(), ServerMetrics()
    a.generation_tokens.inc(3)
    b.generation_tokens.inc(5)
    b.http_requests.labels("/v1/models", "200").inc()
    page = merge_metrics({"r1": a.render()[0].decode(), "r2": b.render()[0].decode()}).decode()
    assert 'vist2_generation_tokens_total{replica="r1"} 3.0' in page
    assert 'vist2_generation_tokens_total{replica="r2"} 5.0' in page
    assert 'vist2_http_requests_total{endpoint="/v1/models",replica="r2",status="200"} 1.0' in page
    assert page.count("# TYPE vist2_generation_tokens_total counter") == 1  # one family, two replicas


@pytest.mark.slow
def test_the_one_process_server_does_not_import_ray(tiny_dir):
    """Without --replicas, building and serving the app never imports Ray (the extra is optional)."""
    code = ("import argparse, sys; from vist2.serve import _add_arguments, build_app; "
            "p = argparse.ArgumentParser(); _add_arguments(p); "
            f"app, engine, info = build_app(p.parse_args(['--model', {str(tiny_dir)!r}])); "
            "import vist2.serve.app; assert 'ray' not in sys.modules, 'ray imported'; print(info['name'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == tiny_dir.name


def test_cluster_flags(tiny_dir, capsys):
    from vist2.serve import main

    assert main(["--model", str(tiny_dir), "--ray-address", "auto"]) == 2
    assert "--ray-address needs --replicas" in capsys.readouterr().err
    assert main(["--model", str(tiny_dir), "--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err


# -- a local Ray Serve application of two replicas -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    pytest.importorskip("ray.serve")
    from vist2.serve import _add_arguments, build_app
    from vist2.serve import cluster as cl

    p = argparse.ArgumentParser()
    _add_arguments(p)
    args = p.parse_args(["--model", str(tiny_dir), "--served-model-name", "tiny", "--replicas", "2",
                         "--port", str(_free_port()), "--chat-history", "compressed", "--max-batch", "4",
                         "--shutdown-grace", "1"])
    url = cl.start(args, build_app,
                   ray_init={"num_cpus": 2, "object_store_memory": 80 << 20, "log_to_driver": False})
    yield url
    cl.stop()


def _client(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _replica_of(url, session: str) -> str:
    import httpx

    r = httpx.post(url + "/v1/completions", headers={"x-session-id": session},
                   json={"model": "tiny", "prompt": "Hi", "max_tokens": 1}, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["x-vist2-replica"]


def _two_sessions(url) -> dict[str, str]:
    """Session ids that land on two different replicas: {replica: session}."""
    seen: dict[str, str] = {}
    for i in range(40):
        seen.setdefault(_replica_of(url, f"s{i}"), f"s{i}")
        if len(seen) == 2:
            return seen
    raise AssertionError(f"40 sessions all went to {set(seen)}")


@pytest.mark.slow
def test_two_replicas_answer_the_openai_client(cluster):
    import httpx
    import openai

    client = _client(cluster)
    [card] = client.models.list().data
    assert card.id == "tiny" and card.chunk_tokens == 64
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    parts = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, stream=True, extra_body={"ignore_eos": True}))
    assert parts[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError) as e:  # the replica's own error shape comes through
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    # an oversized body is refused by the replica's own limit (the ingress reads no more than it allows),
    # whether it declares its length or comes chunked
    big = b"[" + b"1," * (1 << 20) + b"1]"  # 2 MiB, over the tiny server's default limit (about 1.5 MiB)
    for content in (big, iter([big[:1 << 20], big[1 << 20:]])):
        r = httpx.post(cluster + "/v1/completions", content=content, timeout=60,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    replicas = _two_sessions(cluster)
    assert len(replicas) == 2
    time.sleep(1.5)  # replicas report their metrics every second
    page = httpx.get(cluster + "/metrics", timeout=30).text
    for replica in replicas:
        assert f'vist2_generation_tokens_total{{replica="{replica}"}}' in page


@pytest.mark.slow
def test_a_conversation_stays_on_its_replica(cluster):
    client = _client(cluster)
    long_user = "The quick brown fox jumps over the lazy dog. " * 30  # several chunks
    messages = [{"role": "user", "content": long_user}]
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=4,
                                                           temperature=0, extra_body={"ignore_eos": True})
    first, replica = raw.parse(), raw.headers["x-vist2-replica"]
    assert first.usage.memory_cache["misses"] > 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=4,
                                                           temperature=0, extra_body={"ignore_eos": True})
    second = raw.parse()
    assert raw.headers["x-vist2-replica"] == replica  # no session header: keyed by the first message
    cache = second.usage.memory_cache
    assert cache["prefix_hit_chunks"] > 0 and cache["misses"] <= 1, cache  # turn 1's chunks were there
    # a session header keeps any requests together
    assert len({_replica_of(cluster, "pinned") for _ in range(4)}) == 1


def _stream(url, session: str, out: dict, max_tokens: int) -> None:
    import httpx

    body = {"model": "tiny", "prompt": "A long story:", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    events = out["events"] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"x-session-id": session},
                      timeout=180) as r:
        out["replica"] = r.headers["x-vist2-replica"]
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_the_others_streams_finish(cluster):
    import ray
    from ray import serve

    sessions = _two_sessions(cluster)
    (victim, doomed_session), (survivor, kept_session) = sorted(sessions.items())
    doomed, kept = {}, {}
    threads = [threading.Thread(target=_stream, args=(cluster, doomed_session, doomed, 1500)),
               threading.Thread(target=_stream, args=(cluster, kept_session, kept, 1500))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(doomed.get("events", ())) < 5 or len(kept.get("events", ())) < 5:
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.05)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::vist2#Engine#{victim}", namespace="serve"), no_restart=True)
    for t in threads:
        t.join(180)
    assert doomed["replica"] == victim and kept["replica"] == survivor
    # the killed replica's stream: an OpenAI error event, then [DONE]
    assert doomed["events"][-1] == "[DONE]"
    error = json.loads(doomed["events"][-2])["error"]
    assert error["code"] == "replica_unavailable" and error["message"]
    # the other replica's stream is intact: every token, a finish reason, [DONE]
    assert kept["events"][-1] == "[DONE]"
    chunks = [json.loads(e) for e in kept["events"][:-1]]
    assert all("error" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 1500
    # the conversation goes on at once (on the survivor, or on the replacement if it is up already)
    assert _replica_of(cluster, doomed_session) != victim
    deadline = time.monotonic() + 240
    while True:
        app = serve.status().applications["vist2"]
        states = app.deployments["Engine"].replica_states
        if states.get("RUNNING", 0) == 2 and app.status == "RUNNING":
            break
        assert time.monotonic() < deadline, f"no replacement replica: {states}"
        time.sleep(1)
    seen = set(_two_sessions(cluster))
    assert survivor in seen and victim not in seen and len(seen) == 2
