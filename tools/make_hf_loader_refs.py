#!/usr/bin/env python3
"""Tiny Hugging Face model directories for the HF loader's weight-decoding tests.

For each variant it writes a model directory (config.json + model.safetensors) under
crates/bitnet-inference/tests/hf_loader/<variant>/, loads it back with transformers (or, for
the 1bitLLM layout that needs custom code, applies its weight_quant formula), and writes
expected.safetensors: per linear `<module>.trits` (int8 [out, in], what transformers computes)
and `<module>.multiplier` (f32 [1]) such that transformers' output is dot(trits, q)/s * multiplier.

Run: TORCHDYNAMO_DISABLE=1 python3 tools/make_hf_loader_refs.py
"""
import json, os, pathlib
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.bitnet import pack_weights, unpack_weights, WeightQuant, BitLinear, AutoBitLinear

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/bitnet-inference/tests/hf_loader"
H, HEADS, KV, FFN, V = 16, 2, 1, 32, 24
HD = H // HEADS
LINEARS = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (KV * HD, H), "self_attn.v_proj": (KV * HD, H),
           "self_attn.o_proj": (H, H), "mlp.gate_proj": (FFN, H), "mlp.up_proj": (FFN, H), "mlp.down_proj": (H, FFN)}
g = torch.Generator().manual_seed(1234)


def base_config(model_type, arch, **kw):
    c = dict(architectures=[arch], model_type=model_type, hidden_size=H, intermediate_size=FFN,
             num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
             max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2)
    c.update(kw)
    return c


def common(dtype, sub_norms):
    sd = {"model.embed_tokens.weight": torch.randn(V, H, generator=g).to(dtype),
          "model.norm.weight": (1 + 0.1 * torch.randn(H, generator=g)).to(dtype),
          "model.layers.0.input_layernorm.weight": (1 + 0.1 * torch.randn(H, generator=g)).to(dtype),
          "model.layers.0.post_attention_layernorm.weight": (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)}
    for name, n in sub_norms:
        sd[f"model.layers.0.{name}.weight"] = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    return sd


def write(variant, config, sd, expected):
    d = OUT / variant
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in expected.items()}, str(d / "expected.safetensors"))


def from_transformers(variant, dtype):
    model = AutoModelForCausalLM.from_pretrained(OUT / variant, dtype=dtype)
    exp = {}
    for lin in LINEARS:
        m = model.get_submodule(f"model.layers.0.{lin}")
        key = f"model.layers.0.{lin}"
        if isinstance(m, BitLinear):
            t = unpack_weights(m.weight, dtype=torch.float32)
            mult = 1.0 / m.weight_scale.float()
        elif isinstance(m, AutoBitLinear) and not m.online_quant:
            t = m.weight.float()
            mult = m.weight_scale.float()
        elif isinstance(m, AutoBitLinear):
            wq = WeightQuant.apply(m.weight).float()
            mult = wq.abs().max().reshape(1)
            t = torch.sign(wq)
        else:
            raise SystemExit(f"{variant}: {key} is {type(m)}")
        assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
        exp[key + ".trits"] = t.to(torch.int8)
        exp[key + ".multiplier"] = mult.float().reshape(1)
    return exp


SUB = [("self_attn.attn_sub_norm", H), ("mlp.ffn_sub_norm", FFN)]

# 1. BitNet 2B-4T layout: bitlinear, packed uint8 + bf16 weight_scale.
cfg = base_config("bitnet", "BitNetForCausalLM", hidden_act="relu2", dtype="bfloat16",
                  quantization_config=dict(quant_method="bitnet", linear_class="bitlinear", quantization_mode="offline"))
sd = common(torch.bfloat16, SUB)
for lin, (o, i) in LINEARS.items():
    t = torch.randint(-1, 2, (o, i), generator=g).to(torch.int8)
    sd[f"model.layers.0.{lin}.weight"] = pack_weights(t.clone())
    sd[f"model.layers.0.{lin}.weight_scale"] = torch.tensor([0.5 + torch.rand(1, generator=g).item()]).to(torch.bfloat16)
write("bitlinear", cfg, sd, {})
write("bitlinear", cfg, sd, from_transformers("bitlinear", torch.bfloat16))

