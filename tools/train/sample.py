"""Sample generations from an exported model with transformers (plain continuation and chat)."""

import argparse

import torch
from transformers import AutoTokenizer, BitNetForCausalLM

PLAIN = ["Once upon a time, there was a little robot named", "One day, Lily went to the park and", "Tom had a red ball."]
CHAT = ["Tell me a short story about a cat who learns to share.", "Write a bedtime story about a brave little bird."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    m = BitNetForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(a.device).eval()
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]
    for greedy in (True, False):
        torch.manual_seed(a.seed)
        for p in PLAIN:
            x = tok(p, return_tensors="pt").to(a.device)
            out = m.generate(**x, max_new_tokens=a.max_new, do_sample=not greedy, temperature=0.7, top_p=0.9,
                             eos_token_id=eos, pad_token_id=tok.eos_token_id)
            print(f"=== {'greedy' if greedy else 'sampled (T=0.7, top-p 0.9)'}: {p!r}\n{tok.decode(out[0], skip_special_tokens=True)}\n", flush=True)
        for q in CHAT:
            x = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True).to(a.device)
            out = m.generate(**x, max_new_tokens=a.max_new + 100, do_sample=not greedy, temperature=0.7, top_p=0.9,
                             eos_token_id=eos, pad_token_id=tok.eos_token_id)
            reply = tok.decode(out[0][x["input_ids"].shape[1]:], skip_special_tokens=True)
            print(f"=== chat {'greedy' if greedy else 'sampled (T=0.7, top-p 0.9)'}: User: {q}\nAssistant: {reply}\n", flush=True)


if __name__ == "__main__":
    main()
