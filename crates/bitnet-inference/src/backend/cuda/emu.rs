//! A CPU stand-in for the GPU, for the unit tests: `kernels.cu` compiled by the system's C++
//! compiler behind `emu_prelude.h`, a block's threads run one after another (as fibers that
//! switch at each barrier, for kernels with barriers), "device memory" in host allocations.
//! It proves
//! the kernels' arithmetic and indexing and the backend's buffer plan and launches against
//! the CPU backend on machines without a GPU (CI); what only a GPU shows (NVRTC, the driver,
//! races, speed) is for the CUDA tests (`tests/it/cuda.rs`, `scripts/test-cuda`).

use super::device::{Arg, DevPtr, Gpu, Kernel, KERNEL_SOURCE};
use crate::{Error, Result};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

type LaunchFn =
    unsafe extern "C" fn(*const std::ffi::c_char, *const u32, *const u32, *mut *mut c_void) -> i32;

pub(crate) struct EmuGpu {
    launch_fn: LaunchFn,
    /// Keeps the compiled kernels loaded while `launch_fn` may be called.
    _lib: libloading::Library,
    /// Live allocations: address → layout.
    allocs: Mutex<HashMap<DevPtr, std::alloc::Layout>>,
    /// Live "page-locked" host allocations (ordinary ones here).
    host: Mutex<HashMap<DevPtr, std::alloc::Layout>>,
}

/// Alignment of every allocation (as cuMemAlloc's).
const ALIGN: usize = 256;

impl EmuGpu {
    /// Compiles the kernels with `c++` into `dir` and loads them; `Ok(None)` (with the
    /// reason) when no C++ compiler is installed.
    pub(crate) fn build(dir: &std::path::Path) -> Result<std::result::Result<Self, String>> {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        if std::process::Command::new(&cxx)
            .arg("--version")
            .output()
            .is_err()
        {
            return Ok(Err(format!(
                "no C++ compiler (`{cxx}`) to run the CUDA kernels on the CPU"
            )));
        }
        let mut src = String::from(include_str!("emu_prelude.h"));
        src.push_str(KERNEL_SOURCE);
        src.push_str("\nstatic const emu_kernel EMU_KERNELS[] = {\n");
        for k in Kernel::ALL {
            let n = k.name();
            src.push_str(&format!(
                "    {{\"{n}\", &emu_wrap<decltype(&{n}), &{n}>::call, {}}},\n",
                k.uses_barriers()
            ));
        }
        src.push_str(
            r#"};
extern "C" int emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                          void** args) {
    for (const emu_kernel& k : EMU_KERNELS) {
        if (std::strcmp(k.name, name) == 0) {
            emu_run(k.call, args, k.fibers, grid, block);
            return 0;
        }
    }
    return 1;
}
"#,
        );
        std::fs::create_dir_all(dir).map_err(|e| Error::Invalid(format!("{e}")))?;
        let cpp = dir.join("kernels_emu.cpp");
        let lib = dir.join("libkernels_emu.so");
        std::fs::write(&cpp, src).map_err(|e| Error::Invalid(format!("{e}")))?;
        let out = std::process::Command::new(&cxx)
            .args([
                "-std=c++17",
                "-O2",
                "-ffp-contract=off",
                "-shared",
                "-fPIC",
                "-o",
            ])
            .arg(&lib)
            .arg(&cpp)
            .output()
            .map_err(|e| Error::Invalid(format!("{cxx}: {e}")))?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "the kernels do not compile as C++:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // SAFETY: the library was just built from our source; its initializers do nothing.
        let lib = unsafe { libloading::Library::new(&lib) }
            .map_err(|e| Error::Invalid(format!("loading the emulated kernels: {e}")))?;
        // SAFETY: `emu_launch` is defined above with exactly this signature.
        let launch_fn = unsafe { lib.get::<LaunchFn>(b"emu_launch\0") }
            .map(|f| *f)
            .map_err(|e| Error::Invalid(format!("emu_launch: {e}")))?;
        Ok(Ok(EmuGpu {
            launch_fn,
            _lib: lib,
            allocs: Mutex::new(HashMap::new()),
            host: Mutex::new(HashMap::new()),
        }))
    }
}

impl EmuGpu {
    /// Bytes of all live allocations.
    pub(crate) fn allocated_bytes(&self) -> usize {
        let allocs = self.allocs.lock().unwrap();
        allocs.values().map(|l| l.size()).sum()
    }
}

impl Gpu for EmuGpu {
    fn name(&self) -> &str {
        "CPU emulator"
    }

    fn alloc(&self, bytes: usize, _what: &str) -> Result<DevPtr> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|e| Error::Invalid(format!("{e}")))?;
        // Poisoned with NaN-pattern bytes, so that a kernel reading what nothing wrote
        // shows in the results.
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Error::Invalid(format!("emulator: {bytes} bytes")));
        }
        // SAFETY: `p` holds `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(p, 0xff, layout.size()) };
        self.allocs.lock().unwrap().insert(p as DevPtr, layout);
        Ok(p as DevPtr)
    }

    unsafe fn free(&self, ptr: DevPtr) {
        if let Some(layout) = self.allocs.lock().unwrap().remove(&ptr) {
            // SAFETY: allocated by `alloc` with this layout, freed once (removed above).
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
        }
    }

    unsafe fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        // SAFETY: the caller's contract: dst..dst+len is inside one allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        // SAFETY: the caller's contract: src..src+len is inside one allocation.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn launch(
        &self,
        kernel: Kernel,
        grid: [u32; 3],
        block: [u32; 3],
        args: &[Arg],
    ) -> Result<()> {
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let name = CString::new(kernel.name()).expect("kernel names have no NUL");
        // SAFETY: the caller's contract (arguments match the kernel, memory in bounds); the
        // launcher reads `params.len()` parameters, which `slots` backs.
        let rc = unsafe {
            (self.launch_fn)(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                params.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::Invalid(format!(
                "emulator: no kernel `{}`",
                kernel.name()
            )));
        }
        Ok(())
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }

    fn int8_mma(&self) -> bool {
        true
    }

    fn alloc_host(&self, bytes: usize) -> Option<*mut u8> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        (!p.is_null()).then(|| {
            self.host.lock().unwrap().insert(p as DevPtr, layout);
            p
        })
    }

    unsafe fn free_host(&self, ptr: *mut u8) {
        if let Some(layout) = self.host.lock().unwrap().remove(&(ptr as DevPtr)) {
            // SAFETY: allocated by `alloc_host` with this layout, freed once.
            unsafe { std::alloc::dealloc(ptr, layout) };
        }
    }

    fn begin_capture(&self) -> Result<bool> {
        Ok(false)
    }

    fn end_capture(&self) -> Result<super::device::Graph> {
        Err(Error::Invalid("emulator: no graphs".into()))
    }

    unsafe fn launch_graph(&self, _graph: super::device::Graph) -> Result<()> {
        Err(Error::Invalid("emulator: no graphs".into()))
    }

    unsafe fn destroy_graph(&self, _graph: super::device::Graph) {}
}
