//! The echo of a loudspeaker in a microphone: [`EchoCanceller`] removes it (WebRTC's AEC3, with
//! the noise suppressor and high-pass filter of the same audio processing module, through the
//! `sonora` crate, a pure-Rust port of it), and [`EchoPath`] makes it, for files and tests: the
//! far end delayed, attenuated and smeared by a short room response, as a loudspeaker a little
//! way from the microphone would.
//!
//! Both work on mono 10 ms frames (the canceller) or any pieces (the path) of f32 samples in
//! [-1, 1]; the caller keeps the two streams in step: each far-end ("render") frame is handed
//! to the canceller before the microphone ("capture") frame recorded while it played, so that
//! only the acoustic delay is left for AEC3's delay estimator to find.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sonora::config::{EchoCanceller as Aec3, HighPassFilter, NoiseSuppression};
use sonora::{AudioProcessing, StreamConfig};

/// Lowest and highest rates the audio processing module takes.
pub const MIN_CANCELLER_RATE: u32 = 8_000;
pub const MAX_CANCELLER_RATE: u32 = 384_000;

/// Length of the canceller's frames.
pub const CANCELLER_FRAME: Duration = Duration::from_millis(10);

/// Samples in one 10 ms frame at `rate`.
pub fn frame_len(rate: u32) -> usize {
    (rate / 100) as usize
}

/// What runs on the microphone besides the echo canceller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancellerConfig {
    /// WebRTC's noise suppressor (moderate level, about 12 dB on stationary noise).
    pub noise_suppression: bool,
    /// WebRTC's high-pass filter (removes DC and rumble below about 80 Hz).
    pub high_pass: bool,
}

impl Default for CancellerConfig {
    fn default() -> Self {
        Self {
            noise_suppression: true,
            high_pass: true,
        }
    }
}

impl fmt::Display for CancellerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "noise suppression {}, high-pass filter {}",
            on(self.noise_suppression),
            on(self.high_pass)
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CancellerError {
    #[error(
        "echo canceller: the {what} rate {rate} Hz is outside \
         {MIN_CANCELLER_RATE}..={MAX_CANCELLER_RATE} Hz"
    )]
    Rate { what: &'static str, rate: u32 },
    #[error(
        "echo canceller: a {what} frame must be 10 ms ({expected} samples at {rate} Hz), not \
         {got} samples"
    )]
    FrameLength {
        what: &'static str,
        rate: u32,
        expected: usize,
        got: usize,
    },
    #[error("echo canceller: {0}")]
    Processing(String),
}

/// The canceller's view of the echo, as AEC3 estimates it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CancellerStats {
    /// Delay from a far-end frame to its echo in the microphone.
    pub delay_ms: Option<i32>,
    /// Echo return loss enhancement: how much weaker the echo is after the canceller's linear
    /// filter than before it, in dB.
    pub erle_db: Option<f64>,
    /// Echo return loss: how much weaker the echo is in the microphone than the far end, in dB.
    pub erl_db: Option<f64>,
    /// Microphone frames processed.
    pub frames: u64,
}

impl fmt::Display for CancellerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let db = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} dB"));
        write!(
            f,
            "estimated delay {}, ERLE {}, ERL {}",
            self.delay_ms.map_or("-".to_string(), |d| format!("{d} ms")),
            db(self.erle_db),
            db(self.erl_db)
        )
    }
}

/// WebRTC's AEC3 on one microphone at `capture_rate` against one far end at `render_rate`.
pub struct EchoCanceller {
    apm: AudioProcessing,
    config: CancellerConfig,
    capture_rate: u32,
    render_rate: u32,
    /// Where a processed frame goes before it is copied back (the module reads and writes
    /// separate buffers).
    scratch: Vec<f32>,
    /// Where the module copies the far end it passes through (unused).
    render_scratch: Vec<f32>,
    frames: u64,
}

impl fmt::Debug for EchoCanceller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EchoCanceller")
            .field("config", &self.config)
            .field("capture_rate", &self.capture_rate)
            .field("render_rate", &self.render_rate)
            .field("frames", &self.frames)
            .finish()
    }
}

fn check_rate(what: &'static str, rate: u32) -> Result<(), CancellerError> {
    if (MIN_CANCELLER_RATE..=MAX_CANCELLER_RATE).contains(&rate) {
        Ok(())
    } else {
        Err(CancellerError::Rate { what, rate })
    }
}

