#!/usr/bin/env python3
"""Oracle fixtures for issue 20: RoPE scaling types and Qwen3, made by transformers.

Run from the repository root:  python3 tools/make_model_fixtures.py
Writes crates/bitnet-inference/tests/fixtures-models/<variant>/ and manifest.json (a directory of
its own: tools/make_fixtures.py deletes and rewrites tests/fixtures/). Reuses that script's tiny
shapes, ternary parameters, ids, hardening and GGUF helpers; see tools/README.md.

Every variant records:
- logits.npy: all positions of one causal forward pass (transformers, float32), as the other
  fixtures;
- logits_incremental.npy: the same ids run as transformers generates: the first PREFIX ids in one
  call, then one id a call with the KV cache. For `dynamic` and `longrope` the frequencies depend
  on the sequence length of each call (transformers' `dynamic_rope_update`), so these differ from
  logits.npy past the original context; the engine must give both.
"""
import os

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "bitnet-inference" / "tests" / "fixtures-models"
PREFIX = 12  # ids of the first call of logits_incremental.npy (inside every original context)
THETA = mf.THETA

SMALL_TIED = dict(h=128, nh=2, ffn=256, nkv=1, tied=True)
# The RoPE variants: Llama with ternary linears (HF1BitLLM's layout: LlamaForCausalLM + bitnet
# quantization_config, bitlinear/offline), tied embeddings to keep the files small. `ctx` is
# max_position_embeddings; 24 ids cross every original context (16) below.
ROPE = {
    "rope-linear": dict(seed=21, ctx=128, key="rope_parameters",
                        rope={"rope_type": "linear", "factor": 4.0}),
    "rope-dynamic": dict(seed=22, ctx=16, key="rope_scaling",  # transformers 4 spelling
                         rope={"type": "dynamic", "factor": 4.0}),
    "rope-llama3": dict(seed=23, ctx=128, key="rope_parameters",
                        rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "rope-yarn": dict(seed=24, ctx=64, key="rope_parameters",
                      rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "rope-longrope": dict(seed=25, ctx=64, key="rope_parameters",
                          rope={"rope_type": "longrope", "original_max_position_embeddings": 16}),
}
# GGUF twins (gguf package, llama.cpp's keys and layouts): arch llama, I2_S linears (the 128-wide
# shapes have no whole TQ2_0 blocks of 256), Q/K rows permuted as llama.cpp's converter does.
# llama3 goes in as the rope_freqs tensor.
ROPE_GGUF = ["rope-linear", "rope-llama3", "rope-yarn"]

# Qwen3: per-head q/k RMSNorm before RoPE; 4 heads of 64 (q width 256 != hidden 128, as in the
# real models); float and ternary (transformers' bitnet quantization_config on Qwen3).
QWEN3 = {
    "qwen3-float": dict(seed=31, tied=True, quant=None),
    "qwen3-bitnet": dict(seed=32, tied=False, quant="bitlinear"),
}


def base_spec(seed, storage="bitlinear", **kw):
    s = dict(SMALL_TIED, seed=seed, arch="llama", act="silu", sub=False, storage=storage, fdt=mf.BF16, rope="top")
    s.update(kw)
    return s


def longrope_factors(rng):
    half = mf.HD // 2
    short = [round(float(x), 4) for x in rng.uniform(1.0, 1.5, half)]
    long = [round(float(x), 4) for x in rng.uniform(1.0, 6.0, half)]
    return short, long


def config_for(name, spec, extra):
    c = mf.hf_config(spec)
    if spec["arch"] == "qwen3":
        c.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=mf.HD,
                 use_sliding_window=False, sliding_window=None, max_window_layers=mf.L)
        c.pop("mlp_bias", None)
        c.pop("pretraining_tp", None)
        if spec.get("quant") is None:
            c.pop("quantization_config", None)
    c["max_position_embeddings"] = spec.get("ctx", mf.CTX)
    if extra is not None:
        key, rope = extra
        c.pop("rope_theta", None)
        if key == "rope_scaling":
            c["rope_theta"] = THETA
            c["rope_scaling"] = rope
        else:
            c["rope_parameters"] = dict(rope, rope_theta=THETA)
    return c


def tensors_for(P, spec):
    if spec["storage"] == "float":
        fdt = mf.torch_dt(spec["fdt"])
        T = {"model.embed_tokens.weight": torch.from_numpy(P["embed"]).to(fdt),
             "model.norm.weight": torch.from_numpy(P["out_norm"]).to(fdt)}
        if not spec["tied"]:
            T["lm_head.weight"] = torch.from_numpy(P["lm_head"]).to(fdt)
        for l in range(mf.L):
            pre = f"model.layers.{l}."
            T[pre + "input_layernorm.weight"] = torch.from_numpy(P[f"{l}.attn_norm"]).to(fdt)
            T[pre + "post_attention_layernorm.weight"] = torch.from_numpy(P[f"{l}.ffn_norm"]).to(fdt)
            for n in mf.LIN:
                T[pre + mf.HF_NAMES[n] + ".weight"] = torch.from_numpy(P[f"{l}.{n}"]["w"]).to(fdt)
    else:
        T = mf.hf_tensors(P, spec)
    if spec["arch"] == "qwen3":
        fdt = mf.torch_dt(spec["fdt"])
        for l in range(mf.L):
            for n in ["q_norm", "k_norm"]:
                T[f"model.layers.{l}.self_attn.{n}.weight"] = torch.from_numpy(P[f"{l}.{n}"]).to(fdt)
    return T


def write_dir(d, P, spec, config, tokenizer=None):
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors_for(P, spec), str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": mf.BOS, "eos_token_id": [mf.EOS, mf.EOT], "do_sample": False}
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(d / "tokenizer.json"))


