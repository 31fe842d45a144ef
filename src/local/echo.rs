//! Keeping the model's own voice, played by a loudspeaker and picked up again by the
//! microphone, from reading as the user talking (which would barge in on every answer).
//!
//! [`HalfDuplexGate`] is the echo handling of `omnicall local`: while the speaker plays the
//! model's voice (and for a short `tail` after, the room's reverberation), every 10 ms of
//! microphone audio quieter than `barge_in_level_dbfs` is replaced by silence before it
//! reaches the session. Louder audio (the user talking over the model, close to the mic)
//! passes, and the gate then stays open for `hold` so that the dips between syllables do not
//! chop the barge-in below the session's barge-in onset. The threshold must sit above the
//! level of the echo at the microphone: the default suits a laptop or a desk microphone with
//! the speaker at a normal volume; raise it if the model interrupts itself, lower it if
//! barge-in needs shouting. Headphones need no gate (`--echo off`); files need none either.
//!
//! This is not echo cancellation: while the model speaks, quiet user speech is lost. The
//! output side reports what it plays through [`SpeakerActivity`] (times on the session
//! clock), which is all the gate needs to know.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How the microphone is protected from the speaker's echo.
#[derive(Debug, Clone, PartialEq)]
pub enum EchoMode {
    /// The half-duplex gate when both the microphone and the speaker are devices, else off.
    Auto,
    /// No echo handling (headphones, files).
    Off,
    /// The half-duplex gate.
    HalfDuplex(GateConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    /// RMS level over 10 ms, in dB relative to full scale, from which the microphone passes
    /// while the model speaks.
    pub barge_in_level_dbfs: f32,
    /// How long after the speaker stops the microphone is still gated (room echo, output
    /// latency misestimates).
    pub tail: Duration,
    /// How long the gate stays open after a piece passed the level.
    pub hold: Duration,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            barge_in_level_dbfs: -30.0,
            tail: Duration::from_millis(150),
            hold: Duration::from_millis(400),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GateError {
    #[error("barge-in level {0} dBFS must be a finite number at or below 0 dBFS")]
    Level(f32),
    #[error("gate tail {0:?} is over 2 s: the microphone would stay deaf long after each answer")]
    Tail(Duration),
    #[error("gate hold {0:?} is over 5 s")]
    Hold(Duration),
}

impl GateConfig {
    pub fn validate(&self) -> Result<(), GateError> {
        if !self.barge_in_level_dbfs.is_finite() || self.barge_in_level_dbfs > 0.0 {
            return Err(GateError::Level(self.barge_in_level_dbfs));
        }
        if self.tail > Duration::from_secs(2) {
            return Err(GateError::Tail(self.tail));
        }
        if self.hold > Duration::from_secs(5) {
            return Err(GateError::Hold(self.hold));
        }
        Ok(())
    }
}

const NONE: u64 = u64::MAX;

fn nanos(t: Duration) -> u64 {
    u64::try_from(t.as_nanos()).unwrap_or(NONE - 1)
}

/// When the speaker plays the model's voice, on the session clock. Written by the output side
/// (an audio callback: lock-free), read by the gate. Keeps the current run of sound and the
/// end of the one before, which is all a microphone lagging by tens of milliseconds needs.
#[derive(Debug)]
pub struct SpeakerActivity {
    since: AtomicU64,
    until: AtomicU64,
    previous_since: AtomicU64,
    previous_until: AtomicU64,
}

impl Default for SpeakerActivity {
    fn default() -> Self {
        Self::new()
    }
}

impl SpeakerActivity {
    /// Output closer than this to the previous run continues it.
    const JOIN: Duration = Duration::from_millis(30);

    pub fn new() -> Self {
        Self {
            since: AtomicU64::new(NONE),
            until: AtomicU64::new(NONE),
            previous_since: AtomicU64::new(NONE),
            previous_until: AtomicU64::new(NONE),
        }
    }

    /// The speaker plays voice from `from` to `to`.
    pub fn record(&self, from: Duration, to: Duration) {
        let (from, to) = (nanos(from), nanos(to.max(from)));
        let until = self.until.load(Ordering::Acquire);
        if until != NONE && from <= until.saturating_add(nanos(Self::JOIN)) {
            self.until.fetch_max(to, Ordering::AcqRel);
        } else {
            let since = self.since.load(Ordering::Acquire);
            self.previous_until.store(until, Ordering::Release);
            self.previous_since.store(since, Ordering::Release);
            self.since.store(from, Ordering::Release);
            self.until.store(to, Ordering::Release);
        }
    }

    /// Whether the speaker played voice at any time in `from..to` (runs are half-open too).
    pub fn overlaps(&self, from: Duration, to: Duration) -> bool {
        let (from, to) = (nanos(from), nanos(to));
        let since = self.since.load(Ordering::Acquire);
        let until = self.until.load(Ordering::Acquire);
        let previous_since = self.previous_since.load(Ordering::Acquire);
        let previous_until = self.previous_until.load(Ordering::Acquire);
        // (a run being replaced may be read as `since` newer than `until`: then it is a run
        // that starts at `since`)
        let current = since != NONE && since < to && until.max(since) > from;
        let before = previous_since != NONE && previous_since < to && previous_until > from;
        current || before
    }

    /// End of the latest sound played.
    pub fn last_end(&self) -> Option<Duration> {
        let until = self.until.load(Ordering::Acquire);
        (until != NONE).then(|| Duration::from_nanos(until))
    }
}

/// What the gate did, in total.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GateStats {
    /// Microphone audio replaced by silence.
    pub gated: Duration,
    /// Microphone audio that passed while the speaker played (a barge-in, or echo above the
    /// level).
    pub passed_over_speaker: Duration,
}

/// The half-duplex gate; see the module doc.
#[derive(Debug)]
pub struct HalfDuplexGate {
    config: GateConfig,
    /// Linear RMS of the level.
    threshold: f32,
    open_until: Option<Duration>,
    stats: GateStats,
}

impl HalfDuplexGate {
    /// Length of the pieces the level is measured on.
    pub const WINDOW: Duration = Duration::from_millis(10);

