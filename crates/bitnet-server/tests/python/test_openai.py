"""The official `openai` client against `bitnet serve` on bitnet-tiny."""

import concurrent.futures as cf
import json
import socket
import time

import httpx
import openai
import pytest

from conftest import Server

CHAT = [{"role": "user", "content": "Tell me a story about a fox."}]


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["bitnet-tiny"]
    assert client.models.retrieve("bitnet-tiny").id == "bitnet-tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=20, seed=5)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    u = r.usage
    assert 0 < u.completion_tokens <= 20 and u.prompt_tokens > 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if c.finish_reason == "length":
        assert u.completion_tokens == 20


def test_chat_stream_equals_whole(client, model_id):
    whole = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=24, seed=11, temperature=0.9
    )
    chunks = list(
        client.chat.completions.create(
            model=model_id, messages=CHAT, max_tokens=24, seed=11, temperature=0.9,
            stream=True, stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    # The usage chunk comes last, with no choices; the others carry usage null.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_text_and_ids(client, model_id, server):
    prompt = "Once upon a time"
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    status, ids, _ = server.post("/tokenize", {"content": prompt})
    assert status == 200
    r2 = client.completions.create(model=model_id, prompt=ids["tokens"], max_tokens=16, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    status, back, _ = server.post("/detokenize", {"tokens": ids["tokens"]})
    assert status == 200 and back["content"].endswith(prompt)
    streamed = client.completions.create(
        model=model_id, prompt=prompt, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    # Several prompts: choices in prompt order.
    r3 = client.completions.create(model=model_id, prompt=[prompt, "The cat"], max_tokens=8, temperature=0)
    assert [c.index for c in r3.choices] == [0, 1]
    assert r.choices[0].text.startswith(r3.choices[0].text)


def test_n2(client, model_id):
    r = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=24, n=2, seed=3, temperature=1.0
    )
    assert [c.index for c in r.choices] == [0, 1]
    a, b = (c.message.content for c in r.choices)
    assert a != b, "two choices drew the same text"
    alone = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=24, seed=3, temperature=1.0
    )
    assert alone.choices[0].message.content == a
    chunks = list(client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=24, n=2, seed=3, temperature=1.0, stream=True
    ))
    texts = ["", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [a, b]


def test_seed_reproducible_under_load(client, model_id):
    def ask(seed, temperature=1.0, max_tokens=32):
        r = client.chat.completions.create(
            model=model_id, messages=CHAT, max_tokens=max_tokens, seed=seed, temperature=temperature
        )
        return r.choices[0].message.content

    first = ask(1234)
    assert ask(1234) == first
    assert ask(4321) != first
    # Again while other requests (other seeds, lengths, prompts) share the batch.
    with cf.ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(ask, s, 0.7, 40 + s) for s in range(6)]
        again = [pool.submit(ask, 1234) for _ in range(2)]
        assert [f.result() for f in again] == [first, first]
        [f.result() for f in noise]


def test_stop_strings(client, model_id):
    base = client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=40, temperature=0
    ).choices[0].text
    words = base.split()
    stop = next(w for w in words[3:] if len(w) > 3)
    r = client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop, "@@"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]
    chunks = client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=40, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_logprobs(client, model_id):
    r = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    text = "".join(t.token for t in content)
    assert text.startswith(r.choices[0].message.content) or r.choices[0].finish_reason == "stop"
    c = client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(d) == 2 for d in lp.top_logprobs)
    streamed = list(client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3,
        stream=True,
    ))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_max_tokens_and_sampling_fields(client, model_id):
    r = client.chat.completions.create(
        model=model_id, messages=CHAT, max_completion_tokens=7, temperature=0.8, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"13": -100}, user="tester", seed=1,
        extra_body={"top_k": 20, "min_p": 0.05, "typical_p": 0.95, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    # A banned token never comes: ban the greedy first token and see it change.
    g = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=1, temperature=0, logprobs=1)
    first = g.choices[0].logprobs.tokens[0]
    status, ids, _ = client._client, None, None  # noqa: the token id comes from the server below
    import urllib.request  # noqa: E402
    tok = json.loads(urllib.request.urlopen(urllib.request.Request(
        str(client.base_url).replace("/v1/", "/tokenize"),
        data=json.dumps({"content": first, "add_special": False}).encode())).read())["tokens"]
    assert len(tok) == 1
    banned = client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=1, temperature=0, logit_bias={str(tok[0]): -100}
    )
    assert banned.choices[0].text != g.choices[0].text


