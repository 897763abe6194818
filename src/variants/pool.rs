//! A fixed pool of decode threads. Decoding and resizing are CPU-bound and allocate up to the
//! pixel limit, so they never run on the async threads, and at most `threads` run at once
//! however many requests and workers want variants: memory is bounded by the pool's size
//! times one decode's bound, and the async threads stay free for requests.

use std::sync::{Arc, Mutex};
use std::thread;

use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Jobs waiting for a thread beyond this make callers wait to submit (backpressure).
const QUEUE_PER_THREAD: usize = 4;

#[derive(Debug, thiserror::Error)]
#[error("the decode pool has shut down")]
pub struct PoolClosed;

/// Submits jobs to the decode threads. The threads end once every handle is dropped.
#[derive(Clone)]
pub struct DecodePool {
    jobs: mpsc::Sender<Job>,
    threads: usize,
}

impl DecodePool {
    /// Starts `threads` (at least one) decode threads.
    pub fn start(threads: usize) -> Self {
        let threads = threads.max(1);
        let (jobs, receiver) = mpsc::channel::<Job>(threads * QUEUE_PER_THREAD);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..threads {
            let receiver = receiver.clone();
            thread::Builder::new()
                .name(format!("chitram-decode-{n}"))
                .spawn(move || run_thread(&receiver))
                .expect("the OS starts a decode thread");
        }
        Self { jobs, threads }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `work` on a decode thread and returns its result.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, PoolClosed> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        self.jobs.send(job).await.map_err(|_| PoolClosed)?;
        result.await.map_err(|_| PoolClosed)
    }
}

fn run_thread(receiver: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, never while running one.
        let job = match receiver.lock() {
            Ok(mut receiver) => receiver.blocking_recv(),
            Err(_) => return,
        };
        let Some(job) = job else { return };
        // A panicking decoder (a bug in a codec) must not take the thread with it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn at_most_the_pool_size_runs_at_once() {
        let pool = DecodePool::start(2);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs = (0..8).map(|_| {
            let (running, peak) = (running.clone(), peak.clone());
            pool.run(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
                thread::current().name().map(str::to_owned)
            })
        });
        let names = futures::future::join_all(jobs).await;
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert!(names.iter().all(|name| name.as_ref().unwrap().as_ref().unwrap().starts_with("chitram-decode-")));
    }

    #[tokio::test]
    async fn a_panicking_job_leaves_the_thread_serving() {
        let pool = DecodePool::start(1);
        assert!(pool.run(|| panic!("a codec bug")).await.is_err());
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }
}
