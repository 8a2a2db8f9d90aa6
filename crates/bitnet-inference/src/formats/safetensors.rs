//! Safetensors: single files and sharded directories (`model.safetensors.index.json`).
//!
//! Files are memory-mapped; tensors are views into the map. Data offsets inside a file need
//! not be aligned for the element type, so every decoder reads little-endian bytes instead of
//! casting the slice.
//!
//! API:
//! - [`SafetensorsFile::open`]: maps one file and parses its header (the `safetensors` crate
//!   checks that the offsets tile the data section exactly).
//! - [`SafetensorsModel::open_dir`]: a model directory's weights, `model.safetensors` or the
//!   shards named by `model.safetensors.index.json`; [`SafetensorsModel::tensor`] /
//!   [`SafetensorsModel::require`] look a tensor up by name across shards.
//! - [`TensorRef`]: dtype, shape, raw bytes, and f32 / f16 / bf16 decoding;
//!   [`TensorRef::mapped`] a typed view that shares the map (zero-copy weights, where the
//!   data happens to be aligned), and [`TensorRef::release`] lets the kernel drop the
//!   tensor's pages once a loader has repacked it.

use super::mmap::{MapElem, MappedSlice, SharedMap};
use crate::{Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub use safetensors::Dtype;

/// The single-file name transformers writes.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: SharedMap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.metadata.tensors().len())
            .finish()
    }
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this process (weights viewed in it with
        // `TensorRef::mapped` keep it alive as long as the model). Another process truncating
        // or rewriting the file in place while it is mapped would be undefined behaviour;
        // model files are not expected to change under a running engine, the same assumption
        // every mmap-based loader (safetensors, llama.cpp) makes.
        let mmap = SharedMap::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap[..]).map_err(|e| {
                Error::format(
                    path,
                    format!("not a valid safetensors file ({} bytes): {e}", mmap.len()),
                )
            })?;
        // read_metadata checked 8 + header_len + data == file length.
        let data_start = header_len + 8;
        // The header now lives in `metadata`.
        super::mmap::release(&mmap, 0..data_start);
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, in the order of their data in the file.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// The free-form `__metadata__` map of the header.
    pub fn header_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    pub fn tensor<'a>(&'a self, name: &'a str) -> Option<TensorRef<'a>> {
        let info = self.metadata.info(name)?;
        let (s, e) = info.data_offsets;
        // Offsets were validated against the file length by read_metadata; `get` keeps this
        // panic-free regardless.
        let start = self.data_start.checked_add(s)?;
        let data = self.mmap.get(start..self.data_start.checked_add(e)?)?;
        Some(TensorRef {
            name,
            file: &self.path,
            dtype: info.dtype,
            shape: &info.shape,
            data,
            map: &self.mmap,
            start,
        })
    }
}

/// A view of one tensor inside a mapped file.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    /// The file that holds it (for errors).
    pub file: &'a Path,
    pub dtype: Dtype,
    /// Row-major shape.
    pub shape: &'a [usize],
    /// Raw little-endian bytes, `numel * dtype size` long.
    pub data: &'a [u8],
    /// The map `data` lies in, and where.
    map: &'a SharedMap,
    start: usize,
}

