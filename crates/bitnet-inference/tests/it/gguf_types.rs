//! ggml block types against the `gguf` PyPI package's `gguf.quants` (fixtures written by
//! tools/make_ggml_type_fixtures.py).

use bitnet_inference::formats::ggml::{self, GgmlType};
use std::path::PathBuf;

fn data(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/ggml_types")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn dequantize_matches_gguf_py() {
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q6_K,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
    ] {
        let raw = data(&format!("{}.bin", ty.name()));
        let want = f32s(&data(&format!("{}.f32", ty.name())));
        let mut got = vec![0f32; want.len()];
        ggml::dequantize_row(ty, &raw, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{} element {i}: {g} vs {w}",
                ty.name()
            );
        }
    }
}

#[test]
fn ternary_decode_matches_gguf_py() {
    for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
        let raw = data(&format!("{}.bin", ty.name()));
        let want = f32s(&data(&format!("{}.f32", ty.name())));
        let mut trits = vec![0i8; want.len()];
        let scales = ggml::ternary_row(ty, &raw, &mut trits).unwrap();
        for (i, w) in want.iter().enumerate() {
            assert_eq!(
                trits[i] as f32 * scales[i / 256],
                *w,
                "{} element {i}",
                ty.name()
            );
        }
    }
}

#[test]
fn tq_packing_matches_gguf_py_quantize() {
    for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
        let x = f32s(&data(&format!("{}.pack_in.f32", ty.name())));
        let want = data(&format!("{}.pack_out.bin", ty.name()));
        let scales: Vec<f32> = x
            .chunks_exact(256)
            .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        let trits: Vec<i8> = x
            .iter()
            .enumerate()
            .map(|(i, v)| (v / scales[i / 256]).round() as i8)
            .collect();
        let got = ggml::pack_tq(ty, &trits, &scales).unwrap();
        assert_eq!(got, want, "{}", ty.name());
    }
}
