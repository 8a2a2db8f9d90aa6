"""`response_format` with the official `openai` client: `json_schema` output parses and
validates (checked by the `jsonschema` package), streamed and not, with n=2; `json_object`
gives an object; invalid and hostile schemas are clean 400s (or bounded in time), and the
server goes on serving. bitnet-tiny writes stories, never JSON, by itself."""

import concurrent.futures as cf
import json
import time

import jsonschema
import openai
import pytest

from test_openai import CHAT, expect_400

# Nested object, enum, array, required fields, integer ranges; strings bounded so the tiny
# model finishes well within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 1, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pet", "tags", "home"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
SCHEMA_PARAM = "response_format.json_schema.schema"


def valid(text):
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return value


def test_json_schema_whole_and_streamed(client, model_id):
    free = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=200, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    r = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=200, temperature=0, response_format=FORMAT
    )
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    valid(c.message.content)
    # Sampled and streamed: the same text as the same seed unstreamed, and valid.
    kw = dict(model=model_id, messages=CHAT, max_tokens=200, temperature=1.0, seed=21, response_format=FORMAT)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    valid(text)


def test_json_schema_n2_and_completions(client, model_id):
    r = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=200, temperature=1.0, seed=3, n=2, response_format=FORMAT
    )
    texts = [c.message.content for c in r.choices]
    for c in r.choices:
        assert c.finish_reason == "stop"
        valid(c.message.content)
    assert texts[0] != texts[1]
    r = client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=200, temperature=0.7, seed=4, n=2,
        extra_body={"response_format": FORMAT},
    )
    for c in r.choices:
        assert c.finish_reason == "stop"
        valid(c.text)


def test_json_object(client, model_id):
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=model_id, messages=CHAT, max_tokens=300, temperature=0.8, seed=seed,
            response_format={"type": "json_object"},
        )
        c = r.choices[0]
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict), c.message.content
        else:
            # Out of tokens before the object closed: the prefix, as OpenAI gives it.
            assert c.finish_reason == "length" and c.message.content.startswith("{")
    r = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=300, temperature=0, response_format={"type": "text"}
    )
    assert r.choices[0].message.content


def test_length_logprobs_and_stop(client, model_id):
    kw = dict(model=model_id, messages=CHAT, temperature=0, response_format=FORMAT)
    full = client.chat.completions.create(max_tokens=200, **kw).choices[0].message.content
    cut = client.chat.completions.create(max_tokens=5, **kw).choices[0]
    assert cut.finish_reason == "length" and full.startswith(cut.message.content)
    with pytest.raises(ValueError):
        json.loads(cut.message.content)
    # Logprobs are those of the constrained distribution: every alternative is a token the
    # schema allowed, so the first one always starts the object.
    r = client.chat.completions.create(max_tokens=200, logprobs=True, top_logprobs=5, **kw)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content == full
    assert all(alt.token.startswith("{") for alt in content[0].top_logprobs)
    for t in content:
        assert t.top_logprobs[0].token == t.token and sum(2.718281828 ** a.logprob for a in t.top_logprobs) <= 1.0001
    # A stop string cuts the JSON where it occurs.
    r = client.chat.completions.create(max_tokens=200, stop=['"age"'], **kw).choices[0]
    assert r.finish_reason == "stop" and full.startswith(r.message.content) and "age" not in r.message.content


def test_invalid_schemas_are_400(client, model_id):
    chat = lambda fmt: client.chat.completions.create(  # noqa: E731
        model=model_id, messages=CHAT, max_tokens=20, response_format=fmt
    )
    schema = lambda s: chat({"type": "json_schema", "json_schema": {"name": "x", "schema": s}})  # noqa: E731
    err = expect_400(lambda: schema({"type": "fancy"}), SCHEMA_PARAM)
    assert "fancy" in err["message"], err
    expect_400(lambda: schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}), SCHEMA_PARAM)
    expect_400(lambda: schema({"type": "integer", "minimum": 5, "maximum": 1}), SCHEMA_PARAM)
    expect_400(lambda: schema([1, 2]), SCHEMA_PARAM)
    expect_400(lambda: chat({"type": "json_schema", "json_schema": {"schema": PERSON}}), "response_format.json_schema.name")
    expect_400(lambda: chat({"type": "yaml"}), "response_format.type")


def test_hostile_schemas_are_refused_quickly_and_others_go_on(client, model_id):
    deep = {"type": "integer"}
    for _ in range(60):
        deep = {"type": "array", "items": deep}
    huge = {"enum": [f"value-{i}-" + "x" * 20 for i in range(30000)]}  # ~900 kB, within the body limit
    costly = {"anyOf": [{"type": "string", "pattern": f"^(a|b)*a(a|b){{{n}}}$"} for n in range(20, 60)]}
    # Meanwhile, an ordinary request is served as usual.
    with cf.ThreadPoolExecutor(4) as pool:
        normal = pool.submit(
            client.chat.completions.create, model=model_id, messages=CHAT, max_tokens=30, temperature=0
        )
        for what, s in [("deep", deep), ("huge", huge), ("costly", costly)]:
            t = time.time()
            try:
                r = client.chat.completions.create(
                    model=model_id, messages=CHAT, max_tokens=20, temperature=0,
                    response_format={"type": "json_schema", "json_schema": {"name": what, "schema": s}},
                )
                # Compiled within the limits: then it ran within them too.
                assert r.choices[0].finish_reason in ("stop", "length")
            except openai.BadRequestError as e:
                assert e.body["param"] in (SCHEMA_PARAM, "response_format"), e.body
            # Generous for a loaded 2-core machine; the limits stop it far sooner.
            assert time.time() - t < 30, what
        assert normal.result().choices[0].message.content
