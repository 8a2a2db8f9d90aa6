//! The device under the CUDA backend: memory, copies and kernel launches, through the
//! [`Gpu`] trait, so that the same forward pass runs on a real GPU ([`CudaGpu`]: the driver
//! API, loaded at run time by `cudarc`) or, in the unit tests, on the CPU emulator
//! (`emu.rs`, the same kernel source compiled with g++).

use crate::{Error, Result};
use std::ffi::{c_void, CString};
use std::sync::Arc;

/// A device address (a host address on the emulator).
pub(crate) type DevPtr = u64;

/// One kernel argument, as the kernel's parameter list declares it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Ptr(DevPtr),
    I32(i32),
    F32(f32),
}

impl Arg {
    /// The argument's bytes in an 8-byte slot (4-byte values in the low half, little-endian),
    /// which is what both launchers hand over by address.
    pub(crate) fn slot(self) -> u64 {
        match self {
            Arg::Ptr(p) => p,
            Arg::I32(v) => v as u32 as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }
}

/// The kernels of `kernels.cu`, in one order for every device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    EmbedRows,
    NormQuant,
    TernaryGemv,
    TernaryGemvGrouped,
    TernaryGemm,
    Int8Logits,
    Q4Logits,
    Q6kLogits,
    DenseGemv,
    DenseGemm,
    Q8Quant,
    Q8Linear,
    HeadNorms,
    RopeStore,
    AttentionChunks,
    AttentionMerge,
    GatherRows,
}

impl Kernel {
    pub(crate) const ALL: [Kernel; 17] = [
        Kernel::EmbedRows,
        Kernel::NormQuant,
        Kernel::TernaryGemv,
        Kernel::TernaryGemvGrouped,
        Kernel::TernaryGemm,
        Kernel::Int8Logits,
        Kernel::Q4Logits,
        Kernel::Q6kLogits,
        Kernel::DenseGemv,
        Kernel::DenseGemm,
        Kernel::Q8Quant,
        Kernel::Q8Linear,
        Kernel::HeadNorms,
        Kernel::RopeStore,
        Kernel::AttentionChunks,
        Kernel::AttentionMerge,
        Kernel::GatherRows,
    ];

    /// The `extern "C"` name in `kernels.cu`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::EmbedRows => "embed_rows",
            Kernel::NormQuant => "norm_quant",
            Kernel::TernaryGemv => "ternary_gemv",
            Kernel::TernaryGemvGrouped => "ternary_gemv_grouped",
            Kernel::TernaryGemm => "ternary_gemm",
            Kernel::Int8Logits => "int8_logits",
            Kernel::Q4Logits => "q4_logits",
            Kernel::Q6kLogits => "q6k_logits",
            Kernel::DenseGemv => "dense_gemv",
            Kernel::DenseGemm => "dense_gemm",
            Kernel::Q8Quant => "q8_quant",
            Kernel::Q8Linear => "q8_linear",
            Kernel::HeadNorms => "head_norms",
            Kernel::RopeStore => "rope_store",
            Kernel::AttentionChunks => "attention_chunks",
            Kernel::AttentionMerge => "attention_merge",
            Kernel::GatherRows => "gather_rows",
        }
    }

    /// Whether the kernel synchronizes its block's threads (`__syncthreads`): the CPU
    /// emulator then runs them as fibers, the others as plain loops.
    #[cfg(test)]
    pub(crate) fn uses_barriers(self) -> bool {
        matches!(
            self,
            Kernel::NormQuant
                | Kernel::TernaryGemv
                | Kernel::TernaryGemvGrouped
                | Kernel::TernaryGemm
                | Kernel::DenseGemm
                | Kernel::AttentionChunks
                | Kernel::HeadNorms
        )
    }

    fn index(self) -> usize {
        Kernel::ALL.iter().position(|&k| k == self).unwrap_or(0)
    }
}

