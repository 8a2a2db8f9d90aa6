#!/usr/bin/env python3
"""Build tiny BitNet-family models and record transformers' logits as the oracle.

Run from the repository root:  python3 tools/make_fixtures.py
Writes crates/bitnet-inference/tests/fixtures/<variant>/ and manifest.json.
See tools/README.md for what each fixture is and how it was made.
"""
import os

# transformers' BitLinear helpers are wrapped in @torch.compile; run them eagerly so the oracle is
# the plain per-op f32 arithmetic (and no C compiler is needed).
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

import gguf

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "bitnet-inference" / "tests" / "fixtures"

# ---- shapes ----------------------------------------------------------------------------------
# H/NH/FFN are per variant (spec["h"], spec["nh"], spec["ffn"]); the defaults are the full tiny shape.
# The vocabulary is 320 (256 byte tokens + 61 merges + 3 specials) to keep all fixtures under 6 MB.
L, HD, V, CTX = 2, 64, 320, 128
THETA, EPS = 10000.0, 1e-5
BOS, EOS, EOT = 317, 318, 319
IDS = [BOS, 0, 17, 300, 319, 42, 42, 7, 255, 256, 128, 64, 1, 299, 3, 250, 88, 310, 318, 13, 2, 133, 77, 5]
assert len(IDS) == 24 and 0 in IDS and V - 1 in IDS

MARGIN = 0.004  # min distance (int8 units) of every x*127/max|x| from a .5 rounding boundary
MAX_GAP = 1e-3  # min relative gap between the largest and second-largest |x| of every token

BF16, F16 = "bf16", "f16"