impl EchoCanceller {
    pub fn new(
        capture_rate: u32,
        render_rate: u32,
        config: CancellerConfig,
    ) -> Result<Self, CancellerError> {
        check_rate("microphone", capture_rate)?;
        check_rate("far-end", render_rate)?;
        let apm_config = sonora::Config {
            echo_canceller: Some(Aec3 {
                // AEC3 would otherwise switch the filter on whatever the caller asked
                enforce_high_pass_filtering: config.high_pass,
                ..Aec3::default()
            }),
            noise_suppression: config.noise_suppression.then(NoiseSuppression::default),
            high_pass_filter: config.high_pass.then(HighPassFilter::default),
            ..sonora::Config::default()
        };
        let apm = AudioProcessing::builder()
            .config(apm_config)
            .capture_config(StreamConfig::new(capture_rate, 1))
            .render_config(StreamConfig::new(render_rate, 1))
            .build();
        Ok(Self {
            apm,
            config,
            capture_rate,
            render_rate,
            scratch: vec![0.0; frame_len(capture_rate)],
            render_scratch: vec![0.0; frame_len(render_rate)],
            frames: 0,
        })
    }

    pub fn config(&self) -> CancellerConfig {
        self.config
    }

    pub fn capture_rate(&self) -> u32 {
        self.capture_rate
    }

    pub fn render_rate(&self) -> u32 {
        self.render_rate
    }

    fn check_frame(what: &'static str, rate: u32, frame: &[f32]) -> Result<(), CancellerError> {
        let expected = frame_len(rate);
        if frame.len() != expected {
            return Err(CancellerError::FrameLength {
                what,
                rate,
                expected,
                got: frame.len(),
            });
        }
        Ok(())
    }

    /// Takes 10 ms of what the loudspeaker plays.
    pub fn process_render(&mut self, frame: &[f32]) -> Result<(), CancellerError> {
        Self::check_frame("far-end", self.render_rate, frame)?;
        self.apm
            .process_render_f32(&[frame], &mut [&mut self.render_scratch])
            .map_err(|e| CancellerError::Processing(e.to_string()))
    }

    /// Removes the echo from 10 ms of microphone audio, in place.
    pub fn process_capture(&mut self, frame: &mut [f32]) -> Result<(), CancellerError> {
        Self::check_frame("microphone", self.capture_rate, frame)?;
        // The far end is handed over in step with the microphone: no delay is left to report
        // beyond the acoustic one, which AEC3 estimates itself.
        let _ = self.apm.set_stream_delay_ms(0);
        self.apm
            .process_capture_f32(&[frame], &mut [&mut self.scratch])
            .map_err(|e| CancellerError::Processing(e.to_string()))?;
        frame.copy_from_slice(&self.scratch);
        self.frames += 1;
        Ok(())
    }

    pub fn stats(&self) -> CancellerStats {
        let s = self.apm.statistics();
        CancellerStats {
            delay_ms: s.delay_ms,
            erle_db: s.echo_return_loss_enhancement,
            erl_db: s.echo_return_loss,
            frames: self.frames,
        }
    }
}

/// A loudspeaker's echo in a microphone: `delay` after the far end plays, `gain_db` louder
/// (0 dB: as loud as it plays, -20 dB: a tenth of its amplitude).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EchoPathConfig {
    pub delay: Duration,
    pub gain_db: f32,
}

impl EchoPathConfig {
    /// Longest delay taken: AEC3 looks for echoes up to about half a second late.
    pub const MAX_DELAY: Duration = Duration::from_millis(500);
    /// Range of gains taken, in dB.
    pub const GAIN_RANGE_DB: (f32, f32) = (-60.0, 12.0);

    pub fn validate(&self) -> Result<(), EchoPathError> {
        if self.delay > Self::MAX_DELAY {
            return Err(EchoPathError::Delay(self.delay));
        }
        let (low, high) = Self::GAIN_RANGE_DB;
        if !(self.gain_db.is_finite() && (low..=high).contains(&self.gain_db)) {
            return Err(EchoPathError::Gain(self.gain_db));
        }
        Ok(())
    }
}

impl fmt::Display for EchoPathConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms, {:+} dB", self.delay.as_millis(), self.gain_db)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EchoPathError {
    #[error(
        "echo path \"{0}\" is not DELAY_MS,GAIN_DB (like 40,-12: the echo 40 ms late, 12 dB \
         quieter than played)"
    )]
    Syntax(String),
    #[error("echo delay {0:?} is over 500 ms (AEC3 looks for echoes up to about half a second)")]
    Delay(Duration),
    #[error("echo gain {0} dB is outside -60..=12 dB")]
    Gain(f32),
}