/// The kernels' CUDA C source.
pub(crate) const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// A device that holds memory and runs the kernels of [`KERNEL_SOURCE`].
pub(crate) trait Gpu: Send + Sync {
    /// The device's name, for display (`NVIDIA H100 80GB HBM3`).
    fn name(&self) -> &str;
    /// `bytes` of device memory; the error names `what` and the free memory.
    fn alloc(&self, bytes: usize, what: &str) -> Result<DevPtr>;
    /// Returns memory from [`Gpu::alloc`].
    ///
    /// # Safety
    /// `ptr` came from `alloc` of this device, is freed once, and no running or queued
    /// kernel uses it.
    unsafe fn free(&self, ptr: DevPtr);
    /// Copies `src` to `dst` (waits for the device's earlier work).
    ///
    /// # Safety
    /// `dst..dst + src.len()` lies inside one allocation of this device.
    unsafe fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Copies device memory at `src` into `dst`, after the device's earlier work is done.
    ///
    /// # Safety
    /// `src..src + dst.len()` lies inside one allocation of this device.
    unsafe fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()>;
    /// Queues `kernel` on a grid of `grid` blocks of `block` threads.
    ///
    /// # Safety
    /// `args` match the kernel's parameters in number and type, and every element the
    /// kernel reads or writes through its pointers for this grid lies inside allocations
    /// of this device that live until the work is done.
    unsafe fn launch(
        &self,
        kernel: Kernel,
        grid: [u32; 3],
        block: [u32; 3],
        args: &[Arg],
    ) -> Result<()>;
    /// (free, total) bytes of device memory, where the device can tell.
    fn memory_info(&self) -> Option<(usize, usize)>;
    /// `bytes` of page-locked host memory, which copies from the device reach at the bus's
    /// full speed (pageable memory goes through a staging copy); `None` where the device
    /// has none to give (the caller then uses ordinary memory).
    fn alloc_host(&self, bytes: usize) -> Option<*mut u8>;
    /// Returns memory from [`Gpu::alloc_host`].
    ///
    /// # Safety
    /// `ptr` came from `alloc_host` of this device and is freed once, after its last use.
    unsafe fn free_host(&self, ptr: *mut u8);
    /// Whether the int8 tensor-core kernel (`ternary_gemm`, `mma.sync` m16n8k32: compute
    /// capability 8.0 and newer) runs here.
    fn int8_mma(&self) -> bool;
    /// Starts recording the launches that follow into a graph instead of running them;
    /// `false` where the device has no graphs (the emulator), which then runs them as usual.
    fn begin_capture(&self) -> Result<bool>;
    /// Ends the recording begun by [`Gpu::begin_capture`]: the launches since, as a graph
    /// ready to run ([`Gpu::launch_graph`]).
    fn end_capture(&self) -> Result<Graph>;
    /// Queues a recorded graph: its launches, in order, with the arguments they were
    /// recorded with.
    ///
    /// # Safety
    /// Every buffer the graph's kernels use is still allocated and in the state their
    /// launches' contracts require.
    unsafe fn launch_graph(&self, graph: Graph) -> Result<()>;
    /// Frees a graph from [`Gpu::end_capture`].
    ///
    /// # Safety
    /// `graph` came from this device, is freed once, and is not queued or running.
    unsafe fn destroy_graph(&self, graph: Graph);
}

/// A recorded graph of launches, ready to run (a driver handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Graph(u64);

/// f32 host memory that device copies land in: page-locked where the device gives it,
/// ordinary memory otherwise.
pub(crate) struct HostFloats {
    gpu: Arc<dyn Gpu>,
    pinned: Option<*mut u8>,
    pageable: Vec<f32>,
    len: usize,
}

// SAFETY: the pinned pointer is this value's own allocation, reached only through `&self` /
// `&mut self` like the Vec beside it.
unsafe impl Send for HostFloats {}
// SAFETY: as above; `&self` gives only shared reads.
unsafe impl Sync for HostFloats {}

impl HostFloats {
    pub(crate) fn new(gpu: &Arc<dyn Gpu>, len: usize) -> Self {
        let pinned = gpu.alloc_host(len * 4);
        if let Some(p) = pinned {
            // SAFETY: `p` holds len·4 bytes; zeroed so the slice below reads defined floats.
            unsafe { std::ptr::write_bytes(p, 0, len * 4) };
        }
        HostFloats {
            gpu: gpu.clone(),
            pageable: if pinned.is_some() {
                Vec::new()
            } else {
                vec![0.0; len]
            },
            pinned,
            len,
        }
    }
}