def rnd(a, kind):
    """Round float32 numpy array to the nearest value of the storage dtype (kept as f32)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    dt = torch.bfloat16 if kind == BF16 else torch.float16
    return t.to(dt).to(torch.float32).numpy()


def torch_dt(kind):
    return torch.bfloat16 if kind == BF16 else torch.float16


# ---- variants --------------------------------------------------------------------------------
FULL = dict(h=256, nh=4, ffn=512)   # multiples of 256: TQ1_0/TQ2_0 rows
SMALL = dict(h=128, nh=2, ffn=256)  # master-weight variants (2 bytes a weight) kept small for the size budget
VARIANTS = {
    "bitnet-packed": dict(**FULL, seed=1, arch="bitnet", act="relu2", sub=True, tied=True, nkv=2, storage="bitlinear",
                          fdt=BF16, rope="top"),
    "bitnet-autobitlinear": dict(**FULL, seed=2, arch="bitnet", act="relu2", sub=True, tied=True, nkv=2,
                                 storage="autobitlinear", fdt=BF16, rope="params"),
    "bitnet-online-bf16": dict(**SMALL, seed=3, arch="bitnet", act="relu2", sub=True, tied=True, nkv=1, storage="online",
                               fdt=BF16, rope="params"),
    "onebitllm": dict(**SMALL, seed=4, arch="onebitllm", act="silu", sub=True, tied=False, nkv=2, storage="online",
                      fdt=F16, rope="top"),
    "llama-bitnet": dict(**FULL, seed=5, arch="llama", act="silu", sub=False, tied=False, nkv=2, storage="bitlinear",
                         fdt=BF16, rope="top"),
}
LIN = ["q", "k", "v", "o", "gate", "up", "down"]


def lin_shape(name, spec):
    H, NH, FFN, nkv = spec["h"], spec["nh"], spec["ffn"], spec["nkv"]
    return {"q": (NH * HD, H), "k": (nkv * HD, H), "v": (nkv * HD, H), "o": (H, NH * HD),
            "gate": (FFN, H), "up": (FFN, H), "down": (H, FFN)}[name]


def make_params(spec):
    """Canonical parameters: float32 arrays whose values are exact in the storage dtype."""
    rng = np.random.default_rng(spec["seed"])
    fdt = spec["fdt"]
    H, FFN = spec["h"], spec["ffn"]
    P = {}
    e = rnd(rng.standard_normal((V, H)).astype(np.float32) * 0.3, fdt)
    small = np.abs(e) < 2.0 ** -10  # keep bf16 values inside f16's normal range (GGUF token_embd is F16)
    e[small] = np.where(e[small] < 0, -(2.0 ** -10), 2.0 ** -10)
    assert np.array_equal(e.astype(np.float16).astype(np.float32), e)
    P["embed"] = e

    def norm(n):
        return rnd(1.0 + 0.15 * rng.standard_normal(n).astype(np.float32), fdt)

    for l in range(L):
        P[f"{l}.attn_norm"] = norm(H)
        P[f"{l}.ffn_norm"] = norm(H)
        if spec["sub"]:
            P[f"{l}.attn_sub_norm"] = norm(H)
            P[f"{l}.ffn_sub_norm"] = norm(FFN)
        for n in LIN:
            shape = lin_shape(n, spec)
            t = rng.integers(-1, 2, size=shape).astype(np.int8)
            if spec["storage"] == "bitlinear":
                # weight_scale is a power of two: exact in bf16/f16/f32, and so is its inverse
                ws = float(2.0 ** rng.integers(3, 6))
                P[f"{l}.{n}"] = dict(t=t, ws=ws, mult=1.0 / ws)
            elif spec["storage"] == "autobitlinear":
                ws = float(rng.integers(12, 25)) / 256.0  # <= 5 significant bits: exact in bf16 and f16
                P[f"{l}.{n}"] = dict(t=t, ws=ws, mult=ws)
            else:  # online: master weights, ternarized at load with gamma = mean|W|
                g0 = float(rng.uniform(0.04, 0.09))
                mag = np.where(t == 0, rng.uniform(0.0, 0.3, size=shape), rng.uniform(0.7, 1.5, size=shape))
                sign = np.where(t == 0, rng.choice([-1.0, 1.0], size=shape), t)
                w = rnd((g0 * mag * sign).astype(np.float32), fdt)
                gamma = np.abs(w.astype(np.float64)).mean()
                r = w / gamma
                assert np.all(np.clip(np.round(r), -1, 1) == t), "master weights do not ternarize as designed"
                assert np.abs(np.abs(r) - 0.5).min() > 0.05
                P[f"{l}.{n}"] = dict(t=t, w=w)
    P["out_norm"] = norm(H)
    if not spec["tied"]:
        P["lm_head"] = rnd(rng.standard_normal((V, H)).astype(np.float32) * 0.3, fdt)
    return P


# ---- HF writers ------------------------------------------------------------------------------
def pack_rows(t):
    """transformers' pack_weights layout: uint8 [out/4, in], bits 2i..2i+1 of row r = row r + i*out/4."""
    out = t.shape[0]
    q = (t.astype(np.int16) + 1).astype(np.uint8)
    rows = out // 4
    p = np.zeros((rows, t.shape[1]), np.uint8)
    for i in range(4):
        p |= q[i * rows:(i + 1) * rows] << (2 * i)
    return p


HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def hf_tensors(P, spec, names1bit=False):
    fdt = torch_dt(spec["fdt"])

    def f(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(fdt)

    T = {"model.embed_tokens.weight": f(P["embed"]), "model.norm.weight": f(P["out_norm"])}
    if not spec["tied"]:
        T["lm_head.weight"] = f(P["lm_head"])
    for l in range(L):
        pre = f"model.layers.{l}."
        T[pre + "input_layernorm.weight"] = f(P[f"{l}.attn_norm"])
        T[pre + "post_attention_layernorm.weight"] = f(P[f"{l}.ffn_norm"])
        if spec["sub"]:
            an, fn = ("self_attn.inner_attn_ln", "mlp.ffn_layernorm") if names1bit else \
                ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")
            T[pre + an + ".weight"] = f(P[f"{l}.attn_sub_norm"])
            T[pre + fn + ".weight"] = f(P[f"{l}.ffn_sub_norm"])
        for n in LIN:
            p = P[f"{l}.{n}"]
            key = pre + HF_NAMES[n]
            if spec["storage"] in ("bitlinear", "autobitlinear"):
                T[key + ".weight"] = torch.from_numpy(pack_rows(p["t"]))
                T[key + ".weight_scale"] = torch.tensor([p["ws"]], dtype=fdt)
            else:
                T[key + ".weight"] = f(p["w"])
    return T


def hf_config(spec, oracle_for_1bit=False):
    fdt_name = "bfloat16" if spec["fdt"] == BF16 else "float16"
    H, NH, FFN = spec["h"], spec["nh"], spec["ffn"]
    c = dict(vocab_size=V, hidden_size=H, intermediate_size=FFN, num_hidden_layers=L, num_attention_heads=NH,
             num_key_value_heads=spec["nkv"], hidden_act=spec["act"], max_position_embeddings=CTX,
             initializer_range=0.02, rms_norm_eps=EPS, use_cache=True, bos_token_id=BOS, eos_token_id=EOS,
             tie_word_embeddings=spec["tied"], attention_bias=False, attention_dropout=0.0)
    if spec["rope"] == "params":
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": THETA}
    else:
        c["rope_theta"] = THETA
    if spec["arch"] == "onebitllm" and not oracle_for_1bit:
        # 1bitLLM/bitnet_b1_58-* layout: custom remote code, fp16 masters, no quantization_config
        c.update(architectures=["BitnetForCausalLM"], model_type="bitnet", pad_token_id=None,
                 pretraining_tp=1, rope_scaling=None, torch_dtype=fdt_name, weight_bits=1, input_bits=8,
                 auto_map={"AutoConfig": "configuration_bitnet.BitnetConfig",
                           "AutoModelForCausalLM": "modeling_bitnet.BitnetForCausalLM"})
        return c
    if spec["arch"] == "llama":
        c.update(architectures=["LlamaForCausalLM"], model_type="llama", mlp_bias=False, pretraining_tp=1,
                 head_dim=HD)
    else:
        c.update(architectures=["BitNetForCausalLM"], model_type="bitnet")
    c["torch_dtype"] = fdt_name
    if spec["storage"] == "bitlinear":
        qc = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
    elif spec["storage"] == "autobitlinear":
        qc = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
    else:
        qc = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    c["quantization_config"] = qc
    return c


def write_hf(d, P, spec, oracle_for_1bit=False, tokenizer=None):
    d.mkdir(parents=True, exist_ok=True)
    names1bit = spec["arch"] == "onebitllm" and not oracle_for_1bit
    save_file(hf_tensors(P, spec, names1bit), str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_config(spec, oracle_for_1bit), indent=2) + "\n")
    gen = {"bos_token_id": BOS, "eos_token_id": [EOS, EOT], "do_sample": False}
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(d / "tokenizer.json"))


def load_hf(d):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    # transformers 5.24 leaves embeddings/norms in the checkpoint's bf16 when the autobitlinear-offline
    # deserializer runs, although dtype=float32 was asked for; the stored values are exact in f32, so the
    # upcast is lossless and makes every variant's oracle a float32 computation.
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.to(torch.float32)
    m.eval()
    return m


# ---- hooks / hardening -----------------------------------------------------------------------
def layer_mods(model, l, spec):
    layer = model.model.layers[l]
    a, m = layer.self_attn, layer.mlp
    return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "gate": m.gate_proj, "up": m.up_proj,
            "down": m.down_proj, "attn_norm": layer.input_layernorm, "ffn_norm": layer.post_attention_layernorm,
            "attn_sub_norm": getattr(a, "attn_sub_norm", None), "ffn_sub_norm": getattr(m, "ffn_sub_norm", None)}


def run_capture(model, spec):
    caps = {}
    hs = []
    for l in range(L):
        mods = layer_mods(model, l, spec)
        for n in LIN:
            def hook(mod, args, key=f"{l}.{n}"):
                caps[key] = args[0].detach()[0].clone()
            hs.append(mods[n].register_forward_pre_hook(hook))
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].float().clone()
    for h in hs:
        h.remove()
    return logits, caps


