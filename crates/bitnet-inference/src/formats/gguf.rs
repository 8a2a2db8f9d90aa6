//! GGUF v2/v3 reader (memory-mapped) and writer.
//!
//! - [`GgufFile::open`] maps the file, parses header, metadata (every value type, nested
//!   arrays included) and tensor infos, and checks that every tensor's bytes lie inside
//!   the file, using the type's size from [`super::ggml`].
//! - [`GgufFile::tensor_data`] gives a tensor's bytes, straight from the map;
//!   [`GgufFile::mapped`] a typed view of them that shares the map (zero-copy weights), and
//!   [`GgufFile::release`] lets the kernel drop their pages once a loader has repacked them.
//! - Typed metadata getters (`get_u64`, `get_f32`, `get_str`, ...) name the key on error.
//! - [`GgufWriter`] writes files (metadata + raw tensor bytes + type id), for tests and
//!   converters, including microsoft's I2_S (type 36).
//!
//! Layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
//! count; metadata `(string key, u32 type, value)`; tensor infos `(string name, u32 n_dims,
//! u64 dims…, u32 type, u64 offset)`; padding to `general.alignment` (default 32); the data
//! section. Strings are a u64 length then UTF-8 bytes.

use super::ggml::GgmlType;
use super::mmap::{MapElem, MappedSlice, SharedMap};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

impl GgufValue {
    /// GGUF's value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }

