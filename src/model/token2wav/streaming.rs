//! Streaming token2wav: the waveform of an utterance chunk by chunk, while its codes arrive.
//!
//! # How
//!
//! Mel frames are committed in chunks whose edges fall on DiT blocks (`block_size` frames).
//! Chunk `[s, e)` runs the DiT sampler on the window `[s - past, e + future)` alone (the noise of
//! those frames is the matching slice of one noise sequence shared by the whole utterance) and
//! keeps `[s, e)`: the window holds the `past_blocks` blocks before the chunk and the
//! `future_blocks` blocks after it that the DiT's block mask lets a frame see in one evaluation
//! (2 back, 1 ahead for the published model). The window always starts on a block edge, so
//! every block is the same set of frames as in the offline decode. The last chunk (when the
//! Talker has finished) runs on `[s - past, end)`; an utterance that finishes before its first
//! chunk is decoded in one piece, exactly as offline.
//!
//! The vocoder then renders the committed mel with `vocoder_overlap_frames` (20) of left context
//! from the previous chunk, dropping that context's samples. Its right edge is either
//! [`VocoderEdge::HoldBack`] (the reference: the last 20 committed frames are withheld until
//! the next chunk brings real right context) or [`VocoderEdge::Lookahead`] (the default: the
//! window's look-ahead frames, already sampled, serve as the right context, so every committed
//! frame is voiced at once). Chunks grow by one block from `first_chunk_blocks` up to
//! `max_chunk_blocks`: the first audio comes early, and with a Talker faster than real time the
//! audio handed out stays ahead of the next chunk (at exactly real time, playback needs the
//! largest chunk plus the look-ahead buffered, whatever the schedule).
//!
//! [`StreamingOptions::reference`] reproduces the schedule of the original Qwen streaming
//! decoder (`Qwen2Code2wav.fast_forward`, ported 1:1 in vllm-omni: 72-frame chunks, 48 frames of
//! past, 24 of future, 20 frames of vocoder overlap held back); its first audio needs 48 codes.
//!
//! # Figures for the published model (block 24 frames = 12 codes = 240 ms, 2 frames per code)
//!
//! | options | first chunk | DiT look-ahead | first audio after | first audio |
//! | --- | --- | --- | --- | --- |
//! | default ([`StreamingOptions::low_latency`]) | early window of 16 codes | 8 codes = 160 ms | 16 codes (320 ms of speech) | 16 frames = 160 ms |
//! | `low_latency` without the early window (`first_window_codes: 0`) | 1 block = 12 codes | 12 codes = 240 ms | 24 codes (480 ms of speech) | 24 frames = 240 ms |
//! | [`StreamingOptions::reference`] | 3 blocks = 36 codes | 12 codes = 240 ms | 48 codes (960 ms of speech) | 52 frames = 520 ms |
//!
//! Later chunks of the default grow to 2 then 3 blocks (480, 720 ms of audio), each needing
//! its own length plus the 12-code look-ahead.
//!
//! # Distance from the offline decode
//!
//! Streaming is an approximation: one DiT evaluation sees 2 blocks back and 1 ahead, but the
//! sampler chains 36 evaluations, so in the offline decode a frame depends on far more of the
//! utterance than a window holds. Measured (same codes, same noise; README "Streaming
//! token2wav"): on the fixture model 2.0e-4 max abs / 1.3e-4 relative RMS for every option set
//! (`tests/token2wav_streaming.rs` bounds it at 1e-2 / 1 %); at 3B shapes with random weights
//! 4.9e-2 / 1.2e-3 for the default and 1.8e-3 / 1e-4 for the reference schedule.

use candle_core::{Device, Result, Tensor};

use super::dit::{OdeSchedule, SpeakerCondition};
use super::{NoiseSource, Token2Wav};
use crate::model::config::DiTConfig;

