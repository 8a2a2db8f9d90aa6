"""Requests a careless or hostile client sends: each gets a clear error, the server stays up
and serves everyone else as before."""

import json
import threading
import time

import pytest

from conftest import Server

GOOD = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def srv():
    s = Server("--request-timeout", "1.5", "--max-body", "64K")
    yield s
    assert s.stop() == 0


def post_raw(srv, body, extra=b""):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return srv.raw(head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def error_of(out):
    return json.loads(out.partition(b"\r\n\r\n")[2])["error"]


def test_hostile_requests_and_the_server_stays_well(srv):
    status, reference, _ = srv.post("/v1/completions", GOOD)
    assert status == 200
    cases = [
        # (body, status, param or None)
        (b'{"prompt": "Once upon', 400, None),  # truncated JSON
        (b'{"prompt": "abc\xff\xfe"}', 400, None),  # invalid UTF-8
        (b"[" * 10000 + b"]" * 10000, 400, None),  # nesting deeper than the parser allows
        (b"", 400, None),
        (b"null", 400, None),
        (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": 10**15}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "n": 10**9}).encode(), 400, "n"),
        (json.dumps({"prompt": "x", "n": 1.5}).encode(), 400, "n"),
        (json.dumps({"prompt": "x", "logprobs": 10**6}).encode(), 400, "logprobs"),
        (json.dumps({"prompt": "x", "stop": ["a"] * 1000}).encode(), 400, "stop"),
        (json.dumps({"prompt": "x", "temperature": float("nan")}).encode().replace(b"NaN", b"1e999"), 400, None),
        (json.dumps({"prompt": "x", "seed": 2**70}).encode(), 400, "seed"),
        (json.dumps({"prompt": [2**40]}).encode(), 400, "prompt"),
        (json.dumps({"prompt": [100000]}).encode(), 400, "prompt"),
        (json.dumps({"prompt": [[1, 2]] * 1000}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x", "unknown_field": True}).encode(), 400, "unknown_field"),
        (json.dumps({"prompt": "x", "stream_options": {"include_usage": True}}).encode(), 400, "stream_options"),
        (json.dumps({"prompt": "x", "logit_bias": {"abc": 1}}).encode(), 400, "logit_bias"),
        (json.dumps({"prompt": []}).encode(), 400, "prompt"),
    ]
    for body, want, param in cases:
        status, out = post_raw(srv, body)
        assert status == want, (body[:80], out[:300])
        err = error_of(out)
        assert err["message"] and err["type"] == "invalid_request_error", err
        if param:
            assert err["param"] == param, (body[:80], err)
    # A body over --max-body: 413, whatever the claimed length.
    status, out = post_raw(srv, b'{"prompt": "' + b"a" * (200 << 10) + b'"}')
    assert status == 413
    status, out = srv.raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\n{")
    assert status == 413
    # A slow body (slowloris): cut at the request timeout with a 408.
    t = time.time()
    body = json.dumps(GOOD).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    status, out = srv.raw(head + body, send_pause=0.1, slow_from=len(head))
    assert status == 408 and time.time() - t < 5, out[:200]
    # Slow headers: the connection is closed at the timeout.
    t = time.time()
    status, out = srv.raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100, send_pause=0.05)
    assert time.time() - t < 5 and status in (None, 408)
    # Not HTTP at all.
    status, out = srv.raw(b"\x00\x01\x02 garbage\r\n\r\n")
    assert status in (None, 400)
    # Nothing of that changed what others get.
    status, again, _ = srv.post("/v1/completions", GOOD)
    assert status == 200 and again["choices"][0]["text"] == reference["choices"][0]["text"]
    assert srv.proc.poll() is None
    m = srv.wait_idle()
    assert m["bitnet_requests_running"] == 0


def test_a_text_too_long_to_fit_is_refused_before_tokenizing(srv):
    long = "a " * 30000  # 60 KB: under the body limit, far over what 512 tokens can hold
    for path, body in [
        ("/v1/completions", {"prompt": long, "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}], "max_tokens": 4}),
    ]:
        status, out, _ = srv.post(path, body)
        assert status == 400, out
        err = out["error"]
        assert err["code"] == "context_length_exceeded", err
        assert "before tokenizing" in err["message"] and "60000 bytes" in err["message"], err
    assert srv.post("/v1/completions", GOOD)[0] == 200


def test_hostile_http_framing(srv):
    """Broken HTTP framing, headers and request lines: each a clear 4xx from the HTTP layer or
    the body reader, and the server serves others as before."""
    _, reference, _ = srv.post("/v1/completions", GOOD)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    big = json.dumps({"prompt": "a" * (100 << 10)}).encode()
    chunked_big = b"".join(
        b"%x\r\n%s\r\n" % (len(big[i : i + 4096]), big[i : i + 4096]) for i in range(0, len(big), 4096)
    )
    cases = [
        # A chunk size past 64 bits, and one that is not hexadecimal.
        (head + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nab\r\n0\r\n\r\n", 400),
        (head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
        # A chunked body larger than --max-body: no length is claimed, the limit still holds.
        (head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked_big + b"0\r\n\r\n", 413),
        (head + b"Content-Length: -1\r\n\r\n{}", 400),
        (head + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x", 400),
        # A 1 MiB header line, and 500 headers.
        (head + b"X-Big: " + b"a" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\n{}", 431),
        (head + b"".join(b"X-%d: a\r\n" % i for i in range(500)) + b"Content-Length: 2\r\n\r\n{}", 431),
        (b"GET /" + b"a" * (100 << 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"FROB /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    ]
    for request, want in cases:
        status, out = srv.raw(request)
        assert status == want, (request[:100], out[:300])
    status, again, _ = srv.post("/v1/completions", GOOD)
    assert status == 200 and again["choices"][0]["text"] == reference["choices"][0]["text"]
    assert srv.proc.poll() is None


def test_hostile_chat_and_tokenizer_bodies(srv):
    """The chat and tokenizer routes' own hostile bodies (the completions route's are above)."""
    user = {"role": "user", "content": "hi"}
    cases = [
        # 3,500 empty messages: no bytes of content, but the template renders ~56 KB of text,
        # which cannot fit 512 tokens: refused before that text is tokenized.
        ("/v1/chat/completions", {"messages": [{"role": "user"}] * 3500}, "messages", "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": None}, "messages", None),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [[[["x"]]]]}]}, "messages[0].content", None),
        ("/v1/chat/completions", {"messages": [user], "n": 17}, "n", None),
        ("/v1/chat/completions", {"messages": [user], "logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
        ("/v1/chat/completions", {"messages": [user], "logit_bias": {"4096": 1}}, "logit_bias", None),
        ("/v1/chat/completions", {"messages": [user], "stop": ["x" * 257]}, "stop", None),
        ("/tokenize", {"content": 5}, "content", None),
        ("/tokenize", {"content": "x", "extra": 1}, "extra", None),
        ("/detokenize", {"tokens": [-1]}, "tokens[0]", None),
        ("/detokenize", {"tokens": [2**32]}, "tokens[0]", None),
        ("/detokenize", {"tokens": [100000]}, "tokens", None),
    ]
    for path, body, param, code in cases:
        status, out, _ = srv.post(path, body)
        assert status == 400, (path, str(body)[:100], out)
        err = out["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", (str(body)[:100], err)
        if code:
            assert err["code"] == code and "before tokenizing" in err["message"], err
    bad_utf8 = b'{"messages":[{"role":"user","content":"\xff\xfe"}]}'
    status, out = srv.raw(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(bad_utf8)
        + bad_utf8
    )
    assert status == 400 and error_of(out)["code"] == "invalid_json", out
    assert srv.post("/v1/completions", GOOD)[0] == 200


def test_concurrent_tokenizing_is_bounded():
    """16 concurrent 1 MiB /tokenize bodies (the default --max-body): each was tokenized
    (~150 MB each, 2.1 GB at once before issue 18); rendering and tokenizing now run a few at a
    time, and a text that cannot fit the context is refused by its bytes before tokenizing."""
    s = Server()
    try:
        base = s.rss_bytes()
        body = json.dumps({"content": "ab " * 340000}).encode()
        assert len(body) < 1 << 20
        peak, statuses, done = [base], [], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], s.rss_bytes())
                time.sleep(0.005)

        def one():
            head = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            statuses.append(s.raw(head + body, timeout=300)[0])

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [threading.Thread(target=one) for _ in range(16)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        done.set()
        sampler.join()
        assert statuses == [400] * 16, statuses
        assert peak[0] - base < 256 << 20, f"{(peak[0] - base) >> 20} MiB more at the peak"
        status, out, _ = s.post("/tokenize", {"content": "ab " * 340000})
        assert status == 400 and "before tokenizing" in out["error"]["message"], out
    finally:
        assert s.stop() == 0