impl FromStr for EchoPathConfig {
    type Err = EchoPathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || EchoPathError::Syntax(s.to_string());
        let (delay, gain) = s.split_once(',').ok_or_else(syntax)?;
        let delay: f64 = delay.trim().parse().map_err(|_| syntax())?;
        let gain_db: f32 = gain.trim().parse().map_err(|_| syntax())?;
        if !(delay.is_finite() && delay >= 0.0) {
            return Err(syntax());
        }
        let delay = Duration::from_secs_f64(delay / 1000.0);
        let config = Self { delay, gain_db };
        config.validate()?;
        Ok(config)
    }
}

/// The room between the loudspeaker and the microphone: the direct sound, then a few
/// reflections (walls, desk, ceiling) arriving later and weaker, some with their phase turned.
/// (milliseconds after the direct sound, level in dB relative to it)
const ROOM_RESPONSE: [(f32, f32); 6] = [
    (0.0, 0.0),
    (2.3, -6.0),
    (5.9, -9.0),
    (11.3, -13.0),
    (19.7, -18.0),
    (32.9, -24.0),
];

/// A simulated loudspeaker-to-microphone path at one rate: a delay line through the room
/// response, scaled by the gain. Streams: push the far end in pieces of any length, get the
/// echo of each sample back in step (the echo of far-end sample `n` lands at `n + delay`).
#[derive(Debug, Clone)]
pub struct EchoPath {
    config: EchoPathConfig,
    /// (delay in samples, gain) of each arrival.
    taps: Vec<(usize, f32)>,
    /// The last `longest tap + 1` far-end samples, oldest first, as a ring.
    history: Vec<f32>,
    head: usize,
}

impl EchoPath {
    pub fn new(config: EchoPathConfig, rate: u32) -> Result<Self, EchoPathError> {
        config.validate()?;
        let rate = rate.max(1) as f64;
        let delay = (config.delay.as_secs_f64() * rate).round() as usize;
        let gain = 10f32.powf(config.gain_db / 20.0);
        let taps: Vec<(usize, f32)> = ROOM_RESPONSE
            .iter()
            .enumerate()
            .map(|(k, &(ms, db))| {
                let sign = if k % 2 == 0 { 1.0 } else { -1.0 };
                (
                    delay + (ms as f64 * rate / 1000.0).round() as usize,
                    sign * gain * 10f32.powf(db / 20.0),
                )
            })
            .collect();
        let longest = taps.iter().map(|&(d, _)| d).max().unwrap_or(0);
        Ok(Self {
            config,
            taps,
            history: vec![0.0; longest + 1],
            head: 0,
        })
    }

    pub fn config(&self) -> EchoPathConfig {
        self.config
    }