def make_params(spec):
    P = mf.make_params(dict(spec, storage="bitlinear" if spec["storage"] == "float" else spec["storage"]))
    rng = np.random.default_rng(500 + spec["seed"])
    if spec["storage"] == "float":
        for l in range(mf.L):
            for n in mf.LIN:
                shape = mf.lin_shape(n, spec)
                w = rng.standard_normal(shape).astype(np.float32) * (1.0 / np.sqrt(shape[1]))
                P[f"{l}.{n}"] = dict(w=mf.rnd(w, spec["fdt"]))
    if spec["arch"] == "qwen3":
        for l in range(mf.L):
            for n in ["q_norm", "k_norm"]:
                P[f"{l}.{n}"] = mf.rnd(1.0 + 0.15 * rng.standard_normal(mf.HD).astype(np.float32), spec["fdt"])
    return P


def incremental_logits(model):
    """The ids as transformers generates: PREFIX ids in one call, then one id a call."""
    ids = torch.tensor([mf.IDS])
    with torch.no_grad():
        out = model(ids[:, :PREFIX], use_cache=True)
        rows = [out.logits[0].float()]
        past = out.past_key_values
        for i in range(PREFIX, len(mf.IDS)):
            out = model(ids[:, i:i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            rows.append(out.logits[0].float())
    return torch.cat(rows, 0)


def build(name, spec, config, tokenizer):
    """Hardens (ternary variants), writes, reloads and records both logits; returns (P, logits)."""
    rng = np.random.default_rng(1000 + spec["seed"])
    P = make_params(spec)
    d = OUT / name
    with tempfile.TemporaryDirectory() as td:
        od = Path(td) / "oracle"
        write_dir(od, P, spec, config)
        model = mf.load_hf(od)
        mods = mf.layer_mods(model, 0, spec)
        if spec["storage"] == "float":
            assert type(mods["q"]).__name__ == "Linear"
            stats = {}
        else:
            assert type(mods["q"]).__name__ == "BitLinear", type(mods["q"]).__name__
            stats = mf.harden(model, P, spec, rng)
        assert type(model.lm_head).__name__ == "Linear"
        if spec["arch"] == "qwen3":
            assert type(model.model.layers[0].self_attn.q_norm).__name__ == "Qwen3RMSNorm"
        mem_logits, _ = mf.run_capture(model, spec)
        shutil.rmtree(od)
        write_dir(od, P, spec, config)
        model = mf.load_hf(od)
        logits, caps = mf.run_capture(model, spec)
        worst = mf.check_margins(caps) if spec["storage"] != "float" else None
        assert torch.equal(logits, mem_logits), "reloaded model differs from the hardened in-memory model"
        inc = incremental_logits(model)
    write_dir(d, P, spec, config, tokenizer)
    (d / "ids.json").write_text(json.dumps({"ids": mf.IDS}) + "\n")
    np.save(d / "logits.npy", logits.numpy().astype(np.float32))
    np.save(d / "logits_incremental.npy", inc.numpy().astype(np.float32))
    diff = float((inc - logits).abs().max())
    print(f"{name}: min_act_margin={worst} incremental_vs_one_call={diff:.3g} {stats}", flush=True)
    return P, logits, diff, worst


def permute(t, n_head):
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute of Q/K rows."""
    rows, cols = t.shape
    return t.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path, P, spec, arch, rope_keys, tokenizer, rope_freqs=None, q2_0_group=0):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"fixture {path.parent.name}")
    w.add_file_type(41 if q2_0_group else 40)  # MOSTLY_Q2_0; I2_S as microsoft's converter writes
    w.add_vocab_size(mf.V)
    w.add_context_length(spec.get("ctx", mf.CTX))
    w.add_embedding_length(spec["h"])
    w.add_block_count(mf.L)
    w.add_feed_forward_length(spec["ffn"])
    w.add_head_count(spec["nh"])
    w.add_head_count_kv(spec["nkv"])
    w.add_key_length(mf.HD)
    w.add_value_length(mf.HD)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(mf.EPS)
    w.add_rope_dimension_count(mf.HD)
    for k, v in rope_keys:
        getattr(w, k)(v)
    mf.add_gguf_tokenizer(w, tokenizer)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.add_tensor("token_embd.weight", P["embed"].astype(np.float16))
    if not spec["tied"]:
        w.add_tensor("output.weight", P["lm_head"].astype(np.float16))
    for l in range(mf.L):
        b = f"blk.{l}."
        w.add_tensor(b + "attn_norm.weight", P[f"{l}.attn_norm"].astype(np.float32))
        w.add_tensor(b + "ffn_norm.weight", P[f"{l}.ffn_norm"].astype(np.float32))
        if arch == "qwen3":
            w.add_tensor(b + "attn_q_norm.weight", P[f"{l}.q_norm"].astype(np.float32))
            w.add_tensor(b + "attn_k_norm.weight", P[f"{l}.k_norm"].astype(np.float32))
        for n in mf.LIN:
            p = P[f"{l}.{n}"]
            t = p["t"]
            if arch == "llama" and n in ("q", "k"):
                t = permute(t, spec["nh"] if n == "q" else spec["nkv"])
            if q2_0_group:
                raw = pack_q2_0(t, p["gs"], q2_0_group)
                dtype = Q2_0
            else:
                raw, dtype = mf.pack_i2s(t, p["mult"]), mf.I2_S
            w.add_tensor(b + mf.GGUF_LIN[n] + ".weight", raw.view(np.int8), raw_shape=list(t.shape),
                         raw_dtype=dtype)
    w.add_tensor("output_norm.weight", P["out_norm"].astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama3_rope_freqs(rope):
    """llama.cpp convert_hf_to_gguf.py LlamaModel: Llama 3's scaling as per-dimension divisors."""
    freqs = 1.0 / (THETA ** (torch.arange(0, mf.HD, 2, dtype=torch.float32) / mf.HD))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


# Group-wise ternary scales (Q2_0): Qwen3 shapes, one f16 scale per 64 (llama.cpp's Q2_0) or 128
# (PrismML's fork) weights. transformers has no group-scaled BitNet linear, so the oracle is
# transformers' float Qwen3 holding W = t·scale_g, with every decoder linear's input quantized as
# transformers' BitNet ActQuant does (per token: s = 127/max|x| (≥ 1e-5), round, clamp, / s).
GROUPED = {"qwen3-q2_0-g64": dict(seed=41, group=64), "qwen3-q2_0-g128": dict(seed=42, group=128)}
Q2_0 = 42


class GroupLinear(dict):
    """t and per-group scales; "w" is the dense t·scale (recomputed after hardening swaps)."""

    def __getitem__(self, k):
        if k == "w":
            t, gs, g = dict.__getitem__(self, "t"), dict.__getitem__(self, "gs"), dict.__getitem__(self, "group")
            return (t.astype(np.float32) * np.repeat(gs, g, axis=1)).astype(np.float32)
        return dict.__getitem__(self, k)

    def __contains__(self, k):
        return k == "w" or dict.__contains__(self, k)


def actquant_forward(mod):
    inner = mod.forward

    def forward(x):
        s = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        return inner((x * s).round().clamp(-128, 127) / s)
    mod.forward = forward


def pack_q2_0(t, gs, group):
    """llama.cpp block_q2_0 (QK2_0 = group): f16 d, then element j in bits 2*(j%4) of byte j/4."""
    rows, cols = t.shape
    codes = (t.astype(np.int16) + 1).astype(np.uint8).reshape(rows, cols // group, group // 4, 4)
    qs = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    d = gs.astype(np.float16).view(np.uint8).reshape(rows, cols // group, 2)
    return np.concatenate([d, qs], axis=-1).reshape(-1)


def build_grouped(name, g, tokenizer):
    spec = base_spec(g["seed"], storage="float", arch="qwen3", nh=4, nkv=2, tied=True, quant=None)
    rng = np.random.default_rng(2000 + g["seed"])
    P = make_params(dict(spec, storage="bitlinear"))
    group = g["group"]
    for l in range(mf.L):
        for n in mf.LIN:
            t = P[f"{l}.{n}"]["t"]
            gs = (rng.integers(16, 48, size=(t.shape[0], t.shape[1] // group)) / 2048.0).astype(np.float32)
            P[f"{l}.{n}"] = GroupLinear(t=t, gs=gs, group=group)
    config = config_for(name, spec, ("rope_parameters", {"rope_type": "default"}))
    with tempfile.TemporaryDirectory() as td:
        od = Path(td) / "oracle"

        def load():
            write_dir(od, P, spec, config)
            m = mf.load_hf(od)
            for l in range(mf.L):
                mods = mf.layer_mods(m, l, spec)
                for n in mf.LIN:
                    actquant_forward(mods[n])
            return m

        model = load()
        stats = mf.harden(model, P, dict(spec, storage="grouped"), rng)
        mem_logits, _ = mf.run_capture(model, spec)
        shutil.rmtree(od)
        model = load()
        logits, caps = mf.run_capture(model, spec)
        worst = mf.check_margins(caps)
        assert torch.equal(logits, mem_logits), "reloaded model differs from the hardened in-memory model"
        inc = incremental_logits(model)
    d = OUT / name
    d.mkdir()
    (d / "ids.json").write_text(json.dumps({"ids": mf.IDS}) + "\n")
    np.save(d / "logits.npy", logits.numpy().astype(np.float32))
    np.save(d / "logits_incremental.npy", inc.numpy().astype(np.float32))
    write_gguf(d / "model-q2_0.gguf", P, spec, "qwen3", [], tokenizer, q2_0_group=group)
    print(f"{name}: min_act_margin={worst} {stats}", flush=True)
    return worst


def main():
    t0 = time.time()
    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    manifest = {"generator": "tools/make_model_fixtures.py", "transformers": transformers.__version__,
                "torch": torch.__version__.split("+")[0], "gguf": "0.19", "prefix_of_incremental": PREFIX,
                "fixtures": []}
    tokenizer = mf.make_tokenizer()

    def entry(name, path, fmt, logits_dir, **kw):
        manifest["fixtures"].append(dict(name=name, path=path, format=fmt, ids=f"{logits_dir}/ids.json",
                                         logits=f"{logits_dir}/logits.npy",
                                         logits_incremental=f"{logits_dir}/logits_incremental.npy", **kw))

    for name, r in ROPE.items():
        spec = base_spec(r["seed"], ctx=r["ctx"])
        rope = dict(r["rope"])
        if rope.get("rope_type") == "longrope":
            rope["short_factor"], rope["long_factor"] = longrope_factors(np.random.default_rng(r["seed"]))
        config = config_for(name, spec, (r["key"], rope))
        P, logits, diff, worst = build(name, spec, config, tokenizer)
        entry(name, name, "hf", name, architecture="LlamaForCausalLM + bitnet bitlinear/offline",
              rope={r["key"]: rope, "max_position_embeddings": r["ctx"]},
              incremental_vs_one_call=diff, min_act_margin=worst)
        if name in ROPE_GGUF:
            gd = OUT / f"{name}-gguf"
            gd.mkdir()
            if rope["rope_type"] == "linear":
                keys = [("add_rope_scaling_type", gguf.RopeScalingType.LINEAR),
                        ("add_rope_scaling_factor", rope["factor"])]
                freqs = None
            elif rope["rope_type"] == "yarn":
                keys = [("add_rope_scaling_type", gguf.RopeScalingType.YARN),
                        ("add_rope_scaling_factor", rope["factor"]),
                        ("add_rope_scaling_orig_ctx_len", rope["original_max_position_embeddings"])]
                freqs = None
            else:
                keys, freqs = [], llama3_rope_freqs(rope)
            write_gguf(gd / "model-i2s.gguf", P, spec, "llama", keys, tokenizer, freqs)
            entry(f"{name}-gguf", f"{name}-gguf/model-i2s.gguf", "gguf", name,
                  architecture="llama (Q/K permuted as llama.cpp's converter)", weights="I2_S",
                  rope_gguf=[k for k, _ in keys] + (["rope_freqs tensor"] if freqs else []))

    for name, q in QWEN3.items():
        storage = "float" if q["quant"] is None else "bitlinear"
        spec = base_spec(q["seed"], storage=storage, arch="qwen3", nh=4, nkv=2, tied=q["tied"], quant=q["quant"])
        config = config_for(name, spec, ("rope_parameters", {"rope_type": "default"}))
        P, logits, diff, worst = build(name, spec, config, tokenizer)
        entry(name, name, "hf", name, architecture="Qwen3ForCausalLM" + (" + bitnet bitlinear/offline" if q["quant"] else " (float)"),
              tied_embeddings=q["tied"], min_act_margin=worst)
        if q["quant"]:
            gd = OUT / f"{name}-gguf"
            gd.mkdir()
            write_gguf(gd / "model-i2s.gguf", P, spec, "qwen3", [], tokenizer)
            entry(f"{name}-gguf", f"{name}-gguf/model-i2s.gguf", "gguf", name, architecture="qwen3",
                  weights="I2_S")

    for name, g in GROUPED.items():
        worst = build_grouped(name, g, tokenizer)
        entry(name, f"{name}/model-q2_0.gguf", "gguf", name,
              architecture="qwen3, Q2_0 linears (ggml type 42) with one f16 scale per %d weights" % g["group"],
              oracle="transformers Qwen3 (float32) with W = t*scale_g and BitNet's per-token int8 activation "
                     "quantization on every decoder linear's input", min_act_margin=worst)

    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"done in {time.time() - t0:.1f}s, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    sys.exit(main())
