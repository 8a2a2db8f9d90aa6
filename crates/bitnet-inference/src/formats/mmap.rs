//! Memory-mapped model files, shared and released.
//!
//! - [`SharedMap`]: a read-only file map behind an `Arc`, so weights viewed straight from it
//!   can outlive the reader that opened the file.
//! - [`MappedSlice`]: a typed (`f32`/`f16`/`bf16`) view of part of a map, checked for bounds
//!   and alignment when made; [`Buffer`] is such a view or an owned `Vec`, either of which
//!   derefs to `&[T]`.
//! - [`release`]: tells the kernel that the pages of a byte range are no longer needed, so
//!   they stop counting in the resident set once a loader has repacked them. Only whole pages
//!   inside the range are released (the range is rounded inward), so neighbouring data keeps
//!   its pages. Reading the range again later is fine: the pages fault back from the file.

use std::marker::PhantomData;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// A read-only map of a whole file, shared by the reader and any views into it.
pub type SharedMap = Arc<memmap2::Mmap>;

/// The size of the pages `madvise` works in; 64 KiB (a multiple of every common page size)
/// where it cannot be read.
pub fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| auxv_page_size().unwrap_or(64 << 10))
}

/// Linux: `AT_PAGESZ` from the process's auxiliary vector.
#[cfg(target_os = "linux")]
fn auxv_page_size() -> Option<usize> {
    const AT_PAGESZ: usize = 6;
    const W: usize = std::mem::size_of::<usize>();
    let auxv = std::fs::read("/proc/self/auxv").ok()?;
    auxv.chunks_exact(2 * W).find_map(|kv| {
        let word = |b: &[u8]| usize::from_ne_bytes(b.try_into().unwrap_or([0; W]));
        (word(&kv[..W]) == AT_PAGESZ)
            .then(|| word(&kv[W..]))
            .filter(|p| p.is_power_of_two())
    })
}

#[cfg(not(target_os = "linux"))]
fn auxv_page_size() -> Option<usize> {
    None
}

/// The whole pages of `map` inside byte range `range`, as `(offset, len)` from the map's
/// start; `None` if the range covers no whole page.
fn inner_pages(map: &[u8], range: Range<usize>, page: usize) -> Option<(usize, usize)> {
    let end = range.end.min(map.len());
    if range.start >= end {
        return None;
    }
    let base = map.as_ptr() as usize;
    let first = (base + range.start).next_multiple_of(page) - base;
    let last = (base + end) / page * page - base;
    (first < last).then(|| (first, last - first))
}

/// Tells the kernel the pages of bytes `range` of `map` are no longer needed
/// (`MADV_DONTNEED` on the whole pages inside the range). What a later read sees is
/// unchanged: the pages fault back in from the file. A no-op where `madvise` is unavailable
/// or fails (it is only advice).
pub fn release(map: &memmap2::Mmap, range: Range<usize>) {
    let Some((offset, len)) = inner_pages(map, range, page_size()) else {
        return;
    };
    #[cfg(unix)]
    {
        // SAFETY: `offset..offset + len` lies inside the map and is page-aligned (so the
        // kernel touches no byte outside it). The map is a read-only (PROT_READ) mapping of a
        // file: its pages were never written and cannot be, so MADV_DONTNEED only drops them
        // from this process's page tables, and the next access faults the same bytes back in
        // from the file (page cache). Live borrows of these bytes therefore keep seeing the
        // same values, under the same assumption as the map itself (the file is not changed
        // while mapped).
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (offset, len);
}

/// Element types of a [`MappedSlice`]: plain data, every bit pattern a value.
pub trait MapElem: bytemuck::Pod + Send + Sync + std::fmt::Debug {}
impl MapElem for f32 {}
impl MapElem for half::f16 {}
impl MapElem for half::bf16 {}
impl MapElem for u8 {}

/// `len` values of type `T` stored little-endian at byte `offset` of a [`SharedMap`].
pub struct MappedSlice<T> {
    map: SharedMap,
    offset: usize,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T> Clone for MappedSlice<T> {
    fn clone(&self) -> Self {
        Self {
            map: self.map.clone(),
            offset: self.offset,
            len: self.len,
            _elem: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for MappedSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedSlice")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl<T: MapElem> MappedSlice<T> {
    /// The view, or `None` if the bytes lie outside the map, are not aligned for `T`, or
    /// this host is big-endian (model files are little-endian): callers then copy.
    pub fn new(map: SharedMap, offset: usize, len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let end = offset.checked_add(bytes)?;
        let ok = cfg!(target_endian = "little")
            && end <= map.len()
            && (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>());
        ok.then_some(Self {
            map,
            offset,
            len,
            _elem: PhantomData,
        })
    }

    pub fn as_slice(&self) -> &[T] {
        let bytes = &self.map[self.offset..self.offset + self.len * std::mem::size_of::<T>()];
        // Cannot fail: bounds and alignment were checked in `new`.
        bytemuck::cast_slice(bytes)
    }

    /// Releases the pages of elements `elems` (see [`release`]).
    pub fn release(&self, elems: Range<usize>) {
        let size = std::mem::size_of::<T>();
        let end = elems.end.min(self.len);
        if elems.start < end {
            release(
                &self.map,
                self.offset + elems.start * size..self.offset + end * size,
            );
        }
    }
}

/// Values owned in a `Vec` or viewed in a file map; derefs to `&[T]` either way.
#[derive(Clone)]
pub enum Buffer<T> {
    Owned(Vec<T>),
    Mapped(MappedSlice<T>),
}

impl<T: MapElem> Buffer<T> {
    pub fn is_mapped(&self) -> bool {
        matches!(self, Buffer::Mapped(_))
    }

    /// Releases the mapped pages of elements `elems`; nothing for owned values.
    pub fn release(&self, elems: Range<usize>) {
        if let Buffer::Mapped(m) = self {
            m.release(elems);
        }
    }
}

impl<T: MapElem> Deref for Buffer<T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        match self {
            Buffer::Owned(v) => v,
            Buffer::Mapped(m) => m.as_slice(),
        }
    }
}

impl<T> From<Vec<T>> for Buffer<T> {
    fn from(v: Vec<T>) -> Self {
        Buffer::Owned(v)
    }
}

impl<T> FromIterator<T> for Buffer<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Buffer::Owned(iter.into_iter().collect())
    }
}

