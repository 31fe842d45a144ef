//! Keeping the model's own voice, played by a loudspeaker and picked up again by the
//! microphone, from reading as the user talking (which would barge in on every answer).
//!
//! Three ways, [`EchoMode`]:
//! - the echo canceller ([`EchoStage`] with [`crate::media::echo::EchoCanceller`], WebRTC's
//!   AEC3): the far end is what the sink hands to the device (or writes to its file), read back
//!   through [`super::far_end`] at the times it plays, 10 ms at a time, each block given to the
//!   canceller before the microphone audio recorded while it played. The echo is removed and
//!   the user's voice kept, even while the model speaks: full duplex at a normal voice.
//! - [`HalfDuplexGate`]: while the speaker plays the model's voice (and for a short `tail`
//!   after, the room's reverberation), every 10 ms of microphone audio quieter than
//!   `barge_in_level_dbfs` is replaced by silence before it reaches the session. Louder audio
//!   (the user talking over the model, close to the mic) passes, and the gate then stays open
//!   for `hold` so that the dips between syllables do not chop the barge-in below the
//!   session's barge-in onset. The threshold must sit above the level of the echo at the
//!   microphone. This is not echo cancellation: while the model speaks, quiet user speech is
//!   lost. The output side reports what it plays through [`SpeakerActivity`] (times on the
//!   session clock), which is all the gate needs to know.
//! - nothing, for headphones and files.
//!
//! For files and tests, [`EchoStage`] can also make the echo: the model's voice as played,
//! through a simulated loudspeaker-to-microphone path
//! ([`crate::media::echo::EchoPath`]), added to the microphone signal before the echo
//! handling sees it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use super::far_end::FarEndReader;
use super::source::{AudioPiece, duration_to_samples, samples_to_duration};
use crate::engine::clock::Clock;
use crate::media::echo::{
    CancellerConfig, CancellerStats, EchoCanceller, EchoPath, EchoPathConfig, frame_len,
};
use crate::media::resample::StreamResampler;

/// How the microphone is protected from the speaker's echo.
#[derive(Debug, Clone, PartialEq)]
pub enum EchoMode {
    /// The echo canceller (with its default settings) when the microphone hears the speaker:
    /// both are devices, or the echo is simulated; else off.
    Auto,
    /// No echo handling (headphones, files).
    Off,
    /// The half-duplex gate.
    HalfDuplex(GateConfig),
    /// The echo canceller.
    Cancel(CancellerConfig),
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

impl GateConfig {
    pub const DEFAULT_TAIL: Duration = Duration::from_millis(150);
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            barge_in_level_dbfs: -30.0,
            tail: Self::DEFAULT_TAIL,
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

/// The far end in order: 10 ms blocks at the sink's rate, each read once it has played and
/// the sink can no longer change it.
struct FarEndBlocks {
    reader: FarEndReader,
    clock: Arc<dyn Clock>,
    /// Sample index of the next block.
    next: u64,
    block: Vec<f32>,
}

impl FarEndBlocks {
    fn new(reader: FarEndReader, clock: Arc<dyn Clock>, from: Duration) -> Self {
        let next = reader.index_of(from);
        let block = vec![0.0; frame_len(reader.rate())];
        Self {
            reader,
            clock,
            next,
            block,
        }
    }

    /// Session time up to which blocks were taken.
    fn taken_until(&self) -> Duration {
        self.reader.time_of(self.next)
    }

    /// Session time of the next block, and its samples.
    fn take(&mut self) -> (Duration, &[f32]) {
        let at = self.reader.time_of(self.next);
        let end = self.next + self.block.len() as u64;
        self.clock
            .sleep_until(self.reader.time_of(end) + self.reader.settle());
        self.reader.read(self.next, &mut self.block);
        self.next = end;
        (at, &self.block)
    }
}

/// The simulated loudspeaker-to-microphone path on the far end: resampled to the microphone's
/// rate, through the [`EchoPath`], kept until the microphone audio it lands in comes.
struct SimulatedEcho {
    path: EchoPath,
    mic_rate: u32,
    /// From the far end's rate to the microphone's (`None`: the same).
    resampler: Option<StreamResampler>,
    /// The echo from microphone sample index `start` on.
    echo: VecDeque<f32>,
    start: Option<u64>,
}

impl SimulatedEcho {
    fn new(config: EchoPathConfig, far_rate: u32, mic_rate: u32) -> anyhow::Result<Self> {
        let resampler = (far_rate != mic_rate)
            .then(|| StreamResampler::new(far_rate, mic_rate))
            .transpose()?;
        Ok(Self {
            path: EchoPath::new(config, mic_rate)?,
            mic_rate,
            resampler,
            echo: VecDeque::new(),
            start: None,
        })
    }

