//! Whisper log-mel features, on a whole clip or incrementally on a stream.
//!
//! [`LogMel`] computes what the published `WhisperFeatureExtractor` computes (all sizes read from
//! [`FeatureExtractorConfig`]): periodic Hann window, STFT with `center=True` reflect padding,
//! power spectrum, Slaney-scale / Slaney-normalised mel filter bank from 0 to 8 kHz, then
//! `log10(max(x, 1e-10))`, the dynamic-range floor `max(x, utterance_max - 8)`, and `(x + 4) / 4`.
//!
//! The reference zero-pads every clip to `chunk_length` seconds (300 s) before the STFT and
//! truncates longer clips to it. The valid frames are the first `ceil(n_samples / hop)`; they see
//! reflect padding on the left and the zeros of that padding on the right, and the utterance
//! maximum is taken over the whole padded array, which includes the few frames just after the
//! valid ones that still overlap the end of the audio. [`LogMel::features`] reproduces all of it.
//!
//! # Streaming and the dynamic-range floor
//!
//! [`MelStream`] takes 16 kHz samples in pieces of any size and computes each frame as soon as it
//! is defined: frame `t` is centred on sample `t * hop` and needs `n_fft / 2` samples to its right
//! (frame 0 one more, for its reflect padding). [`MelStream::flush`] ends the utterance: the
//! missing right context is zeros, exactly as in the whole-clip path. The raw `log10` frames of a
//! stream are therefore bit for bit those of the whole clip.
//!
//! The floor `max(x, M - 8)` needs the maximum `M` of the whole utterance, which a stream does not
//! know yet. Policy ([`FloorPolicy`]): frames are released in groups of `n` frames aligned on frame
//! 0 (the last group at flush), and every frame of a group is floored with the maximum `M_g` of all
//! raw values from the start of the utterance to the end of that group (at flush: to the end, the
//! trailing frames that overlap the audio included). With `n` equal to the audio encoder's chunk
//! (`2 * n_window` frames, one 2-s block for the published model) this adds no latency: the
//! encoder cannot run a chunk before its last frame anyway. The result does not depend on how the
//! samples were cut into pieces. Against the whole clip (`M >= M_g`):
//!
//! * a released value `s` and the whole-clip value `w` satisfy `0 <= w - s <= (M - M_g) / 4`;
//! * they are equal whenever `M_g == M` (the loudest moment of the utterance is at or before the
//!   group: typically the first word of a turn), and for every value with `x >= M - 8`;
//! * [`FloorPolicy::Utterance`] holds every frame until flush and is exactly the whole clip.
//!
//! Unlike the whole-clip path, a stream has no 300-s limit (nothing is truncated); flush it at the
//! end of every user turn so that each turn is one utterance, as the reference sees it.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

use crate::model::config::FeatureExtractorConfig;

/// `WhisperFeatureExtractor` fixes the top of its filter bank at 8 kHz whatever the sample rate.
const MAX_MEL_FREQUENCY: f64 = 8000.0;
/// Power below this is clamped before the log (`log10(1e-10) = -10`).
const MIN_POWER: f64 = 1e-10;
/// Dynamic range kept below the utterance maximum, in log10 units (80 dB).
const DYNAMIC_RANGE: f64 = 8.0;

#[derive(Debug, thiserror::Error)]
pub enum MelError {
    #[error("feature extractor config: {0}")]
    Config(String),
    #[error("no audio: zero samples")]
    Empty,
    #[error("audio sample {index} is not a finite number ({value})")]
    NotFinite { index: u64, value: f32 },
    #[error("floor policy: a group must hold at least one frame")]
    EmptyGroup,
}

/// Log-mel frames in time order, `n_mels` values per frame.
#[derive(Debug, Clone, PartialEq)]
pub struct MelFrames {
    n_mels: usize,
    /// Frame-major: frame `t` is `data[t * n_mels..(t + 1) * n_mels]`.
    data: Vec<f32>,
}

impl MelFrames {
    pub fn new(n_mels: usize) -> Self {
        Self {
            n_mels,
            data: Vec::new(),
        }
    }

    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.n_mels).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The `n_mels` values of frame `t`.
    pub fn frame(&self, t: usize) -> &[f32] {
        &self.data[t * self.n_mels..(t + 1) * self.n_mels]
    }

    /// All values, frame-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// Appends the frames of `other` (same `n_mels`).
    pub fn append(&mut self, other: &MelFrames) {
        debug_assert_eq!(self.n_mels, other.n_mels);
        self.data.extend_from_slice(&other.data);
    }

    /// The frames as `[n_mels, n_frames]` f32, the layout the audio tower takes.
    pub fn to_tensor(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_slice(&self.data, (self.len(), self.n_mels), device)?
            .t()?
            .contiguous()
    }
}

