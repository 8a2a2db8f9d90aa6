"""Check an exported packed model against the QAT model it came from.

Loads the HF packed folder with transformers' BitNetForCausalLM (bitlinear/offline) and compares its
logits with BitNetQAT's quantized forward pass (float32, same latent weights), and checks that the
packed codes unpack to the same ternary matrices. With --random, builds a random model first
(no checkpoint needed) to test the export path itself.
"""

import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import BitNetForCausalLM

from bitnet_qat import BitLinear, BitNetQAT, TinyConfig, weight_quant
from export_hf import TERNARY, export, unpack_ternary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt")
    ap.add_argument("--hf", required=True)
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.random:
        cfg = TinyConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        m = BitNetQAT(cfg)
        with torch.no_grad():  # make norms non-trivial
            for n, p in m.named_parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        export(m.state_dict(), cfg, a.hf, eot_id=2)
    else:
        ck = torch.load(a.ckpt, map_location="cpu")
        cfg = TinyConfig(**ck["cfg"])
        m = BitNetQAT(cfg)
        m.load_state_dict(ck["state"])
    m = m.float().eval().to(a.device)
    BitLinear.bf16_scale = True
    with torch.no_grad():  # the export stores embedding and norms in bf16
        for n, p in m.named_parameters():
            if n.split(".")[-2] not in TERNARY:
                p.copy_(p.to(torch.bfloat16).float())
    st = load_file(a.hf + "/model.safetensors")
    sd = m.state_dict()
    for name in sd:
        if name.split(".")[-2] in TERNARY:
            t, g = weight_quant(sd[name].cpu())
            assert torch.equal(unpack_ternary(st[name]).float(), t), name
    hf = BitNetForCausalLM.from_pretrained(a.hf, dtype=torch.float32).to(a.device).eval()
    x = torch.randint(3, cfg.vocab_size, (2, 48), device=a.device)
    x[:, 0] = cfg.bos_token_id
    with torch.no_grad():
        ref = m(x).float()
        got = hf(input_ids=x).logits.float()
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"packed codes OK; logits rel diff {rel:.2e}; argmax agreement {agree:.4f}")
    if rel > 1e-2:  # CPU gives ~3e-7; on GPU rare int8 rounding flips give ~2e-3
        sys.exit("logits differ too much")


if __name__ == "__main__":
    main()
