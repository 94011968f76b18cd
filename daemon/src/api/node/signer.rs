//! Threads that sign, beside the async runtime rather than on it.
//!
//! A batch of CSRs is a verification and a signature per CSR, milliseconds of CPU: on a
//! runtime thread it would hold up every sync stream, call and audit commit queued behind
//! it. The pool has one thread per core, so signing can still take every core, and its
//! threads run at a lower scheduling priority (nice 5): when a runtime thread or the
//! database's connection thread wakes up, the kernel runs it first instead of letting it
//! wait out a signing thread's time slice. Measured on two cores, signing at the runtime's
//! priority made each audit commit wait behind signing and halved what the daemon signed.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

type Job = Box<dyn FnOnce() + Send>;

/// How much lower than the rest of the daemon signing threads run (`nice` steps, added
/// to the daemon's own).
const SIGNING_NICENESS: libc::c_int = 5;

/// The jobs waiting for a signing thread. Idle threads wait on the condition variable, and
/// a job wakes one of them only if one is idle. It was one channel receiver behind a mutex,
/// one idle thread waiting in `recv` while holding the mutex and the other waiting for the
/// mutex. This one signs 6–33% more one-CSR calls a second over 16 connections, 18% on
/// average (docs/benchmarks.md, step 13).
struct Queue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

struct Jobs {
    waiting: VecDeque<Job>,
    /// Threads waiting on `ready`: a job wakes one only if there is one to wake.
    idle: usize,
    /// False once the pool is dropped: the threads finish what is queued, then end.
    open: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        // Jobs run outside the lock, so a panicking one cannot poison it.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next job, waiting for one; `None` once the pool is closed and drained.
    fn next(&self) -> Option<Job> {
        let mut jobs = self.lock();
        loop {
            if let Some(job) = jobs.waiting.pop_front() {
                return Some(job);
            }
            if !jobs.open {
                return None;
            }
            jobs.idle += 1;
            jobs = self
                .ready
                .wait(jobs)
                .unwrap_or_else(PoisonError::into_inner);
            jobs.idle -= 1;
        }
    }
}

pub struct SigningPool {
    queue: Arc<Queue>,
}

impl SigningPool {
    /// Starts `threads` signing threads; they end when the pool is dropped.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let queue = Arc::new(Queue {
            jobs: Mutex::new(Jobs {
                waiting: VecDeque::new(),
                idle: 0,
                open: true,
            }),
            ready: Condvar::new(),
        });
        let pool = Self {
            queue: queue.clone(),
        };
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            // On an error, `pool` drops and ends the threads already started.
            std::thread::Builder::new()
                .name(format!("mayfly-sign-{i}"))
                .spawn(move || {
                    lower_priority();
                    while let Some(job) = queue.next() {
                        // A panic is the job's answer lost (its caller's channel closes);
                        // the thread goes on serving the others.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(pool)
    }

    /// Runs `work` on a signing thread without waiting for it: `work` answers its caller
    /// itself (as signing does, through the audit commit). `false` if the pool has stopped.
    pub fn spawn(&self, work: impl FnOnce() + Send + 'static) -> bool {
        let wake = {
            let mut jobs = self.queue.lock();
            if !jobs.open {
                return false;
            }
            jobs.waiting.push_back(Box::new(work));
            jobs.idle > 0
        };
        // Busy threads take the job when they finish theirs; no system call for them.
        if wake {
            self.queue.ready.notify_one();
        }
        true
    }
}

impl Drop for SigningPool {
    fn drop(&mut self) {
        self.queue.lock().open = false;
        self.queue.ready.notify_all();
    }
}

/// The calling thread's id: with PRIO_PROCESS, Linux's get/setpriority act on that one
/// thread.
fn thread_id() -> libc::id_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

/// The calling thread's nice value.
fn niceness() -> libc::c_int {
    // SAFETY: getpriority only reads its integer arguments.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, thread_id()) }
}

/// Lowers the calling thread's scheduling priority; signing still runs if it cannot.
fn lower_priority() {
    let nice = (niceness() + SIGNING_NICENESS).min(19);
    // SAFETY: setpriority only reads its integer arguments.
    let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, thread_id(), nice) != 0 };
    if failed {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "signing thread keeps the daemon's priority"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// Runs `work` on the pool and waits for its result; `None` if it panicked.
    async fn run<T: Send + 'static>(
        pool: &SigningPool,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = oneshot::channel();
        assert!(pool.spawn(move || {
            let _ = done.send(work());
        }));
        result.await.ok()
    }

    #[tokio::test]
    async fn work_runs_on_a_lower_priority_thread_and_answers() {
        let pool = SigningPool::new(2).unwrap();
        let ours = niceness();
        let (name, nice) = run(&pool, || {
            (std::thread::current().name().map(str::to_owned), niceness())
        })
        .await
        .unwrap();
        assert!(name.unwrap().starts_with("mayfly-sign-"));
        assert_eq!(nice, (ours + SIGNING_NICENESS).min(19));
        // Many at once all answer, whichever thread takes them.
        let answers = futures::future::join_all((0..64).map(|i| run(&pool, move || i * 2))).await;
        assert_eq!(
            answers.into_iter().map(Option::unwrap).sum::<i32>(),
            (0..64).map(|i| i * 2).sum::<i32>()
        );
    }

    #[test]
    fn jobs_queued_when_the_pool_is_dropped_still_run_and_the_threads_end() {
        let pool = SigningPool::new(2).unwrap();
        let (done, answers) = std::sync::mpsc::channel();
        for i in 0..8 {
            let done = done.clone();
            assert!(pool.spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(5));
                let _ = done.send(i);
            }));
        }
        drop(done);
        drop(pool);
        // Every job answered, and the channel closes: no thread is left holding a job.
        let mut got: Vec<i32> = answers.iter().collect();
        got.sort_unstable();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_panicking_job_answers_none_and_the_pool_goes_on() {
        let pool = SigningPool::new(1).unwrap();
        assert_eq!(run(&pool, || -> i32 { panic!("boom") }).await, None);
        assert_eq!(run(&pool, || 7).await, Some(7));
    }
}