/// One triangle of the filter bank: its non-zero weights from `first_bin` on.
#[derive(Debug, Clone)]
struct MelFilter {
    first_bin: usize,
    weights: Vec<f64>,
}

/// The log-mel front end of one feature-extractor config (cheap to clone).
#[derive(Clone)]
pub struct LogMel {
    n_fft: usize,
    hop: usize,
    n_mels: usize,
    sampling_rate: usize,
    /// Length the reference pads (and truncates) every clip to.
    max_samples: usize,
    window: Arc<[f64]>,
    filters: Arc<[MelFilter]>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for LogMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMel")
            .field("n_fft", &self.n_fft)
            .field("hop", &self.hop)
            .field("n_mels", &self.n_mels)
            .field("sampling_rate", &self.sampling_rate)
            .field("max_samples", &self.max_samples)
            .finish()
    }
}

/// Work buffers of one frame computation.
#[derive(Clone)]
struct Scratch {
    input: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    fft: Vec<Complex<f64>>,
    power: Vec<f64>,
}

impl LogMel {
    pub fn new(cfg: &FeatureExtractorConfig) -> Result<Self, MelError> {
        let bad = |m: String| Err(MelError::Config(m));
        if cfg.n_fft < 2 {
            return bad(format!("n_fft {} must be at least 2", cfg.n_fft));
        }
        if cfg.hop_length == 0 {
            return bad("hop_length must be > 0".into());
        }
        if cfg.feature_size == 0 {
            return bad("feature_size (mel bins) must be > 0".into());
        }
        if cfg.sampling_rate == 0 {
            return bad("sampling_rate must be > 0".into());
        }
        if cfg.dither != 0.0 {
            // The reference adds unseeded Gaussian noise: nothing to be at parity with.
            return bad(format!("dither {} is not supported (only 0)", cfg.dither));
        }
        let max_samples = cfg.chunk_length * cfg.sampling_rate;
        if max_samples <= cfg.n_fft / 2 {
            return bad(format!(
                "chunk_length {} s is shorter than half an FFT window",
                cfg.chunk_length
            ));
        }
        let window: Vec<f64> = (0..cfg.n_fft)
            .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / cfg.n_fft as f64).cos())
            .collect();
        let filters = slaney_filter_bank(
            cfg.n_fft / 2 + 1,
            cfg.feature_size,
            MAX_MEL_FREQUENCY,
            cfg.sampling_rate,
        );
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(cfg.n_fft);
        Ok(Self {
            n_fft: cfg.n_fft,
            hop: cfg.hop_length,
            n_mels: cfg.feature_size,
            sampling_rate: cfg.sampling_rate,
            max_samples,
            window: window.into(),
            filters: filters.into(),
            fft,
        })
    }

    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    pub fn hop_length(&self) -> usize {
        self.hop
    }

    pub fn n_fft(&self) -> usize {
        self.n_fft
    }

    pub fn sampling_rate(&self) -> usize {
        self.sampling_rate
    }

    /// Valid frames of a clip of `n_samples` samples: `ceil(n / hop)` after truncation to the
    /// reference's longest clip.
    pub fn valid_frames(&self, n_samples: usize) -> usize {
        n_samples.min(self.max_samples).div_ceil(self.hop)
    }

    /// Frames of the reference's padded output (`chunk_length` seconds): those of a centred
    /// STFT, less the last.
    pub fn padded_frames(&self) -> usize {
        (self.max_samples + 2 * (self.n_fft / 2) - self.n_fft) / self.hop
    }

    /// The valid log-mel frames of a whole clip, as the reference processor computes them.
    pub fn features(&self, samples: &[f32]) -> Result<MelFrames, MelError> {
        let n_valid = self.valid_frames(samples.len());
        self.padded_features(samples, n_valid)
    }

    /// The first `keep` frames (at most [`Self::padded_frames`]) of the reference's output
    /// padded to `chunk_length` seconds: the valid frames, then frames that overlap the end of
    /// the audio, then frames of pure padding (all equal to the floor).
    pub fn padded_features(&self, samples: &[f32], keep: usize) -> Result<MelFrames, MelError> {
        if samples.is_empty() {
            return Err(MelError::Empty);
        }
        check_finite(samples, 0)?;
        let samples = &samples[..samples.len().min(self.max_samples)];
        let total = self.padded_frames();
        let keep = keep.min(total);
        let n_valid = self.valid_frames(samples.len());
        let virtual_len = self.max_samples as isize;
        let half = (self.n_fft / 2) as isize;
        let fetch = |i: isize| -> f32 {
            // Reflect at both ends of the padded clip (torch's center padding), zeros after
            // the audio.
            let mut i = i;
            if i < 0 {
                i = -i;
            }
            if i >= virtual_len {
                i = 2 * (virtual_len - 1) - i;
            }
            samples.get(i as usize).copied().unwrap_or(0.0)
        };
        let touches_audio = |t: usize| -> bool {
            let start = (t * self.hop) as isize - half;
            let end = start + self.n_fft as isize; // exclusive
            let len = samples.len() as isize;
            // Left part, reflected at 0, and the part up to the end of the padded clip.
            start < len
                // The part past the end of the padded clip reflects back onto the audio.
                || (end > virtual_len && 2 * (virtual_len - 1) - (end - 1) < len)
        };
        let kept = keep.max(n_valid);
        let mut scratch = self.scratch();
        let mut raw = Vec::with_capacity(kept * self.n_mels);
        let mut max = f64::NEG_INFINITY;
        let mut frame = Vec::with_capacity(self.n_mels);
        for t in 0..total {
            let needed = t < kept;
            // Frames of pure padding hold log10(MIN_POWER), the least any frame can hold: they
            // cannot move the maximum, so only the ones asked for are computed.
            if !needed && !touches_audio(t) {
                continue;
            }
            frame.clear();
            self.raw_frame(t, &fetch, &mut scratch, &mut frame);
            max = frame.iter().copied().fold(max, f64::max);
            if needed {
                raw.extend_from_slice(&frame);
            }
        }
        let mut out = normalise(&raw, max, self.n_mels);
        out.data.truncate(keep * self.n_mels);
        Ok(out)
    }

    /// A stream of this front end with the given floor policy.
    pub fn stream(&self, policy: FloorPolicy) -> Result<MelStream, MelError> {
        if let FloorPolicy::Groups(0) = policy {
            return Err(MelError::EmptyGroup);
        }
        Ok(MelStream {
            mel: self.clone(),
            policy,
            buffer: Vec::new(),
            buffer_start: 0,
            received: 0,
            next_frame: 0,
            pending: Vec::new(),
            pending_start: 0,
            max: f64::NEG_INFINITY,
            scratch: self.scratch(),
        })
    }

    fn scratch(&self) -> Scratch {
        Scratch {
            input: self.fft.make_input_vec(),
            spectrum: self.fft.make_output_vec(),
            fft: self.fft.make_scratch_vec(),
            power: vec![0.0; self.n_fft / 2 + 1],
        }
    }

    /// Appends the `n_mels` raw values `log10(max(mel power, 1e-10))` of frame `t`, reading the
    /// padded signal through `fetch` (index relative to the first real sample).
    fn raw_frame(
        &self,
        t: usize,
        fetch: &impl Fn(isize) -> f32,
        scratch: &mut Scratch,
        out: &mut Vec<f64>,
    ) {
        let start = (t * self.hop) as isize - (self.n_fft / 2) as isize;
        for (k, (x, w)) in scratch.input.iter_mut().zip(self.window.iter()).enumerate() {
            *x = fetch(start + k as isize) as f64 * w;
        }
        self.fft
            .process_with_scratch(&mut scratch.input, &mut scratch.spectrum, &mut scratch.fft)
            .expect("buffers made by the plan have its sizes");
        for (p, c) in scratch.power.iter_mut().zip(&scratch.spectrum) {
            *p = c.norm_sqr();
        }
        for filter in self.filters.iter() {
            let bins = &scratch.power[filter.first_bin..filter.first_bin + filter.weights.len()];
            let energy: f64 = bins.iter().zip(&filter.weights).map(|(p, w)| p * w).sum();
            out.push(energy.max(MIN_POWER).log10());
        }
    }
}