impl<'a> TensorRef<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        // The header validation already computed this product without overflow.
        self.shape.iter().product()
    }

    /// An [`Error::Tensor`] about this tensor.
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::tensor(self.file, self.name, message)
    }

    /// Fails unless the shape is exactly `expected`.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(self.error(format!(
                "expected shape {expected:?}, found {:?}",
                self.shape
            )));
        }
        Ok(())
    }

    /// Fails unless the dtype is one of `allowed`.
    pub fn expect_dtype(&self, allowed: &[Dtype]) -> Result<()> {
        if !allowed.contains(&self.dtype) {
            let names: Vec<String> = allowed.iter().map(|d| d.to_string()).collect();
            return Err(self.error(format!(
                "dtype {} is not supported here (expected {})",
                self.dtype,
                names.join(" or ")
            )));
        }
        Ok(())
    }

    pub fn is_float(&self) -> bool {
        matches!(self.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }

    /// Bytes per element of a float tensor, or an error naming the tensor.
    fn float_width(&self) -> Result<usize> {
        match self.dtype {
            Dtype::F32 => Ok(4),
            Dtype::F16 | Dtype::BF16 => Ok(2),
            other => Err(self.error(format!(
                "dtype {other} is not a float type (expected BF16, F16 or F32)"
            ))),
        }
    }

    /// Decodes elements `start..start + out.len()` (flat, row-major) of a BF16/F16/F32
    /// tensor into `out`.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) -> Result<()> {
        let width = self.float_width()?;
        let bytes = start
            .checked_add(out.len())
            .filter(|&end| end <= self.numel())
            .and_then(|end| self.data.get(start * width..end * width))
            .ok_or_else(|| {
                self.error(format!(
                    "elements {start}..{} are out of range ({} elements)",
                    start.saturating_add(out.len()),
                    self.numel()
                ))
            })?;
        decode_f32(self.dtype, bytes, out);
        Ok(())
    }

    /// Row `r` of a 2-D float tensor as f32.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.cols()?;
        if out.len() != cols {
            return Err(self.error(format!("row buffer of {} for rows of {cols}", out.len())));
        }
        let start = r
            .checked_mul(cols)
            .ok_or_else(|| self.error("row index overflows"))?;
        self.read_f32(start, out)
    }

    /// The whole float tensor as f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        self.float_width()?;
        let mut out = vec![0.0; self.numel()];
        self.read_f32(0, &mut out)?;
        Ok(out)
    }

    /// The single value of a one-element float tensor (shape `[]` or `[1]`, ...).
    pub fn scalar_f32(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(self.error(format!(
                "expected a single value, found shape {:?}",
                self.shape
            )));
        }
        let mut v = [0.0f32];
        self.read_f32(0, &mut v)?;
        Ok(v[0])
    }

    /// A BF16 tensor's values (copied: the map may be unaligned).
    pub fn to_bf16_vec(&self) -> Result<Vec<bf16>> {
        self.expect_dtype(&[Dtype::BF16])?;
        Ok(u16_le(self.data).map(bf16::from_bits).collect())
    }

    /// An F16 tensor's values (copied: the map may be unaligned).
    pub fn to_f16_vec(&self) -> Result<Vec<f16>> {
        self.expect_dtype(&[Dtype::F16])?;
        Ok(u16_le(self.data).map(f16::from_bits).collect())
    }

    /// The tensor as `numel` values of `T` viewed in the map (which the view keeps alive), or
    /// `None` if the dtype's width differs from `T`'s or the data is not aligned for `T`
    /// (safetensors offsets need not be): then copy. The caller checks the dtype.
    pub fn mapped<T: MapElem>(&self) -> Option<MappedSlice<T>> {
        let width = self.dtype.bitsize() / 8;
        if width != std::mem::size_of::<T>() || self.data.len() != self.numel() * width {
            return None;
        }
        MappedSlice::new(self.map.clone(), self.start, self.numel())
    }

    /// Tells the kernel the tensor's mapped pages are no longer needed (loaders call it once
    /// the tensor is repacked or copied into owned memory). Only whole pages inside the
    /// tensor's bytes are released, never a neighbour's; reading the tensor again later
    /// still gives the same bytes (they fault back from the file).
    pub fn release(&self) {
        super::mmap::release(self.map, self.start..self.start + self.data.len());
    }

    /// The row length of a 2-D tensor.
    fn cols(&self) -> Result<usize> {
        match self.shape {
            [_, c] => Ok(*c),
            _ => Err(self.error(format!(
                "expected a 2-D tensor, found shape {:?}",
                self.shape
            ))),
        }
    }
}

fn u16_le(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

/// Decodes little-endian BF16/F16/F32 `bytes` into `out` (`out.len()` elements). Other
/// dtypes leave `out` untouched; callers check the dtype first.
pub fn decode_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(u16_le(bytes)) {
                *o = bf16::from_bits(b).to_f32();
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(u16_le(bytes)) {
                *o = f16::from_bits(b).to_f32();
            }
        }
        _ => {}
    }
}

/// All the weights of a model directory: one file or a set of shards.
#[derive(Debug)]
pub struct SafetensorsModel {
    /// The directory (or single file) it was opened from, for errors.
    source: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    lookup: BTreeMap<String, usize>,
}

