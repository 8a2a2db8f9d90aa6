//! GGUF v2/v3 reader (memory-mapped) and writer.
//!
//! API (fill in the implementation, keep these names):
//! - `GgufValue`: one metadata value.
//! - `GgufFile::open(path)`: maps the file, parses header, metadata and tensor infos, checks
//!   that every tensor's bytes lie inside the file.
//! - `GgufFile::tensor_data(&info) -> &[u8]`.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// One metadata value, as typed in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

/// A tensor's entry in the GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row length) dimension.
    pub dims: Vec<u64>,
    /// The ggml type id as stored (34 TQ1_0, 35 TQ2_0, 36 I2_S in microsoft's fork, ...).
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

pub type GgufMetadata = BTreeMap<String, GgufValue>;

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: GgufMetadata,
    pub tensors: Vec<GgufTensorInfo>,
}