/// How a stream floors its frames before the utterance maximum is known (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorPolicy {
    /// Release frames in groups of this many, each floored with the maximum up to its end.
    /// `Groups(1)`: every frame as soon as it is defined, with the running maximum.
    Groups(usize),
    /// Hold every frame until flush: exactly the whole-clip features.
    Utterance,
}

/// Incremental log-mel features of one utterance at a time (see the module doc).
#[derive(Clone)]
pub struct MelStream {
    mel: LogMel,
    policy: FloorPolicy,
    /// Samples from absolute index `buffer_start` on.
    buffer: Vec<f32>,
    buffer_start: usize,
    received: usize,
    next_frame: usize,
    /// Raw frames computed but not yet released, frame-major, from frame `pending_start`.
    pending: Vec<f64>,
    pending_start: usize,
    /// Maximum raw value of the released frames.
    max: f64,
    scratch: Scratch,
}

impl MelStream {
    pub fn n_mels(&self) -> usize {
        self.mel.n_mels
    }

    pub fn policy(&self) -> FloorPolicy {
        self.policy
    }

    /// Samples pushed since the utterance started.
    pub fn samples_received(&self) -> usize {
        self.received
    }

    /// Frames released since the utterance started.
    pub fn frames_released(&self) -> usize {
        self.pending_start
    }

