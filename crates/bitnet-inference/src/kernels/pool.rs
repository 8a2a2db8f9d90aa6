//! A persistent spinning thread pool, measured against rayon for `ternary_matmul` (see the
//! benches). Workers spin briefly after a job, then yield, then sleep on a condition variable,
//! so idle workers cost nothing and a 2-core machine shared with other work is not starved.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

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
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct SpinPool {
    shared: &'static Shared,
    workers: usize,
    /// One job at a time: callers from several threads queue here.
    submit: Mutex<()>,
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
    /// A pool where the caller plus `threads - 1` workers run each job.
    pub fn new(threads: usize) -> Self {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let workers = threads.max(1) - 1;
        for _ in 0..workers {
            std::thread::spawn(move || worker(shared));
        }
        Self {
            shared,
            workers,
            submit: Mutex::new(()),
        }
    }

    /// The pool with as many threads as the rayon pool this is called from (the global
    /// one, or the one an engine `install`ed for `-t N`); one pool a size, made on first use
    /// and kept (idle workers sleep).
    pub fn current() -> &'static SpinPool {
        const MAX: usize = 256;
        static POOLS: [OnceLock<SpinPool>; MAX] = [const { OnceLock::new() }; MAX];
        let n = rayon::current_num_threads().clamp(1, MAX);
        POOLS[n - 1].get_or_init(|| SpinPool::new(n))
    }

    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(i)` for `i in 0..n` on the pool and the calling thread; returns when all are
    /// done.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers == 0 || n <= 1 {
            (0..n).for_each(f);
            return;
        }
        let _one = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job {
            f,
            n,
            next: AtomicUsize::new(0),
        };
        let s = self.shared;
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
        while s.done.load(Ordering::Acquire) < self.workers {
            if !backoff(&mut round) {
                std::thread::yield_now();
            }
        }
    }
}

/// A slice's base pointer handed to pool tasks that each take a disjoint chunk.
struct ChunksOut<T>(*mut T);
// SAFETY: every task gets a distinct chunk index, so the `&mut` sub-slices made from the
// pointer never overlap, and `for_each_chunk_mut` holds the `&mut [T]` borrow (so nothing else
// touches the slice) until all tasks are done; `T: Send` lets a chunk move to another thread.
unsafe impl<T: Send> Sync for ChunksOut<T> {}

impl SpinPool {
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
        assert!(chunk > 0, "chunk size");
        let len = data.len();
        let base = ChunksOut(data.as_mut_ptr());
        let base = &base;
        let pieces = len.div_ceil(chunk);
        self.run(pieces, &|j| {
            let i = pieces - 1 - j;
            let start = i * chunk;
            let n = chunk.min(len - start);
            // SAFETY: `start + n <= len`, and chunk `i` is handed to exactly one task (see
            // `ChunksOut`), so this is the only reference to these elements.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), n) };
            f(i, piece);
        });
    }
}

fn run_job(job: &Job) {
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.n {
            break;
        }
        (job.f)(i);
    }
}

fn worker(s: &'static Shared) {
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
        // SAFETY: the submitter stored a pointer to a `Job` that it keeps alive until this
        // worker increments `done` below (it waits for all workers), and published it before
        // the epoch bump this worker acquired.
        let job = unsafe { &*(s.job.load(Ordering::Relaxed) as *const Job) };
        run_job(job);
        s.done.fetch_add(1, Ordering::Release);
    }
}