/// Samples one DiT window of a stream: the mel `[1, mel_dim, repeats n]` of `codes` from
/// `noise` `[1, repeats n, mel_dim]` on `schedule` ([`Token2Wav::mel`]). The decoder's own
/// thread does it ([`OwnWindows`]), or a runner that batches the windows of many streams.
pub trait WindowSampler {
    fn sample_window(
        &mut self,
        t2w: &Token2Wav,
        speaker: &SpeakerCondition,
        codes: &[u32],
        noise: &Tensor,
        schedule: &OdeSchedule,
    ) -> Result<Tensor>;
}

/// Every window sampled where the decoder runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnWindows;

impl WindowSampler for OwnWindows {
    fn sample_window(
        &mut self,
        t2w: &Token2Wav,
        speaker: &SpeakerCondition,
        codes: &[u32],
        noise: &Tensor,
        schedule: &OdeSchedule,
    ) -> Result<Tensor> {
        t2w.mel(speaker, codes, noise, schedule)
    }
}

/// Where the vocoder's right context comes from at a chunk edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocoderEdge {
    /// Withhold the last `vocoder_overlap_frames` committed frames until the next chunk (the
    /// reference; adds that many frames of delay).
    HoldBack,
    /// Use the DiT window's look-ahead frames (sampled but not committed) as right context and
    /// voice every committed frame at once.
    Lookahead,
}

/// Chunking of the streaming decoder, in DiT blocks (`block_size` mel frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamingOptions {
    /// An early first DiT window over the first this many codes (0: none), used where it is
    /// smaller than the block schedule's first window: it commits all its frames but a
    /// look-ahead (the `future_blocks` look-ahead, at most half the window), so the first
    /// audio needs only these codes. The block schedule then goes on from its first chunk.
    pub first_window_codes: usize,
    /// Size of the first chunk of the block schedule.
    pub first_chunk_blocks: usize,
    /// Each later chunk is one block longer than the one before, up to this size.
    pub max_chunk_blocks: usize,
    /// DiT context before a chunk.
    pub past_blocks: usize,
    /// DiT context after a chunk (the codes a chunk waits for beyond its own).
    pub future_blocks: usize,
    /// Mel frames of vocoder context at chunk edges.
    pub vocoder_overlap_frames: usize,
    pub vocoder_edge: VocoderEdge,
}

impl Default for StreamingOptions {
    fn default() -> Self {
        Self::low_latency()
    }
}

impl StreamingOptions {
    /// First audio after an early window of 16 codes (the block schedule alone: one block plus
    /// the look-ahead, 24 codes for the published model); chunks grow to 3 blocks.
    pub fn low_latency() -> Self {
        Self {
            // the smallest early window within the block schedule's own distance from the
            // offline decode at the published block size (tests/token2wav_streaming.rs)
            first_window_codes: 16,
            first_chunk_blocks: 1,
            max_chunk_blocks: 3,
            past_blocks: 2,
            future_blocks: 1,
            vocoder_overlap_frames: 20,
            vocoder_edge: VocoderEdge::Lookahead,
        }
    }

    /// The original Qwen streaming decoder: 3-block chunks, 2 blocks of past, 1 of future,
    /// 20 frames of vocoder overlap withheld at the right edge.
    pub fn reference() -> Self {
        Self {
            first_window_codes: 0,
            first_chunk_blocks: 3,
            max_chunk_blocks: 3,
            past_blocks: 2,
            future_blocks: 1,
            vocoder_overlap_frames: 20,
            vocoder_edge: VocoderEdge::HoldBack,
        }
    }

    /// Blocks of chunk `index`.
    pub fn chunk_blocks(&self, index: usize) -> usize {
        if index == 0 {
            self.first_chunk_blocks
        } else {
            (self.first_chunk_blocks + index).min(self.max_chunk_blocks)
        }
    }

