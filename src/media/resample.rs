//! Mono sample-rate conversion with rubato's synchronous FFT resampler: whole clips, and streams
//! fed in pieces of any size (microphone 48 kHz -> 16 kHz for the model, the model's 24 kHz
//! voice -> 48 kHz for Opus).

use audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

/// The largest rate accepted, in Hz; anything above is a broken input, not audio.
pub const MAX_SAMPLE_RATE: u32 = 384_000;
/// The smallest rate accepted, in Hz.
pub const MIN_SAMPLE_RATE: u32 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    #[error("unsupported sample rate {0} Hz (expected {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE})")]
    Rate(u32),
    #[error("resampler: {0}")]
    Rubato(String),
}

fn check_rate(rate: u32) -> Result<(), ResampleError> {
    if (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
        Ok(())
    } else {
        Err(ResampleError::Rate(rate))
    }
}

fn rubato_error(e: impl std::fmt::Display) -> ResampleError {
    ResampleError::Rubato(e.to_string())
}

/// Resamples a whole mono clip from `from` Hz to `to` Hz; the output is aligned with the input
/// (no startup delay) and `ceil(len * to / from)` samples long.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>, ResampleError> {
    check_rate(from)?;
    check_rate(to)?;
    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let mut fft = Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Both)
        .map_err(rubato_error)?;
    let input = InterleavedSlice::new(samples, 1, samples.len()).map_err(rubato_error)?;
    let out = fft
        .process_all(&input, samples.len(), None)
        .map_err(rubato_error)?;
    let mut out = out.take_data();
    out.truncate((samples.len() as u64 * to as u64).div_ceil(from as u64) as usize);
    Ok(out)
}

/// A streaming mono resampler: push pieces of any length, get back every output sample that
/// is already defined. Its output lags the input by the FFT block delay, which is trimmed, so
/// the n-th output sample is the same as in [`resample`] of the whole stream.
pub struct StreamResampler {
    from: u32,
    to: u32,
    fft: Option<Fft<f32>>,
    pending: Vec<f32>,
    /// Output samples still to drop (the resampler's startup delay).
    delay_left: usize,
    pushed: u64,
    emitted: u64,
}

impl StreamResampler {
    pub fn new(from: u32, to: u32) -> Result<Self, ResampleError> {
        check_rate(from)?;
        check_rate(to)?;
        let fft = if from == to {
            None
        } else {
            // 10 ms input chunks keep the delay short; FixedSync::Input lets any size be pushed.
            let chunk = (from as usize / 100).max(1);
            Some(
                Fft::<f32>::new(from as usize, to as usize, chunk, 1, FixedSync::Input)
                    .map_err(rubato_error)?,
            )
        };
        let delay_left = fft.as_ref().map(|f| f.output_delay()).unwrap_or(0);
        Ok(Self {
            from,
            to,
            fft,
            pending: Vec::new(),
            delay_left,
            pushed: 0,
            emitted: 0,
        })
    }

    pub fn input_rate(&self) -> u32 {
        self.from
    }

    pub fn output_rate(&self) -> u32 {
        self.to
    }

    /// Feeds `samples`; returns the output samples this made available.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<f32>, ResampleError> {
        self.pushed += samples.len() as u64;
        let Some(fft) = self.fft.as_mut() else {
            self.emitted += samples.len() as u64;
            return Ok(samples.to_vec());
        };
        self.pending.extend_from_slice(samples);
        let mut out = Vec::new();
        let mut used = 0;
        while self.pending.len() - used >= fft.input_frames_next() {
            let need = fft.input_frames_next();
            let chunk = &self.pending[used..used + need];
            let input = InterleavedSlice::new(chunk, 1, need).map_err(rubato_error)?;
            let produced = fft.process(&input, None).map_err(rubato_error)?.take_data();
            used += need;
            let skip = self.delay_left.min(produced.len());
            self.delay_left -= skip;
            out.extend_from_slice(&produced[skip..]);
        }
        self.pending.drain(..used);
        self.emitted += out.len() as u64;
        Ok(out)
    }

    /// Ends the stream: pushes silence until every sample owed for the input is out, and
    /// returns the rest. The resampler can be reused afterwards.
    pub fn flush(&mut self) -> Result<Vec<f32>, ResampleError> {
        let owed = (self.pushed * self.to as u64).div_ceil(self.from as u64);
        let mut out = Vec::new();
        if let Some(fft) = self.fft.as_ref() {
            let chunk = fft.input_frames_next();
            while self.emitted + (out.len() as u64) < owed {
                let pushed = self.pushed;
                out.extend(self.push(&vec![0.0; chunk])?);
                self.pushed = pushed;
            }
        }
        let keep = owed.saturating_sub(self.emitted - out.len() as u64) as usize;
        out.truncate(keep);
        self.reset();
        Ok(out)
    }

    /// Forgets everything pushed so far.
    pub fn reset(&mut self) {
        if let Some(fft) = self.fft.as_mut() {
            fft.reset();
            self.delay_left = fft.output_delay();
        }
        self.pending.clear();
        self.pushed = 0;
        self.emitted = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f32, rate: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    #[test]
    fn whole_clip_keeps_length_and_tone() {
        let x = sine(440.0, 48_000, 48_000);
        let y = resample(&x, 48_000, 16_000).unwrap();
        assert_eq!(y.len(), 16_000);
        let want = sine(440.0, 16_000, 16_000);
        let err = y[200..15_800]
            .iter()
            .zip(&want[200..15_800])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-2, "max error {err}");
    }

    #[test]
    fn stream_in_odd_pieces_matches_the_whole_clip() {
        let x = sine(300.0, 24_000, 24_000);
        let whole = resample(&x, 24_000, 48_000).unwrap();
        let mut s = StreamResampler::new(24_000, 48_000).unwrap();
        let mut streamed = Vec::new();
        for piece in x.chunks(333) {
            streamed.extend(s.push(piece).unwrap());
        }
        streamed.extend(s.flush().unwrap());
        assert_eq!(streamed.len(), whole.len());
        let err = streamed[100..]
            .iter()
            .zip(&whole[100..])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-2, "max error {err}");
        let tone = sine(300.0, 48_000, 48_000);
        let err = streamed[500..47_000]
            .iter()
            .zip(&tone[500..47_000])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-2, "stream vs tone {err}");
    }

    #[test]
    fn absurd_rates_are_refused_and_equal_rates_pass_through() {
        assert!(matches!(
            resample(&[0.0; 10], 0, 16_000),
            Err(ResampleError::Rate(0))
        ));
        assert!(StreamResampler::new(16_000, 10_000_000).is_err());
        let mut s = StreamResampler::new(16_000, 16_000).unwrap();
        assert_eq!(s.push(&[0.5, -0.5]).unwrap(), vec![0.5, -0.5]);
        assert!(s.flush().unwrap().is_empty());
    }
}