impl std::ops::Deref for HostFloats {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self.pinned {
            // SAFETY: `p` holds `len` floats (4-byte aligned: the driver's pages), initialized
            // in `new`, alive while `self` is.
            Some(p) => unsafe { std::slice::from_raw_parts(p as *const f32, self.len) },
            None => &self.pageable,
        }
    }
}

impl std::ops::DerefMut for HostFloats {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self.pinned {
            // SAFETY: as in `deref`; `&mut self` makes this the only reference.
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p as *mut f32, self.len) },
            None => &mut self.pageable,
        }
    }
}

impl Drop for HostFloats {
    fn drop(&mut self) {
        if let Some(p) = self.pinned.take() {
            // SAFETY: from this device's alloc_host, freed once, no longer used.
            unsafe { self.gpu.free_host(p) };
        }
    }
}

/// An allocation of device memory, freed on drop.
pub(crate) struct DevBuf {
    gpu: Arc<dyn Gpu>,
    ptr: DevPtr,
    bytes: usize,
}

impl DevBuf {
    pub(crate) fn new(gpu: &Arc<dyn Gpu>, bytes: usize, what: &str) -> Result<Self> {
        // A zero-byte buffer still gets an address (kernels may be handed it unused).
        let ptr = gpu.alloc(bytes.max(4), what)?;
        Ok(DevBuf {
            gpu: gpu.clone(),
            ptr,
            bytes,
        })
    }

    /// A buffer holding `data`.
    pub(crate) fn from_slice<T: bytemuck::Pod>(
        gpu: &Arc<dyn Gpu>,
        data: &[T],
        what: &str,
    ) -> Result<Self> {
        let buf = Self::new(gpu, std::mem::size_of_val(data), what)?;
        buf.upload(0, data)?;
        Ok(buf)
    }

    pub(crate) fn ptr(&self) -> DevPtr {
        self.ptr
    }
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
    pub(crate) fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }

    /// Copies `data` to byte offset `offset` of the buffer.
    pub(crate) fn upload<T: bytemuck::Pod>(&self, offset: usize, data: &[T]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.check(offset, bytes.len())?;
        // SAFETY: offset..offset + len lies inside this allocation (checked above).
        unsafe { self.gpu.upload(self.ptr + offset as u64, bytes) }
    }

    /// Copies bytes from offset `offset` into `out`.
    pub(crate) fn download<T: bytemuck::Pod>(&self, offset: usize, out: &mut [T]) -> Result<()> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        self.check(offset, bytes.len())?;
        // SAFETY: offset..offset + len lies inside this allocation (checked above).
        unsafe { self.gpu.download(self.ptr + offset as u64, bytes) }
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.bytes) {
            return Err(Error::Invalid(format!(
                "CUDA: a copy of {len} bytes at offset {offset} overruns a buffer of {}",
                self.bytes
            )));
        }
        Ok(())
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: the pointer came from this device's `alloc` and is freed only here; the
        // forward pass waits for its kernels (the logits download) before returning, so no
        // queued work uses a buffer that is being dropped.
        unsafe { self.gpu.free(self.ptr) }
    }
}

/// A CUDA device through the driver API (`libcuda.so`, loaded at run time).
pub(crate) struct CudaGpu {
    device: cudarc::driver::sys::CUdevice,
    context: cudarc::driver::sys::CUcontext,
    module: cudarc::driver::sys::CUmodule,
    functions: Vec<cudarc::driver::sys::CUfunction>,
    /// Every copy and launch goes on this stream, in order (the legacy default stream
    /// cannot be recorded into graphs).
    stream: cudarc::driver::sys::CUstream,
    name: String,
    /// Compute capability (major, minor).
    capability: (i32, i32),
}

// SAFETY: the handles are plain driver handles; the driver API is thread-safe, and every
// method makes the context current on the calling thread before it uses them.
unsafe impl Send for CudaGpu {}
// SAFETY: as above; no method mutates `self`.
unsafe impl Sync for CudaGpu {}

fn driver_error(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Invalid(format!("CUDA: {what}: {e}"))
}