    fn validate(&self, dit: &DiTConfig) -> Result<()> {
        if self.first_chunk_blocks == 0 || self.max_chunk_blocks == 0 {
            candle_core::bail!(
                "streaming token2wav: chunks must be at least one block (first {}, max {})",
                self.first_chunk_blocks,
                self.max_chunk_blocks
            );
        }
        if self.first_window_codes > 0 && self.first_window_codes * dit.repeats < 2 {
            candle_core::bail!(
                "streaming token2wav: a first window of {} codes holds fewer than 2 frames",
                self.first_window_codes
            );
        }
        Ok(())
    }

    /// Codes of the early first window, if it is smaller than the block schedule's first
    /// window (else there is none: the block schedule alone is already as early).
    fn early_window_codes(&self, dit: &DiTConfig) -> Option<usize> {
        (self.first_window_codes > 0
            && self.first_window_codes < self.block_window_after_codes(dit))
        .then_some(self.first_window_codes)
    }

    /// Look-ahead frames of the early first window of `frames` frames.
    fn first_window_lookahead(&self, frames: usize, block: usize) -> usize {
        (self.future_blocks * block).min(frames / 2)
    }

    /// Codes of the block schedule's first window.
    fn block_window_after_codes(&self, dit: &DiTConfig) -> usize {
        ((self.first_chunk_blocks + self.future_blocks) * dit.block_size).div_ceil(dit.repeats)
    }

    /// Mel frames that can be voiced once `committed` frames are final (before the utterance
    /// ends). With [`VocoderEdge::Lookahead`] the window's look-ahead serves as right context;
    /// only the part of the overlap it does not cover (when blocks are shorter than the
    /// overlap) is held back.
    fn voiced_after(&self, committed: usize, block: usize) -> usize {
        let held = match self.vocoder_edge {
            VocoderEdge::HoldBack => self.vocoder_overlap_frames,
            VocoderEdge::Lookahead => self
                .vocoder_overlap_frames
                .saturating_sub(self.future_blocks * block),
        };
        committed.saturating_sub(held)
    }

    /// How many codes must have arrived before the DiT samples its first window; an utterance
    /// that ends before that is decoded in one piece, as offline.
    pub fn first_window_after_codes(&self, dit: &DiTConfig) -> usize {
        self.early_window_codes(dit)
            .unwrap_or_else(|| self.block_window_after_codes(dit))
    }

    /// How many codes must have arrived before the first audio comes out (for an utterance
    /// that is still going on).
    pub fn first_audio_after_codes(&self, dit: &DiTConfig) -> usize {
        let block = dit.block_size;
        if let Some(codes) = self.early_window_codes(dit) {
            let frames = codes * dit.repeats;
            let committed = frames - self.first_window_lookahead(frames, block);
            if self.voiced_after(committed, block) > 0 {
                return codes;
            }
        }
        let mut committed = 0;
        for index in 0.. {
            committed += self.chunk_blocks(index) * block;
            if self.voiced_after(committed, block) > 0 {
                let frames = committed + self.future_blocks * block;
                return frames.div_ceil(dit.repeats);
            }
        }
        unreachable!("chunks grow until some audio is voiced")
    }
}

/// Where the initial ODE state comes from.
#[derive(Debug, Clone)]
pub enum StreamNoise {
    /// Drawn frame by frame from a seeded generator (as [`Token2Wav::noise_source`]).
    Seeded(Box<NoiseSource>),
    /// A given `[1, frames, mel_dim]` tensor covering the whole utterance.
    Given(Tensor),
}

/// The streaming decoder of one utterance. It holds no reference to the model: every call
/// takes the [`Token2Wav`], so a vocoder thread can own both.
#[derive(Debug)]
pub struct StreamingDecoder {
    speaker: SpeakerCondition,
    schedule: OdeSchedule,
    options: StreamingOptions,
    block: usize,
    repeats: usize,
    mel_dim: usize,
    hop: usize,
    codes: Vec<u32>,
    noise: StreamNoise,
    /// Seeded noise drawn so far, frame-major.
    noise_frames: Vec<f32>,
    /// Codes of the early first window (0: none).
    early_window: usize,
    chunk_index: usize,
    committed: usize,
    /// Committed mel `[1, mel_dim, n]` from frame `mel_start` on (older frames are dropped once
    /// no vocoder call needs them).
    mel: Option<Tensor>,
    mel_start: usize,
    /// Look-ahead frames of the last window, right after `committed`.
    provisional: Option<Tensor>,
    voiced: usize,
    finished: bool,
}

