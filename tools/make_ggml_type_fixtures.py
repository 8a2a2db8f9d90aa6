#!/usr/bin/env python3
"""Writes reference fixtures for the ggml block types, decoded by the `gguf` PyPI package.

For each of Q4_0, Q4_1, Q8_0, Q6_K, TQ1_0, TQ2_0 it writes into
crates/bitnet-inference/tests/data/ggml_types/:
  NAME.bin  raw blocks (random bytes; f16 scale fields set to finite values)
  NAME.f32  gguf.quants.dequantize of those bytes, little-endian f32
For TQ1_0 and TQ2_0 it also writes
  NAME.pack_in.f32   a ternary-valued row (t * d per 256-block)
  NAME.pack_out.bin  gguf.quants.quantize of it (what our packers must reproduce)

Run: python3 tools/make_ggml_type_fixtures.py   (needs numpy and gguf>=0.10)
"""
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = Path(__file__).resolve().parent.parent / "crates/bitnet-inference/tests/data/ggml_types"

# (type, bytes per block, byte offsets of f16 scale fields inside a block)
TYPES = [
    (T.Q4_0, 18, [0]),
    (T.Q4_1, 20, [0, 2]),
    (T.Q8_0, 34, [0]),
    (T.Q6_K, 210, [208]),
    (T.TQ1_0, 54, [52]),
    (T.TQ2_0, 66, [64]),
]
N_BLOCKS = 4


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    for qtype, block_bytes, scale_offsets in TYPES:
        raw = rng.integers(0, 256, size=(N_BLOCKS, block_bytes), dtype=np.uint8)
        if qtype == T.TQ2_0:
            # Code 3 is not a ternary value: map it to 2 (+1) in every 2-bit field.
            codes = raw[:, :64]
            for shift in range(0, 8, 2):
                field = (codes >> shift) & 3
                codes -= ((field == 3).astype(np.uint8) << shift)
            raw[:, :64] = codes
        for off in scale_offsets:
            scales = rng.uniform(-2.0, 2.0, size=N_BLOCKS).astype(np.float16)
            raw[:, off : off + 2] = scales.view(np.uint8).reshape(N_BLOCKS, 2)
        name = qtype.name
        ref = quants.dequantize(raw.reshape(1, -1), qtype).astype("<f4")
        (OUT / f"{name}.bin").write_bytes(raw.tobytes())
        (OUT / f"{name}.f32").write_bytes(ref.tobytes())
        print(f"{name}: {raw.size} bytes -> {ref.size} values")

        if qtype in (T.TQ1_0, T.TQ2_0):
            n = 2 * 256
            trits = rng.integers(-1, 2, size=n).astype(np.float32)
            d = np.repeat(np.array([0.5, 1.25], dtype=np.float32), 256)
            x = (trits * d).reshape(1, n).astype(np.float32)
            packed = quants.quantize(x, qtype)
            (OUT / f"{name}.pack_in.f32").write_bytes(x.astype("<f4").tobytes())
            (OUT / f"{name}.pack_out.bin").write_bytes(packed.tobytes())


if __name__ == "__main__":
    main()