    fn push_far_end(&mut self, at: Duration, block: &[f32]) -> anyhow::Result<()> {
        self.start
            .get_or_insert(duration_to_samples(at, self.mic_rate));
        let at_mic = match self.resampler.as_mut() {
            Some(resampler) => resampler.push(block)?,
            None => block.to_vec(),
        };
        self.echo.extend(self.path.process(&at_mic));
        Ok(())
    }

    /// Microphone sample index up to which the echo is known.
    fn known_until(&self) -> Option<u64> {
        self.start.map(|start| start + self.echo.len() as u64)
    }

    /// Adds the echo to microphone audio starting at sample index `first`.
    fn add_to(&mut self, first: u64, samples: &mut [f32]) {
        let Some(start) = self.start else { return };
        let stale = (first.saturating_sub(start) as usize).min(self.echo.len());
        self.echo.drain(..stale);
        self.start = Some(start + stale as u64);
        let lead = self.start.map_or(0, |s| s.saturating_sub(first)) as usize;
        for (x, e) in samples.iter_mut().skip(lead).zip(self.echo.iter()) {
            *x += e;
        }
    }
}

/// The canceller and the microphone audio not yet a whole 10 ms frame.
struct CancellerStage {
    aec: EchoCanceller,
    pending: Vec<f32>,
    /// Microphone sample index of `pending[0]`.
    pending_start: u64,
}

/// Microphone pieces this close to where the previous one ended continue it (the session's
/// input stage takes the same).
const CONTIGUOUS: Duration = Duration::from_millis(2);

/// What [`EchoStage`] does to the microphone.
#[derive(Debug, Clone, PartialEq)]
pub struct EchoStageConfig {
    /// The echo canceller.
    pub cancel: Option<CancellerConfig>,
    /// A simulated echo added to the microphone first.
    pub simulate: Option<EchoPathConfig>,
}

/// What the echo stage did, in total.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct EchoStageStats {
    /// The canceller's estimates, when it runs.
    pub canceller: Option<CancellerStats>,
    /// Far-end samples the sink wrote that the stage fell too far behind to get.
    pub far_end_dropped: u64,
}

/// The microphone path of the echo: a simulated echo added, then the echo canceller, each 10 ms
/// frame against the far end that played over the same time (see the module doc). Works on
/// the microphone's pieces in order, at their rate; the canceller gives its audio back in whole
/// 10 ms frames (up to 10 ms held back).
pub struct EchoStage {
    config: EchoStageConfig,
    clock: Arc<dyn Clock>,
    reader: Option<FarEndReader>,
    blocks: Option<FarEndBlocks>,
    simulation: Option<SimulatedEcho>,
    canceller: Option<CancellerStage>,
    mic_rate: Option<u32>,
}

/// Takes the next far-end block and hands it to whoever needs it.
fn take_block(
    blocks: &mut FarEndBlocks,
    simulation: Option<&mut SimulatedEcho>,
    canceller: Option<&mut CancellerStage>,
) -> anyhow::Result<()> {
    let (at, block) = blocks.take();
    if let Some(simulation) = simulation {
        simulation.push_far_end(at, block)?;
    }
    if let Some(canceller) = canceller {
        canceller.aec.process_render(block)?;
    }
    Ok(())
}

impl EchoStage {
    /// A stage reading the far end from `far_end` (what the sink plays).
    pub fn new(
        config: EchoStageConfig,
        far_end: FarEndReader,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        if let Some(path) = &config.simulate {
            path.validate().context("simulated echo")?;
        }
        Ok(Self {
            config,
            clock,
            reader: Some(far_end),
            blocks: None,
            simulation: None,
            canceller: None,
            mic_rate: None,
        })
    }

    pub fn config(&self) -> &EchoStageConfig {
        &self.config
    }

    /// Sets up for the microphone's rate on its first piece.
    fn start(&mut self, piece: &AudioPiece) -> anyhow::Result<()> {
        let Some(reader) = self.reader.take() else {
            return Ok(());
        };
        let (far_rate, mic_rate) = (reader.rate(), piece.sample_rate);
        if let Some(path) = self.config.simulate {
            self.simulation = Some(SimulatedEcho::new(path, far_rate, mic_rate)?);
        }
        if let Some(config) = self.config.cancel {
            self.canceller = Some(CancellerStage {
                aec: EchoCanceller::new(mic_rate, far_rate, config)?,
                pending: Vec::new(),
                pending_start: duration_to_samples(piece.at, mic_rate),
            });
        }
        self.blocks = Some(FarEndBlocks::new(reader, self.clock.clone(), piece.at));
        self.mic_rate = Some(mic_rate);
        Ok(())
    }