impl StreamNoise {
    /// Noise drawn from `seed` (the same frames as [`Token2Wav::noise_source`] gives offline).
    pub fn seeded(t2w: &Token2Wav, seed: u64) -> Self {
        Self::Seeded(Box::new(t2w.noise_source(seed)))
    }
}

impl StreamingDecoder {
    pub fn new(
        t2w: &Token2Wav,
        speaker: SpeakerCondition,
        schedule: OdeSchedule,
        options: StreamingOptions,
        noise: StreamNoise,
    ) -> Result<Self> {
        let dit = &t2w.config().dit_config;
        options.validate(dit)?;
        let early_window = options.early_window_codes(dit).unwrap_or(0);
        if let StreamNoise::Given(t) = &noise {
            let (b, _, m) = t.dims3()?;
            if b != 1 || m != dit.mel_dim {
                candle_core::bail!(
                    "streaming token2wav: noise must be [1, frames, {}], got {:?}",
                    dit.mel_dim,
                    t.dims()
                );
            }
        }
        Ok(Self {
            speaker,
            schedule,
            options,
            block: dit.block_size,
            repeats: dit.repeats,
            mel_dim: dit.mel_dim,
            hop: t2w.bigvgan().hop_length(),
            codes: Vec::new(),
            noise,
            noise_frames: Vec::new(),
            early_window,
            chunk_index: 0,
            committed: 0,
            mel: None,
            mel_start: 0,
            provisional: None,
            voiced: 0,
            finished: false,
        })
    }

    pub fn options(&self) -> &StreamingOptions {
        &self.options
    }

    /// Codes received so far.
    pub fn codes(&self) -> &[u32] {
        &self.codes
    }

    /// Mel frames committed (final) so far.
    pub fn committed_frames(&self) -> usize {
        self.committed
    }

    /// Waveform samples handed out so far.
    pub fn voiced_samples(&self) -> usize {
        self.voiced * self.hop
    }

    /// Adds codes; returns the waveform samples that became final (often none).
    pub fn push_codes(&mut self, t2w: &Token2Wav, codes: &[u32]) -> Result<Vec<f32>> {
        self.push_codes_with(t2w, &mut OwnWindows, codes)
    }

    /// [`StreamingDecoder::push_codes`], its DiT windows sampled by `windows`.
    pub fn push_codes_with(
        &mut self,
        t2w: &Token2Wav,
        windows: &mut dyn WindowSampler,
        codes: &[u32],
    ) -> Result<Vec<f32>> {
        if self.finished {
            candle_core::bail!("streaming token2wav: codes pushed after finish()");
        }
        self.codes.extend_from_slice(codes);
        let mut out = Vec::new();
        let early = self.early_window * self.repeats;
        if early > 0 && self.committed == 0 && self.codes.len() * self.repeats >= early {
            let end = early - self.options.first_window_lookahead(early, self.block);
            self.commit(t2w, windows, end, early)?;
            // the block schedule starts over from its first chunk
            self.chunk_index = 0;
            out.extend(self.voice(t2w, false)?);
        }
        let future = self.options.future_blocks * self.block;
        loop {
            // chunks end on block edges (the early window's end is inside the first block)
            let start = self.committed / self.block * self.block;
            let end = start + self.options.chunk_blocks(self.chunk_index) * self.block;
            if self.codes.len() * self.repeats < end + future {
                break;
            }
            self.commit(t2w, windows, end, end + future)?;
            out.extend(self.voice(t2w, false)?);
        }
        Ok(out)
    }

    /// The utterance is complete: decodes what is left and returns the remaining samples.
    pub fn finish(&mut self, t2w: &Token2Wav) -> Result<Vec<f32>> {
        self.finish_with(t2w, &mut OwnWindows)
    }

