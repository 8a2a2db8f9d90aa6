#!/usr/bin/env python3
"""Reads GGUF files written by `bitnet convert` with the `gguf` PyPI package (TQ1_0/TQ2_0 are
decoded by its own dequantizer; I2_S is not known to it) and checks every ternary tensor holds
only {-1, 0, +1} times one scale per block, that the tokenizer keys are there, and that the
token embedding (F32, F16, Q8_0 or Q6_K) decodes to finite values of the right shape.

    tools/check_converted_gguf.py OUT-tq2_0.gguf OUT-tq1_0.gguf
    tools/check_converted_gguf.py --embedding-ref OUT-f32emb.gguf OUT-q6_k.gguf

With --embedding-ref, each file's decoded token embedding is also compared with the reference
file's (same model, converted with another --embedding-type, e.g. f32): the relative RMS
difference is printed, and must stay below 3% (Q6_K gives about 1.6%, Q8_0 about 0.4%).
"""
import sys

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

EMBEDDING_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q6_K)


def embedding(r: GGUFReader, path: str):
    t = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
    assert t is not None, f"{path}: token_embd.weight missing"
    assert t.tensor_type in EMBEDDING_TYPES, f"{path}: token_embd.weight is {t.tensor_type.name}"
    cols, rows = int(t.shape[0]), int(t.shape[1])
    w = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(rows, cols)
    assert np.isfinite(w).all(), f"{path}: token_embd.weight has non-finite values"
    return t.tensor_type.name, w


args = sys.argv[1:]
ref = None
if args[:1] == ["--embedding-ref"]:
    ref, ref_w = embedding(GGUFReader(args[1]), args[1])
    args = args[2:]

for path in args:
    r = GGUFReader(path)
    keys = {f.name for f in r.fields.values()}
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert k in keys, f"{path}: {k} missing"
    n_tern = 0
    kind = None
    for t in r.tensors:
        if t.tensor_type in (Q.TQ1_0, Q.TQ2_0):
            w = dequantize(t.data, t.tensor_type).reshape(-1, 256)
            for blk in w[:64]:
                nz = np.abs(blk[blk != 0])
                assert nz.size == 0 or np.allclose(nz, nz[0]), f"{path}: {t.name} not ternary"
            n_tern += 1
            kind = t.tensor_type.name
    assert n_tern > 0, f"{path}: no TQ tensors"
    emb_type, emb = embedding(r, path)
    line = f"{path}: {len(r.tensors)} tensors, {n_tern} ternary ({kind}), embedding {emb_type}"
    if ref is not None:
        assert emb.shape == ref_w.shape, f"{path}: embedding {emb.shape} vs {ref_w.shape}"
        rel = np.sqrt(((emb - ref_w) ** 2).sum() / (ref_w**2).sum())
        line += f" ({rel:.4%} RMS from the {ref} reference)"
        assert rel < 0.03, f"{path}: embedding differs from the reference by {rel:.2%}"
    print(line + ", ok")
