//! The session's cancellation epoch: every stop moves it on, and work started under an older
//! epoch is stale; closing the session stales everything.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Cancellation {
    epoch: AtomicU64,
    closed: AtomicBool,
}

impl Cancellation {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether work started under `epoch` is stale.
    pub fn cancelled(&self, epoch: u64) -> bool {
        self.epoch() != epoch || self.is_closed()
    }

    /// A stop: what is under way is stale from now on.
    pub fn advance(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The session is closing: everything is stale.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.advance();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_stales_the_work_under_way_and_closing_stales_all() {
        let c = Cancellation::default();
        let before = c.epoch();
        assert!(!c.cancelled(before));
        c.advance();
        assert!(c.cancelled(before));
        let now = c.epoch();
        assert!(!c.cancelled(now));
        c.close();
        assert!(c.is_closed());
        assert!(c.cancelled(c.epoch()), "nothing runs after the close");
    }
}
