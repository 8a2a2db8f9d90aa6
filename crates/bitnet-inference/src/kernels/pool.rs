//! The CPU backend's compute threads: a persistent spinning pool, measured against rayon for
//! `ternary_matmul` (see the benches). Workers spin briefly after a job, then yield, then
//! sleep on a condition variable, so idle workers cost nothing and a 2-core machine shared
//! with other work is not starved.
//!
//! A pool is owned by the backend that made it (`-t N`: the calling thread plus N − 1
//! workers, nothing else), together with the [`KernelChoice`] its tasks compute with.
//! [`SpinPool::install`] makes it the pool of the calling thread for the length of a forward
//! call; the kernels' parallel loops ([`run`], [`for_each_chunk_mut`]) use the installed
//! pool, or run on the calling thread alone where none is installed (kernel tests, load-time
//! work). Its workers stop and are joined when the pool is dropped.

use super::KernelChoice;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// A loop body: `f(i)` for each index.
type Task<'a> = &'a (dyn Fn(usize) + Sync);

/// One parallel loop: `f(i)` for every `i < n`, handed out one index at a time.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
}

struct Shared {
    /// Bumped once per job; workers run each epoch exactly once.
    epoch: AtomicU64,
    /// The current job (a `*const Job` with its lifetime erased), valid until every worker
    /// has acknowledged the epoch.
    job: AtomicUsize,
    /// Workers that finished the current epoch.
    done: AtomicUsize,
    sleepers: AtomicUsize,
    /// Set when the pool is dropped: workers leave at the next epoch.
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    kernels: KernelChoice,
}

pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// One job at a time: callers from several threads queue here.
    submit: Mutex<()>,
}

thread_local! {
    /// The pool installed on this thread ([`SpinPool::install`]); a worker's own pool.
    static CURRENT: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
    /// The installed pool's `SpinPool` on the installing thread (null on workers).
    static CURRENT_POOL: Cell<*const SpinPool> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread is running a task of a job: a loop started inside a task runs
    /// inline (the pool is busy with the outer job).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Spins (with `spin_loop`) for a few microseconds, then yields, then reports `false`.
fn backoff(round: &mut u32) -> bool {
    *round += 1;
    if *round < 2000 {
        std::hint::spin_loop();
        true
    } else if *round < 2100 {
        std::thread::yield_now();
        true
    } else {
        false
    }
}

impl SpinPool {
    /// A pool where the caller plus `threads - 1` workers run each job, computing with the
    /// machine's kernels.
    pub fn new(threads: usize) -> Self {
        Self::with_kernels(threads, KernelChoice::machine())
    }

    /// A pool whose tasks compute with `kernels`.
    pub fn with_kernels(threads: usize, kernels: KernelChoice) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            kernels,
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("bitnet-compute-{i}"))
                    .spawn(move || worker(shared))
                    .expect("cannot start a compute thread")
            })
            .collect();
        Self {
            shared,
            workers,
            submit: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    pub fn kernels(&self) -> KernelChoice {
        self.shared.kernels
    }

    /// Runs `f` with this pool installed on the calling thread: the kernels' parallel loops
    /// inside it run on this pool and compute with its kernel choice.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const Shared, *const SpinPool);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.set(self.0);
                CURRENT_POOL.set(self.1);
            }
        }
        let _restore = Restore(
            CURRENT.replace(Arc::as_ptr(&self.shared)),
            CURRENT_POOL.replace(self as *const SpinPool),
        );
        f()
    }

    /// Runs `f(i)` for `i in 0..n` on the pool and the calling thread; returns when all are
    /// done.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() || n <= 1 || IN_TASK.get() {
            run_inline(n, f);
            return;
        }
        let _one = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job {
            f,
            n,
            next: AtomicUsize::new(0),
        };
        let s = &*self.shared;
        s.done.store(0, Ordering::Relaxed);
        s.job.store(&job as *const Job as usize, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        run_job(&job);
        // `job` lives on this stack: wait until every worker has stopped touching it.
        let mut round = 0;
        while s.done.load(Ordering::Acquire) < self.workers.len() {
            if !backoff(&mut round) {
                std::thread::yield_now();
            }
        }
    }

    /// `f(i, chunk_i)` for every `chunk`-sized piece of `data` (the last may be shorter), in
    /// parallel: the pool's counterpart of rayon's `par_chunks_mut().enumerate()`. Pieces are
    /// handed out last first: in causal attention the late pieces are the long ones, and a
    /// pool ends sooner when its longest tasks start first.
    pub fn for_each_chunk_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        chunks_on(data, chunk, f, &|n, g| self.run(n, g));
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Threads of the pool installed on this thread (1 where none is: loops run inline).
pub fn threads() -> usize {
    with_installed(|p| p.map_or(1, SpinPool::threads))
}

