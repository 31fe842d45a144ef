//! Work in flight inside a session, counted so that a driver on simulated time can wait until
//! the session has done everything it can before moving the clock on (tests and benchmarks run
//! deterministically that way, whatever the threads' timing).
//!
//! The rule: whoever hands work to another thread counts it first ([`Activity::token`] travels
//! with the message and uncounts itself when dropped, that is once the receiver has finished
//! with the message); a thread that waits for the clock (the pacer's listeners) uncounts the
//! work it holds while it waits and is counted again by whoever wakes it. The session is
//! quiescent when the count is zero and no clock-driven thread has something due.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Activity {
    count: Mutex<i64>,
    changed: Condvar,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts `n` pieces of work.
    pub fn add(&self, n: i64) {
        let mut count = self.count.lock().expect("activity lock");
        *count += n;
        debug_assert!(*count >= 0, "activity count went negative");
        if *count <= 0 {
            self.changed.notify_all();
        }
    }

    pub fn begin(&self) {
        self.add(1);
    }

    pub fn end(&self) {
        self.add(-1);
    }

    /// Counts one piece of work until the returned token is dropped.
    pub fn token(self: &Arc<Self>) -> WorkToken {
        self.begin();
        WorkToken {
            activity: Some(self.clone()),
        }
    }

    /// Work counted now.
    pub fn pending(&self) -> i64 {
        *self.count.lock().expect("activity lock")
    }

    /// Waits (wall time) until no work is counted; false if `timeout` passed first.
    pub fn wait_zero(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut count = self.count.lock().expect("activity lock");
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            count = self
                .changed
                .wait_timeout(count, left)
                .expect("activity lock")
                .0;
        }
        true
    }
}

/// One counted piece of work; uncounted when dropped.
#[derive(Debug, Default)]
pub struct WorkToken {
    activity: Option<Arc<Activity>>,
}

impl WorkToken {
    /// A token that counts nothing (work nobody waits for).
    pub fn none() -> Self {
        Self { activity: None }
    }
}

impl Drop for WorkToken {
    fn drop(&mut self) {
        if let Some(a) = self.activity.take() {
            a.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_count_until_dropped_across_threads() {
        let activity = Activity::new();
        let (tx, rx) = crossbeam_channel::unbounded();
        for k in 0..3 {
            tx.send((k, activity.token())).unwrap();
        }
        assert_eq!(activity.pending(), 3);
        assert!(!activity.wait_zero(Duration::from_millis(5)));
        let worker = std::thread::spawn(move || {
            while let Ok((_k, token)) = rx.recv() {
                std::thread::sleep(Duration::from_millis(2));
                drop(token);
            }
        });
        assert!(activity.wait_zero(Duration::from_secs(5)));
        drop(tx);
        worker.join().unwrap();
        assert_eq!(activity.pending(), 0);
        drop(WorkToken::none());
        assert_eq!(activity.pending(), 0);
    }
}