    /// [`StreamingDecoder::finish`], its DiT windows sampled by `windows`.
    pub fn finish_with(
        &mut self,
        t2w: &Token2Wav,
        windows: &mut dyn WindowSampler,
    ) -> Result<Vec<f32>> {
        if self.finished {
            return Ok(Vec::new());
        }
        self.finished = true;
        let total = self.codes.len() * self.repeats;
        if self.committed < total {
            self.commit(t2w, windows, total, total)?;
        }
        if total == 0 {
            return Ok(Vec::new());
        }
        self.voice(t2w, true)
    }

    /// Noise frames `[start, end)` as `[1, end - start, mel_dim]`.
    fn noise(&mut self, start: usize, end: usize) -> Result<Tensor> {
        match &mut self.noise {
            StreamNoise::Given(t) => {
                let have = t.dim(1)?;
                if end > have {
                    candle_core::bail!(
                        "streaming token2wav: the given noise has {have} frames, the utterance needs {end}"
                    );
                }
                t.narrow(1, start, end - start)
            }
            StreamNoise::Seeded(source) => {
                let have = self.noise_frames.len() / self.mel_dim;
                if end > have {
                    self.noise_frames.extend(source.take(end - have));
                }
                let values = self.noise_frames[start * self.mel_dim..end * self.mel_dim].to_vec();
                Tensor::from_vec(values, (1, end - start, self.mel_dim), &Device::Cpu)
            }
        }
    }

    /// Samples the window `[committed - past, window_end)` and commits `[committed, end)`.
    fn commit(
        &mut self,
        t2w: &Token2Wav,
        windows: &mut dyn WindowSampler,
        end: usize,
        window_end: usize,
    ) -> Result<()> {
        let start = self.committed;
        let window_start = start.saturating_sub(self.options.past_blocks * self.block);
        let noise = self.noise(window_start, window_end)?;
        let codes = &self.codes[window_start / self.repeats..window_end / self.repeats];
        // [1, mel, W]
        let mel = windows.sample_window(t2w, &self.speaker, codes, &noise, &self.schedule)?;
        let kept = mel.narrow(2, start - window_start, end - start)?;
        self.provisional = if window_end > end {
            Some(mel.narrow(2, end - window_start, window_end - end)?)
        } else {
            None
        };
        self.mel = Some(match self.mel.take() {
            Some(old) => Tensor::cat(&[old, kept], 2)?,
            None => kept,
        });
        self.committed = end;
        self.chunk_index += 1;
        Ok(())
    }

    /// Vocodes the committed frames that can be voiced now and returns their samples.
    fn voice(&mut self, t2w: &Token2Wav, last: bool) -> Result<Vec<f32>> {
        let target = if last {
            self.committed
        } else {
            self.options.voiced_after(self.committed, self.block)
        };
        if target <= self.voiced {
            return Ok(Vec::new());
        }
        let overlap = self.options.vocoder_overlap_frames;
        let input_start = self.voiced.saturating_sub(overlap).max(self.mel_start);
        let mel = self.mel.as_ref().expect("frames were committed");
        let mut input = mel.narrow(
            2,
            input_start - self.mel_start,
            self.committed - input_start,
        )?;
        if !last
            && self.options.vocoder_edge == VocoderEdge::Lookahead
            && let Some(p) = &self.provisional
        {
            let n = p.dim(2)?.min(overlap);
            if n > 0 {
                input = Tensor::cat(&[input, p.narrow(2, 0, n)?], 2)?;
            }
        }
        let wav = t2w.vocode(&input)?;
        let from = (self.voiced - input_start) * self.hop;
        let to = (target - input_start) * self.hop;
        let samples = wav[from..to].to_vec();
        self.voiced = target;
        // Keep only the frames the next vocoder call reads.
        let keep_from = self.voiced.saturating_sub(overlap).max(self.mel_start);
        if keep_from > self.mel_start {
            let len = self.committed - keep_from;
            self.mel = Some(
                mel.narrow(2, keep_from - self.mel_start, len)?
                    .contiguous()?,
            );
            self.mel_start = keep_from;
        }
        Ok(samples)
    }
}

