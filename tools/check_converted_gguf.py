#!/usr/bin/env python3
"""Reads GGUF files written by `bitnet convert` with the `gguf` PyPI package (TQ1_0/TQ2_0 are
decoded by its own dequantizer; I2_S is not known to it) and checks every ternary tensor holds
only {-1, 0, +1} times one scale per block, and that the tokenizer keys are there.

    tools/check_converted_gguf.py OUT-tq2_0.gguf OUT-tq1_0.gguf
"""
import sys

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

for path in sys.argv[1:]:
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
    print(f"{path}: {len(r.tensors)} tensors, {n_tern} ternary ({kind}), ok")
