//! The session's clock, injectable so that tests run in simulated time: deterministic and
//! faster than real time. Times are durations since the session started.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

pub trait Clock: Send + Sync {
    /// Time since the session started.
    fn now(&self) -> Duration;
    /// Blocks until `now() >= deadline`.
    fn sleep_until(&self, deadline: Duration);
}

/// Wall-clock time.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn sleep_until(&self, deadline: Duration) {
        let now = self.now();
        if deadline > now {
            std::thread::sleep(deadline - now);
        }
    }
}

/// Time that moves only when the test says so: `advance` wakes every sleeper whose deadline
/// has come.
#[derive(Debug, Default)]
pub struct SimulatedClock {
    now: Mutex<Duration>,
    moved: Condvar,
}

impl SimulatedClock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().expect("clock lock");
        *now += by;
        self.moved.notify_all();
    }

    pub fn set(&self, to: Duration) {
        let mut now = self.now.lock().expect("clock lock");
        if to > *now {
            *now = to;
            self.moved.notify_all();
        }
    }
}

impl Clock for SimulatedClock {
    fn now(&self) -> Duration {
        *self.now.lock().expect("clock lock")
    }

    fn sleep_until(&self, deadline: Duration) {
        let mut now = self.now.lock().expect("clock lock");
        while *now < deadline {
            now = self.moved.wait(now).expect("clock lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn simulated_sleep_wakes_when_time_is_advanced() {
        let clock = Arc::new(SimulatedClock::new());
        let sleeper = {
            let clock = clock.clone();
            std::thread::spawn(move || {
                clock.sleep_until(Duration::from_millis(40));
                clock.now()
            })
        };
        clock.advance(Duration::from_millis(20));
        clock.advance(Duration::from_millis(20));
        assert_eq!(sleeper.join().unwrap(), Duration::from_millis(40));
    }

    #[test]
    fn system_clock_moves_forward() {
        let clock = SystemClock::new();
        let a = clock.now();
        clock.sleep_until(a + Duration::from_millis(2));
        assert!(clock.now() >= a + Duration::from_millis(2));
    }
}
