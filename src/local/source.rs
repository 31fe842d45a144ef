//! Where the user's audio comes from: a microphone ([`super::device::MicSource`]) or a WAV
//! file ([`FileSource`]), behind one trait so that both take the same path into the session
//! (echo gate, timestamps on the session clock, `SessionInput::Audio`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::engine::clock::Clock;
use crate::media::resample::{MAX_SAMPLE_RATE, MIN_SAMPLE_RATE};

/// Mono audio captured from media time `at` (session clock).
#[derive(Debug, Clone, PartialEq)]
pub struct AudioPiece {
    pub at: Duration,
    pub sample_rate: u32,
    pub samples: Vec<f32>,
}

impl AudioPiece {
    pub fn duration(&self) -> Duration {
        samples_to_duration(self.samples.len() as u64, self.sample_rate)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    Audio(AudioPiece),
    /// Nothing arrived in the time waited.
    Nothing,
    /// The recording is over at media time `at`; silence follows (a file source keeps the
    /// session's time moving until the runner stops it).
    Ended {
        at: Duration,
    },
}

/// Counters of a source.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SourceStats {
    /// Audio delivered.
    pub captured: Duration,
    /// Audio lost because the consumer fell behind the device.
    pub overrun: Duration,
    /// Timestamp corrections beyond jitter (device clock drift, a stalled device).
    pub resyncs: u64,
}

/// A source of the user's audio.
pub trait AudioSource: Send {
    /// What this source is, for the transcript.
    fn describe(&self) -> String;
    /// Starts delivering audio; `origin` is the session time the runner counts the input
    /// from (a file starts there; a microphone dates its audio by capture time anyway).
    fn start(&mut self, origin: Duration) -> anyhow::Result<()>;
    /// The next piece, waiting up to about `wait` for it (a file source paces itself on the
    /// session clock instead).
    fn next(&mut self, wait: Duration) -> anyhow::Result<SourceEvent>;
    fn stats(&self) -> SourceStats;
}

pub(crate) fn samples_to_duration(samples: u64, rate: u32) -> Duration {
    Duration::from_nanos((samples as u128 * 1_000_000_000 / rate.max(1) as u128) as u64)
}

/// The index of the sample at `t` in a stream at `rate` that starts at time zero (rounded).
pub(crate) fn duration_to_samples(t: Duration, rate: u32) -> u64 {
    ((t.as_nanos() * rate as u128 + 500_000_000) / 1_000_000_000) as u64
}

/// A WAV file read whole as mono (channels averaged) at its own rate.
#[derive(Debug, Clone, PartialEq)]
pub struct MonoClip {
    pub sample_rate: u32,
    pub samples: Vec<f32>,
}

/// Reads a WAV file (PCM 8/16/24/32-bit or 32-bit float, any rate and channel count) as mono.
pub fn read_wav_mono(path: &Path) -> anyhow::Result<MonoClip> {
    let mut reader = hound::WavReader::open(path)
        .with_context(|| format!("cannot open the WAV file {}", path.display()))?;
    let spec = reader.spec();
    if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&spec.sample_rate) {
        bail!(
            "{}: sample rate {} Hz is outside {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE} Hz",
            path.display(),
            spec.sample_rate
        );
    }
    if spec.channels == 0 {
        bail!("{}: the WAV header says 0 channels", path.display());
    }
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: bad float samples", path.display()))?,
        (hound::SampleFormat::Int, bits @ 1..=32) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}: bad PCM samples", path.display()))?
        }
        (format, bits) => bail!(
            "{}: unsupported WAV sample format {format:?} with {bits} bits",
            path.display()
        ),
    };
    let channels = spec.channels as usize;
    let samples = interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect();
    Ok(MonoClip {
        sample_rate: spec.sample_rate,
        samples,
    })
}

/// A WAV file played into the session as a microphone would deliver it: 20 ms pieces, each
/// handed over once the session clock has passed its end (real time on a wall clock, as fast
/// as the clock moves on a simulated one). The file starts at the origin given to `start`; after
/// its end the source delivers silence at the same pace, so that the session's time goes on
/// while the model answers.
pub struct FileSource {
    path: PathBuf,
    clip: MonoClip,
    piece: usize,
    clock: Arc<dyn Clock>,
    started: bool,
    origin: Duration,
    /// Samples delivered, the file's and the silence after it.
    delivered: u64,
    ended_reported: bool,
    stats: SourceStats,
}

impl FileSource {
    /// Length of the pieces handed over, as a WebRTC or device microphone would.
    pub const PIECE: Duration = Duration::from_millis(20);

    /// Reads the file; it is paced on `clock`.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let clip = read_wav_mono(path)?;
        if clip.samples.is_empty() {
            bail!("{}: the WAV file holds no audio", path.display());
        }
        Ok(Self::from_clip(path, clip, clock))
    }

    /// A source playing `clip` (named `path` in messages).
    pub fn from_clip(path: &Path, clip: MonoClip, clock: Arc<dyn Clock>) -> Self {
        let piece = (clip.sample_rate as u128 * Self::PIECE.as_nanos() / 1_000_000_000) as usize;
        Self {
            path: path.to_path_buf(),
            piece: piece.max(1),
            clip,
            clock,
            started: false,
            origin: Duration::ZERO,
            delivered: 0,
            ended_reported: false,
            stats: SourceStats::default(),
        }
    }

    /// Session time of the file's first sample (set by `start`).
    pub fn origin(&self) -> Duration {
        self.origin
    }

    pub fn clip(&self) -> &MonoClip {
        &self.clip
    }

    fn time_of(&self, sample: u64) -> Duration {
        self.origin + samples_to_duration(sample, self.clip.sample_rate)
    }
}

impl AudioSource for FileSource {
    fn describe(&self) -> String {
        format!(
            "file {} ({:.2} s at {} Hz)",
            self.path.display(),
            self.clip.samples.len() as f64 / self.clip.sample_rate as f64,
            self.clip.sample_rate
        )
    }

    fn start(&mut self, origin: Duration) -> anyhow::Result<()> {
        self.origin = origin;
        self.started = true;
        Ok(())
    }

    fn next(&mut self, _wait: Duration) -> anyhow::Result<SourceEvent> {
        if !self.started {
            bail!("the file source {} was not started", self.path.display());
        }
        let total = self.clip.samples.len() as u64;
        if self.delivered >= total && !self.ended_reported {
            self.ended_reported = true;
            return Ok(SourceEvent::Ended {
                at: self.time_of(total),
            });
        }
        let start = self.delivered;
        let end = start + self.piece as u64;
        // A microphone hands a piece over once it has been captured.
        self.clock.sleep_until(self.time_of(end));
        let samples = if start >= total {
            vec![0.0; self.piece]
        } else {
            let mut samples = self.clip.samples[start as usize..end.min(total) as usize].to_vec();
            samples.resize(self.piece, 0.0);
            samples
        };
        self.delivered = end;
        let piece = AudioPiece {
            at: self.time_of(start),
            sample_rate: self.clip.sample_rate,
            samples,
        };
        self.stats.captured += piece.duration();
        Ok(SourceEvent::Audio(piece))
    }

    fn stats(&self) -> SourceStats {
        self.stats
    }
}
