"""A bounded load test on loopback: 64 concurrent clients, some hanging up mid-stream or right
after sending; every other request gets one whole answer, greedy and seeded texts equal their
one-at-a-time texts, no slot is leaked and memory stays level across rounds."""

import concurrent.futures as cf
import json
import socket

import httpx
import pytest

from conftest import Server

CLIENTS = 64
PER_CLIENT = 3
PROMPTS = [
    "Once upon a time",
    "The little fish",
    "In a small village by the sea",
    "Tom and his dog",
    "The sun was shining and",
    "A girl named Lily found",
    "Every morning the old man",
    "The big red ball",
]


@pytest.fixture(scope="module")
def srv():
    s = Server("--parallel", "16", "--max-queue", "256")
    yield s
    assert s.stop() == 0


def body(k):
    """Request k: its prompt, greedy or seeded, streamed or not."""
    b = {"prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": 24}
    if k % 2:
        b.update(temperature=0.9, seed=k % 5)
    else:
        b.update(temperature=0)
    return b


def reference(srv, k):
    status, r, _ = srv.post("/v1/completions", body(k))
    assert status == 200
    return r["choices"][0]["text"]


def run_one(srv, k):
    """Returns (kind, id, text)."""
    mode = k % 10
    if mode == 3:  # hang up mid-stream
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=120,
                          json={**body(k), "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
            it = r.iter_lines()
            next(it), next(it)
        return "cancelled", None, None
    if mode == 7:  # hang up right after sending (queued or in prefill)
        data = json.dumps({**body(k), "max_tokens": 300, "ignore_eos": True}).encode()
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        s.close()
        return "disconnected", None, None
    if mode in (0, 5, 9):  # streamed
        text, ids, finish, done = "", set(), None, False
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body(k), "stream": True}, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                c = json.loads(line[6:])
                ids.add(c["id"])
                ch = c["choices"][0]
                text += ch["text"]
                finish = ch["finish_reason"] or finish
        assert done and finish in ("stop", "length") and len(ids) == 1
        return "complete", ids.pop(), text
    r = httpx.post(srv.url + "/v1/completions", json=body(k), timeout=120)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["choices"][0]["finish_reason"] in ("stop", "length")
    return "complete", j["id"], j["choices"][0]["text"]


def test_load_rounds(srv):
    n = CLIENTS * PER_CLIENT
    refs = {k: reference(srv, k) for k in range(20)}  # body(k) repeats every 40; 20 covers both kinds
    want = {k: refs[k % 20] if (k % 20) in refs and body(k) == body(k % 20) else None for k in range(n)}
    rss = []
    for _ in range(2):
        before = srv.wait_idle()
        with cf.ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda k: run_one(srv, k), range(n)))
        after = srv.wait_idle(timeout=60)
        complete = [(k, r) for k, r in enumerate(results) if r[0] == "complete"]
        cancelled = sum(r[0] == "cancelled" for r in results)
        disconnected = sum(r[0] == "disconnected" for r in results)
        # Every request that was not abandoned got exactly one answer, under its own id.
        assert len({r[1] for _, r in complete}) == len(complete) == n - cancelled - disconnected
        for k, r in complete:
            if want[k] is not None:
                assert r[2] == want[k], (k, body(k))
        d = {key: after[key] - before[key] for key in (
            "bitnet_requests_finished_total", "bitnet_requests_cancelled_total")}
        finished, gone = d["bitnet_requests_finished_total"], d["bitnet_requests_cancelled_total"]
        assert len(complete) <= finished <= len(complete) + disconnected
        assert cancelled <= gone <= cancelled + disconnected
        assert finished + gone <= n
        assert after["bitnet_requests_running"] == 0 and after["bitnet_requests_queued"] == 0
        assert after["bitnet_kv_cache_usage_ratio"] == 0
        rss.append(srv.rss_bytes())
    # The second round needed no more memory than the first.
    assert rss[1] <= rss[0] * 1.10 + (8 << 20), rss
