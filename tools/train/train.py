"""Quantization-aware training of a tiny BitNet b1.58 model (see bitnet_qat.py), then export.

Time-budgeted: the learning-rate and weight-decay schedule follow the fraction of --seconds used
(measured from the first optimizer step, so compile time is excluded), which lets one call of a
fixed length use its time fully. Schedule (BitNet b1.58 2B-4T style, two stages):
  warmup over the first --warmup steps to --lr;
  stage 1 (progress < 0.5): linear decay lr -> 0.6*lr, weight decay --wd;
  stage 2: lr drops to 0.4*lr and decays linearly to 0.02*lr, weight decay 0.

Writes to --out: log.csv (step, tokens, train loss, lr, seconds), val.csv, the exported HF
model (hf/), and ckpt.pt (latent float weights) to --ckpt.
"""

import argparse
import csv
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from bitnet_qat import BitNetQAT, TinyConfig, count_params
from export_hf import export


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder from prep_data.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default="/tmp/bitnet_ckpt.pt")
    ap.add_argument("--seconds", type=float, default=420)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--eval-every", type=float, default=0.1, help="fraction of the budget")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = "cuda"

    stats = json.load(open(os.path.join(a.data, "stats.json")))
    cfg = TinyConfig(vocab_size=stats["vocab"], hidden_size=a.hidden, intermediate_size=a.ffn,
                     num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                     max_position_embeddings=a.seq, bos_token_id=stats["bos"], eos_token_id=stats["eos"])
    tern, emb, norms, packed = count_params(cfg)
    print(f"config {cfg.to_dict()}\nternary {tern/1e6:.2f}M embedding {emb/1e6:.2f}M norms {norms} "
          f"packed size ~{packed/1e6:.2f} MB", flush=True)

    train = torch.from_numpy(np.fromfile(os.path.join(a.data, "train.bin"), dtype=np.uint16).astype(np.int64)).to(dev)
    val = torch.from_numpy(np.fromfile(os.path.join(a.data, "val.bin"), dtype=np.uint16).astype(np.int64)).to(dev)
    print(f"train tokens {train.numel()} val tokens {val.numel()}", flush=True)
    nval = (val.numel() - 1) // a.seq
    vx = torch.stack([val[i * a.seq:(i + 1) * a.seq] for i in range(nval)])
    vy = torch.stack([val[i * a.seq + 1:(i + 1) * a.seq + 1] for i in range(nval)])

    model = BitNetQAT(cfg).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    fwd = torch.compile(model) if a.compile else model

    def loss_fn(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate():
        model.eval()
        tot = 0.0
        for i in range(0, nval, 64):
            tot += loss_fn(vx[i:i + 64], vy[i:i + 64]).item() * vx[i:i + 64].shape[0]
        model.train()
        return tot / nval

    g = torch.Generator(device=dev)
    g.manual_seed(a.seed)
    ar = torch.arange(a.seq + 1, device=dev)
    hi = train.numel() - a.seq - 1

    def batch():
        off = torch.randint(0, hi, (a.batch,), device=dev, generator=g)
        w = train[off[:, None] + ar]
        return w[:, :-1], w[:, 1:]

    logf = open(os.path.join(a.out, "log.csv"), "w", newline="")
    log = csv.writer(logf)
    log.writerow(["step", "tokens", "loss", "lr", "seconds"])
    valf = open(os.path.join(a.out, "val.csv"), "w", newline="")
    vlog = csv.writer(valf)
    vlog.writerow(["step", "tokens", "val_loss", "seconds"])

    best = (float("inf"), None, 0)  # (val loss, state on CPU, step): the exported model is the best one
    t_start = None
    step = 0
    next_eval = a.eval_every
    t_compile = time.time()
    while True:
        prog = 0.0 if t_start is None else (time.time() - t_start) / a.seconds
        if prog >= 1.0 or step >= a.max_steps:
            break
        warm = min(1.0, (step + 1) / a.warmup)
        if prog < 0.5:
            lr = a.lr * (1.0 - 0.4 * prog / 0.5)
            wd = a.wd
        else:
            lr = a.lr * (0.4 - 0.38 * (prog - 0.5) / 0.5)
            wd = 0.0
        lr *= warm
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[0]["weight_decay"] = wd
        opt.param_groups[1]["lr"] = lr
        x, y = batch()
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == 3:
            torch.cuda.synchronize()
            t_start = time.time()
            print(f"compile + first steps: {t_start - t_compile:.1f}s", flush=True)
        if step % 25 == 0 or step <= 3:
            el = 0.0 if t_start is None else time.time() - t_start
            lv = loss.item()
            log.writerow([step, step * a.batch * a.seq, f"{lv:.4f}", f"{lr:.6f}", f"{el:.1f}"])
            logf.flush()
            if step % 100 == 0:
                tps = (step - 3) * a.batch * a.seq / max(el, 1e-6)
                print(f"step {step} loss {lv:.4f} lr {lr:.2e} {el:.0f}s {tps/1e3:.0f}k tok/s", flush=True)
        if prog >= next_eval:
            next_eval += a.eval_every
            vl = evaluate()
            vlog.writerow([step, step * a.batch * a.seq, f"{vl:.4f}", f"{time.time()-t_start:.1f}"])
            valf.flush()
            print(f"  val loss {vl:.4f} ppl {math.exp(vl):.2f}", flush=True)
            if vl < best[0]:
                best = (vl, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, step)
    vl = evaluate()
    el = time.time() - t_start
    vlog.writerow([step, step * a.batch * a.seq, f"{vl:.4f}", f"{el:.1f}"])
    valf.flush()
    print(f"final step {step} tokens {step*a.batch*a.seq} val loss {vl:.4f} ppl {math.exp(vl):.2f} ({el:.0f}s)", flush=True)
    if vl < best[0]:
        best = (vl, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, step)
    print(f"exporting the best validation checkpoint: step {best[2]} val loss {best[0]:.4f}", flush=True)
    torch.save({"cfg": cfg.to_dict(), "state": best[1], "args": vars(a), "step": best[2]}, a.ckpt)
    hf = os.path.join(a.out, "hf")
    size = export(best[1], cfg, hf, eot_id=stats.get("eot"))
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(a.data, fn), hf)
    summary = {"steps": step, "tokens": step * a.batch * a.seq, "train_seconds": el, "final_val_loss": vl,
               "best_step": best[2], "best_val_loss": best[0], "best_val_ppl_qat_model": math.exp(best[0]), "safetensors_bytes": size, "args": vars(a), "config": cfg.to_dict()}
    json.dump(summary, open(os.path.join(a.out, "summary.json"), "w"), indent=2)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
