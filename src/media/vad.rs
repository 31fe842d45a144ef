//! Voice activity detection on a stream, with one of two detectors behind one API:
//!
//! - **Silero VAD** (the default; [`crate::media::silero`]): a small neural network giving the
//!   speech probability of each 32 ms frame at 16 kHz. Speech starts when the probability
//!   reaches `threshold` (0.5, Silero's usual) and goes on while it stays at or above
//!   `release_threshold` (0.35): the hysteresis keeps a word's quiet middle inside the speech.
//!   It tells speech from coughs, clicks and noise far better than an energy/GMM detector.
//! - **WebRTC's VAD** (the GMM detector of the WebRTC audio processing module, as packaged by
//!   libfvad and built from its C sources by the `webrtc-vad` crate): frames of exactly 10, 20
//!   or 30 ms at 8, 16, 32 or 48 kHz, answered voiced / not voiced; it adapts its noise model
//!   to stationary background noise and already holds a voiced decision for 2-14 frames after
//!   speech (its own hangover). Its one knob is the aggressiveness mode. Each frame's raw answer
//!   is smoothed by a short majority window, so that a single voiced frame in silence (a click)
//!   or a single unvoiced frame inside a word does not flip the decision: the smoothed decision
//!   of a frame is `voiced frames in the last window / window >= threshold`.
//!
//! [`VoiceDetector`] takes samples in pieces of any length and cuts frames on a continuous
//! timeline. Silero runs at 16 kHz only: the session resamples its input to the model's rate
//! (16 kHz) before the VAD, so a detector at another rate is refused rather than resampled.

use std::collections::VecDeque;
use std::time::Duration;

use super::silero::{SILERO_FRAME_SAMPLES, SILERO_SAMPLE_RATE, SileroVad};

/// Sample rates WebRTC's VAD accepts, in Hz.
pub const VAD_SAMPLE_RATES: [u32; 4] = [8_000, 16_000, 32_000, 48_000];

/// Length of one Silero frame (512 samples at 16 kHz).
pub const SILERO_FRAME: Duration = Duration::from_millis(32);

/// The detector behind a [`VoiceDetector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VadBackend {
    /// Silero VAD v5 (neural, 32 ms frames at 16 kHz).
    #[default]
    Silero,
    /// WebRTC's GMM detector (10/20/30 ms frames).
    WebRtc,
}

impl std::str::FromStr for VadBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "silero" => Ok(Self::Silero),
            "webrtc" => Ok(Self::WebRtc),
            other => Err(format!("unknown VAD \"{other}\" (silero or webrtc)")),
        }
    }
}

/// WebRTC's aggressiveness modes, from the one that reports speech most readily to the one
/// that reports it least readily.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggressiveness {
    /// Mode 0.
    Quality,
    /// Mode 1.
    LowBitrate,
    /// Mode 2.
    Aggressive,
    /// Mode 3: the fewest false alarms on noise; a good default for barge-in.
    VeryAggressive,
}

impl Aggressiveness {
    fn mode(self) -> webrtc_vad::VadMode {
        match self {
            Self::Quality => webrtc_vad::VadMode::Quality,
            Self::LowBitrate => webrtc_vad::VadMode::LowBitrate,
            Self::Aggressive => webrtc_vad::VadMode::Aggressive,
            Self::VeryAggressive => webrtc_vad::VadMode::VeryAggressive,
        }
    }
}

/// Settings of a [`VoiceDetector`]. `Default` is Silero with its usual thresholds;
/// [`VadConfig::webrtc`] is WebRTC's detector as the session used it before.
#[derive(Debug, Clone, PartialEq)]
pub struct VadConfig {
    pub backend: VadBackend,
    /// WebRTC only.
    pub aggressiveness: Aggressiveness,
    /// Length of one decision frame: 10, 20 or 30 ms for WebRTC, [`SILERO_FRAME`] for Silero.
    pub frame: Duration,
    /// WebRTC: frames in the smoothing window (1 = WebRTC's raw decisions). Silero: 1.
    pub smoothing_frames: usize,
    /// WebRTC: share of voiced frames in the smoothing window (0..=1) from which a frame counts
    /// as speech (0.5 with 3 frames is a majority vote of the frame and the two before it).
    /// Silero: the speech probability from which speech starts.
    pub threshold: f32,
    /// Silero: speech goes on while the probability stays at or above this (at most
    /// `threshold`). WebRTC: unused.
    pub release_threshold: f32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self::silero()
    }
}

