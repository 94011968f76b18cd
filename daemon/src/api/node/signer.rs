//! Threads that sign, beside the async runtime rather than on it.
//!
//! A batch of CSRs is a verification and a signature per CSR, milliseconds of CPU: on a
//! runtime thread it would hold up every sync stream, call and audit commit queued behind
//! it. The pool has one thread per core, so signing can still take every core, and its
//! threads run at a lower scheduling priority (nice 5): when a runtime thread or the
//! database's connection thread wakes up, the kernel runs it first instead of letting it
//! wait out a signing thread's time slice. Measured on two cores, signing at the runtime's
//! priority made each audit commit wait behind signing and halved what the daemon signed.

use std::sync::{Arc, Mutex, mpsc};

type Job = Box<dyn FnOnce() + Send>;

/// How much lower than the rest of the daemon signing threads run (`nice` steps, added
/// to the daemon's own).
const SIGNING_NICENESS: libc::c_int = 5;

pub struct SigningPool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl SigningPool {
    /// Starts `threads` signing threads; they end when the pool is dropped.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("mayfly-sign-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        // One thread waits on the queue at a time; the lock is held only
                        // while taking a job, never while running one.
                        let job = match rx.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panic is the job's answer lost (its caller's channel closes);
                            // the thread goes on serving the others.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `work` on a signing thread without waiting for it: `work` answers its caller
    /// itself (as signing does, through the audit commit). `false` if the pool has stopped.
    pub fn spawn(&self, work: impl FnOnce() + Send + 'static) -> bool {
        let Ok(jobs) = self.jobs.lock() else {
            return false;
        };
        jobs.send(Box::new(work)).is_ok()
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

    #[tokio::test]
    async fn a_panicking_job_answers_none_and_the_pool_goes_on() {
        let pool = SigningPool::new(1).unwrap();
        assert_eq!(run(&pool, || -> i32 { panic!("boom") }).await, None);
        assert_eq!(run(&pool, || 7).await, Some(7));
    }
}