    /// The echo of `far_end` (and of what came before it), one sample per sample pushed.
    pub fn process(&mut self, far_end: &[f32]) -> Vec<f32> {
        let len = self.history.len();
        far_end
            .iter()
            .map(|&x| {
                self.history[self.head] = x;
                let echo = self
                    .taps
                    .iter()
                    .map(|&(d, g)| g * self.history[(self.head + len - d) % len])
                    .sum();
                self.head = (self.head + 1) % len;
                echo
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Real speech: espeak-ng's voice (tests/media/README.md), twice over.
    fn speech(rate: u32) -> Vec<f32> {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/media/utterance_long.wav");
        let once = crate::media::audio_file::load_audio_at(path, rate).unwrap();
        let mut twice = once.clone();
        twice.extend(&once);
        twice
    }

    fn power(x: &[f32]) -> f64 {
        x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len().max(1) as f64
    }

    fn db(ratio: f64) -> f64 {
        10.0 * ratio.log10()
    }

    #[test]
    fn the_path_delays_attenuates_and_adds_the_room() {
        let rate = 16_000;
        let config = EchoPathConfig {
            delay: ms(40),
            gain_db: -20.0,
        };
        let mut path = EchoPath::new(config, rate).unwrap();
        let mut impulse = vec![0.0f32; 2000];
        impulse[0] = 1.0;
        // in pieces of any length: the same as one
        let mut echo = path.process(&impulse[..7]);
        echo.extend(path.process(&impulse[7..]));
        let first = echo.iter().position(|&v| v != 0.0).unwrap();
        assert_eq!(first, 640, "40 ms at 16 kHz");
        assert!((echo[640] - 0.1).abs() < 1e-6, "-20 dB: {}", echo[640]);
        let arrivals = echo.iter().filter(|&&v| v != 0.0).count();
        assert_eq!(arrivals, ROOM_RESPONSE.len());
        let last = echo.iter().rposition(|&v| v != 0.0).unwrap();
        assert_eq!(last, 640 + (32.9f32 * 16.0).round() as usize);
        assert!(
            echo[last].abs() < echo[640].abs() / 10.0,
            "reflections decay"
        );
    }

    #[test]
    fn echo_path_settings_are_parsed_and_bad_ones_named() {
        let c: EchoPathConfig = "40,-12".parse().unwrap();
        assert_eq!((c.delay, c.gain_db), (ms(40), -12.0));
        let c: EchoPathConfig = " 0 , 0 ".parse().unwrap();
        assert_eq!((c.delay, c.gain_db), (ms(0), 0.0));
        let err = |s: &str| s.parse::<EchoPathConfig>().unwrap_err();
        assert!(matches!(err("40"), EchoPathError::Syntax(_)));
        assert!(matches!(err("-5,0"), EchoPathError::Syntax(_)));
        assert!(matches!(err("a,b"), EchoPathError::Syntax(_)));
        assert_eq!(err("900,0"), EchoPathError::Delay(ms(900)));
        assert_eq!(err("40,30"), EchoPathError::Gain(30.0));
        assert!(err("40,nan").to_string().contains("gain"));
    }

    #[test]
    fn bad_rates_and_frames_are_refused_with_the_reason() {
        let err = EchoCanceller::new(4_000, 16_000, CancellerConfig::default()).unwrap_err();
        assert!(err.to_string().contains("microphone rate 4000 Hz"), "{err}");
        let mut aec = EchoCanceller::new(16_000, 24_000, CancellerConfig::default()).unwrap();
        let err = aec.process_render(&[0.0; 160]).unwrap_err();
        assert!(err.to_string().contains("240 samples at 24000 Hz"), "{err}");
        let err = aec.process_capture(&mut [0.0; 100]).unwrap_err();
        assert!(err.to_string().contains("160 samples"), "{err}");
    }

    /// Far end at 24 kHz (the model's voice), microphone at 16 kHz hearing it through the room
    /// 60 ms late and 6 dB down; how much weaker the echo is after the canceller, measured on
    /// the second pass of the speech (the canceller has converged on the first).
    #[test]
    fn the_canceller_removes_most_of_a_speech_echo_once_converged() {
        let (render_rate, capture_rate) = (24_000, 16_000);
        let far_end = speech(render_rate);
        let far_at_mic = speech(capture_rate);
        let mut path = EchoPath::new(
            EchoPathConfig {
                delay: ms(60),
                gain_db: -6.0,
            },
            capture_rate,
        )
        .unwrap();
        let echo = path.process(&far_at_mic);
        let mut aec =
            EchoCanceller::new(capture_rate, render_rate, CancellerConfig::default()).unwrap();
        let (rf, cf) = (frame_len(render_rate), frame_len(capture_rate));
        let frames = (far_end.len() / rf).min(echo.len() / cf);
        let mut out = Vec::with_capacity(frames * cf);
        for k in 0..frames {
            aec.process_render(&far_end[k * rf..(k + 1) * rf]).unwrap();
            let mut frame = echo[k * cf..(k + 1) * cf].to_vec();
            aec.process_capture(&mut frame).unwrap();
            out.extend(frame);
        }
        let half = out.len() / 2;
        let reduction = db(power(&echo[half..out.len()]) / power(&out[half..]));
        let stats = aec.stats();
        eprintln!("echo reduced by {reduction:.1} dB; AEC3: {stats}");
        assert!(reduction > 20.0, "echo only {reduction:.1} dB weaker");
        assert_eq!(stats.frames, frames as u64);
        let delay = stats.delay_ms.expect("a delay estimate");
        assert!((50..=80).contains(&delay), "delay estimate {delay} ms");
        assert!(stats.erle_db.expect("an ERLE estimate") > 3.0, "{stats}");
    }

    #[test]
    fn without_an_echo_near_end_speech_passes() {
        let rate = 16_000;
        let talk = speech(rate);
        let mut aec = EchoCanceller::new(rate, rate, CancellerConfig::default()).unwrap();
        let n = frame_len(rate);
        let silence = vec![0.0; n];
        let mut out = Vec::new();
        for frame in talk.chunks_exact(n) {
            aec.process_render(&silence).unwrap();
            let mut frame = frame.to_vec();
            aec.process_capture(&mut frame).unwrap();
            out.extend(frame);
        }
        let kept = db(power(&out) / power(&talk[..out.len()]));
        assert!(kept > -3.0, "near-end speech lost {kept:.1} dB");
    }
}