/// Whether the NVIDIA driver library can be loaded here (no GPU is touched).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library's names; nothing is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl CudaGpu {
    /// Opens GPU `ordinal` and loads the kernels (compiled by NVRTC, or from the disk cache).
    pub(crate) fn open(ordinal: usize) -> Result<Self> {
        use cudarc::driver::result;
        use cudarc::driver::sys::CUdevice_attribute as Attr;
        if !driver_present() {
            return Err(Error::Invalid(
                "CUDA: no NVIDIA driver here (libcuda.so could not be loaded): `--device cuda` \
                 needs an NVIDIA GPU and its driver; use `--device cpu`"
                    .into(),
            ));
        }
        result::init().map_err(|e| driver_error("the driver did not initialize", e))?;
        let count = result::device::get_count().map_err(|e| driver_error("device count", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Invalid(format!(
                "CUDA: no device {ordinal}: the driver sees {count} GPU(s) (ordinals start at 0)"
            )));
        }
        let device = result::device::get(ordinal as i32)
            .map_err(|e| driver_error(&format!("device {ordinal}"), e))?;
        let name = result::device::get_name(device)
            .map_err(|e| driver_error(&format!("device {ordinal}'s name"), e))?;
        // SAFETY: `device` came from `device::get`.
        let context = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| driver_error(&format!("a context on {name}"), e))?;
        // SAFETY: `context` is the device's retained primary context.
        unsafe { result::ctx::set_current(context) }
            .map_err(|e| driver_error("making the context current", e))?;
        // SAFETY: `device` came from `device::get`; the attributes exist on every device.
        let (major, minor) = unsafe {
            (
                result::device::get_attribute(
                    device,
                    Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                ),
                result::device::get_attribute(
                    device,
                    Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                ),
            )
        };
        let cc = (
            major.map_err(|e| driver_error("compute capability", e))?,
            minor.map_err(|e| driver_error("compute capability", e))?,
        );
        let ptx = kernels_ptx(cc)?;
        let image = CString::new(ptx)
            .map_err(|_| Error::Invalid("CUDA: the compiled PTX holds a NUL byte".into()))?;
        // SAFETY: `image` is NUL-terminated PTX text; the context is current.
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(|e| driver_error(&format!("loading the kernels on {name}"), e))?;
        let mut functions = Vec::with_capacity(Kernel::ALL.len());
        for k in Kernel::ALL {
            let fname = CString::new(k.name()).expect("kernel names have no NUL");
            // SAFETY: `module` was just loaded and is not unloaded while `self` lives.
            let f = unsafe { result::module::get_function(module, fname) }
                .map_err(|e| driver_error(&format!("kernel `{}`", k.name()), e))?;
            functions.push(f);
        }
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_error("creating a stream", e))?;
        Ok(CudaGpu {
            device,
            context,
            module,
            functions,
            stream,
            name,
            capability: cc,
        })
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained until `self` drops.
        unsafe { cudarc::driver::result::ctx::set_current(self.context) }
            .map_err(|e| driver_error("making the context current", e))
    }
}

impl Drop for CudaGpu {
    fn drop(&mut self) {
        // SAFETY: the module and the retained context are released once, here; every
        // buffer holds an `Arc` to this device, so none is left to free.
        unsafe {
            let _ = cudarc::driver::result::ctx::set_current(self.context);
            let _ = cudarc::driver::result::stream::synchronize(self.stream);
            let _ = cudarc::driver::result::stream::destroy(self.stream);
            let _ = cudarc::driver::result::module::unload(self.module);
            let _ = cudarc::driver::result::primary_ctx::release(self.device);
        }
    }
}

impl Gpu for CudaGpu {
    fn name(&self) -> &str {
        &self.name
    }

    fn alloc(&self, bytes: usize, what: &str) -> Result<DevPtr> {
        self.bind()?;
        // SAFETY: a plain allocation in the current context.
        match unsafe { cudarc::driver::result::malloc_sync(bytes) } {
            Ok(p) => Ok(p),
            Err(e) => {
                let free = match self.memory_info() {
                    Some((free, total)) => format!("{free} of {total} bytes free"),
                    None => "free memory unknown".into(),
                };
                Err(Error::Invalid(format!(
                    "CUDA: {what} ({bytes} bytes) did not fit on {} ({free}): {e}",
                    self.name
                )))
            }
        }
    }

