//! The evaluation pool: a fixed set of threads of its own where jq programs run (the
//! rules' filters and transforms, and the postgres sink's `columns:`), so that their CPU
//! work neither blocks the async workers nor shares tokio's blocking pool with the spool
//! and password hashing.
//!
//! The pool never grows. Jobs wait in a bounded queue; a caller whose job does not fit
//! waits (asynchronously) for room. A runaway program does not hold a thread for long:
//! every run carries a deadline that stops it from inside the interpreter (see
//! [`crate::rule::jq`]), after [`EvalPool::limit`]. What no deadline can interrupt is one
//! native operation on a huge value; it keeps its thread busy until it ends, while the
//! other threads go on with the queue.
//!
//! A job that panics costs its result ([`EvalError::Panicked`], with the panic's payload),
//! never a thread.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::rule::jq::THREAD_STACK;

/// How long one evaluation may run: a rule on one message, or one record's `columns:`.
pub const EVAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Jobs queued per thread beyond the one it runs.
const QUEUE_PER_THREAD: usize = 2;

type Job = Box<dyn FnOnce() + Send>;

/// Why a job has no result.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The job panicked; the payload, to resume the panic or describe it.
    #[error("evaluation panicked: {}", panic_message(.0.as_ref()))]
    Panicked(Box<dyn Any + Send>),
    /// The job was dropped without running: the pool's threads are gone.
    #[error("the evaluation pool stopped")]
    Stopped,
}

/// A handle on the pool; clones share the threads. The threads end when the last handle
/// is dropped and the queue is empty.
#[derive(Clone)]
pub struct EvalPool {
    jobs: mpsc::Sender<Job>,
    threads: usize,
    limit: Duration,
}

impl std::fmt::Debug for EvalPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalPool")
            .field("threads", &self.threads)
            .field("limit", &self.limit)
            .finish()
    }
}

impl EvalPool {
    /// Starts `threads` threads (at least one), named `{name}-{i}`, whose evaluations may
    /// each run for `limit`.
    pub fn start(name: &str, threads: usize, limit: Duration) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>(threads * QUEUE_PER_THREAD);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(THREAD_STACK)
                .spawn(move || work(&rx))?;
        }
        Ok(EvalPool {
            jobs: tx,
            threads,
            limit,
        })
    }

    /// As many threads as cores, and at least two, so that one long evaluation does not
    /// hold up all the others.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// How long one evaluation may run; jobs pass it to the programs they run.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Queues `job` (waiting for room in the queue) and returns its pending result, so a
    /// caller can queue several jobs before awaiting any.
    pub async fn submit<T, F>(&self, job: F) -> Result<Pending<T>, EvalError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(job)));
        });
        self.jobs.send(job).await.map_err(|_| EvalError::Stopped)?;
        Ok(Pending(rx))
    }

    /// Runs `job` on the pool and returns its result.
    pub async fn run<T, F>(&self, job: F) -> Result<T, EvalError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.submit(job).await?.await
    }
}

/// The result of a queued job.
pub struct Pending<T>(oneshot::Receiver<std::thread::Result<T>>);

impl<T> Future for Pending<T> {
    type Output = Result<T, EvalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(payload)) => Err(EvalError::Panicked(payload)),
            Err(_) => Err(EvalError::Stopped),
        })
    }
}

/// A pool thread: takes the next job (one idle thread waits on the queue, the others on
/// the lock) and runs it, until the queue is closed.
fn work(jobs: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocking_recv();
        match job {
            Some(job) => job(),
            None => return,
        }
    }
}

/// The message of a panic payload (`panic!` makes a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names of this process's threads (Linux).
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim_end().to_string())
            .collect()
    }

    #[tokio::test]
    async fn runs_jobs_on_its_own_threads_and_survives_panics() {
        let pool = EvalPool::start("evalpool-t", 2, EVAL_TIMEOUT).unwrap();
        let name = pool
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("evalpool-t-"));
        let err = pool.run::<(), _>(|| panic!("boom")).await.unwrap_err();
        assert!(matches!(err, EvalError::Panicked(_)));
        assert_eq!(err.to_string(), "evaluation panicked: boom");
        // Many more jobs than threads and queue: all run, on the same two threads.
        let mut pending = Vec::new();
        for i in 0..50 {
            pending.push(pool.submit(move || i * 2).await.unwrap());
        }
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(p.await.unwrap(), i * 2);
        }
        let ours = |names: &[String]| {
            names
                .iter()
                .filter(|n| n.starts_with("evalpool-t-"))
                .count()
        };
        assert_eq!(ours(&thread_names()), 2);
        // The threads end once the last handle is gone.
        drop(pool);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ours(&thread_names()) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "pool threads still running"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
