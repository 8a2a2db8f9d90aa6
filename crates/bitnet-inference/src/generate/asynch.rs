//! Generation as an async [`futures_core::Stream`]: the work runs on its own thread (it is
//! CPU-bound and would block an executor), chunks travel through a queue, and the task is
//! woken for each one. Dropping the stream stops the generation at its next token.

use super::StreamChunk;
use crate::Result;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Inner {
    queue: VecDeque<Result<StreamChunk>>,
    done: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
    cancelled: AtomicBool,
}

/// The sending side given to the producer.
pub struct ChunkSender(Arc<Shared>);

impl ChunkSender {
    /// Queues an item; returns false once the consumer has dropped the stream.
    pub fn send(&self, item: Result<StreamChunk>) -> bool {
        if self.0.cancelled.load(Ordering::Relaxed) {
            return false;
        }
        let waker = {
            let mut inner = self.0.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.queue.push_back(item);
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }
}

impl Drop for ChunkSender {
    fn drop(&mut self) {
        let waker = {
            let mut inner = self.0.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.done = true;
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A stream of [`StreamChunk`]s produced on a background thread.
pub struct AsyncTokenStream {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AsyncTokenStream {
    /// Runs `produce` on a new thread; it sends chunks until it is done or `send` says the
    /// consumer is gone.
    pub fn spawn(produce: impl FnOnce(&ChunkSender) + Send + 'static) -> Self {
        let shared = Arc::new(Shared::default());
        let sender = ChunkSender(shared.clone());
        let thread = std::thread::Builder::new()
            .name("bitnet-generate".into())
            .spawn(move || {
                produce(&sender);
                drop(sender);
            })
            .expect("spawn the generation thread");
        AsyncTokenStream {
            shared,
            thread: Some(thread),
        }
    }
}

impl futures_core::Stream for AsyncTokenStream {
    type Item = Result<StreamChunk>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut inner = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(item) = inner.queue.pop_front() {
            return Poll::Ready(Some(item));
        }
        if inner.done {
            return Poll::Ready(None);
        }
        inner.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for AsyncTokenStream {
    fn drop(&mut self) {
        self.shared.cancelled.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Drives a future to completion on the current thread (for tests, examples and callers
/// without an executor).
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl std::task::Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// The next item of a stream, as a future (a minimal `StreamExt::next`).
pub fn next<S: futures_core::Stream + Unpin>(
    s: &mut S,
) -> impl std::future::Future<Output = Option<S::Item>> + '_ {
    std::future::poll_fn(move |cx| Pin::new(&mut *s).poll_next(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_arrive_in_order_then_the_end() {
        let mut s = AsyncTokenStream::spawn(|tx| {
            for i in 0..50u32 {
                std::thread::sleep(std::time::Duration::from_micros(200));
                tx.send(Ok(StreamChunk {
                    token: Some(i),
                    text: i.to_string(),
                }));
            }
        });
        let got = block_on(async {
            let mut v = Vec::new();
            while let Some(c) = next(&mut s).await {
                v.push(c.unwrap().token.unwrap());
            }
            v
        });
        assert_eq!(got, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn dropping_the_stream_stops_the_producer() {
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        let s = AsyncTokenStream::spawn(move |tx| {
            while tx.send(Ok(StreamChunk {
                token: None,
                text: String::new(),
            })) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            flag.store(true, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(5));
        drop(s);
        assert!(stopped.load(Ordering::Relaxed));
    }
}