    /// The floor maximum used for the frames released so far (`-inf` before the first).
    pub fn floor_max(&self) -> f64 {
        self.max
    }

    /// Feeds samples at the config's rate; returns the frames this released (maybe none).
    pub fn push(&mut self, samples: &[f32]) -> Result<MelFrames, MelError> {
        check_finite(samples, self.received as u64)?;
        self.buffer.extend_from_slice(samples);
        self.received += samples.len();
        let half = self.mel.n_fft / 2;
        loop {
            let t = self.next_frame;
            let centre = t * self.mel.hop;
            // The window's right part, and for the first frames the reflected left part.
            let needed = (centre + self.mel.n_fft - half).max(half.saturating_sub(centre) + 1);
            if self.received < needed {
                break;
            }
            self.compute_frame(t);
        }
        self.drop_consumed_samples();
        let mut out = MelFrames::new(self.mel.n_mels);
        if let FloorPolicy::Groups(n) = self.policy {
            // Group by group: each is floored with the maximum up to its own end.
            while self.pending_len() >= n {
                out.append(&self.release(n));
            }
        }
        Ok(out)
    }

    /// Ends the utterance: computes the remaining frames with zeros to the right, releases
    /// everything, and resets the stream for the next utterance.
    pub fn flush(&mut self) -> MelFrames {
        let n_valid = self.received.div_ceil(self.mel.hop);
        while self.next_frame < n_valid {
            self.compute_frame(self.next_frame);
        }
        // Frames past the valid ones that still overlap the audio count for the maximum.
        let half = self.mel.n_fft / 2;
        let mut t = n_valid;
        let mut tail = Vec::with_capacity(self.mel.n_mels);
        while self.received > 0 && t * self.mel.hop < self.received + half {
            tail.clear();
            self.raw_frame_from_buffer(t, &mut tail);
            self.max = tail.iter().copied().fold(self.max, f64::max);
            t += 1;
        }
        let out = self.release(self.pending_len());
        self.reset();
        out
    }

    /// Forgets the current utterance.
    pub fn reset(&mut self) {
        self.buffer.clear();
        self.buffer_start = 0;
        self.received = 0;
        self.next_frame = 0;
        self.pending.clear();
        self.pending_start = 0;
        self.max = f64::NEG_INFINITY;
    }

    fn pending_len(&self) -> usize {
        self.pending.len() / self.mel.n_mels
    }

    fn compute_frame(&mut self, t: usize) {
        let mut frame = std::mem::take(&mut self.pending);
        self.raw_frame_from_buffer(t, &mut frame);
        self.pending = frame;
        self.next_frame = t + 1;
    }

    fn raw_frame_from_buffer(&mut self, t: usize, out: &mut Vec<f64>) {
        let (buffer, start) = (&self.buffer, self.buffer_start as isize);
        let fetch = |i: isize| -> f32 {
            let i = i.abs();
            // Samples not received yet are the zeros after the utterance (only read at flush).
            buffer.get((i - start) as usize).copied().unwrap_or(0.0)
        };
        self.mel.raw_frame(t, &fetch, &mut self.scratch, out);
    }

