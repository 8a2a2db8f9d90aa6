"""Export a BitNetQAT state dict to the transformers BitNet packed format (bitlinear, offline).

Layout (see /work/shared/docs/BITNET.md): each ternary projection W [out, in] becomes
  `<name>.weight`        uint8 [out/4, in]; bits 2i..2i+1 (i = 0..3, least significant first) of
                         packed row r hold row r + i*out/4, code = t + 1 (0 -> -1, 1 -> 0, 2 -> +1)
  `<name>.weight_scale`  bf16 [1] = 1/gamma, so that transformers' BitLinear computes
                         y = (sum t*q) / (s * weight_scale) = gamma * (sum t*q) / s.
Embedding (tied lm_head) and all RMSNorm weights are bf16.
"""

import json
import os

import torch
from safetensors.torch import save_file

from bitnet_qat import TinyConfig, weight_quant

TERNARY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """t: integer-valued tensor [out, in] in {-1,0,1}; out divisible by 4."""
    out, _ = t.shape
    assert out % 4 == 0, f"rows {out} not divisible by 4"
    codes = (t.to(torch.int16) + 1).to(torch.uint8)
    assert int(codes.max()) <= 2
    q = out // 4
    packed = torch.zeros((q, t.shape[1]), dtype=torch.uint8)
    for i in range(4):
        packed |= codes[i * q:(i + 1) * q] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    q = packed.shape[0]
    rows = [((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(4)]
    return torch.cat(rows, 0) if q else packed.to(torch.int8)


def hf_config(cfg: TinyConfig):
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "relu2",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.eos_token_id,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "bitlinear",
            "quantization_mode": "offline",
        },
    }


def export(state_dict, cfg: TinyConfig, out_dir, eot_id=None):
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for name, p in state_dict.items():
        p = p.detach().float().cpu()
        if name.endswith(".weight") and name.split(".")[-2] in TERNARY:
            t, gamma = weight_quant(p)
            tensors[name] = pack_ternary(t)
            tensors[name[: -len("weight")] + "weight_scale"] = (1.0 / gamma).reshape(1).to(torch.bfloat16)
        else:
            tensors[name] = p.to(torch.bfloat16).contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
    eos = [cfg.eos_token_id] + ([eot_id] if eot_id is not None else [])
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.eos_token_id,
           "do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 300}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    return os.path.getsize(os.path.join(out_dir, "model.safetensors"))