impl SafetensorsModel {
    /// Opens `dir/model.safetensors` if it exists, else the shards listed by
    /// `dir/model.safetensors.index.json` (the order transformers tries them in).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if single.is_file() {
            Self::open_file(&single)
        } else if index.is_file() {
            Self::open_index(&index)
        } else {
            Err(Error::format(
                dir,
                format!("no weights: neither {SINGLE_FILE} nor {INDEX_FILE} exists"),
            ))
        }
    }

    /// One `.safetensors` file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let lookup = file.names().into_iter().map(|n| (n, 0)).collect();
        Ok(Self {
            source: path.to_path_buf(),
            files: vec![file],
            lookup,
        })
    }

    /// A sharded checkpoint: `weight_map` of the index names each tensor's shard, which must
    /// lie in the index's directory and hold that tensor.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(index_path, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::format(
                    index_path,
                    "missing object `weight_map` (tensor → shard file)",
                )
            })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<SafetensorsFile> = Vec::new();
        let mut file_index: HashMap<String, usize> = HashMap::new();
        let mut lookup = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::format(
                    index_path,
                    format!("weight_map entry for `{tensor}` is not a file name"),
                )
            })?;
            let plain = Path::new(shard)
                .file_name()
                .is_some_and(|f| f == std::ffi::OsStr::new(shard));
            if !plain {
                return Err(Error::format(
                    index_path,
                    format!(
                        "weight_map entry for `{tensor}`: `{shard}` is not a plain file name in \
                         the model directory"
                    ),
                ));
            }
            let idx = match file_index.get(shard) {
                Some(&i) => i,
                None => {
                    let path = dir.join(shard);
                    if !path.is_file() {
                        return Err(Error::format(
                            index_path,
                            format!(
                                "shard `{shard}` (listed for tensor `{tensor}`) does not exist: {}",
                                path.display()
                            ),
                        ));
                    }
                    files.push(SafetensorsFile::open(&path)?);
                    file_index.insert(shard.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            if files[idx].metadata.info(tensor).is_none() {
                return Err(Error::tensor(
                    files[idx].path(),
                    tensor.as_str(),
                    format!("listed in {INDEX_FILE} but not present in this shard"),
                ));
            }
            lookup.insert(tensor.clone(), idx);
        }
        Ok(Self {
            source: index_path.to_path_buf(),
            files,
            lookup,
        })
    }

    /// Where the weights came from: the single file or the index.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lookup.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.lookup.keys().map(|s| s.as_str())
    }

    pub fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        let (key, &idx) = self.lookup.get_key_value(name)?;
        self.files[idx].tensor(key)
    }

    /// The tensor, or an error naming it and where it was looked for.
    pub fn require(&self, name: &str) -> Result<TensorRef<'_>> {
        self.tensor(name)
            .ok_or_else(|| Error::tensor(&self.source, name, "missing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a safetensors file by hand: `tensors` are (name, dtype, shape, bytes).
    fn write(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)], pad: usize) {
        let mut header = serde_json::Map::new();
        let mut offset = 0;
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape,
                                   "data_offsets": [offset, offset + bytes.len()]}),
            );
            offset += bytes.len();
            data.extend_from_slice(bytes);
        }
        let mut h = serde_json::to_vec(&header).unwrap();
        // Pad the header with spaces so the data section starts at an odd offset.
        h.extend(std::iter::repeat_n(b' ', pad));
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        std::fs::write(path, out).unwrap();
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bitnet-st-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn decodes_unaligned_floats() {
        let d = tmpdir("unaligned");
        let vals = [1.5f32, -2.25, 3.0e-3, 7.0, 0.0, -0.5];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let hf: Vec<u8> = vals
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        // A 1-byte tensor first puts everything after it at odd addresses.
        let p = d.join("model.safetensors");
        for pad in 0..4 {
            write(
                &p,
                &[
                    ("a", "U8", vec![1], vec![9]),
                    ("b", "F32", vec![2, 3], f32b.clone()),
                    ("c", "BF16", vec![2, 3], bf.clone()),
                    ("d", "F16", vec![3, 2], hf.clone()),
                ],
                pad,
            );
            let m = SafetensorsModel::open_dir(&d).unwrap();
            let b = m.require("b").unwrap();
            assert_eq!(b.to_f32_vec().unwrap(), vals);
            let mut row = [0.0f32; 3];
            b.row_f32(1, &mut row).unwrap();
            assert_eq!(row, [7.0, 0.0, -0.5]);
            let c = m.require("c").unwrap();
            let expect: Vec<f32> = vals.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
            assert_eq!(c.to_f32_vec().unwrap(), expect);
            assert_eq!(c.to_bf16_vec().unwrap()[1], bf16::from_f32(-2.25));
            let dd = m.require("d").unwrap();
            let mut row = [0.0f32; 2];
            dd.row_f32(2, &mut row).unwrap();
            assert_eq!(row, [0.0, -0.5]);
            assert!(dd.row_f32(3, &mut row).is_err());
            assert_eq!(m.require("a").unwrap().data, &[9]);
            let err = m.require("a").unwrap().to_f32_vec().unwrap_err();
            assert!(err.to_string().contains("not a float type"), "{err}");
            // A zero-copy view exactly when the data is aligned for the type.
            let aligned = (dd.data.as_ptr() as usize).is_multiple_of(2);
            let view = dd.mapped::<f16>();
            assert_eq!(view.is_some(), aligned, "pad {pad}");
            if let Some(v) = view {
                assert_eq!(v.as_slice(), &dd.to_f16_vec().unwrap()[..]);
            }
            assert!(dd.mapped::<f32>().is_none());
        }
    }

    #[test]
    fn release_keeps_tensor_data() {
        let d = tmpdir("release");
        let page = crate::formats::mmap::page_size();
        let big: Vec<u8> = (0..3 * page + 10).map(|i| (i * 13 % 256) as u8).collect();
        let small: Vec<u8> = (0..100).map(|i| i as u8).collect();
        write(
            &d.join("model.safetensors"),
            &[
                ("a", "U8", vec![big.len()], big.clone()),
                ("b", "U8", vec![small.len()], small.clone()),
                ("c", "U8", vec![big.len()], big.clone()),
            ],
            3,
        );
        let m = SafetensorsModel::open_dir(&d).unwrap();
        for name in ["a", "b", "c", "a"] {
            let t = m.require(name).unwrap();
            let before = t.data.to_vec();
            t.release();
            assert_eq!(t.data, &before[..], "{name}");
            assert_eq!(m.require(name).unwrap().data, &before[..], "{name}");
        }
        assert_eq!(m.require("a").unwrap().data, &big[..]);
        assert_eq!(m.require("b").unwrap().data, &small[..]);
        assert_eq!(m.require("c").unwrap().data, &big[..]);
    }

    #[test]
    fn errors_name_file_and_tensor() {
        let d = tmpdir("errors");
        let err = SafetensorsModel::open_dir(&d).unwrap_err().to_string();
        assert!(err.contains("no weights"), "{err}");

        let p = d.join("model.safetensors");
        write(&p, &[("w", "F32", vec![2], vec![0; 8])], 0);
        let m = SafetensorsModel::open_dir(&d).unwrap();
        let err = m.require("nope").unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("`nope`"),
            "{err}"
        );
        let err = m.require("w").unwrap().expect_shape(&[3]).unwrap_err();
        assert!(
            err.to_string().contains("expected shape [3], found [2]"),
            "{err}"
        );

        // Truncated data section.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        let err = SafetensorsModel::open_dir(&d).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("not a valid"),
            "{err}"
        );
        // Truncated header length.
        std::fs::write(&p, &bytes[..5]).unwrap();
        assert!(SafetensorsModel::open_dir(&d).is_err());
        // Header length beyond the file.
        let mut bad = bytes.clone();
        bad[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        assert!(SafetensorsModel::open_dir(&d).is_err());
        // Corrupt JSON.
        let mut bad = bytes.clone();
        bad[8] = b'x';
        std::fs::write(&p, &bad).unwrap();
        assert!(SafetensorsModel::open_dir(&d).is_err());
    }

    #[test]
    fn sharded_lookup_and_index_errors() {
        let d = tmpdir("sharded");
        write(
            &d.join("model-00001-of-00002.safetensors"),
            &[("x", "F32", vec![1], 1.0f32.to_le_bytes().to_vec())],
            0,
        );
        write(
            &d.join("model-00002-of-00002.safetensors"),
            &[("y", "F32", vec![1], 2.0f32.to_le_bytes().to_vec())],
            0,
        );
        let index = d.join(INDEX_FILE);
        let idx = |map: serde_json::Value| {
            std::fs::write(
                &index,
                serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
            )
            .unwrap()
        };
        idx(serde_json::json!({"x": "model-00001-of-00002.safetensors",
                               "y": "model-00002-of-00002.safetensors"}));
        let m = SafetensorsModel::open_dir(&d).unwrap();
        assert_eq!(m.files().len(), 2);
        assert_eq!(m.require("y").unwrap().scalar_f32().unwrap(), 2.0);
        assert!(m
            .require("y")
            .unwrap()
            .file
            .ends_with("model-00002-of-00002.safetensors"));
        assert_eq!(m.names().collect::<Vec<_>>(), ["x", "y"]);

        idx(serde_json::json!({"x": "model-00001-of-00002.safetensors",
                               "y": "model-00003-of-00003.safetensors"}));
        let err = SafetensorsModel::open_dir(&d).unwrap_err().to_string();
        assert!(
            err.contains(INDEX_FILE) && err.contains("model-00003-of-00003") && err.contains("`y`"),
            "{err}"
        );
        idx(serde_json::json!({"y": "model-00001-of-00002.safetensors"}));
        let err = SafetensorsModel::open_dir(&d).unwrap_err().to_string();
        assert!(
            err.contains("model-00001-of-00002") && err.contains("`y`"),
            "{err}"
        );
        idx(serde_json::json!({"y": "../model-00001-of-00002.safetensors"}));
        assert!(SafetensorsModel::open_dir(&d).is_err());
    }
}
