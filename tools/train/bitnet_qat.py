"""BitNet b1.58 model for quantization-aware training (QAT).

Same architecture and parameter names as transformers' `BitNetForCausalLM`
(microsoft/bitnet-b1.58-2B-4T): RMSNorm pre-norms, GQA attention with NeoX-style RoPE,
`attn_sub_norm` before `o_proj`, ReLU² gated FFN with `ffn_sub_norm` before `down_proj`,
tied embedding used as the (not ternary) lm_head.

Every q/k/v/o/gate/up/down projection is a `BitLinear`: in the forward pass its weight is
ternarized by absmean (gamma = mean|W| floored at 1e-5, t = clamp(round(W/gamma), -1, 1),
value t*gamma) and its input quantized per token to int8 by absmax
(s = 127/max|x| floored at 1e-5, q = clamp(round(x*s), -128, 127), value q/s). The
backward pass uses the straight-through estimator: gradients flow to the latent float
weights and activations as if no rounding happened. This is the BitNet b1.58 recipe and
the same arithmetic as /work/shared/docs/BITNET.md and transformers' online mode.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TinyConfig:
    vocab_size: int = 4096
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = 1

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def to_dict(self):
        return asdict(self)


def weight_quant(w: torch.Tensor):
    """Absmean ternarization. Returns (ternary values t as float, gamma)."""
    gamma = w.float().abs().mean().clamp(min=1e-5)
    t = (w.float() / gamma).round().clamp(-1, 1)
    return t, gamma


def act_quant(x: torch.Tensor):
    """Per-token absmax int8 fake quantization (value q/s), computed in float32."""
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((xf * s).round().clamp(-128, 127) / s).to(x.dtype)


class BitLinear(nn.Linear):
    # When True, the multiplier is 1/bf16(1/gamma): exactly what the exported file (bf16
    # weight_scale) gives, for checking an export against this model.
    bf16_scale = False

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        w = self.weight
        t, gamma = weight_quant(w)
        if BitLinear.bf16_scale:
            gamma = 1.0 / (1.0 / gamma).to(torch.bfloat16).float()
        wq = (t * gamma).to(w.dtype)
        w = w + (wq - w).detach()  # STE
        xq = x + (act_quant(x) - x).detach()  # STE
        return F.linear(xq, w)


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


def rope_cache(cfg: TinyConfig, T: int, device):
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    pos = torch.arange(T, device=device).float()
    fr = torch.outer(pos, inv)
    emb = torch.cat([fr, fr], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = BitLinear(cfg.hidden_size, cfg.num_attention_heads * hd)
        self.k_proj = BitLinear(cfg.hidden_size, cfg.num_key_value_heads * hd)
        self.v_proj = BitLinear(cfg.hidden_size, cfg.num_key_value_heads * hd)
        self.o_proj = BitLinear(cfg.num_attention_heads * hd, cfg.hidden_size)
        self.attn_sub_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.cfg
        hd = c.head_dim
        q = self.q_proj(x).view(B, T, c.num_attention_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, hd).transpose(1, 2)
        cos = cos.to(q.dtype)
        sin = sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        a = a.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(self.attn_sub_norm(a))


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.gate_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = BitLinear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps)

    def forward(self, x):
        return self.down_proj(self.ffn_sub_norm(F.relu(self.gate_proj(x)).square() * self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Inner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class BitNetQAT(nn.Module):
    """Parameter names equal transformers' BitNetForCausalLM (`model.` prefix)."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Inner(cfg)
        self.apply(self._init)
        # scaled init of the residual-writing projections (GPT-2 style)
        for n, p in self.named_parameters():
            if n.endswith("o_proj.weight") or n.endswith("down_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.num_hidden_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, ids):
        T = ids.shape[1]
        cos, sin = rope_cache(self.cfg, T, ids.device)
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        h = self.model.norm(h)
        return F.linear(h, self.model.embed_tokens.weight)  # tied lm_head, not ternary


def count_params(cfg: TinyConfig):
    hd = cfg.head_dim
    per_layer_tern = (
        cfg.hidden_size * cfg.num_attention_heads * hd * 2
        + cfg.hidden_size * cfg.num_key_value_heads * hd * 2
        + cfg.hidden_size * cfg.intermediate_size * 3
    )
    tern = per_layer_tern * cfg.num_hidden_layers
    emb = cfg.vocab_size * cfg.hidden_size
    norms = cfg.num_hidden_layers * (3 * cfg.hidden_size + cfg.intermediate_size) + cfg.hidden_size
    packed_bytes = tern // 4 + emb * 2 + norms * 2 + 7 * cfg.num_hidden_layers * 2
    return tern, emb, norms, packed_bytes