    /// The microphone's `piece` with the simulated echo added and the echo removed: the audio
    /// of the whole 10 ms frames it completes (`None` while less than one is pending).
    pub fn process(&mut self, mut piece: AudioPiece) -> anyhow::Result<Option<AudioPiece>> {
        self.start(&piece)?;
        let rate = piece.sample_rate;
        if self.mic_rate != Some(rate) {
            bail!(
                "the microphone's rate changed from {:?} Hz to {rate} Hz during the call",
                self.mic_rate
            );
        }
        let blocks = self.blocks.as_mut().expect("started");
        let first = duration_to_samples(piece.at, rate);
        if let Some(simulation) = self.simulation.as_mut() {
            let end = first + piece.samples.len() as u64;
            while simulation.known_until().is_none_or(|known| known < end) {
                take_block(blocks, Some(&mut *simulation), self.canceller.as_mut())?;
            }
            simulation.add_to(first, &mut piece.samples);
        }
        let Some(canceller) = self.canceller.as_mut() else {
            return Ok(Some(piece));
        };
        let expected = canceller.pending_start + canceller.pending.len() as u64;
        if first.abs_diff(expected) > duration_to_samples(CONTIGUOUS, rate) {
            // a gap in the microphone (a stalled device): the part frame before it is dropped
            canceller.pending.clear();
        }
        // the piece's time wins over the count: the device's clock is slewed toward the
        // system's by small steps, which the part frame before it follows
        canceller.pending_start = first.saturating_sub(canceller.pending.len() as u64);
        canceller.pending.extend_from_slice(&piece.samples);
        let n = frame_len(rate);
        let whole = canceller.pending.len() / n * n;
        if whole == 0 {
            return Ok(None);
        }
        let out_start = canceller.pending_start;
        for k in 0..whole / n {
            let frame_end = samples_to_duration(out_start + ((k + 1) * n) as u64, rate);
            while blocks.taken_until() < frame_end {
                take_block(blocks, self.simulation.as_mut(), Some(&mut *canceller))?;
            }
            canceller
                .aec
                .process_capture(&mut canceller.pending[k * n..(k + 1) * n])?;
        }
        let samples: Vec<f32> = canceller.pending.drain(..whole).collect();
        canceller.pending_start += whole as u64;
        Ok(Some(AudioPiece {
            at: samples_to_duration(out_start, rate),
            sample_rate: rate,
            samples,
        }))
    }