def bad_columns(x):
    """Columns of x [n, width] where some token's x*127/max|x| is within MARGIN of a .5, or a near-tie of
    the max (returns the runner-up's column)."""
    scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    v = x * scale
    d = (v - torch.floor(v) - 0.5).abs()
    bad = set(torch.nonzero((d < MARGIN).any(dim=0)).flatten().tolist())
    top = x.abs().topk(2, dim=-1)
    for i in range(x.shape[0]):
        a1, a2 = top.values[i].tolist()
        # exact duplicates (GQA heads sharing one kv head at the first position) give the same max either way
        if 0 < (a1 - a2) / a1 < MAX_GAP:
            bad.add(int(top.indices[i, 1]))
    return sorted(bad), float(d.min())


def set_linear(mod, p, spec):
    """Write the (possibly modified) ternary weights of p into a loaded transformers module."""
    if spec["storage"] == "bitlinear":
        mod.weight.data = torch.from_numpy(pack_rows(p["t"]))
    elif spec["storage"] == "autobitlinear":
        mod.weight.data = torch.from_numpy(p["t"].astype(np.float32))
    else:
        mod.weight.data = torch.from_numpy(p["w"].copy())


def harden(model, P, spec, rng):
    """Nudge norm weights (or, with no norm in front, swap ternary entries of the producing linear) until
    every activation fed to a ternary linear is MARGIN away from an int8 rounding boundary."""
    groups = []
    for l in range(L):
        groups.append((l, "attn_norm", ["q", "k", "v"]))
        groups.append((l, "attn_sub_norm" if spec["sub"] else None, ["o"]))
        groups.append((l, "ffn_norm", ["gate", "up"]))
        groups.append((l, "ffn_sub_norm" if spec["sub"] else None, ["down"]))
    stats = {"norm_nudges": 0, "weight_swaps": 0, "runs": 0}
    for l, norm, lins in groups:
        mods = layer_mods(model, l, spec)
        for it in range(400):
            _, caps = run_capture(model, spec)
            stats["runs"] += 1
            bad = sorted(set(sum((bad_columns(caps[f"{l}.{n}"])[0] for n in lins), [])))
            if not bad:
                break
            if norm is not None:
                key = f"{l}.{norm}"
                w = P[key].copy()
                for j in bad:
                    while True:
                        f = 1.0 + rng.choice([-1.0, 1.0]) * rng.uniform(0.01, 0.05)
                        nv = rnd(np.array([w[j] * f], np.float32), spec["fdt"])[0]
                        if nv != w[j]:
                            break
                    w[j] = nv
                P[key] = w
                mods[norm].weight.data = torch.from_numpy(w.copy())
                stats["norm_nudges"] += len(bad)
            else:
                # llama-bitnet: o_proj's input is the attention output (column j <- v_proj row of its kv
                # head), down_proj's input is act(gate)*up (column j <- up_proj row j).
                prod = "v" if lins == ["o"] else "up"
                p = P[f"{l}.{prod}"]
                t = p["t"].copy()
                rows = set()
                for j in bad:
                    if prod == "v":
                        h, dd = divmod(j, HD)
                        rows.add((h // (spec["nh"] // spec["nkv"])) * HD + dd)
                    else:
                        rows.add(j)
                for r in sorted(rows):
                    while True:
                        a, b = rng.integers(0, t.shape[1], size=2)
                        if t[r, a] != t[r, b]:
                            break
                    t[r, a], t[r, b] = t[r, b], t[r, a]
                p["t"] = t
                set_linear(mods[prod], p, spec)
                stats["weight_swaps"] += len(rows)
        else:
            raise RuntimeError(f"hardening did not converge for layer {l} {norm} {lins}")
    return stats


def check_margins(caps):
    worst = 1.0
    for k, x in caps.items():
        bad, dmin = bad_columns(x)
        assert not bad, f"activation margin violated at {k}"
        worst = min(worst, dmin)
    return worst


# ---- independent reference forward (for wrong-scheme margins) --------------------------------
def ref_forward(P, spec, act="token", kv16=False, dt=torch.float32, f64=False):
    cdt = torch.float64 if f64 else torch.float32
    NH = spec["nh"]

    def R(x):
        return x.to(dt).to(cdt) if dt != torch.float32 else x

    def T(a):
        return torch.from_numpy(np.asarray(a)).to(cdt)

    def norm(x, w):
        return R(x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS) * T(w))

    def actq(x):
        if act == "none":
            return x
        if act == "token":
            s = 127 / x.abs().max(-1, keepdim=True).values.clamp(min=1e-5)
            return torch.round(x * s).clamp(-128, 127) / s
        if act.startswith("block"):
            b = int(act[5:])
            xb = x.reshape(x.shape[0], -1, b)
            s = 127 / xb.abs().max(-1, keepdim=True).values.clamp(min=1e-5)
            return (torch.round(xb * s).clamp(-128, 127) / s).reshape(x.shape)
        if act == "q8k":  # llama.cpp Q8_K: blocks of 256, iscale = -128/max (signed max-|x| element)
            xb = x.reshape(x.shape[0], -1, 256)
            idx = xb.abs().argmax(-1, keepdim=True)
            mx = torch.gather(xb, -1, idx)
            iscale = -128.0 / mx
            q = torch.round(xb * iscale).clamp(max=127)
            return (q / iscale).reshape(x.shape)
        raise ValueError(act)

    def lin(x, key):
        p = P[key]
        if "w" in p:
            w = torch.from_numpy(p["w"]).float()
            g = w.abs().mean().clamp(min=1e-5)
            W = (torch.round(w / g).clamp(-1, 1) * g).to(cdt)
        else:
            W = T(p["t"].astype(np.float32)) * p["mult"]
        return R(actq(x) @ W.T)

    n = len(IDS)
    x = T(P["embed"][IDS])
    inv = 1.0 / (THETA ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
    fr = torch.arange(n, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos().to(cdt), emb.sin().to(cdt)
    nkv = spec["nkv"]
    mask = torch.full((n, n), float("-inf"), dtype=cdt).triu(1)

    def rope(t):  # t [heads, n, HD]
        t1, t2 = t[..., :HD // 2], t[..., HD // 2:]
        return R(t * cos + torch.cat([-t2, t1], -1) * sin)

    for l in range(L):
        h = norm(x, P[f"{l}.attn_norm"])
        q = lin(h, f"{l}.q").reshape(n, NH, HD).transpose(0, 1)
        k = lin(h, f"{l}.k").reshape(n, nkv, HD).transpose(0, 1)
        v = lin(h, f"{l}.v").reshape(n, nkv, HD).transpose(0, 1)
        q, k = rope(q), rope(k)
        if kv16:
            k, v = k.half().to(cdt), v.half().to(cdt)
        k = k.repeat_interleave(NH // nkv, 0)
        v = v.repeat_interleave(NH // nkv, 0)
        s = R(q @ k.transpose(1, 2) * HD ** -0.5) + mask
        a = R(torch.softmax(s, -1)) @ v
        a = R(a).transpose(0, 1).reshape(n, NH * HD)
        if spec["sub"]:
            a = norm(a, P[f"{l}.attn_sub_norm"])
        x = R(x + lin(a, f"{l}.o"))
        h = norm(x, P[f"{l}.ffn_norm"])
        g, u = lin(h, f"{l}.gate"), lin(h, f"{l}.up")
        m = R(torch.relu(g) ** 2 * u) if spec["act"] == "relu2" else R(torch.nn.functional.silu(g) * u)
        if spec["sub"]:
            m = norm(m, P[f"{l}.ffn_sub_norm"])
        x = R(x + lin(m, f"{l}.down"))
    x = norm(x, P["out_norm"])
    head = P["embed"] if spec["tied"] else P["lm_head"]
    return (x @ T(head).T).float()


# ---- GGUF ------------------------------------------------------------------------------------
GGUF_ARCH = "bitnet-b1.58"
GGUF_LIN = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
            "down": "ffn_down"}
I2_S = 36


def pack_i2s(t, scale):
    """microsoft/BitNet I2_S (x86 layout): blocks of 128 -> 32 bytes, byte j = elements j,j+32,j+64,j+96 in
    bits 7-6,5-4,3-2,1-0, code = t+1; then a 32-byte tail whose first 4 bytes are the f32 multiplier."""
    q = (t.reshape(-1).astype(np.int16) + 1).astype(np.uint8)
    assert q.size % 128 == 0
    q = q.reshape(-1, 4, 32)
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def write_gguf(path, P, spec, qtype, tokenizer=None):
    w = gguf.GGUFWriter(str(path), GGUF_ARCH)
    H, NH, FFN = spec["h"], spec["nh"], spec["ffn"]
    ftype = {"F32": 0, "TQ1_0": 36, "TQ2_0": 37, "I2_S": 40}[qtype]
    w.add_name(f"fixture {path.stem}")
    w.add_file_type(ftype)
    w.add_vocab_size(V)
    w.add_context_length(CTX)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(FFN)
    w.add_head_count(NH)
    w.add_head_count_kv(spec["nkv"])
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(HD)
    if tokenizer is not None:
        add_gguf_tokenizer(w, tokenizer)
    w.add_tensor("token_embd.weight", P["embed"].astype(np.float16))
    for l in range(L):
        b = f"blk.{l}."
        w.add_tensor(b + "attn_norm.weight", P[f"{l}.attn_norm"].astype(np.float32))
        for n in ["q", "k", "v"]:
            add_ternary(w, b + GGUF_LIN[n] + ".weight", P[f"{l}.{n}"], qtype)
        w.add_tensor(b + "attn_sub_norm.weight", P[f"{l}.attn_sub_norm"].astype(np.float32))
        add_ternary(w, b + "attn_output.weight", P[f"{l}.o"], qtype)
        w.add_tensor(b + "ffn_norm.weight", P[f"{l}.ffn_norm"].astype(np.float32))
        for n in ["gate", "up"]:
            add_ternary(w, b + GGUF_LIN[n] + ".weight", P[f"{l}.{n}"], qtype)
        w.add_tensor(b + "ffn_sub_norm.weight", P[f"{l}.ffn_sub_norm"].astype(np.float32))
        add_ternary(w, b + "ffn_down.weight", P[f"{l}.down"], qtype)
    w.add_tensor("output_norm.weight", P["out_norm"].astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_ternary(w, name, p, qtype):
    if "w" in p:
        # master weights: exactly the f32 values transformers' online WeightQuant produces (and that
        # microsoft's preprocess/convert pipeline writes): round(W/gamma).clamp(-1,1) / (1/gamma)
        w32 = torch.from_numpy(p["w"]).float()
        sc = 1.0 / w32.abs().mean().clamp(min=1e-5)
        dense = ((w32 * sc).round().clamp(-1, 1) / sc).numpy()
        assert qtype == "F32"
    else:
        dense = p["t"].astype(np.float32) * np.float32(p["mult"])
    if qtype == "F32":
        w.add_tensor(name, dense)
    elif qtype == "I2_S":
        raw = pack_i2s(p["t"], p["mult"])
        w.add_tensor(name, raw.view(np.int8), raw_shape=list(p["t"].shape), raw_dtype=I2_S)
    else:
        gt = getattr(gguf.GGMLQuantizationType, qtype)
        qd = gguf.quants.quantize(dense, gt)
        back = gguf.quants.dequantize(qd, gt)
        assert np.array_equal(back.reshape(dense.shape), dense), f"{qtype} is not exact for {name}"
        w.add_tensor(name, qd, raw_dtype=gt)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import codecs
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401  (the Zen of Python, rot13-encoded in this.s)
    text = codecs.decode(this.s, "rot13")
    corpus = [text] * 4 + [line for line in text.splitlines() if line] + [
        "Once upon a time, there was a little robot named Kara who lived in a world made of glitter.",
        "The quick brown fox jumps over the lazy dog. 0123456789 !?,.;:'\"()[]{}",
        "System: You are a helpful assistant. User: What is 2+2? Assistant: 4.",
        "BitNet b1.58 uses ternary weights {-1, 0, +1} and 8-bit activations.",
        "Ünïcödé, 日本語, emoji 🙂 and tabs\tand\nnewlines.",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BOS, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    if tok.get_vocab_size() != BOS:
        return None
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    assert tok.token_to_id("<|begin_of_text|>") == BOS and tok.token_to_id("<|eot_id|>") == EOT
    return tok


def add_gguf_tokenizer(w, tok):
    j = json.loads(tok.to_str())
    vocab = sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [k for k, _ in vocab] + ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    assert len(tokens) == V
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * BOS + [3, 3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_eot_token_id(EOT)
    w.add_add_bos_token(True)


# ---- main ------------------------------------------------------------------------------------
def main():
    t0 = time.time()
    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    manifest = {"generator": "tools/make_fixtures.py", "transformers": transformers.__version__,
                "torch": torch.__version__.split("+")[0], "gguf": "0.19", "ids_file": "ids.json",
                "logits_file": "logits.npy (float32 [n_tokens, vocab])", "activation_margin_int8": MARGIN,
                "fixtures": []}
    report = {}
    tokenizer = make_tokenizer()
    for name, spec in VARIANTS.items():
        d = OUT / name
        if d.exists():
            shutil.rmtree(d)
        rng = np.random.default_rng(1000 + spec["seed"])
        P = make_params(spec)
        with tempfile.TemporaryDirectory() as td:
            od = Path(td) / "oracle"
            is1 = spec["arch"] == "onebitllm"
            write_hf(od, P, spec, oracle_for_1bit=is1)
            model = load_hf(od)
            # the loaded model must use the ternary linears
            mods = layer_mods(model, 0, spec)
            want = "BitLinear" if spec["storage"] == "bitlinear" else "AutoBitLinear"
            assert type(mods["q"]).__name__ == want, type(mods["q"]).__name__
            assert type(model.lm_head).__name__ == "Linear"
            assert model.model.embed_tokens.weight.dtype == torch.float32
            stats = harden(model, P, spec, rng)
            mem_logits, _ = run_capture(model, spec)
            shutil.rmtree(od)
            # rebuild from the final canonical weights and reload fresh: that is the oracle
            write_hf(od, P, spec, oracle_for_1bit=is1)
            model = load_hf(od)
            logits, caps = run_capture(model, spec)
            worst = check_margins(caps)
            assert torch.equal(logits, mem_logits), "reloaded model differs from the hardened in-memory model"
        write_hf(d, P, spec, tokenizer=tokenizer)
        (d / "ids.json").write_text(json.dumps({"ids": IDS}) + "\n")
        np.save(d / "logits.npy", logits.numpy().astype(np.float32))

        # independent reference and wrong schemes
        ref = ref_forward(P, spec)
        b256 = spec["h"] % 256 == 0 and spec["ffn"] % 256 == 0
        ref64 = ref_forward(P, spec, f64=True)
        o = logits
        r = {"ref_f32_vs_oracle": float((ref - o).abs().max()),
             "ref_f64_vs_oracle": float((ref64 - o).abs().max()),
             "no_act_quant": float((ref_forward(P, spec, act="none") - o).abs().max()),
             "block32_q8": float((ref_forward(P, spec, act="block32") - o).abs().max()),
             # blocks of 256 need widths that are multiples of 256 (not the SMALL variants)
             "block256_q8": float((ref_forward(P, spec, act="block256") - o).abs().max()) if b256 else None,
             "q8_k_256": float((ref_forward(P, spec, act="q8k") - o).abs().max()) if b256 else None,
             "kv_f16": float((ref_forward(P, spec, kv16=True) - o).abs().max()),
             "bf16_compute": float((ref_forward(P, spec, dt=torch.bfloat16) - o).abs().max()),
             "logit_abs_max": float(o.abs().max()), "min_act_margin": worst, **stats}
        report[name] = r
        assert r["ref_f32_vs_oracle"] < 1e-3 and r["ref_f64_vs_oracle"] < 1e-3, r
        for k in ["no_act_quant", "block32_q8", "kv_f16", "bf16_compute"]:
            assert r[k] > 0.04, (name, k, r[k])
        print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) and v is not None else f"{k}={v}" for k, v in r.items()),
              flush=True)

        fmt = {"bitlinear": "hf-safetensors packed uint8 [out/4,in] + weight_scale (divide)",
               "autobitlinear": "hf-safetensors packed uint8 [out/4,in] + weight_scale (multiply)",
               "online": "hf-safetensors master weights, ternarized at load (gamma = mean|W|)"}[spec["storage"]]
        arch = {"bitnet": "BitNetForCausalLM", "onebitllm": "BitnetForCausalLM (1bitLLM)",
                "llama": "LlamaForCausalLM"}[spec["arch"]]
        manifest["fixtures"].append({
            "name": name, "path": name, "format": "hf", "architecture": arch, "weights": fmt,
            "float_dtype": "bfloat16" if spec["fdt"] == BF16 else "float16", "hidden_act": spec["act"],
            "tied_embeddings": spec["tied"], "sub_norms": spec["sub"], "num_key_value_heads": spec["nkv"],
            "rope_theta_in": "rope_parameters" if spec["rope"] == "params" else "top-level rope_theta",
            "tokenizer": (d / "tokenizer.json").exists(), "ids": f"{name}/ids.json", "logits": f"{name}/logits.npy",
            "expected": "logits match logits.npy (per-token int8 activations); max|diff| << 0.04",
            "wrong_scheme_max_abs_diff": {k: r[k] for k in ["no_act_quant", "block32_q8", "block256_q8", "q8_k_256",
                                                             "kv_f16", "bf16_compute"]},
            "reference_noise": {k: r[k] for k in ["ref_f32_vs_oracle", "ref_f64_vs_oracle"]}})

        if name == "bitnet-packed":
            gd = OUT / "bitnet-packed-gguf"
            if gd.exists():
                shutil.rmtree(gd)
            gd.mkdir()
            for qt in ["I2_S", "TQ2_0", "TQ1_0"]:
                fn = f"model-{qt.lower().replace('_', '')}.gguf"
                tk = tokenizer
                write_gguf(gd / fn, P, spec, qt, tokenizer=tk)
                manifest["fixtures"].append({
                    "name": f"bitnet-packed-gguf/{qt}", "path": f"bitnet-packed-gguf/{fn}", "format": "gguf",
                    "architecture": GGUF_ARCH, "weights": qt, "tokenizer": tk is not None,
                    "ids": "bitnet-packed/ids.json", "logits": "bitnet-packed/logits.npy",
                    "expected": ("same ternary weights and multipliers as bitnet-packed: with per-token int8 "
                                 "activations the logits match bitnet-packed/logits.npy; with llama.cpp's Q8_K "
                                 "activations they differ by about wrong_scheme q8_k_256")})
            (gd / "ids.json").write_text(json.dumps({"ids": IDS}) + "\n")
        if name == "bitnet-online-bf16":
            gd = OUT / "bitnet-online-bf16-gguf"
            if gd.exists():
                shutil.rmtree(gd)
            gd.mkdir()
            write_gguf(gd / "model-f32.gguf", P, spec, "F32", tokenizer=tokenizer)
            (gd / "ids.json").write_text(json.dumps({"ids": IDS}) + "\n")
            manifest["fixtures"].append({
                "name": "bitnet-online-bf16-gguf/F32", "path": "bitnet-online-bf16-gguf/model-f32.gguf",
                "format": "gguf", "architecture": GGUF_ARCH, "weights": "F32 (ternary x gamma as floats)",
                "tokenizer": True, "ids": "bitnet-online-bf16/ids.json", "logits": "bitnet-online-bf16/logits.npy",
                "expected": ("the ternarized bitnet-online-bf16 weights stored as f32 (t / (1/gamma)): logits match "
                             "bitnet-online-bf16/logits.npy whether the engine runs them dense or re-ternarizes "
                             "them (every row's nonzeros have one magnitude per tensor)")})
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (OUT / "margins.json").write_text(json.dumps(report, indent=2) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"done in {time.time() - t0:.1f}s, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    sys.exit(main())