    unsafe fn free(&self, ptr: DevPtr) {
        if self.bind().is_ok() {
            // SAFETY: the caller's contract: `ptr` came from `alloc` and is unused.
            let _ = unsafe { cudarc::driver::result::free_sync(ptr) };
        }
    }

    unsafe fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        use cudarc::driver::result;
        self.bind()?;
        // SAFETY: the caller's contract: the range lies inside one allocation. The copy is
        // queued after the stream's earlier work, and waited for before `src` is released.
        unsafe {
            result::memcpy_htod_async(dst, src, self.stream)
                .and_then(|()| result::stream::synchronize(self.stream))
        }
        .map_err(|e| driver_error("a kernel or the copy to the GPU failed", e))
    }

    unsafe fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        use cudarc::driver::result;
        self.bind()?;
        // SAFETY: the caller's contract: the range lies inside one allocation. The copy is
        // queued after the kernels before it, and waited for (which reports their errors)
        // before `dst` is read.
        unsafe {
            result::memcpy_dtoh_async(dst, src, self.stream)
                .and_then(|()| result::stream::synchronize(self.stream))
        }
        .map_err(|e| driver_error("a kernel or the copy from the GPU failed", e))
    }

    unsafe fn launch(
        &self,
        kernel: Kernel,
        grid: [u32; 3],
        block: [u32; 3],
        args: &[Arg],
    ) -> Result<()> {
        self.bind()?;
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: the caller's contract (arguments match, memory in bounds); the function
        // handle comes from the loaded module; `slots` outlives the call, which copies the
        // parameters before it returns.
        unsafe {
            cudarc::driver::result::launch_kernel(
                self.functions[kernel.index()],
                (grid[0], grid[1], grid[2]),
                (block[0], block[1], block[2]),
                0,
                self.stream,
                &mut params,
            )
        }
        .map_err(|e| driver_error(&format!("launching `{}`", kernel.name()), e))
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        self.bind().ok()?;
        cudarc::driver::result::mem_get_info().ok()
    }

    fn int8_mma(&self) -> bool {
        self.capability >= (8, 0)
    }

    fn alloc_host(&self, bytes: usize) -> Option<*mut u8> {
        self.bind().ok()?;
        // SAFETY: a plain allocation of `bytes` (> 0, the caller's) with no flags.
        unsafe { cudarc::driver::result::malloc_host(bytes.max(1), 0) }
            .ok()
            .map(|p| p as *mut u8)
    }

    unsafe fn free_host(&self, ptr: *mut u8) {
        if self.bind().is_ok() {
            // SAFETY: the caller's contract: from malloc_host, freed once.
            let _ = unsafe { cudarc::driver::result::free_host(ptr as *mut std::ffi::c_void) };
        }
    }

    fn begin_capture(&self) -> Result<bool> {
        use cudarc::driver::sys::CUstreamCaptureMode;
        self.bind()?;
        // SAFETY: the stream is this device's, alive while `self` is; thread-local mode
        // leaves other threads' use of the driver alone.
        unsafe {
            cudarc::driver::result::stream::begin_capture(
                self.stream,
                CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| driver_error("starting a graph capture", e))?;
        Ok(true)
    }

    fn end_capture(&self) -> Result<Graph> {
        use cudarc::driver::{result, sys};
        self.bind()?;
        // SAFETY: the stream is capturing (begin_capture); the recorded graph is turned into
        // an executable one and then released (the executable keeps what it needs).
        unsafe {
            let graph = result::stream::end_capture(self.stream)
                .map_err(|e| driver_error("ending a graph capture", e))?;
            let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = result::graph::destroy(graph);
            let exec = exec.map_err(|e| driver_error("instantiating a graph", e))?;
            Ok(Graph(exec as u64))
        }
    }

    unsafe fn launch_graph(&self, graph: Graph) -> Result<()> {
        self.bind()?;
        // SAFETY: `graph` is an executable graph of this device (end_capture); the caller
        // keeps its buffers alive.
        unsafe {
            cudarc::driver::result::graph::launch(
                graph.0 as cudarc::driver::sys::CUgraphExec,
                self.stream,
            )
        }
        .map_err(|e| driver_error("launching a graph", e))
    }

    unsafe fn destroy_graph(&self, graph: Graph) {
        if self.bind().is_ok() {
            // SAFETY: the caller's contract: from end_capture, freed once, not running.
            let _ = unsafe {
                cudarc::driver::result::graph::exec_destroy(
                    graph.0 as cudarc::driver::sys::CUgraphExec,
                )
            };
        }
    }
}