/// The kernel choice of the pool this thread computes for (installed, or a worker's own),
/// else the machine's.
pub fn kernels() -> KernelChoice {
    let s = CURRENT.get();
    if s.is_null() {
        KernelChoice::machine()
    } else {
        // SAFETY: CURRENT points at the `Shared` of a pool that is alive: on an installing
        // thread, `install` keeps `&self` borrowed (and so the pool and its `Arc`) until it
        // restores the previous value; on a worker, the worker holds an `Arc` to it.
        unsafe { (*s).kernels }
    }
}

/// `f(i)` for `i in 0..n` on the installed pool, or on this thread alone.
pub fn run(n: usize, f: &(dyn Fn(usize) + Sync)) {
    with_installed(|p| match p {
        Some(p) => p.run(n, f),
        None => run_inline(n, f),
    })
}

/// [`SpinPool::for_each_chunk_mut`] on the installed pool, or on this thread alone.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    chunks_on(data, chunk, f, &run);
}

fn with_installed<R>(f: impl FnOnce(Option<&SpinPool>) -> R) -> R {
    let p = CURRENT_POOL.get();
    // SAFETY: CURRENT_POOL is non-null only inside `SpinPool::install` on this thread, which
    // holds `&self` for as long as the pointer is set.
    f(unsafe { p.as_ref() })
}

fn run_inline(n: usize, f: &(dyn Fn(usize) + Sync)) {
    (0..n).for_each(f);
}

/// A slice's base pointer handed to pool tasks that each take a disjoint chunk.
struct ChunksOut<T>(*mut T);
// SAFETY: every task gets a distinct chunk index, so the `&mut` sub-slices made from the
// pointer never overlap, and `for_each_chunk_mut` holds the `&mut [T]` borrow (so nothing else
// touches the slice) until all tasks are done; `T: Send` lets a chunk move to another thread.
unsafe impl<T: Send> Sync for ChunksOut<T> {}

/// Splits `data` into `chunk`-sized pieces and runs `f` on each through `run_n`.
fn chunks_on<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
    run_n: &dyn Fn(usize, Task),
) {
    assert!(chunk > 0, "chunk size");
    let len = data.len();
    let base = ChunksOut(data.as_mut_ptr());
    let base = &base;
    let pieces = len.div_ceil(chunk);
    run_n(pieces, &|j| {
        let i = pieces - 1 - j;
        let start = i * chunk;
        let n = chunk.min(len - start);
        // SAFETY: `start + n <= len`, and chunk `i` is handed to exactly one task (see
        // `ChunksOut`), so this is the only reference to these elements.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), n) };
        f(i, piece);
    });
}

fn run_job(job: &Job) {
    let outer = IN_TASK.replace(true);
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.n {
            break;
        }
        (job.f)(i);
    }
    IN_TASK.set(outer);
}

fn worker(s: Arc<Shared>) {
    CURRENT.set(Arc::as_ptr(&s));
    let mut seen = 0u64;
    loop {
        let mut round = 0;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if !backoff(&mut round) {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(g);
                round = 0;
            }
        }
        if s.stop.load(Ordering::SeqCst) {
            CURRENT.set(std::ptr::null());
            return;
        }
        // SAFETY: the submitter stored a pointer to a `Job` that it keeps alive until this
        // worker increments `done` below (it waits for all workers), and published it before
        // the epoch bump this worker acquired.
        let job = unsafe { &*(s.job.load(Ordering::Relaxed) as *const Job) };
        run_job(job);
        s.done.fetch_add(1, Ordering::Release);
    }
}
