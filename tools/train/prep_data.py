"""Split the generated stories, train the byte-level BPE tokenizer, tokenize the training set.

Inputs: one or more JSONL files from gen_stories.py. Outputs in --out:
  tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
  validation.txt   held-out stories (plain text, blank line between stories)
  train.bin        uint16 token stream for training (documents concatenated)
  val.bin          uint16 token stream of the held-out stories (plain form)
  stats.json

Documents: each story appears ONCE, either plain (<|begin_of_text|> story <|end_of_text|>)
or as a chat (the template below, the user turn being the request it was generated from),
chosen at random with --chat-frac. The chat prompt part is tokenized as rendered by the template
(as an engine does at inference), then the reply is tokenized separately and followed by <|eot_id|>.
"""

import argparse
import json
import os
import random

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS = [BOS, EOS, EOT]
# Llama-3's pre-tokenizer split (same structure as microsoft/bitnet-b1.58-2B-4T's tokenizer.json)
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
SYSTEMS = ["You are a helpful assistant.", "You are a helpful assistant that writes short stories for children.",
           "You are a friendly storyteller.", "You are a helpful AI assistant."]


def render_prompt(system, user):
    s = BOS
    if system:
        s += f"System: {system.strip()}{EOT}"
    return s + f"User: {user.strip()}{EOT}Assistant: "


def clean(story):
    return story.replace("\r", "").strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--chat-frac", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)

    recs, seen = [], set()
    for fn in a.jsonl:
        for line in open(fn):
            r = json.loads(line)
            s = clean(r["story"])
            if s in seen or len(s) < 200:
                continue
            seen.add(s)
            recs.append((r["prompt"].strip(), s))
    rng.shuffle(recs)
    val, train = recs[: a.n_val], recs[a.n_val:]
    with open(os.path.join(a.out, "validation.txt"), "w") as f:
        f.write("\n\n".join(s for _, s in val) + "\n")

    # tokenizer: byte-level BPE, Llama-3-style split, trained on the training stories and requests
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=a.vocab, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def corpus():
        for p, s in train:
            yield s
            yield f"System: {SYSTEMS[0]}\nUser: {p}\nAssistant: "

    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id, eos_id, eot_id = (tok.token_to_id(t) for t in SPECIALS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    tok.save(os.path.join(a.out, "tokenizer.json"))
    cfg = {
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }
    json.dump(cfg, open(os.path.join(a.out, "tokenizer_config.json"), "w"), indent=2)
    json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS},
              open(os.path.join(a.out, "special_tokens_map.json"), "w"), indent=2)

    def enc(texts):
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    # training documents
    is_chat = [rng.random() < a.chat_frac for _ in train]
    systems = [rng.choice(SYSTEMS) if rng.random() < 0.5 else None for _ in train]
    story_ids = enc([s for _, s in train])
    prompt_ids = enc([render_prompt(sy, p) for (p, _), sy in zip(train, systems)])
    stream = []
    n_chat = 0
    for i, ids in enumerate(story_ids):
        if is_chat[i]:
            stream.extend(prompt_ids[i] + ids + [eot_id])
            n_chat += 1
        else:
            stream.extend([bos_id] + ids + [eos_id])
    arr = np.array(stream, dtype=np.uint16)
    arr.tofile(os.path.join(a.out, "train.bin"))
    vstream = []
    for ids in enc([s for _, s in val]):
        vstream.extend([bos_id] + ids + [eos_id])
    np.array(vstream, dtype=np.uint16).tofile(os.path.join(a.out, "val.bin"))
    n_chars = sum(len(s) for _, s in train)
    stats = {"stories_total": len(recs), "train_stories": len(train), "val_stories": len(val),
             "train_chat_docs": n_chat, "train_tokens": len(stream), "val_tokens": len(vstream),
             "train_story_chars": n_chars, "chars_per_token": n_chars / max(1, sum(map(len, story_ids))),
             "vocab": tok.get_vocab_size(), "bos": bos_id, "eos": eos_id, "eot": eot_id}
    json.dump(stats, open(os.path.join(a.out, "stats.json"), "w"), indent=2)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