impl<T> From<MappedSlice<T>> for Buffer<T> {
    fn from(m: MappedSlice<T>) -> Self {
        Buffer::Mapped(m)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Buffer::Owned(v) => f.debug_tuple("Owned").field(v).finish(),
            Buffer::Mapped(m) => f.debug_tuple("Mapped").field(m).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_pages_round_inward() {
        let page = 4096;
        let buf = vec![0u8; 8 * page + 1];
        let base = buf.as_ptr() as usize;
        // Offsets of the first page boundary in `buf`.
        let b0 = base.next_multiple_of(page) - base;
        assert_eq!(
            inner_pages(&buf, b0..b0 + 2 * page, page),
            Some((b0, 2 * page))
        );
        assert_eq!(
            inner_pages(&buf, b0 + 1..b0 + 3 * page, page),
            Some((b0 + page, 2 * page))
        );
        assert_eq!(
            inner_pages(&buf, b0..b0 + 2 * page - 1, page),
            Some((b0, page))
        );
        assert_eq!(inner_pages(&buf, b0 + 1..b0 + page + 1, page), None);
        assert_eq!(inner_pages(&buf, 5..5, page), None);
    }

    #[test]
    fn release_keeps_contents() {
        let p = std::env::temp_dir().join(format!("bitnet-mmap-unit-{}", std::process::id()));
        let data: Vec<u8> = (0..5 * page_size() + 123)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let file = std::fs::File::open(&p).unwrap();
        // SAFETY: a private temporary file nobody else writes.
        let map: SharedMap = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        assert_eq!(&map[..], &data[..]);
        release(&map, 17..map.len() - 5);
        release(&map, 0..map.len());
        assert_eq!(&map[..], &data[..]);

        let view = MappedSlice::<half::f16>::new(map.clone(), 2, 100).unwrap();
        let bits = |v: &[half::f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
        let before = bits(view.as_slice());
        view.release(0..100);
        assert_eq!(bits(view.as_slice()), before);
        assert_eq!(
            bytemuck::cast_slice::<_, u8>(view.as_slice()),
            &data[2..202]
        );
        assert!(MappedSlice::<half::f16>::new(map.clone(), 3, 10).is_none());
        assert!(MappedSlice::<f32>::new(map.clone(), 2, 10).is_none());
        assert!(MappedSlice::<f32>::new(map.clone(), 4, map.len()).is_none());
        let b: Buffer<f32> = MappedSlice::new(map, 4, 3).unwrap().into();
        assert!(b.is_mapped());
        assert_eq!(b.len(), 3);
        let _ = std::fs::remove_file(&p);
    }
}
