//! CPU time of a session's model calls, by stage, when the session is profiled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::threads::thread_cpu;

/// Which part of the model a timed call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Log-mel features, audio encoder, frame preparation, vision encoder.
    Encoders,
    /// Thinker prefill and decode steps (with sampling).
    Thinker,
    /// Talker mirroring and steps.
    Talker,
    /// Streaming token2wav.
    Vocoder,
}

/// CPU time of the model's calls in a profiled session, by stage (CPU time of the calling
/// thread: work the math library hands to helper threads is not in it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ModelTimes {
    pub encoders: Duration,
    pub thinker: Duration,
    pub talker: Duration,
    pub vocoder: Duration,
}

impl ModelTimes {
    pub fn total(&self) -> Duration {
        self.encoders + self.thinker + self.talker + self.vocoder
    }
}

/// Times model calls when on; a plain call otherwise.
#[derive(Debug, Default)]
pub(crate) struct ModelProfile {
    /// ns by [`Stage`]; `None`: not profiled.
    stages: Option<[AtomicU64; 4]>,
}

impl ModelProfile {
    /// A profile that times calls if `on` and the platform can measure thread CPU time.
    pub fn new(on: bool) -> Self {
        Self {
            stages: (on && thread_cpu().is_some()).then(Default::default),
        }
    }

    /// Runs a model call, timing it when the session is profiled.
    pub fn timed<T>(&self, stage: Stage, call: impl FnOnce() -> T) -> T {
        let Some(stages) = &self.stages else {
            return call();
        };
        let before = thread_cpu();
        let out = call();
        if let (Some(a), Some(b)) = (before, thread_cpu()) {
            stages[stage as usize]
                .fetch_add(b.saturating_sub(a).as_nanos() as u64, Ordering::Relaxed);
        }
        out
    }

    /// The time so far (`None` unless profiled).
    pub fn times(&self) -> Option<ModelTimes> {
        let stages = self.stages.as_ref()?;
        let get = |s: Stage| Duration::from_nanos(stages[s as usize].load(Ordering::Relaxed));
        Some(ModelTimes {
            encoders: get(Stage::Encoders),
            thinker: get(Stage::Thinker),
            talker: get(Stage::Talker),
            vocoder: get(Stage::Vocoder),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profiled_call_counts_under_its_stage_only() {
        let off = ModelProfile::new(false);
        assert_eq!(off.timed(Stage::Thinker, || 7), 7);
        assert_eq!(off.times(), None);
        let on = ModelProfile::new(true);
        let busy = || {
            let start = thread_cpu().unwrap();
            while thread_cpu().unwrap() - start < Duration::from_millis(2) {}
        };
        on.timed(Stage::Vocoder, busy);
        let times = on.times().unwrap();
        assert!(times.vocoder >= Duration::from_millis(2), "{times:?}");
        assert_eq!(times.thinker, Duration::ZERO);
        assert_eq!(times.total(), times.vocoder);
    }
}
