//! The evaluation pool: a fixed set of threads of its own where jq programs run (the
//! rules' filters and transforms, and the postgres sink's `columns:`), so that their CPU
//! work neither blocks the async workers nor shares tokio's blocking pool with the spool
//! and password hashing.
//!
//! The pool never grows. Jobs wait in a bounded queue; a caller whose job does not fit
//! waits (asynchronously) for room. A job wakes one idle thread, and only when one is
//! idle: a thread that finishes a job takes the next without sleeping.
//!
//! A runaway program does not hold a thread for long: every run carries a deadline that
//! stops it from inside the interpreter (see [`crate::rule::jq`]), after
//! [`EvalPool::limit`]. What no deadline can interrupt is one native operation on a huge
//! value; it keeps its thread busy until it ends, while the other threads go on with the
//! queue.
//!
//! A job that panics costs its result ([`EvalError::Panicked`], with the panic's payload),
//! never a thread.
//!
//! [`runtime`] builds mqbridge's async runtime, whose threads may run programs too: the
//! router evaluates a batch on its own worker for a short while before it hands the rest
//! here (see [`crate::pipeline`]).

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::rule::jq::{self, THREAD_STACK};

/// How long one evaluation may run: a rule on one message, or one record's `columns:`.
pub const EVAL_TIMEOUT: Duration = Duration::from_secs(2);

/// The runtime mqbridge runs on, with `workers` async workers. Its threads have the
/// stack programs need ([`THREAD_STACK`], reserved, not committed: only the pages a
/// thread touches take memory) and say so ([`jq::mark_program_stack`]), so that the
/// router may evaluate a batch on its own worker for a short while (see
/// [`crate::pipeline`]) instead of always handing it to the pool.
pub fn runtime(workers: usize) -> tokio::runtime::Builder {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(workers)
        .thread_stack_size(THREAD_STACK)
        .on_thread_start(jq::mark_program_stack)
        .enable_all();
    b
}

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
    queue: Arc<Closing>,
    /// Room in the queue: a permit per queued job, given back when a thread takes it.
    room: Arc<Semaphore>,
    threads: usize,
    limit: Duration,
}

/// The jobs waiting for a thread, shared by the threads and the handles.
#[derive(Default)]
struct Queue {
    state: Mutex<Waiting>,
    /// Signalled once per job, and for all at the end.
    ready: Condvar,
}

#[derive(Default)]
struct Waiting {
    jobs: VecDeque<(Job, OwnedSemaphorePermit)>,
    /// Threads waiting on `ready`.
    idle: usize,
    /// No handle is left: the threads end once `jobs` is empty.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The queue as the handles hold it: dropping the last one closes it.
struct Closing(Arc<Queue>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_all();
    }
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
        // Closed (its threads told to end) if a thread cannot be started.
        let queue = Closing(Arc::new(Queue::default()));
        for i in 0..threads {
            let queue = Arc::clone(&queue.0);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(THREAD_STACK)
                .spawn(move || work(&queue))?;
        }
        Ok(EvalPool {
            queue: Arc::new(queue),
            room: Arc::new(Semaphore::new(threads * QUEUE_PER_THREAD)),
            threads,
            limit,
        })
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
    pub async fn submit<T, F>(&self, job: F) -> Pending<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(job)));
        });
        let room = Arc::clone(&self.room)
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        let queue = &self.queue.0;
        let wake = {
            let mut waiting = queue.lock();
            waiting.jobs.push_back((job, room));
            waiting.idle > 0
        };
        if wake {
            queue.ready.notify_one();
        }
        Pending(rx)
    }

    /// Runs `job` on the pool and returns its result.
    pub async fn run<T, F>(&self, job: F) -> Result<T, EvalError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.submit(job).await.await
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

/// A pool thread: takes the next job and runs it, until the queue is closed and empty.
fn work(queue: &Queue) {
    loop {
        let (job, room) = {
            let mut waiting = queue.lock();
            loop {
                if let Some(next) = waiting.jobs.pop_front() {
                    break next;
                }
                if waiting.closed {
                    return;
                }
                waiting.idle += 1;
                waiting = queue
                    .ready
                    .wait(waiting)
                    .unwrap_or_else(PoisonError::into_inner);
                waiting.idle -= 1;
            }
        };
        drop(room);
        job();
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
    async fn jobs_queued_while_threads_are_idle_run_side_by_side() {
        let pool = EvalPool::start("evalpool-p", 2, EVAL_TIMEOUT).unwrap();
        // Each job waits for the other: they end only if both threads took one.
        let meet = Arc::new(std::sync::Barrier::new(2));
        let mut pending = Vec::new();
        for _ in 0..2 {
            let meet = Arc::clone(&meet);
            pending.push(pool.submit(move || meet.wait().is_leader()).await);
        }
        let mut leaders = 0;
        for p in pending {
            let led = tokio::time::timeout(Duration::from_secs(10), p)
                .await
                .expect("both jobs ran at once")
                .unwrap();
            leaders += usize::from(led);
        }
        assert_eq!(leaders, 1);
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
            pending.push(pool.submit(move || i * 2).await);
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
