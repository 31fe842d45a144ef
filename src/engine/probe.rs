//! What tests and benchmarks see of a running session, kept out of the tasks' own types: the
//! context as the Thinker last published it, how interrupted answers were cut, the Talker's
//! cache length, speculation counts ([`ProbeRecord`], written by the tasks only when a probe
//! reads it), and [`SessionProbe`], which says when the session is quiescent on simulated
//! time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::activity::Activity;
use super::clock::Clock;
use super::context::Entry;
use super::events::AnswerMarks;
use super::pacer::Pacer;
use super::profile::{ModelProfile, ModelTimes};
use super::session::TurnTimings;

/// The Thinker's context as last published by its thread.
#[derive(Debug, Clone, Default)]
pub struct ContextView {
    pub entries: Vec<Entry>,
    /// Positions in the Thinker's KV cache (equal to `entries.len()` between batches).
    pub thinker_cache: usize,
    /// Positions in the Talker's cache (`None` without a Talker); between answers it mirrors
    /// the Thinker's entry for entry.
    pub talker_cache: Option<usize>,
    /// Answers cut by a stop, oldest first.
    pub cut_answers: Vec<CutAnswer>,
}

/// How an interrupted answer was cut.
#[derive(Debug, Clone, PartialEq)]
pub struct CutAnswer {
    pub turn: u64,
    /// Every token fed back into the Thinker before the stop.
    pub generated: Vec<u32>,
    /// Characters of the answer's text after each of them.
    pub cumulative_chars: Vec<usize>,
    /// Codec codes heard, and all the codes if the Talker had finished.
    pub heard_codes: usize,
    pub total_codes: Option<usize>,
    /// Tokens kept in the context.
    pub kept: usize,
}

/// What the tasks record for a probe.
#[derive(Debug)]
pub(crate) struct ProbeRecord {
    /// Whether a [`SessionProbe`] reads `view`: without one, the Thinker does not copy its
    /// context there after every message.
    probed: bool,
    view: Mutex<ContextView>,
    /// Positions in the Talker's cache after its last message (`u64::MAX`: no Talker).
    talker_cache: AtomicU64,
    speculations: AtomicU64,
    speculations_dropped: AtomicU64,
}

impl ProbeRecord {
    pub fn new(probed: bool) -> Self {
        Self {
            probed,
            view: Mutex::new(ContextView::default()),
            talker_cache: AtomicU64::new(u64::MAX),
            speculations: AtomicU64::new(0),
            speculations_dropped: AtomicU64::new(0),
        }
    }

    /// Whether the context view is read (see [`ProbeRecord::set_view`]).
    pub fn probed(&self) -> bool {
        self.probed
    }

    pub fn set_view(&self, entries: Vec<Entry>, thinker_cache: usize) {
        let mut view = self.view.lock().expect("view lock");
        view.entries = entries;
        view.thinker_cache = thinker_cache;
    }

    pub fn record_cut(&self, cut: CutAnswer) {
        self.view.lock().expect("view lock").cut_answers.push(cut);
    }

    pub fn set_talker_cache(&self, len: usize) {
        self.talker_cache.store(len as u64, Ordering::SeqCst);
    }

    pub fn speculation_started(&self) {
        self.speculations.fetch_add(1, Ordering::SeqCst);
    }

    pub fn speculation_dropped(&self) {
        self.speculations_dropped.fetch_add(1, Ordering::SeqCst);
    }

    fn context(&self) -> ContextView {
        let mut view = self.view.lock().expect("view lock").clone();
        let talker = self.talker_cache.load(Ordering::SeqCst);
        view.talker_cache = (talker != u64::MAX).then_some(talker as usize);
        view
    }
}

/// The parts of a running session a probe reads.
pub(crate) struct ProbeParts {
    pub clock: Arc<dyn Clock>,
    pub activity: Arc<Activity>,
    pub pacer: Arc<Pacer>,
    pub record: Arc<ProbeRecord>,
    pub profile: Arc<ModelProfile>,
    pub marks: Arc<AnswerMarks>,
    /// Inputs the control thread has handled.
    pub processed: Arc<AtomicU64>,
    /// Session-clock time (ns) of the ticker's next tick.
    pub next_tick: Arc<AtomicU64>,
    /// Messages waiting for the Talker (`None` without one): what waits behind a Talker
    /// parked until playback catches up cannot be handled before the clock moves.
    pub talker_queue: Option<Box<dyn Fn() -> usize + Send + Sync>>,
    pub threads: Vec<JoinHandle<()>>,
}

/// A running session's internals, for tests and benchmarks on simulated time.
pub struct SessionProbe {
    parts: ProbeParts,
}

impl SessionProbe {
    pub(crate) fn new(parts: ProbeParts) -> Self {
        Self { parts }
    }

    /// Work the session has counted and not finished.
    pub fn pending(&self) -> i64 {
        self.parts.activity.pending()
    }

    /// Whether the session has done everything it can at the clock's present time, given that
    /// `inputs_sent` inputs were sent to its handle.
    pub fn quiescent(&self, inputs_sent: u64) -> bool {
        let p = &self.parts;
        let now = p.clock.now().as_nanos() as u64;
        let before = p.activity.pending();
        // A parked Talker is uncounted (the pacer wakes and counts it again); what is queued
        // for it waits for the clock too.
        let blocked = match &p.talker_queue {
            Some(queue) if p.pacer.parked() > 0 => queue() as i64,
            _ => 0,
        };
        let after = p.activity.pending();
        p.processed.load(Ordering::SeqCst) == inputs_sent
            && before == after
            && before == blocked
            && p.pacer.quiescent()
            && now < p.next_tick.load(Ordering::SeqCst)
    }

    /// Waits (wall time) until [`SessionProbe::quiescent`]; false after `timeout`.
    pub fn wait_quiescent(&self, inputs_sent: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.quiescent(inputs_sent) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if !self
                .parts
                .activity
                .wait_zero(left.min(Duration::from_millis(5)))
            {
                continue;
            }
            if !self.quiescent(inputs_sent) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// CPU time of the model's calls so far (`None` unless spawned with profiling).
    pub fn model_time(&self) -> Option<ModelTimes> {
        self.parts.profile.times()
    }

    /// The timing marks so far of the answer to `turn`, while it is under way (they are
    /// handed out in a `Timings` event when it ends).
    pub fn timings(&self, turn: u64) -> Option<TurnTimings> {
        self.parts.marks.get(turn)
    }

    /// Speculative answers started so far, and how many of them were dropped.
    pub fn speculations(&self) -> (u64, u64) {
        let r = &self.parts.record;
        (
            r.speculations.load(Ordering::SeqCst),
            r.speculations_dropped.load(Ordering::SeqCst),
        )
    }

    /// The Thinker's context as its thread last published it.
    pub fn context(&self) -> ContextView {
        self.parts.record.context()
    }

    /// Waits for the session's compute threads to end (after `Close` or a dropped handle);
    /// false if some still run after `timeout`.
    pub fn join(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.parts.threads.iter().any(|t| !t.is_finished()) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in self.parts.threads {
            let _ = t.join();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_reports_the_talker_cache_only_once_there_is_one() {
        let record = ProbeRecord::new(true);
        assert!(record.probed());
        assert_eq!(record.context().talker_cache, None);
        record.set_talker_cache(12);
        record.set_view(Vec::new(), 9);
        let view = record.context();
        assert_eq!((view.talker_cache, view.thinker_cache), (Some(12), 9));
        record.speculation_started();
        record.speculation_dropped();
        assert_eq!(record.speculations.load(Ordering::SeqCst), 1);
    }
}