def expect_400(fn, param):
    with pytest.raises(openai.BadRequestError) as e:
        fn()
    err = e.value.body
    assert e.value.status_code == 400
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]
    return err


def test_errors_400(client, model_id, server):
    chat = lambda **kw: client.chat.completions.create(model=model_id, messages=CHAT, **kw)  # noqa: E731
    expect_400(lambda: chat(temperature=3), "temperature")
    expect_400(lambda: chat(top_p=2), "top_p")
    expect_400(lambda: chat(n=100000), "n")
    expect_400(lambda: chat(max_tokens=10**12), "max_tokens")
    expect_400(lambda: chat(extra_body={"temperature": "hot"}), "temperature")
    expect_400(lambda: chat(extra_body={"frobnicate": 1}), "frobnicate")
    expect_400(lambda: chat(response_format={"type": "xml"}), "response_format.type")
    expect_400(lambda: chat(logit_bias={"999999": 1}), "logit_bias")
    expect_400(lambda: client.chat.completions.create(model=model_id, messages=[{"role": "wizard", "content": "x"}]), "messages[0].role")
    # A prompt longer than the context: both numbers in the message.
    long = "story " * 2000
    err = expect_400(lambda: client.completions.create(model=model_id, prompt=long, max_tokens=5), "prompt")
    n = int(err["message"].split(" has ", 1)[1].split(" tokens", 1)[0])
    assert n > 512 and "512" in err["message"], err["message"]
    assert err["code"] == "context_length_exceeded"
    # /tokenize is bounded as a prompt is: that text is more tokens than the context.
    status, toks, _ = server.post("/tokenize", {"content": long})
    assert status == 400 and toks["error"]["param"] == "content", toks
    assert toks["error"]["code"] == "context_length_exceeded", toks
    assert f"the content is {n} tokens" in toks["error"]["message"], toks
    err = expect_400(lambda: client.completions.create(model=model_id, prompt="Hi", max_tokens=511), "max_tokens")
    assert "512" in err["message"]