    pub fn stats(&self) -> EchoStageStats {
        EchoStageStats {
            canceller: self.canceller.as_ref().map(|c| c.aec.stats()),
            far_end_dropped: self.blocks.as_ref().map_or(0, |b| b.reader.dropped()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::clock::SimulatedClock;
    use crate::local::far_end::far_end_tap;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A clock far past every time used: the stage never waits.
    fn late_clock() -> Arc<dyn Clock> {
        let clock = SimulatedClock::new();
        clock.set(Duration::from_secs(1000));
        Arc::new(clock)
    }

    /// Feeds `seconds` of silent microphone at 16 kHz from 1 s on, in 7 ms pieces, through
    /// `stage`, calling `play` with each piece's time first; returns what comes out, checking
    /// that it comes back to back from 1 s on.
    fn silent_microphone(
        stage: &mut EchoStage,
        seconds: f64,
        mut play: impl FnMut(Duration),
    ) -> Vec<f32> {
        let (rate, piece) = (16_000u32, 112usize);
        let mut out = Vec::new();
        let mut next_at = Duration::from_secs(1);
        for k in 0..(seconds * rate as f64) as usize / piece {
            let at = Duration::from_secs(1) + samples_to_duration((k * piece) as u64, rate);
            play(at);
            let processed = stage
                .process(AudioPiece {
                    at,
                    sample_rate: rate,
                    samples: vec![0.0; piece],
                })
                .unwrap();
            if let Some(p) = processed {
                assert_eq!(p.sample_rate, rate);
                assert!(
                    p.at.abs_diff(next_at) < Duration::from_micros(100),
                    "{:?}",
                    p.at
                );
                next_at = p.at + Duration::from_secs_f64(p.samples.len() as f64 / rate as f64);
                out.extend(p.samples);
            }
        }
        out
    }

    fn speech_at(rate: u32) -> Vec<f32> {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/media/utterance_long.wav");
        crate::media::audio_file::load_audio_at(path, rate).unwrap()
    }

    #[test]
    fn the_stage_adds_the_echo_of_what_played_at_its_delay_and_level() {
        // a 24 kHz sink played a 5 ms click at 1.5 s; the 16 kHz microphone hears it 60 ms later
        let (writer, reader) = far_end_tap(24_000, Duration::ZERO);
        writer.write(ms(1500), &[0.5; 120]);
        let config = EchoStageConfig {
            cancel: None,
            simulate: Some(EchoPathConfig {
                delay: ms(60),
                gain_db: -6.0,
            }),
        };
        let mut stage = EchoStage::new(config, reader, late_clock()).unwrap();
        let out = silent_microphone(&mut stage, 1.0, |_| {});
        let loud: Vec<usize> = (0..out.len()).filter(|&i| out[i].abs() > 0.05).collect();
        let first = *loud.first().expect("an echo") as f64 / 16.0;
        assert!(
            (555.0..=565.0).contains(&first),
            "echo at {first} ms after 1 s"
        );
        let peak = out.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!((0.2..0.32).contains(&peak), "-6 dB of 0.5: {peak}");
        assert!(
            out[..8000].iter().all(|&x| x.abs() < 1e-3),
            "nothing before"
        );
    }

    #[test]
    fn the_stage_cancels_the_echo_it_simulates() {
        let far = speech_at(24_000);
        let seconds = 2.0 * far.len() as f64 / 24_000.0;
        let run = |cancel: Option<CancellerConfig>| {
            let (writer, reader) = far_end_tap(24_000, Duration::ZERO);
            // the speech twice from 1 s on, as a sink writes it: 20 ms frames, a little ahead
            let mut twice = far.clone();
            twice.extend(&far);
            let mut frames = twice.chunks(480).enumerate().peekable();
            let play = move |now: Duration| {
                while let Some((k, frame)) =
                    frames.next_if(|(k, _)| ms(1000 + 20 * *k as u64) < now + ms(100))
                {
                    writer.write(Duration::from_secs(1) + ms(20 * k as u64), frame);
                }
            };
            let config = EchoStageConfig {
                cancel,
                simulate: Some(EchoPathConfig {
                    delay: ms(60),
                    gain_db: -6.0,
                }),
            };
            let mut stage = EchoStage::new(config, reader, late_clock()).unwrap();
            let out = silent_microphone(&mut stage, seconds, play);
            (out, stage.stats())
        };
        let (echo, plain) = run(None);
        assert!(plain.canceller.is_none());
        let (cancelled, stats) = run(Some(CancellerConfig::default()));
        let power = |x: &[f32]| x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
        let half = echo.len() / 2;
        let reduction = 10.0 * (power(&echo[half..]) / power(&cancelled[half..])).log10();
        let canceller = stats.canceller.unwrap();
        eprintln!("{reduction:.1} dB less echo; {canceller}");
        assert!(reduction > 20.0, "only {reduction:.1} dB less echo");
        let delay = canceller.delay_ms.unwrap();
        assert!((50..=80).contains(&delay), "delay estimate {delay} ms");
    }

    #[test]
    fn pieces_shorter_than_a_frame_slewed_by_the_device_clock_all_come_through() {
        // 5 ms pieces at 48 kHz, each dated 0.25 ms early by the capture clock's slew
        let (_writer, reader) = far_end_tap(48_000, Duration::ZERO);
        let config = EchoStageConfig {
            cancel: Some(CancellerConfig::default()),
            simulate: None,
        };
        let mut stage = EchoStage::new(config, reader, late_clock()).unwrap();
        let mut out = 0;
        for k in 0..200u64 {
            let piece = AudioPiece {
                at: ms(1000) + Duration::from_micros(4_750 * k),
                sample_rate: 48_000,
                samples: vec![0.0; 240],
            };
            if let Some(p) = stage.process(piece).unwrap() {
                assert_eq!(p.samples.len(), 480);
                out += p.samples.len();
            }
        }
        assert_eq!(out, 200 * 240);
    }

    #[test]
    fn a_simulated_echo_with_a_bad_path_is_refused() {
        let (_writer, reader) = far_end_tap(24_000, Duration::ZERO);
        let config = EchoStageConfig {
            cancel: None,
            simulate: Some(EchoPathConfig {
                delay: Duration::from_secs(3),
                gain_db: 0.0,
            }),
        };
        let err = EchoStage::new(config, reader, late_clock()).err().unwrap();
        assert!(format!("{err:#}").contains("over 500 ms"), "{err:#}");
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