/// The kernels as PTX for compute capability `cc`: from the disk cache, or compiled by
/// NVRTC and cached (keyed by a hash of the source and the options).
fn kernels_ptx(cc: (i32, i32)) -> Result<String> {
    use sha2::Digest;
    let options = nvrtc_options(cc);
    let mut hash = sha2::Sha256::new();
    hash.update(KERNEL_SOURCE.as_bytes());
    for o in &options {
        hash.update([0u8]);
        hash.update(o.as_bytes());
    }
    let key: String = hash
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let cached = cache_dir().map(|d| d.join(format!("kernels-{key}.ptx")));
    if let Some(text) = cached
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        return Ok(text);
    }
    let ptx = compile(&options)?;
    if let Some(path) = cached {
        // Best effort: a read-only or full disk only costs a compile next time.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(path.parent().unwrap_or(&path)).is_ok()
            && std::fs::write(&tmp, &ptx).is_ok()
        {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}

/// NVRTC's options for compute capability `cc`: no FMA contraction (the CPU's rounding).
pub(crate) fn nvrtc_options(cc: (i32, i32)) -> Vec<String> {
    vec![
        "--fmad=false".to_string(),
        format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
    ]
}

/// Whether NVRTC can be loaded here.
#[cfg(test)]
pub(crate) fn nvrtc_present() -> bool {
    preload_nvrtc();
    // SAFETY: only tries to dlopen the library's names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// `$BITNET_CUDA_CACHE`, else `$XDG_CACHE_HOME/bitnet/cuda`, else `~/.cache/bitnet/cuda`.
fn cache_dir() -> Option<std::path::PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = env("BITNET_CUDA_CACHE") {
        return Some(d.into());
    }
    let base = env("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| env("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("bitnet").join("cuda"))
}

/// The kernels as PTX, compiled by NVRTC with `options`.
pub(crate) fn compile(options: &[String]) -> Result<String> {
    preload_nvrtc();
    // SAFETY: only tries to dlopen the library's names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Invalid(
            "CUDA: NVRTC (libnvrtc.so.13) not found: the CUDA backend compiles its kernels at \
             run time; install the CUDA runtime compiler (NVRTC) or add its folder to \
             LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: options.to_vec(),
        name: Some("bitnet_kernels.cu".into()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. }) => {
            Err(Error::Invalid(format!(
                "CUDA: NVRTC could not compile the kernels ({nvrtc:?}):\n{}",
                log.to_string_lossy()
            )))
        }
        Err(e) => Err(Error::Invalid(format!("CUDA: NVRTC: {e:?}"))),
    }
}

/// Loads NVRTC from the CUDA toolkit's usual folders when it is not on the loader's path
/// (`LD_LIBRARY_PATH`, ld.so.cache), so that cudarc's load by name finds it already loaded.
fn preload_nvrtc() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let mut dirs: Vec<std::path::PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
            .iter()
            .filter_map(std::env::var_os)
            .map(|d| std::path::PathBuf::from(d).join("lib64"))
            .collect();
        dirs.push("/usr/local/cuda/lib64".into());
        if let Ok(entries) = std::fs::read_dir("/usr/local") {
            let mut more: Vec<_> = entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("cuda-"))
                .map(|e| e.path().join("lib64"))
                .collect();
            more.sort();
            dirs.extend(more.into_iter().rev());
        }
        for dir in dirs {
            for name in ["libnvrtc.so.13", "libnvrtc.so"] {
                let path = dir.join(name);
                if !path.exists() {
                    continue;
                }
                // SAFETY: loading NVRTC runs only its initializers, which have no
                // preconditions.
                if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
                    // Kept loaded for the life of the process, for cudarc to find.
                    std::mem::forget(lib);
                    return;
                }
            }
        }
    });
}