def test_errors_404(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert e.value.body["param"] == "model"
    status, body = server.get("/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"


def test_errors_413(server):
    body = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    status, out = server.raw(head + body)
    assert status == 413 and b'"body_too_large"' in out
    # Without a length (chunked), the limit holds while reading.
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [body[i:i + 1 << 16] for i in range(0, len(body), 1 << 16)])
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, out = server.raw(head + chunked + b"0\r\n\r\n")
    assert status == 413 and b'"body_too_large"' in out


def test_api_key_and_cors():
    s = Server("--api-key", "sesame", "--cors-origin", "http://app.example")
    try:
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert ok.models.list().data[0].id == "bitnet-tiny"
        for key in ("wrong", ""):
            bad = openai.OpenAI(base_url=s.url + "/v1", api_key=key or "x", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        assert s.get("/health")[0] == 200  # no key needed
        assert s.get("/v1/models")[0] == 401
        # CORS: a browser's preflight from the allowed origin passes (without a key), another
        # origin gets no allowance.
        pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
        r = httpx.options(s.url + "/v1/chat/completions", headers=pre)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.options(s.url + "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = httpx.get(s.url + "/v1/models", headers={"Origin": "http://app.example", "Authorization": "Bearer sesame"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    finally:
        assert s.stop() == 0


def long_request(url, max_tokens=400):
    """A streamed completion that runs a while (ignore_eos), read to its end."""
    with httpx.stream("POST", url + "/v1/completions", json={
        "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
    }, timeout=60) as r:
        return r.status_code, [line for line in r.iter_lines() if line]


def test_queue_full_429_and_cancel_while_queued():
    s = Server("--parallel", "1", "--max-queue", "1")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with cf.ThreadPoolExecutor(2) as pool:
            running = pool.submit(long_request, s.url)
            deadline = time.time() + 10
            while s.metrics()["bitnet_requests_running"] < 1:
                assert time.time() < deadline
                time.sleep(0.01)
            # A second waits in the queue; its client hangs up before it runs.
            queued = socket.create_connection(("127.0.0.1", s.port))
            body = json.dumps({"prompt": "Hello", "max_tokens": 5}).encode()
            queued.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            while s.metrics()["bitnet_requests_queued"] < 1:
                assert time.time() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model="bitnet-tiny", prompt="Hi", max_tokens=3)
            assert e.value.response.headers["retry-after"] == "1"
            assert e.value.body["type"] == "rate_limit_error"
            queued.close()
            status, lines = running.result()
            assert status == 200 and lines[-1] == "data: [DONE]"
        m = s.wait_idle()
        assert m["bitnet_requests_cancelled_total"] == 1
        assert m["bitnet_requests_finished_total"] == 1
    finally:
        assert s.stop() == 0


def wait_cancelled(server, count, timeout=10):
    """Waits until the server is idle with `count` requests cancelled in all (the counter is
    published with the step that drops the request, a moment after the slot frees); returns
    the metrics."""
    deadline = time.time() + timeout
    while True:
        m = server.wait_idle(timeout=timeout)
        if m["bitnet_requests_cancelled_total"] == count or time.time() > deadline:
            assert m["bitnet_requests_cancelled_total"] == count, m
            return m
        time.sleep(0.05)


def test_disconnect_cancels(server):
    before = server.wait_idle()
    # Streamed: read the first chunk, hang up.
    with httpx.stream("POST", server.url + "/v1/completions", json={
        "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True,
    }) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))
    m = wait_cancelled(server, before["bitnet_requests_cancelled_total"] + 1)
    # Not streamed: send, wait until it runs, hang up.
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 10
    while server.metrics()["bitnet_requests_admitted_total"] <= m["bitnet_requests_admitted_total"]:
        assert time.time() < deadline
        time.sleep(0.01)
    sock.close()
    after = wait_cancelled(server, before["bitnet_requests_cancelled_total"] + 2)
    # Both stopped long before their 400 tokens: the slots were freed early.
    generated = after["bitnet_generation_tokens_total"] - before["bitnet_generation_tokens_total"]
    assert generated < 400, generated


def test_keep_alive_while_waiting():
    s = Server("--parallel", "1", "--keep-alive", "0.05")
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            first = pool.submit(long_request, s.url, 300)
            while s.metrics()["bitnet_requests_running"] < 1:
                time.sleep(0.01)
            # This one waits for the slot: comments keep its connection alive meanwhile.
            with httpx.stream("POST", s.url + "/v1/completions", json={
                "prompt": "Hello", "max_tokens": 3, "stream": True}) as r:
                raw = b"".join(r.iter_raw()).decode()
            first.result()
        assert raw.count(": keep-alive") >= 2, raw[:300]
        assert raw.rstrip().endswith("data: [DONE]")
        assert raw.index(": keep-alive") < raw.index('"text"')
    finally:
        assert s.stop() == 0


def test_graceful_shutdown():
    s = Server("--shutdown-timeout", "20")
    with cf.ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(long_request, s.url, 200)
        while s.metrics()["bitnet_requests_running"] < 1:
            time.sleep(0.01)
        s.proc.send_signal(2)  # SIGINT, as Ctrl-C
        time.sleep(0.2)
        # New requests get 503 while the one in flight finishes.
        status, body = s.get("/health")
        assert status == 503 and json.loads(body)["status"] == "draining"
        status, body, _ = s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == "shutting_down"
        status, lines = inflight.result()
    assert status == 200 and lines[-1] == "data: [DONE]"
    finals = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(timeout=10) == 0


def test_shutdown_timeout_cancels():
    s = Server("--shutdown-timeout", "0.5")
    with cf.ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(long_request, s.url, 500)
        while s.metrics()["bitnet_requests_running"] < 1:
            time.sleep(0.01)
        t = time.time()
        s.proc.send_signal(15)
        assert s.proc.wait(timeout=10) == 0
        assert time.time() - t < 5
        try:
            status, lines = inflight.result()
            assert lines[-1] != "data: [DONE]"
        except httpx.HTTPError:
            pass  # the connection was cut: as good