    /// Drops samples no later frame reads (while frames reflect the start, nothing is dropped).
    fn drop_consumed_samples(&mut self) {
        let half = self.mel.n_fft / 2;
        let first_needed = (self.next_frame * self.mel.hop).saturating_sub(half);
        if first_needed > self.buffer_start {
            let drop = (first_needed - self.buffer_start).min(self.buffer.len());
            self.buffer.drain(..drop);
            self.buffer_start += drop;
        }
    }

    /// Floors and releases the first `n` pending frames.
    fn release(&mut self, n: usize) -> MelFrames {
        let n_mels = self.mel.n_mels;
        let raw: Vec<f64> = self.pending.drain(..n * n_mels).collect();
        self.max = raw.iter().copied().fold(self.max, f64::max);
        self.pending_start += n;
        normalise(&raw, self.max, n_mels)
    }
}

/// `(max(x, max - 8) + 4) / 4` of raw frames.
fn normalise(raw: &[f64], max: f64, n_mels: usize) -> MelFrames {
    let floor = max - DYNAMIC_RANGE;
    MelFrames {
        n_mels,
        data: raw
            .iter()
            .map(|&x| ((x.max(floor) + 4.0) / 4.0) as f32)
            .collect(),
    }
}

fn check_finite(samples: &[f32], offset: u64) -> Result<(), MelError> {
    match samples.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(MelError::NotFinite {
            index: offset + i as u64,
            value: samples[i],
        }),
        None => Ok(()),
    }
}

/// Slaney mel scale (linear below 1 kHz, logarithmic above), as transformers' `hertz_to_mel`.
fn hertz_to_mel(hz: f64) -> f64 {
    const MIN_LOG_HZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 27.0 / 6.4f64.ln();
    if hz >= MIN_LOG_HZ {
        MIN_LOG_MEL + (hz / MIN_LOG_HZ).ln() * logstep
    } else {
        3.0 * hz / 200.0
    }
}