# 2. autobitlinear offline: ternary floats + weight_scale.
cfg = base_config("bitnet", "BitNetForCausalLM", hidden_act="relu2", dtype="float32",
                  quantization_config=dict(quant_method="bitnet", linear_class="autobitlinear", quantization_mode="offline"))
sd = common(torch.float32, SUB)
for lin, (o, i) in LINEARS.items():
    sd[f"model.layers.0.{lin}.weight"] = torch.randint(-1, 2, (o, i), generator=g).float()
    sd[f"model.layers.0.{lin}.weight_scale"] = torch.tensor([0.5 + torch.rand(1, generator=g).item()])
write("autobitlinear_offline", cfg, sd, {})
write("autobitlinear_offline", cfg, sd, from_transformers("autobitlinear_offline", torch.float32))

# 3. autobitlinear online: bf16 masters, with use_rms_norm (per-linear input norms).
cfg = base_config("bitnet", "BitNetForCausalLM", hidden_act="relu2", dtype="bfloat16",
                  quantization_config=dict(quant_method="bitnet", linear_class="autobitlinear", quantization_mode="online",
                                           use_rms_norm=True, rms_norm_eps=1e-6))
sd = common(torch.bfloat16, SUB)
for lin, (o, i) in LINEARS.items():
    # Masters near rounding boundaries exercise round-half-even and the scale's rounding.
    sd[f"model.layers.0.{lin}.weight"] = (0.02 * torch.randn(o, i, generator=g)).to(torch.bfloat16)
    sd[f"model.layers.0.{lin}.rms_norm.weight"] = (1 + 0.1 * torch.randn(i, generator=g)).to(torch.bfloat16)
write("autobitlinear_online", cfg, sd, {})
# The engine reproduces the model loaded in float32 (masters upcast, then ternarized).
write("autobitlinear_online", cfg, sd, from_transformers("autobitlinear_online", torch.float32))

# 4. Llama architecture with bitlinear packing (HF1BitLLM / Falcon3 1.58bit), untied lm_head.
cfg = base_config("llama", "LlamaForCausalLM", hidden_act="silu", dtype="bfloat16", tie_word_embeddings=False,
                  quantization_config=dict(quant_method="bitnet", linear_class="bitlinear", quantization_mode="offline",
                                           modules_to_not_convert=["lm_head"]))
sd = common(torch.bfloat16, [])
sd["lm_head.weight"] = torch.randn(V, H, generator=g).to(torch.bfloat16)
for lin, (o, i) in LINEARS.items():
    t = torch.randint(-1, 2, (o, i), generator=g).to(torch.int8)
    sd[f"model.layers.0.{lin}.weight"] = pack_weights(t.clone())
    sd[f"model.layers.0.{lin}.weight_scale"] = torch.tensor([0.5 + torch.rand(1, generator=g).item()]).to(torch.bfloat16)
write("llama_bitlinear", cfg, sd, {})
write("llama_bitlinear", cfg, sd, from_transformers("llama_bitlinear", torch.bfloat16))

# 5. 1bitLLM layout (custom code, not loadable by transformers): fp16 masters, inner_attn_ln /
# ffn_layernorm, ternarized with the same formula as WeightQuant (its weight_quant).
cfg = base_config("llama", "BitnetForCausalLM", hidden_act="silu", torch_dtype="float16", tie_word_embeddings=False,
                  input_bits=8, weight_bits=1)
sd = common(torch.float16, [("self_attn.inner_attn_ln", H), ("mlp.ffn_layernorm", FFN)])
sd["lm_head.weight"] = torch.randn(V, H, generator=g).to(torch.float16)
exp = {}
for lin, (o, i) in LINEARS.items():
    w = (0.02 * torch.randn(o, i, generator=g)).to(torch.float16)
    sd[f"model.layers.0.{lin}.weight"] = w
    wq = WeightQuant.apply(w.float())
    exp[f"model.layers.0.{lin}.trits"] = torch.sign(wq).to(torch.int8)
    exp[f"model.layers.0.{lin}.multiplier"] = wq.abs().max().reshape(1)
write("onebitllm", cfg, sd, exp)
print("wrote", OUT)
