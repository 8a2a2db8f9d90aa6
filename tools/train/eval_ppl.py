"""Perplexity of a transformers model on a text file, computed the way llama.cpp's `perplexity` does.

The whole file is tokenized once (with BOS, as the tokenizer's post-processor adds it). It is cut
into floor(n_tokens / ctx) chunks of ctx tokens; the first token of every chunk is replaced by BOS;
each chunk is run on its own (no state between chunks) and only its second half is scored: the
logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1 (ctx/2 - 1 tokens a chunk).
PPL = exp(mean negative log-likelihood over all scored tokens).

Usage: python3 eval_ppl.py MODEL_DIR TEXT_FILE [--ctx 512] [--chunks N] [--device cpu] [--dtype float32]
"""

import argparse
import math

import torch
from transformers import AutoTokenizer, BitNetForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=None, help="score only the first N chunks")
    a = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(a.model)
    model = BitNetForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).to(a.device).eval()
    text = open(a.text, encoding="utf-8").read()
    ids = tok(text, add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id
    if ids[0] != bos:
        ids = [bos] + ids
    n_chunks = len(ids) // a.ctx
    if a.chunks is not None:
        n_chunks = min(n_chunks, a.chunks)
    first = a.ctx // 2
    print(f"tokens {len(ids)}, ctx {a.ctx}, chunks {n_chunks}, scored per chunk {a.ctx - 1 - first}", flush=True)
    nll, count = 0.0, 0
    chunks = []
    for i in range(n_chunks):
        c = list(ids[i * a.ctx:(i + 1) * a.ctx])
        c[0] = bos
        chunks.append(c)
    with torch.no_grad():
        for b in range(0, n_chunks, a.batch):
            x = torch.tensor(chunks[b:b + a.batch], device=a.device)
            logits = model(input_ids=x).logits.double()
            lp = torch.log_softmax(logits[:, first:a.ctx - 1], dim=-1)
            tgt = x[:, first + 1:a.ctx]
            nll -= lp.gather(-1, tgt[..., None]).sum().item()
            count += tgt.numel()
            print(f"[{min(b + a.batch, n_chunks)}]{math.exp(nll / count):.4f}", end=" ", flush=True)
    print()
    print(f"Final estimate: PPL = {math.exp(nll / count):.4f} over {count} tokens ({n_chunks} chunks of {a.ctx})")


if __name__ == "__main__":
    main()