fn mel_to_hertz(mel: f64) -> f64 {
    const MIN_LOG_HZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HZ * (logstep * (mel - MIN_LOG_MEL)).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// numpy's `linspace(start, stop, n)` (endpoint included, last value exact).
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// transformers' `mel_filter_bank(n_freqs, n_mels, 0, max_hz, rate, norm="slaney",
/// mel_scale="slaney")`, kept as the non-zero run of each triangle.
fn slaney_filter_bank(
    n_freqs: usize,
    n_mels: usize,
    max_hz: f64,
    sampling_rate: usize,
) -> Vec<MelFilter> {
    let mels = linspace(hertz_to_mel(0.0), hertz_to_mel(max_hz), n_mels + 2);
    let hz: Vec<f64> = mels.into_iter().map(mel_to_hertz).collect();
    let fft_freqs = linspace(0.0, (sampling_rate / 2) as f64, n_freqs);
    (0..n_mels)
        .map(|m| {
            let (lo, centre, hi) = (hz[m], hz[m + 1], hz[m + 2]);
            let enorm = 2.0 / (hi - lo);
            let weights: Vec<f64> = fft_freqs
                .iter()
                .map(|&f| {
                    let down = (f - lo) / (centre - lo);
                    let up = (hi - f) / (hi - centre);
                    down.min(up).max(0.0) * enorm
                })
                .collect();
            let first = weights.iter().position(|&w| w != 0.0);
            let last = weights.iter().rposition(|&w| w != 0.0);
            match (first, last) {
                (Some(a), Some(b)) => MelFilter {
                    first_bin: a,
                    weights: weights[a..=b].to_vec(),
                },
                // A filter narrower than a bin is all zeros, as in the reference.
                _ => MelFilter {
                    first_bin: 0,
                    weights: Vec::new(),
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published() -> LogMel {
        LogMel::new(&FeatureExtractorConfig::default()).unwrap()
    }

    /// A deterministic test signal: two tones and a little xorshift noise, loud from
    /// `loud_from` samples on.
    fn signal(n: usize, loud_from: usize) -> Vec<f32> {
        signal_with_gain(n, |i| if i >= loud_from { 0.8 } else { 0.05 })
    }

    fn signal_with_gain(n: usize, gain: impl Fn(usize) -> f32) -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let t = i as f32 / 16000.0;
                gain(i) * (2.0 * std::f32::consts::PI * 440.0 * t).sin()
                    + 0.03 * (2.0 * std::f32::consts::PI * 2900.0 * t).sin()
                    + 0.01 * noise
            })
            .collect()
    }

    fn stream_all(mel: &LogMel, policy: FloorPolicy, x: &[f32], piece: usize) -> MelFrames {
        let mut stream = mel.stream(policy).unwrap();
        let mut out = MelFrames::new(mel.n_mels());
        for part in x.chunks(piece) {
            out.append(&stream.push(part).unwrap());
        }
        out.append(&stream.flush());
        out
    }

    #[test]
    fn filter_bank_matches_transformers() {
        // Values of transformers' mel_filter_bank(201, 128, 0, 8000, 16000, "slaney", "slaney").
        let mel = published();
        let weight = |m: usize, bin: usize| {
            let f = &mel.filters[m];
            bin.checked_sub(f.first_bin)
                .and_then(|i| f.weights.get(i))
                .copied()
                .unwrap_or(0.0)
        };
        assert_eq!(mel.filters.len(), 128);
        assert!((weight(0, 1) - 0.012373986332636965).abs() < 1e-15);
        assert!((weight(1, 1) - 0.03039256487135522).abs() < 1e-15);
        assert!((weight(80, 63) - 0.0149405469039324).abs() < 1e-15);
        assert!((weight(127, 199) - 0.001114280198753211).abs() < 1e-15);
        assert_eq!(weight(127, 200), 0.0);
        assert_eq!(
            (mel.filters[127].first_bin, mel.filters[127].weights.len()),
            (191, 9)
        );
    }

    #[test]
    fn periodic_hann_window() {
        let mel = published();
        assert_eq!(mel.window[0], 0.0);
        assert!((mel.window[mel.n_fft / 2] - 1.0).abs() < 1e-15);
        // Periodic: symmetric around n_fft / 2, not (n_fft - 1) / 2.
        assert!((mel.window[1] - mel.window[mel.n_fft - 1]).abs() < 1e-15);
    }

    #[test]
    fn valid_frames_and_padding() {
        let mel = published();
        assert_eq!(mel.valid_frames(1), 1);
        assert_eq!(mel.valid_frames(160), 1);
        assert_eq!(mel.valid_frames(161), 2);
        assert_eq!(mel.valid_frames(10 * 4_800_000), 30_000);
        assert_eq!(mel.padded_frames(), 30_000);
        let x = signal(3_000, 0);
        let f = mel.features(&x).unwrap();
        assert_eq!((f.len(), f.n_mels()), (19, 128));
        // Pure padding sits at the floor: ((max - 8) + 4) / 4 for every bin.
        let padded = mel.padded_features(&x, 40).unwrap();
        assert_eq!(padded.as_slice()[..f.as_slice().len()], *f.as_slice());
        let floor = padded.frame(39)[0];
        assert!(padded.frame(39).iter().all(|&v| v == floor));
        assert!(padded.as_slice().iter().all(|&v| v >= floor));
    }

    #[test]
    fn stream_holding_the_utterance_is_the_whole_clip() {
        let mel = published();
        for (n, loud_from) in [(52_801, 30_000), (150, 0), (401, 0), (16_000, 8_000)] {
            let x = signal(n, loud_from);
            let whole = mel.features(&x).unwrap();
            for piece in [1, 7, 160, 333, 4096, n] {
                let streamed = stream_all(&mel, FloorPolicy::Utterance, &x, piece);
                assert!(streamed == whole, "{n} samples in pieces of {piece}");
            }
        }
    }

    #[test]
    fn other_sizes_stream_like_the_whole_clip() {
        // An odd FFT size and another hop and bank: readiness and padding follow the config.
        let cfg = FeatureExtractorConfig {
            n_fft: 401,
            hop_length: 100,
            feature_size: 40,
            chunk_length: 30,
            ..FeatureExtractorConfig::default()
        };
        let mel = LogMel::new(&cfg).unwrap();
        // torch.stft gives 1 + (480000 + 400 - 401) / 100 = 4800 frames, the last dropped.
        assert_eq!(mel.padded_frames(), 4_799);
        let x = signal(12_345, 6_000);
        let whole = mel.features(&x).unwrap();
        assert_eq!((whole.len(), whole.n_mels()), (124, 40));
        for piece in [1, 99, 1_000] {
            assert!(stream_all(&mel, FloorPolicy::Utterance, &x, piece) == whole);
        }
    }

    #[test]
    fn grouped_floor_is_bounded_and_exact_once_the_max_is_seen() {
        let mel = published();
        // Quiet first, loud from 2.5 s: frames before the loud part are floored lower.
        let x = signal(64_000, 40_000);
        let whole = mel.features(&x).unwrap();
        let whole_max = whole.as_slice().iter().copied().fold(f32::MIN, f32::max);
        for group in [1, 16, 200] {
            let reference = stream_all(&mel, FloorPolicy::Groups(group), &x, 1_000);
            for piece in [3, 999, 48_000] {
                let streamed = stream_all(&mel, FloorPolicy::Groups(group), &x, piece);
                assert!(
                    streamed == reference,
                    "pieces of {piece} changed the result"
                );
            }
            assert_eq!(reference.len(), whole.len());
            let mut differing = 0;
            for t in 0..whole.len() {
                // The group's maximum in normalised units: at least its largest value.
                let g = t / group;
                let end = ((g + 1) * group).min(whole.len());
                let group_max = (0..end)
                    .flat_map(|u| reference.frame(u).iter().copied())
                    .fold(f32::MIN, f32::max);
                for (s, w) in reference.frame(t).iter().zip(whole.frame(t)) {
                    let gap = w - s;
                    assert!(gap >= -1e-6, "frame {t}: streamed above whole clip");
                    assert!(
                        gap <= (whole_max - group_max) + 1e-6,
                        "frame {t}: gap {gap}"
                    );
                    if gap > 0.0 {
                        differing += 1;
                    }
                }
                if group_max == whole_max {
                    assert!(
                        reference.frame(t) == whole.frame(t),
                        "frame {t} after the max"
                    );
                }
            }
            assert!(differing > 0, "the quiet start must show the policy");
        }
    }

    #[test]
    fn stream_with_loud_start_is_exact() {
        let mel = published();
        // Loudest in the first 2-s group, then quieter: every group sees the maximum.
        let x = signal_with_gain(80_000, |i| if i < 16_000 { 0.9 } else { 0.3 });
        let whole = mel.features(&x).unwrap();
        let streamed = stream_all(&mel, FloorPolicy::Groups(200), &x, 777);
        assert!(streamed == whole);
    }

    #[test]
    fn frames_come_out_as_soon_as_defined() {
        let mel = published();
        let mut stream = mel.stream(FloorPolicy::Groups(1)).unwrap();
        // Frame 0 needs n_fft/2 + 1 samples (its reflected left half reads sample n_fft/2).
        assert_eq!(stream.push(&vec![0.1; 200]).unwrap().len(), 0);
        assert_eq!(stream.push(&[0.1]).unwrap().len(), 1);
        // Frame 1 needs samples up to 160 + 200.
        assert_eq!(stream.push(&vec![0.1; 158]).unwrap().len(), 0);
        assert_eq!(stream.push(&[0.1]).unwrap().len(), 1);
        assert_eq!(stream.frames_released(), 2);
        // Flush: ceil(360 / 160) = 3 frames in all, then a fresh utterance.
        assert_eq!(stream.flush().len(), 1);
        assert_eq!(stream.samples_received(), 0);
        assert_eq!(stream.flush().len(), 0);
    }

    #[test]
    fn bad_input_is_rejected() {
        let mel = published();
        assert!(matches!(mel.features(&[]), Err(MelError::Empty)));
        let mut x = signal(1_000, 0);
        x[321] = f32::NAN;
        let err = mel.features(&x).unwrap_err();
        assert!(err.to_string().contains("sample 321"), "{err}");
        let mut stream = mel.stream(FloorPolicy::Groups(1)).unwrap();
        stream.push(&[0.0; 10]).unwrap();
        let err = stream.push(&[0.0, f32::INFINITY]).unwrap_err();
        assert!(err.to_string().contains("sample 11"), "{err}");
        assert!(matches!(
            mel.stream(FloorPolicy::Groups(0)),
            Err(MelError::EmptyGroup)
        ));
        let bad = FeatureExtractorConfig {
            hop_length: 0,
            ..FeatureExtractorConfig::default()
        };
        assert!(
            LogMel::new(&bad)
                .unwrap_err()
                .to_string()
                .contains("hop_length")
        );
        let dither = FeatureExtractorConfig {
            dither: 1e-5,
            ..FeatureExtractorConfig::default()
        };
        assert!(
            LogMel::new(&dither)
                .unwrap_err()
                .to_string()
                .contains("dither")
        );
    }
}