    /// Any integer type, if it is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// F32 or F64 (narrowed).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short rendering for display (arrays summarized).
    pub fn display(&self) -> String {
        match self {
            GgufValue::String(s) => s.clone(),
            GgufValue::Array(a) => format!("[{} values]", a.len()),
            GgufValue::Bool(b) => b.to_string(),
            GgufValue::F32(v) => v.to_string(),
            GgufValue::F64(v) => v.to_string(),
            other => other
                .as_i64()
                .map(|v| v.to_string())
                .or_else(|| other.as_u64().map(|v| v.to_string()))
                .unwrap_or_default(),
        }
    }
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
    /// The decoded type (checked at open).
    pub ggml_type: GgmlType,
    /// Bytes the tensor's data takes.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

pub type GgufMetadata = BTreeMap<String, GgufValue>;

/// Architectures whose files come from microsoft's BitNet fork or its relatives, where
/// type id 36 is I2_S.
pub const BITNET_ARCHS: [&str; 3] = ["bitnet-25", "bitnet-b1.58", "bitnet"];

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: GgufMetadata,
    pub tensors: Vec<GgufTensorInfo>,
    /// `general.alignment`, default 32.
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
    map: SharedMap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader over the header bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, what: &str, need: u64) -> Error {
        Error::format(
            self.path,
            format!(
                "truncated header: {what} needs {need} bytes at offset {}, file has {}",
                self.pos,
                self.buf.len()
            ),
        )
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(self.truncated(what, n));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::format(self.path, format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = &format!("metadata value of `{key}`");
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>(what)?[0]),
            1 => GgufValue::I8(self.arr::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(Error::config(
                        self.path,
                        key,
                        format!("bool value is {b}, expected 0 or 1"),
                    ))
                }
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth > 8 {
                    return Err(Error::config(self.path, key, "arrays nested too deeply"));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: refuse counts the file can't hold
                // before allocating.
                let left = (self.buf.len() - self.pos) as u64;
                if n > left {
                    return Err(self.truncated(&format!("array of {n} elements of `{key}`"), n));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(what)?)),
            other => {
                return Err(Error::config(
                    self.path,
                    key,
                    format!("unknown metadata value type {other}"),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`. Every tensor's type is known and its bytes lie in the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and shared only with views made by `mapped` (weights
        // read in place, which keep it alive as long as the model); we rely on the file not
        // being truncated or rewritten in place while it is mapped, the same assumption
        // every mmap-based model loader (llama.cpp, safetensors) makes. (Replacing it by a
        // rename, as downloads and converters do, is fine: the map keeps the old inode.)
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let map = SharedMap::new(map);
        let mut c = Cursor {
            buf: &map,
            pos: 0,
            path,
        };
        let magic = c.arr::<4>("magic").map_err(|_| {
            Error::format(
                path,
                format!(
                    "not a GGUF file: {} bytes, too short for the magic",
                    map.len()
                ),
            )
        })?;
        if &magic != b"GGUF" {
            return Err(Error::format(
                path,
                format!("not a GGUF file: wrong magic {magic:02x?}, expected \"GGUF\""),
            ));
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                " (a big-endian file?)"
            } else if version == 1 {
                " (GGUF v1 is obsolete)"
            } else {
                ""
            };
            return Err(Error::format(
                path,
                format!("unsupported GGUF version {version}{hint}; supported: 2 and 3"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let mut metadata = GgufMetadata::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            let ty = c.u32(&format!("type of `{key}`"))?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::config(
                        path,
                        "general.alignment",
                        format!("{v:?} is not a power of two"),
                    ))
                }
            },
        };
        let arch = metadata
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();

        struct Raw {
            name: String,
            dims: Vec<u64>,
            type_id: u32,
            offset: u64,
        }
        let mut raws = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor {i}"))?;
            let n_dims = c.u32(&format!("dimension count of tensor `{name}`"))?;
            if n_dims > 8 {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("{n_dims} dimensions; at most 8 are possible"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("dimensions of tensor `{name}`"))?);
            }
            let type_id = c.u32(&format!("type of tensor `{name}`"))?;
            let offset = c.u64(&format!("offset of tensor `{name}`"))?;
            raws.push(Raw {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let header_end = c.pos;
        let data_offset = (c.pos as u64).next_multiple_of(alignment);
        let data_len = (map.len() as u64).saturating_sub(data_offset);

        // Offsets sorted, to find each tensor's room (up to the next tensor) for type 36.
        let mut offsets: Vec<u64> = raws.iter().map(|r| r.offset).collect();
        offsets.sort_unstable();
        offsets.dedup();

        let mut tensors = Vec::with_capacity(raws.len());
        let mut seen = std::collections::HashSet::new();
        for r in raws {
            if !seen.insert(r.name.clone()) {
                return Err(Error::tensor(path, &r.name, "appears twice in the file"));
            }
            let n_elements = r
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::tensor(path, &r.name, "element count overflows"))?;
            let mut ggml_type = GgmlType::from_id(r.type_id).ok_or_else(|| {
                let note = match r.type_id {
                    37..=39 => " (ids 37-39 are I8_S/TL1/TL2 in microsoft's BitNet fork and other types upstream; not supported)",
                    _ => "",
                };
                Error::tensor(
                    path,
                    &r.name,
                    format!("unknown or unsupported ggml type id {}{note}", r.type_id),
                )
            })?;
            let ne0 = r.dims.first().copied().unwrap_or(1);
            if ggml_type == GgmlType::Q2_0 {
                // Id 42: llama.cpp's Q2_0 (groups of 64) or PrismML's fork's (groups of 128).
                // The tensor's room (to the next tensor or the end) tells which.
                let next = offsets
                    .iter()
                    .find(|&&o| o > r.offset)
                    .copied()
                    .unwrap_or(data_len);
                let room = next.saturating_sub(r.offset);
                let fits = |ty: GgmlType| {
                    ty.tensor_bytes(ne0, n_elements).is_ok_and(|n| {
                        room >= n && room < n.next_multiple_of(alignment) + alignment
                    })
                };
                if !fits(GgmlType::Q2_0) && fits(GgmlType::Q2_0_G128) {
                    ggml_type = GgmlType::Q2_0_G128;
                }
            }
            let n_bytes = ggml_type
                .tensor_bytes(ne0, n_elements)
                .map_err(|m| Error::tensor(path, &r.name, m))?;
            if r.offset % alignment != 0 {
                return Err(Error::tensor(
                    path,
                    &r.name,
                    format!(
                        "data offset {} is not a multiple of the alignment {alignment}",
                        r.offset
                    ),
                ));
            }
            let end = r.offset.checked_add(n_bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(Error::tensor(
                    path,
                    &r.name,
                    format!(
                        "truncated tensor data: {} {:?} needs {n_bytes} bytes at data offset {}, \
                         but only {} bytes are left in the file",
                        ggml_type.name(),
                        r.dims,
                        r.offset,
                        data_len.saturating_sub(r.offset)
                    ),
                ));
            }
            if ggml_type == GgmlType::I2_S && !BITNET_ARCHS.contains(&arch.as_str()) {
                // Not a BitNet architecture: accept id 36 as I2_S only if the tensor's room
                // (to the next tensor or the end) is exactly what I2_S needs, padded.
                let next = offsets
                    .iter()
                    .find(|&&o| o > r.offset)
                    .copied()
                    .unwrap_or(data_len);
                let room = next - r.offset;
                if room < n_bytes || room >= n_bytes.next_multiple_of(alignment) + alignment {
                    return Err(Error::tensor(
                        path,
                        &r.name,
                        format!(
                            "type id 36 is I2_S only in microsoft's BitNet fork; architecture \
                             `{arch}` is not BitNet and the tensor's {room} bytes do not match \
                             I2_S's {n_bytes}"
                        ),
                    ));
                }
            }
            tensors.push(GgufTensorInfo {
                name: r.name,
                dims: r.dims,
                type_id: r.type_id,
                offset: r.offset,
                ggml_type,
                n_bytes,
            });
        }
        // Everything in the header now lives in `metadata` and `tensors`.
        super::mmap::release(&map, 0..header_end);
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            map,
        })
    }

    /// The tensor's bytes (checked at open to lie inside the file).
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let start = self
            .data_offset
            .checked_add(info.offset)
            .filter(|s| {
                s.checked_add(info.n_bytes)
                    .is_some_and(|e| e <= self.map.len() as u64)
            })
            .ok_or_else(|| {
                Error::tensor(
                    &self.path,
                    &info.name,
                    format!(
                        "data at offset {} ({} bytes) lies outside the file",
                        info.offset, info.n_bytes
                    ),
                )
            })? as usize;
        Ok(&self.map[start..start + info.n_bytes as usize])
    }

    /// The tensor's bytes as `len` values of `T`, viewed in the map (which the view keeps
    /// alive); `None` if its size differs or the data is not aligned for `T` (then copy).
    pub fn mapped<T: MapElem>(&self, info: &GgufTensorInfo) -> Option<MappedSlice<T>> {
        let bytes = self.tensor_data(info).ok()?;
        if bytes.len() % std::mem::size_of::<T>() != 0 {
            return None;
        }
        let offset = (self.data_offset + info.offset) as usize;
        MappedSlice::new(
            self.map.clone(),
            offset,
            bytes.len() / std::mem::size_of::<T>(),
        )
    }

    /// Tells the kernel the tensor's mapped pages are no longer needed (loaders call it once
    /// the tensor is repacked or copied into owned memory), so they leave the resident set.
    /// Only whole pages inside the tensor's bytes are released, never a neighbour's; reading
    /// the tensor again later still gives the same bytes (they fault back from the file).
    pub fn release(&self, info: &GgufTensorInfo) {
        if let Ok(bytes) = self.tensor_data(info) {
            let start = bytes.as_ptr() as usize - self.map.as_ptr() as usize;
            super::mmap::release(&self.map, start..start + bytes.len());
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
}

/// Typed reads of GGUF metadata, with errors naming the file and key: one implementation for
/// every reader of GGUF metadata (the model loader, the tokenizer, conversion).
pub trait MetadataReader {
    /// The value of `key`, if present.
    fn value(&self, key: &str) -> Option<&GgufValue>;
    /// The file the metadata came from, for errors.
    fn source(&self) -> &Path;

    fn missing(&self, key: &str) -> Error {
        Error::config(self.source(), key, "missing from the GGUF metadata")
    }

    fn wrong(&self, key: &str, v: &GgufValue, expected: &str) -> Error {
        Error::config(
            self.source(),
            key,
            format!(
                "expected {expected}, found {} {}",
                v.type_name(),
                v.display()
            ),
        )
    }

    /// A non-negative integer of any width; `None` if absent, an error if mistyped.
    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.value(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.wrong(key, v, "a non-negative integer"))
            })
            .transpose()
    }
    fn get_u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.opt_u64(key)?
            .map(|v| {
                usize::try_from(v)
                    .map_err(|_| Error::config(self.source(), key, format!("{v} is too large")))
            })
            .transpose()
    }
    fn get_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.opt_u64(key)?
            .map(|v| {
                u32::try_from(v)
                    .map_err(|_| Error::config(self.source(), key, format!("{v} does not fit u32")))
            })
            .transpose()
    }
    fn get_u32(&self, key: &str) -> Result<u32> {
        self.opt_u32(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        self.value(key)
            .map(|v| v.as_i64().ok_or_else(|| self.wrong(key, v, "an integer")))
            .transpose()
    }
    fn get_i64(&self, key: &str) -> Result<i64> {
        self.opt_i64(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.value(key)
            .map(|v| v.as_f32().ok_or_else(|| self.wrong(key, v, "a float")))
            .transpose()
    }
    fn get_f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.value(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong(key, v, "a bool")))
            .transpose()
    }
    fn get_bool(&self, key: &str) -> Result<bool> {
        self.opt_bool(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.value(key)
            .map(|v| v.as_str().ok_or_else(|| self.wrong(key, v, "a string")))
            .transpose()
    }
    fn get_str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_array(&self, key: &str) -> Result<Option<&[GgufValue]>> {
        self.value(key)
            .map(|v| v.as_array().ok_or_else(|| self.wrong(key, v, "an array")))
            .transpose()
    }
    fn get_array(&self, key: &str) -> Result<&[GgufValue]> {
        self.opt_array(key)?.ok_or_else(|| self.missing(key))
    }
    /// Every element of `values` (the array at `key`) read by `read`, which gives None for
    /// an element that is not `expected`.
    fn elements<'v, T>(
        &self,
        key: &str,
        values: &'v [GgufValue],
        expected: &str,
        read: impl Fn(&'v GgufValue) -> Option<T>,
    ) -> Result<Vec<T>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                read(v).ok_or_else(|| {
                    Error::config(
                        self.source(),
                        key,
                        format!(
                            "element {i} is {} {}, expected {expected}",
                            v.type_name(),
                            v.display()
                        ),
                    )
                })
            })
            .collect()
    }
    /// An array of strings.
    fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.elements(key, self.get_array(key)?, "a string", GgufValue::as_str)
    }
    /// An array of floats (f32 or f64 elements).
    fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.elements(key, self.get_array(key)?, "a float", GgufValue::as_f32)
    }
    /// An array of integers that fit i32; `None` if absent.
    fn opt_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        let Some(values) = self.opt_array(key)? else {
            return Ok(None);
        };
        self.elements(key, values, "an i32", |v| {
            v.as_i64().and_then(|x| i32::try_from(x).ok())
        })
        .map(Some)
    }
}

impl MetadataReader for GgufFile {
    fn value(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
    fn source(&self) -> &Path {
        &self.path
    }
}

/// A metadata map read on its own (as the tokenizer does), with the file it came from.
pub struct MetadataView<'a> {
    pub metadata: &'a GgufMetadata,
    pub path: &'a Path,
}

impl MetadataReader for MetadataView<'_> {
    fn value(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
    fn source(&self) -> &Path {
        self.path
    }
}

/// Writes GGUF v3 files: metadata in insertion order, then tensors (raw bytes + type id),
/// each aligned to 32 bytes.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

const WRITER_ALIGNMENT: usize = 32;

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_metadata(&mut self, key: impl Into<String>, value: GgufValue) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// A tensor as raw bytes of ggml type `type_id`; `dims` in ggml order (row length
    /// first). The bytes are written as given (size checks are the reader's job, so tests
    /// can write bad files).
    pub fn add_tensor_raw(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        type_id: u32,
        bytes: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.into(), dims.to_vec(), type_id, bytes));
        self
    }

    /// An f32 tensor.
    pub fn add_f32(&mut self, name: impl Into<String>, dims: &[u64], values: &[f32]) -> &mut Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor_raw(name, dims, GgmlType::F32.id(), bytes)
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        fn put_str(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
            match v {
                GgufValue::U8(x) => out.push(*x),
                GgufValue::I8(x) => out.push(*x as u8),
                GgufValue::U16(x) => out.extend(x.to_le_bytes()),
                GgufValue::I16(x) => out.extend(x.to_le_bytes()),
                GgufValue::U32(x) => out.extend(x.to_le_bytes()),
                GgufValue::I32(x) => out.extend(x.to_le_bytes()),
                GgufValue::U64(x) => out.extend(x.to_le_bytes()),
                GgufValue::I64(x) => out.extend(x.to_le_bytes()),
                GgufValue::F32(x) => out.extend(x.to_le_bytes()),
                GgufValue::F64(x) => out.extend(x.to_le_bytes()),
                GgufValue::Bool(x) => out.push(*x as u8),
                GgufValue::String(s) => put_str(out, s),
                GgufValue::Array(a) => {
                    // An empty array's element type is written as u8's.
                    let elem = a.first().map_or(0, |e| e.type_id());
                    out.extend(elem.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for e in a {
                        put_value(out, e);
                    }
                }
            }
        }
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + bytes.len()).next_multiple_of(WRITER_ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(WRITER_ALIGNMENT), 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend(bytes);
            out.resize(out.len().next_multiple_of(WRITER_ALIGNMENT), 0);
        }
        out
    }

    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()).map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bitnet-gguf-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn writes_and_reads_every_value_type() {
        let mut w = GgufWriter::new();
        let values = [
            ("a.u8", GgufValue::U8(7)),
            ("a.i8", GgufValue::I8(-7)),
            ("a.u16", GgufValue::U16(700)),
            ("a.i16", GgufValue::I16(-700)),
            ("a.u32", GgufValue::U32(70000)),
            ("a.i32", GgufValue::I32(-70000)),
            ("a.u64", GgufValue::U64(1 << 40)),
            ("a.i64", GgufValue::I64(-(1 << 40))),
            ("a.f32", GgufValue::F32(1.5)),
            ("a.f64", GgufValue::F64(-2.5)),
            ("a.bool", GgufValue::Bool(true)),
            ("a.str", GgufValue::String("héllo".into())),
            (
                "a.nested",
                GgufValue::Array(vec![
                    GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(2)]),
                    GgufValue::Array(vec![GgufValue::I32(3)]),
                ]),
            ),
            (
                "a.strs",
                GgufValue::Array(vec![
                    GgufValue::String("x".into()),
                    GgufValue::String("yz".into()),
                ]),
            ),
        ];
        for (k, v) in &values {
            w.add_metadata(*k, v.clone());
        }
        w.add_f32("t", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        w.add_f32("u", &[1], &[9.0]);
        let p = tmp("values.gguf");
        w.write(&p).unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.version, 3);
        for (k, v) in &values {
            assert_eq!(f.get(k), Some(v), "{k}");
        }
        assert_eq!(f.get_u64("a.u32").unwrap(), 70000);
        assert_eq!(f.get_u64("a.u8").unwrap(), 7);
        assert_eq!(f.get_i64("a.i64").unwrap(), -(1 << 40));
        assert_eq!(f.get_f32("a.f64").unwrap(), -2.5);
        assert_eq!(f.get_str("a.str").unwrap(), "héllo");
        assert_eq!(f.get_str_array("a.strs").unwrap(), vec!["x", "yz"]);
        assert!(f.get_bool("a.bool").unwrap());
        let err = f.get_u64("a.i8").unwrap_err().to_string();
        assert!(
            err.contains("a.i8") && err.contains("non-negative"),
            "{err}"
        );
        let err = f.get_str("nope").unwrap_err().to_string();
        assert!(err.contains("`nope`") && err.contains("missing"), "{err}");
        let err = f.get_f32("a.str").unwrap_err().to_string();
        assert!(
            err.contains("a.str") && err.contains("expected a float"),
            "{err}"
        );
        let t = f.tensor("t").unwrap();
        assert_eq!(t.dims, vec![3, 2]);
        let data = f.tensor_data(t).unwrap();
        assert_eq!(&data[4..8], &2.0f32.to_le_bytes());
        let u = f.tensor("u").unwrap();
        assert_eq!(u.offset, 32);
        assert_eq!(f.tensor_data(u).unwrap(), &9.0f32.to_le_bytes());
    }

    #[test]
    fn release_keeps_tensor_data() {
        let page = crate::formats::mmap::page_size();
        let mut w = GgufWriter::new();
        // F16 tensors of several pages and of less than one, next to each other (sizes in
        // bytes).
        let sizes = [3 * page + 40, 100, 2 * page, 6];
        for (i, &n) in sizes.iter().enumerate() {
            let bytes = (0..n).map(|k| (k * 31 + i * 7) as u8).collect();
            w.add_tensor_raw(format!("t{i}"), &[n as u64 / 2], GgmlType::F16.id(), bytes);
        }
        let p = tmp("release.gguf");
        w.write(&p).unwrap();
        let f = GgufFile::open(&p).unwrap();
        let before: Vec<Vec<u8>> = f
            .tensors
            .iter()
            .map(|t| f.tensor_data(t).unwrap().to_vec())
            .collect();
        for t in &f.tensors {
            let live = f.tensor_data(t).unwrap();
            f.release(t);
            assert_eq!(live, f.tensor_data(t).unwrap());
        }
        for (t, b) in f.tensors.iter().zip(&before) {
            assert_eq!(f.tensor_data(t).unwrap(), &b[..], "{}", t.name);
            f.release(t);
            assert_eq!(f.tensor_data(t).unwrap(), &b[..], "{}", t.name);
        }
        // A mapped view outlives the file and reads the same values after a release.
        assert!(
            f.mapped::<f32>(&f.tensors[3]).is_none(),
            "6 bytes are no f32s"
        );
        let t2 = f.tensor("t2").unwrap().clone();
        let v = f.mapped::<half::f16>(&t2).unwrap();
        drop(f);
        let bytes = |v: &[half::f16]| bytemuck::cast_slice::<_, u8>(v).to_vec();
        assert_eq!(bytes(v.as_slice()), before[2]);
        v.release(0..v.as_slice().len());
        assert_eq!(bytes(v.as_slice()), before[2]);
    }
}