/// The maximum absolute difference and the relative RMS error of `streamed` against `offline`.
/// A stream of another length (a truncated one) or with a non-finite sample is an error, never
/// a small distance.
pub fn waveform_distance(streamed: &[f32], offline: &[f32]) -> Result<(f32, f32)> {
    if streamed.len() != offline.len() {
        candle_core::bail!(
            "streamed waveform has {} samples, the offline one {}",
            streamed.len(),
            offline.len()
        );
    }
    let mut max = 0f32;
    let (mut err, mut energy) = (0f64, 0f64);
    for (i, (a, b)) in streamed.iter().zip(offline).enumerate() {
        if !a.is_finite() || !b.is_finite() {
            candle_core::bail!("sample {i} is not finite: streamed {a}, offline {b}");
        }
        let d = (a - b).abs();
        max = max.max(d);
        err += (d as f64).powi(2);
        energy += (*b as f64).powi(2);
    }
    let rel = if energy > 0.0 {
        (err / energy).sqrt() as f32
    } else {
        0.0
    };
    Ok((max, rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dit(block: usize, repeats: usize) -> DiTConfig {
        serde_json::from_str(&format!(
            r#"{{"block_size": {block}, "repeats": {repeats}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn first_audio_needs_first_chunk_plus_lookahead() {
        let published = dit(24, 2);
        // The early first window comes before the block schedule's 24 codes.
        let low = StreamingOptions::low_latency();
        assert!(low.first_window_codes > 0 && low.first_window_codes < 24);
        assert_eq!(
            low.first_audio_after_codes(&published),
            low.first_window_codes
        );
        let without_early_window = StreamingOptions {
            first_window_codes: 0,
            ..StreamingOptions::low_latency()
        };
        assert_eq!(without_early_window.first_audio_after_codes(&published), 24);
        assert_eq!(
            StreamingOptions::reference().first_audio_after_codes(&published),
            48
        );
        // Holding back 20 frames behind 4-frame blocks waits for more chunks: 4, 12, 24 frames
        // committed, 24 > 20 after the third, plus 4 frames of look-ahead.
        let tiny = dit(4, 2);
        let hold = StreamingOptions {
            first_chunk_blocks: 1,
            max_chunk_blocks: 3,
            vocoder_edge: VocoderEdge::HoldBack,
            ..StreamingOptions::low_latency()
        };
        assert_eq!(hold.first_audio_after_codes(&tiny), (24 + 4) / 2);
    }

    #[test]
    fn chunks_grow_to_the_maximum() {
        let o = StreamingOptions::low_latency();
        let sizes: Vec<usize> = (0..5).map(|i| o.chunk_blocks(i)).collect();
        assert_eq!(sizes, vec![1, 2, 3, 3, 3]);
        let r = StreamingOptions::reference();
        assert!((0..5).all(|i| r.chunk_blocks(i) == 3));
    }

    #[test]
    fn distance_is_max_and_relative_rms() {
        let (max, rel) = waveform_distance(&[1.0, 0.0, 2.0], &[1.0, 0.5, 2.0]).unwrap();
        assert_eq!(max, 0.5);
        assert!((rel - (0.25f32 / 5.25).sqrt()).abs() < 1e-6);
    }

    #[test]
    fn distance_refuses_a_truncated_or_non_finite_stream() {
        let err = waveform_distance(&[1.0, 0.0], &[1.0, 0.5, 2.0]).unwrap_err();
        assert!(
            err.to_string().contains("has 2 samples, the offline one 3"),
            "{err}"
        );
        let err = waveform_distance(&[1.0, f32::NAN, 2.0], &[1.0, 0.5, 2.0]).unwrap_err();
        assert!(err.to_string().contains("sample 1 is not finite"), "{err}");
    }
}