impl VadConfig {
    /// Silero VAD with its usual thresholds: speech from p ≥ 0.5, on until p < 0.35.
    pub fn silero() -> Self {
        Self {
            backend: VadBackend::Silero,
            aggressiveness: Aggressiveness::VeryAggressive,
            frame: SILERO_FRAME,
            smoothing_frames: 1,
            threshold: 0.5,
            release_threshold: 0.35,
        }
    }

    /// WebRTC's detector, mode 3, 20 ms frames, majority of 3.
    pub fn webrtc() -> Self {
        Self {
            backend: VadBackend::WebRtc,
            aggressiveness: Aggressiveness::VeryAggressive,
            frame: Duration::from_millis(20),
            smoothing_frames: 3,
            threshold: 0.5,
            release_threshold: 0.5,
        }
    }

    /// The default settings of `backend`.
    pub fn for_backend(backend: VadBackend) -> Self {
        match backend {
            VadBackend::Silero => Self::silero(),
            VadBackend::WebRtc => Self::webrtc(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VadError {
    #[error("VAD sample rate {0} Hz is not supported (WebRTC's VAD takes {VAD_SAMPLE_RATES:?})")]
    Rate(u32),
    #[error("VAD frame of {0:?} is not supported (WebRTC's VAD takes 10, 20 or 30 ms)")]
    Frame(Duration),
    #[error("VAD smoothing window must hold at least one frame")]
    Window,
    #[error("VAD threshold {0} is outside 0..=1")]
    Threshold(f32),
    #[error("Silero VAD runs at 16000 Hz, not {0} Hz (resample the input first)")]
    SileroRate(u32),
    #[error("Silero VAD frames are 32 ms (512 samples at 16 kHz), not {0:?}")]
    SileroFrame(Duration),
    #[error("Silero VAD release threshold {release} must be in 0..=threshold ({threshold})")]
    Release { release: f32, threshold: f32 },
    #[error("Silero VAD model: {0}")]
    Model(String),
}

impl VadConfig {
    pub fn validate(&self) -> Result<(), VadError> {
        match self.backend {
            VadBackend::WebRtc => {
                if ![10, 20, 30].contains(&self.frame.as_millis())
                    || !self.frame.subsec_nanos().is_multiple_of(1_000_000)
                {
                    return Err(VadError::Frame(self.frame));
                }
            }
            VadBackend::Silero => {
                if self.frame != SILERO_FRAME {
                    return Err(VadError::SileroFrame(self.frame));
                }
                if !(0.0..=self.threshold).contains(&self.release_threshold) {
                    return Err(VadError::Release {
                        release: self.release_threshold,
                        threshold: self.threshold,
                    });
                }
            }
        }
        if self.smoothing_frames == 0 {
            return Err(VadError::Window);
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(VadError::Threshold(self.threshold));
        }
        Ok(())
    }
}

/// The decision for one frame of the stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadDecision {
    /// Media time of the frame's first sample.
    pub at: Duration,
    /// Length of the frame (20 ms for WebRTC's default, 32 ms for Silero).
    pub duration: Duration,
    /// The detector's answer for this frame alone (Silero: `probability >= threshold`).
    pub voiced: bool,
    /// WebRTC: share of voiced frames in the smoothing window ending with this frame.
    /// Silero: the probability.
    pub voiced_share: f32,
    /// Silero: the speech probability of the frame. WebRTC: `voiced_share`.
    pub probability: f32,
    /// The decision: WebRTC `voiced_share >= threshold`; Silero with hysteresis.
    pub speech: bool,
}

impl VadDecision {
    /// Media time just after the frame.
    pub fn end(&self) -> Duration {
        self.at + self.duration
    }
}

/// The C detector instance.
struct WebRtcVad(webrtc_vad::Vad);

// SAFETY: the libfvad instance is a plain heap allocation with no thread affinity and no shared
// or global state; it is only reached through `&mut self`, so moving it to another thread is
// sound (the crate only lacks the marker because it holds a raw pointer).
unsafe impl Send for WebRtcVad {}

enum Detector {
    WebRtc {
        vad: WebRtcVad,
        window: VecDeque<bool>,
    },
    Silero {
        vad: Box<SileroVad>,
        /// Whether the last frame was speech (the hysteresis' side).
        speaking: bool,
    },
}

/// A streaming voice activity detector on a continuous timeline: sample `n` pushed since the
/// start is at media time `start + n / sample_rate`.
pub struct VoiceDetector {
    config: VadConfig,
    detector: Detector,
    sample_rate: u32,
    frame_samples: usize,
    start: Duration,
    /// Frames decided so far.
    frames_done: u64,
    /// Samples not yet forming a whole frame, clipped to -1..1.
    pending: Vec<f32>,
    /// The frame as 16-bit PCM (WebRTC).
    pcm: Vec<i16>,
}

impl VoiceDetector {
    /// A detector for audio at `sample_rate` whose first sample is at media time `start`.
    pub fn new(config: VadConfig, sample_rate: u32, start: Duration) -> Result<Self, VadError> {
        config.validate()?;
        let (detector, frame_samples) = match config.backend {
            VadBackend::WebRtc => {
                let rate = vad_rate(sample_rate)?;
                let vad =
                    webrtc_vad::Vad::new_with_rate_and_mode(rate, config.aggressiveness.mode());
                let detector = Detector::WebRtc {
                    vad: WebRtcVad(vad),
                    window: VecDeque::with_capacity(config.smoothing_frames),
                };
                (
                    detector,
                    (sample_rate as u128 * config.frame.as_millis() / 1000) as usize,
                )
            }
            VadBackend::Silero => {
                if sample_rate != SILERO_SAMPLE_RATE {
                    return Err(VadError::SileroRate(sample_rate));
                }
                let vad = SileroVad::new().map_err(|e| VadError::Model(format!("{e:#}")))?;
                let detector = Detector::Silero {
                    vad: Box::new(vad),
                    speaking: false,
                };
                (detector, SILERO_FRAME_SAMPLES)
            }
        };
        Ok(Self {
            config,
            detector,
            sample_rate,
            frame_samples,
            start,
            frames_done: 0,
            pending: Vec::with_capacity(frame_samples),
            pcm: Vec::with_capacity(frame_samples),
        })
    }

    pub fn config(&self) -> &VadConfig {
        &self.config
    }

    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Samples in one decision frame.
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// Media time of the next sample the detector expects.
    pub fn position(&self) -> Duration {
        let samples = self.frames_done * self.frame_samples as u64 + self.pending.len() as u64;
        self.start + samples_to_duration(samples, self.sample_rate)
    }

    /// Feeds the next samples of the stream (mono, -1..1; values outside are clipped);
    /// returns the decisions of the frames they completed, in order.
    pub fn push(&mut self, samples: &[f32]) -> Vec<VadDecision> {
        let mut out = Vec::with_capacity((self.pending.len() + samples.len()) / self.frame_samples);
        for &s in samples {
            self.pending.push(if s.is_finite() {
                s.clamp(-1.0, 1.0)
            } else {
                0.0
            });
            if self.pending.len() == self.frame_samples {
                out.push(self.decide());
            }
        }
        out
    }

    /// Forgets the stream and starts a new one whose first sample is at `start`.
    pub fn reset(&mut self, start: Duration) {
        match &mut self.detector {
            Detector::WebRtc { vad, window } => {
                vad.0.reset();
                vad.0.set_mode(self.config.aggressiveness.mode());
                if let Ok(rate) = vad_rate(self.sample_rate) {
                    vad.0.set_sample_rate(rate);
                }
                window.clear();
            }
            Detector::Silero { vad, speaking } => {
                vad.reset();
                *speaking = false;
            }
        }
        self.start = start;
        self.frames_done = 0;
        self.pending.clear();
    }

    fn decide(&mut self) -> VadDecision {
        let at = self.start
            + samples_to_duration(
                self.frames_done * self.frame_samples as u64,
                self.sample_rate,
            );
        self.frames_done += 1;
        let config = &self.config;
        let decision = match &mut self.detector {
            Detector::WebRtc { vad, window } => {
                self.pcm.clear();
                self.pcm.extend(self.pending.iter().map(|&s| to_pcm16(s)));
                // The frame length was checked in `new`, so the detector cannot refuse it.
                let voiced = vad.0.is_voice_segment(&self.pcm).unwrap_or(false);
                if window.len() == config.smoothing_frames {
                    window.pop_front();
                }
                window.push_back(voiced);
                // Before the window is full, the missing frames count as unvoiced.
                let voiced_count = window.iter().filter(|v| **v).count();
                let voiced_share = voiced_count as f32 / config.smoothing_frames as f32;
                VadDecision {
                    at,
                    duration: config.frame,
                    voiced,
                    voiced_share,
                    probability: voiced_share,
                    speech: voiced_share >= config.threshold && voiced_count > 0,
                }
            }
            Detector::Silero { vad, speaking } => {
                let probability = vad.speech_probability(&self.pending).unwrap_or_else(|e| {
                    // the frame length is fixed here and the weights loaded: not expected
                    tracing::warn!("Silero VAD failed on a frame, taken as silence: {e:#}");
                    0.0
                });
                let bar = if *speaking {
                    config.release_threshold
                } else {
                    config.threshold
                };
                *speaking = probability >= bar;
                VadDecision {
                    at,
                    duration: config.frame,
                    voiced: probability >= config.threshold,
                    voiced_share: probability,
                    probability,
                    speech: *speaking,
                }
            }
        };
        self.pending.clear();
        decision
    }
}

fn vad_rate(sample_rate: u32) -> Result<webrtc_vad::SampleRate, VadError> {
    Ok(match sample_rate {
        8_000 => webrtc_vad::SampleRate::Rate8kHz,
        16_000 => webrtc_vad::SampleRate::Rate16kHz,
        32_000 => webrtc_vad::SampleRate::Rate32kHz,
        48_000 => webrtc_vad::SampleRate::Rate48kHz,
        other => return Err(VadError::Rate(other)),
    })
}

fn to_pcm16(s: f32) -> i16 {
    (s * i16::MAX as f32).round() as i16
}

fn samples_to_duration(samples: u64, rate: u32) -> Duration {
    Duration::from_nanos((samples as u128 * 1_000_000_000 / rate as u128) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const RATE: u32 = 16_000;

    fn load(name: &str) -> Vec<f32> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/media")
            .join(name);
        let mut reader = hound::WavReader::open(&path).expect("test wav");
        assert_eq!(reader.spec().sample_rate, RATE, "{name}");
        reader
            .samples::<i16>()
            .map(|s| s.expect("sample") as f32 / 32768.0)
            .collect()
    }

    fn decide(config: VadConfig, audio: &[f32], piece: usize) -> Vec<VadDecision> {
        let mut vad = VoiceDetector::new(config, RATE, Duration::ZERO).unwrap();
        audio.chunks(piece).flat_map(|p| vad.push(p)).collect()
    }

    /// Seeded noise scaled to `rms`: white, or brown (leaky-integrated white, most energy
    /// low, like a fan or traffic rumble).
    fn noise(seed: u64, len: usize, rms: f32, brown: bool) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut acc = 0.0f32;
        let raw: Vec<f32> = (0..len)
            .map(|_| {
                let w: f32 = rng.random_range(-1.0..1.0);
                acc = if brown { 0.98 * acc + w } else { w };
                acc
            })
            .collect();
        let now = (raw.iter().map(|x| x * x).sum::<f32>() / len as f32).sqrt();
        raw.iter().map(|x| x * rms / now).collect()
    }

    /// First and last sample louder than -40 dBFS.
    fn loud_span(audio: &[f32]) -> (usize, usize) {
        let loud = |x: &&f32| x.abs() > 0.01;
        let first = audio.iter().position(|x| loud(&x)).unwrap();
        let last = audio.len() - 1 - audio.iter().rev().position(|x| loud(&x)).unwrap();
        (first, last)
    }

    fn frame_of(sample: usize) -> usize {
        sample / (RATE as usize / 50)
    }

    #[test]
    fn speech_is_found_and_silence_is_not() {
        let speech = load("utterance_long.wav");
        let lead = RATE as usize / 2;
        let mut audio = vec![0.0; lead];
        audio.extend(&speech);
        audio.extend(vec![0.0; RATE as usize]);
        let (first, last) = loud_span(&audio);
        let d = decide(VadConfig::webrtc(), &audio, 333);
        assert_eq!(d.len(), audio.len() / 320);
        let onset = d.iter().position(|d| d.speech).expect("speech found");
        // within three 20 ms frames of the first loud sample (smoothing delays by one)
        assert!(
            onset.abs_diff(frame_of(first)) <= 3,
            "onset frame {onset}, speech starts in frame {}",
            frame_of(first)
        );
        let offset = d.iter().rposition(|d| d.speech).unwrap();
        // WebRTC's hangover holds speech for up to 5 frames of 20 ms after the last sound
        assert!(
            offset >= frame_of(last) && offset <= frame_of(last) + 8,
            "last speech frame {offset}, sound ends in frame {}",
            frame_of(last)
        );
        let inside = &d[onset..=offset];
        let share = inside.iter().filter(|d| d.speech).count() as f32 / inside.len() as f32;
        assert!(share > 0.8, "speech share inside the utterance {share}");
        assert!(d[..frame_of(first)].iter().all(|d| !d.speech));
        assert!(d[offset + 1..].iter().all(|d| !d.speech));
    }

    #[test]
    fn room_noise_is_not_speech_but_speech_in_it_is() {
        let speech = load("utterance_short.wav");
        for brown in [false, true] {
            // -40 dBFS of noise under speech at about -22 dBFS
            let noise_only = noise(7, 3 * RATE as usize, 0.01, brown);
            let d = decide(VadConfig::webrtc(), &noise_only, 480);
            // the detector adapts its noise model in the first frames; none is a turn onset
            let longest_run = d
                .split(|d| !d.speech)
                .map(|run| run.len())
                .max()
                .unwrap_or(0);
            assert!(
                longest_run < 5,
                "brown {brown}: run of {longest_run} speech frames"
            );
            assert!(
                d[10..].iter().all(|d| !d.speech),
                "brown {brown}: speech after 200 ms of noise"
            );

            let mut mixed = noise(8, 3 * RATE as usize, 0.01, brown);
            let at = RATE as usize;
            for (m, s) in mixed[at..].iter_mut().zip(&speech) {
                *m += s;
            }
            let (first, last) = loud_span(&speech);
            let d = decide(VadConfig::webrtc(), &mixed, 160);
            let voiced = &d[frame_of(at + first) + 3..frame_of(at + last)];
            let share = voiced.iter().filter(|d| d.speech).count() as f32 / voiced.len() as f32;
            assert!(share > 0.8, "brown {brown}: speech share in noise {share}");
            assert!(d[10..frame_of(at + first)].iter().all(|d| !d.speech));
        }
    }

    #[test]
    fn a_short_blip_gives_a_short_run() {
        let mut audio = vec![0.0; RATE as usize / 2];
        audio.extend(load("cough.wav"));
        audio.extend(vec![0.0; RATE as usize / 2]);
        let d = decide(VadConfig::webrtc(), &audio, 320);
        let speech = d.iter().filter(|d| d.speech).count();
        // 100 ms of sound plus the detector's short-burst hangover (3 frames)
        assert!((1..=9).contains(&speech), "{speech} frames");
    }

    #[test]
    fn pieces_of_any_size_give_the_same_decisions_on_the_same_times() {
        let audio = load("utterance_short.wav");
        for ms in [10, 20, 30] {
            let config = VadConfig {
                frame: Duration::from_millis(ms),
                ..VadConfig::webrtc()
            };
            let whole = decide(config.clone(), &audio, audio.len());
            let start = Duration::from_millis(1234);
            let mut vad = VoiceDetector::new(config.clone(), RATE, start).unwrap();
            let mut pieces = Vec::new();
            let mut rest = &audio[..];
            let mut k = 1;
            while !rest.is_empty() {
                let n = (k * 37 % 701).min(rest.len());
                pieces.extend(vad.push(&rest[..n]));
                rest = &rest[n..];
                k += 1;
            }
            assert_eq!(
                pieces.len(),
                audio.len() / (RATE as usize * ms as usize / 1000)
            );
            for (k, (a, b)) in whole.iter().zip(&pieces).enumerate() {
                assert_eq!((a.voiced, a.speech), (b.voiced, b.speech), "frame {k}");
                assert_eq!(b.at, start + Duration::from_millis(ms) * k as u32);
                assert_eq!(b.duration, Duration::from_millis(ms));
            }
            assert!(whole.iter().any(|d| d.speech));
            assert_eq!(
                vad.position(),
                start + Duration::from_nanos(audio.len() as u64 * 62_500)
            );
        }
    }

    #[test]
    fn the_smoothed_decision_is_the_window_share_over_the_threshold() {
        let audio = load("utterance_short.wav");
        let config = VadConfig {
            aggressiveness: Aggressiveness::Aggressive,
            smoothing_frames: 3,
            threshold: 0.6,
            ..VadConfig::webrtc()
        };
        let d = decide(config, &audio, 320);
        for k in 0..d.len() {
            let window = &d[k.saturating_sub(2)..=k];
            let share = window.iter().filter(|d| d.voiced).count() as f32 / 3.0;
            assert_eq!(d[k].voiced_share, share, "frame {k}");
            assert_eq!(d[k].speech, share >= 0.6, "frame {k}");
        }
        // the utterance has both decisions, and smoothing changed at least one frame
        assert!(d.iter().any(|d| d.speech) && d.iter().any(|d| !d.speech));
        assert!(d.iter().any(|d| d.speech != d.voiced));
    }

    #[test]
    fn reset_starts_a_new_stream() {
        let audio = load("utterance_short.wav");
        let mut vad = VoiceDetector::new(VadConfig::webrtc(), RATE, Duration::ZERO).unwrap();
        let first = vad.push(&audio);
        vad.push(&[0.3; 100]);
        vad.reset(Duration::from_secs(10));
        assert_eq!(vad.position(), Duration::from_secs(10));
        let again = vad.push(&audio);
        assert_eq!(first.len(), again.len());
        for (a, b) in first.iter().zip(&again) {
            assert_eq!(a.speech, b.speech);
            assert_eq!(b.at, a.at + Duration::from_secs(10));
        }
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let bad_frame = VadConfig {
            frame: Duration::from_millis(25),
            ..VadConfig::webrtc()
        };
        assert_eq!(
            VoiceDetector::new(bad_frame, RATE, Duration::ZERO).err(),
            Some(VadError::Frame(Duration::from_millis(25)))
        );
        assert_eq!(
            VoiceDetector::new(VadConfig::webrtc(), 44_100, Duration::ZERO).err(),
            Some(VadError::Rate(44_100))
        );
        let bad_threshold = VadConfig {
            threshold: 1.5,
            ..VadConfig::webrtc()
        };
        let err = VoiceDetector::new(bad_threshold, RATE, Duration::ZERO)
            .err()
            .unwrap();
        assert!(err.to_string().contains("1.5"), "{err}");
        let no_window = VadConfig {
            smoothing_frames: 0,
            ..VadConfig::webrtc()
        };
        assert_eq!(no_window.validate(), Err(VadError::Window));
        // out-of-range and non-finite samples do not break the detector
        let mut vad = VoiceDetector::new(VadConfig::webrtc(), 8_000, Duration::ZERO).unwrap();
        let d = vad.push(&[f32::NAN, f32::INFINITY, 5.0, -5.0].repeat(40));
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn silero_finds_speech_with_its_hysteresis_and_not_a_cough() {
        let speech = load("utterance_long.wav");
        let lead = RATE as usize / 2;
        let mut audio = vec![0.0; lead];
        audio.extend(&speech);
        audio.extend(vec![0.0; RATE as usize]);
        let (first, last) = loud_span(&audio);
        let config = VadConfig::silero();
        let d = decide(config.clone(), &audio, 333);
        assert_eq!(d.len(), audio.len() / SILERO_FRAME_SAMPLES);
        let frame = |sample: usize| sample / SILERO_FRAME_SAMPLES;
        let onset = d.iter().position(|d| d.speech).expect("speech found");
        assert!(
            onset.abs_diff(frame(first)) <= 2,
            "onset frame {onset}, sound in {}",
            frame(first)
        );
        let offset = d.iter().rposition(|d| d.speech).unwrap();
        assert!(
            offset + 1 >= frame(last) && offset <= frame(last) + 4,
            "last speech frame {offset}, sound ends in frame {}",
            frame(last)
        );
        // the decision is the hysteresis of the probability, frame by frame
        let mut speaking = false;
        for (k, x) in d.iter().enumerate() {
            speaking = x.probability
                >= if speaking {
                    config.release_threshold
                } else {
                    config.threshold
                };
            assert_eq!(x.speech, speaking, "frame {k}");
            assert_eq!(x.duration, SILERO_FRAME);
            assert_eq!(x.at, SILERO_FRAME * k as u32);
        }
        assert!(d[..frame(first)].iter().all(|d| !d.speech));

        let mut cough = vec![0.0; RATE as usize / 2];
        cough.extend(load("cough.wav"));
        cough.extend(vec![0.0; RATE as usize / 2]);
        let d = decide(config, &cough, 320);
        let speech = d.iter().filter(|d| d.speech).count();
        assert!(speech <= 3, "{speech} frames of a cough taken as speech");
    }

    #[test]
    fn silero_pieces_of_any_size_and_reset_give_the_same_decisions() {
        let audio = load("utterance_short.wav");
        let whole = decide(VadConfig::silero(), &audio, audio.len());
        let start = Duration::from_millis(1234);
        let mut vad = VoiceDetector::new(VadConfig::silero(), RATE, start).unwrap();
        let mut pieces = Vec::new();
        for (k, piece) in audio.chunks(97).enumerate() {
            pieces.extend(vad.push(piece));
            if k == 3 {
                assert_eq!(
                    vad.position(),
                    start + Duration::from_nanos(4 * 97 * 62_500)
                );
            }
        }
        assert_eq!(pieces.len(), whole.len());
        for (k, (a, b)) in whole.iter().zip(&pieces).enumerate() {
            assert_eq!(
                (a.probability, a.speech),
                (b.probability, b.speech),
                "frame {k}"
            );
            assert_eq!(b.at, start + SILERO_FRAME * k as u32);
        }
        assert!(whole.iter().any(|d| d.speech));
        vad.reset(Duration::from_secs(10));
        let again = vad.push(&audio);
        for (a, b) in whole.iter().zip(&again) {
            assert_eq!(a.probability, b.probability);
            assert_eq!(b.at, a.at + Duration::from_secs(10));
        }
    }

    #[test]
    fn silero_settings_are_checked() {
        assert_eq!(VadConfig::default().backend, VadBackend::Silero);
        assert_eq!(
            VoiceDetector::new(VadConfig::silero(), 48_000, Duration::ZERO).err(),
            Some(VadError::SileroRate(48_000))
        );
        let frame = VadConfig {
            frame: Duration::from_millis(20),
            ..VadConfig::silero()
        };
        assert_eq!(
            frame.validate(),
            Err(VadError::SileroFrame(Duration::from_millis(20)))
        );
        let release = VadConfig {
            release_threshold: 0.6,
            ..VadConfig::silero()
        };
        let err = release.validate().unwrap_err().to_string();
        assert!(err.contains("0.6") && err.contains("0.5"), "{err}");
        assert_eq!("webrtc".parse(), Ok(VadBackend::WebRtc));
        assert!(
            "energy"
                .parse::<VadBackend>()
                .unwrap_err()
                .contains("energy")
        );
    }
}