    pub fn new(config: GateConfig) -> Result<Self, GateError> {
        config.validate()?;
        let threshold = 10f32.powf(config.barge_in_level_dbfs / 20.0);
        Ok(Self {
            config,
            threshold,
            open_until: None,
            stats: GateStats::default(),
        })
    }

    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    pub fn stats(&self) -> GateStats {
        self.stats
    }

    /// Gates microphone audio captured from media time `at` at `sample_rate`, in place.
    pub fn process(
        &mut self,
        at: Duration,
        sample_rate: u32,
        samples: &mut [f32],
        speaker: &SpeakerActivity,
    ) {
        if sample_rate == 0 {
            return;
        }
        let window =
            ((sample_rate as u128 * Self::WINDOW.as_nanos() / 1_000_000_000) as usize).max(1);
        let rate = sample_rate as f64;
        for (k, piece) in samples.chunks_mut(window).enumerate() {
            let start = at + Duration::from_secs_f64((k * window) as f64 / rate);
            let length = Duration::from_secs_f64(piece.len() as f64 / rate);
            let end = start + length;
            if !speaker.overlaps(start.saturating_sub(self.config.tail), end) {
                self.open_until = None;
                continue;
            }
            let rms = (piece.iter().map(|x| x * x).sum::<f32>() / piece.len() as f32).sqrt();
            if rms >= self.threshold {
                self.open_until = Some(end + self.config.hold);
            }
            if self.open_until.is_some_and(|until| start < until) {
                self.stats.passed_over_speaker += length;
            } else {
                piece.fill(0.0);
                self.stats.gated += length;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn activity_joins_close_runs_and_remembers_the_previous_one() {
        let a = SpeakerActivity::new();
        assert!(!a.overlaps(ms(0), ms(1000)));
        a.record(ms(100), ms(120));
        a.record(ms(120), ms(140));
        a.record(ms(150), ms(200));
        assert!(a.overlaps(ms(190), ms(210)));
        assert!(!a.overlaps(ms(201), ms(300)));
        a.record(ms(1000), ms(1020));
        assert!(
            a.overlaps(ms(180), ms(250)),
            "the run before is still known"
        );
        assert!(!a.overlaps(ms(300), ms(900)));
        assert!(a.overlaps(ms(1010), ms(1015)));
        assert_eq!(a.last_end(), Some(ms(1020)));
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = GateConfig {
            barge_in_level_dbfs: 3.0,
            ..Default::default()
        };
        assert_eq!(HalfDuplexGate::new(bad).unwrap_err(), GateError::Level(3.0));
        let bad = GateConfig {
            barge_in_level_dbfs: f32::NAN,
            ..Default::default()
        };
        assert!(HalfDuplexGate::new(bad).is_err());
    }
}
