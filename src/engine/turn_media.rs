//! A user turn's media, encoded block by block as the blocks close: the audio through the
//! streaming log-mel front end and the block-wise audio encoder, the camera frames through
//! the video processor and the vision encoder.
//!
//! The audio of a turn is one utterance, as the reference sees a clip: log-mel frames are
//! released in groups of one audio-encoder chunk (`FloorPolicy::Groups`, see `media::mel` for
//! the one difference from the whole clip, the dynamic-range floor), each chunk is encoded as
//! soon as its last frame is known, and the stream is flushed at the end of the turn (zeros to
//! the right, as the reference pads the clip). A block comes with a look-ahead (the first
//! samples of the next block) so that its last frames, and with the published model (a 2-s
//! encoder chunk per 2-s block) all of its audio tokens, are ready when it closes. The next
//! block's first samples were then already fed: they are skipped. When the encoder chunk does
//! not divide the block (the tiny test model), the tokens of a chunk that straddles two blocks
//! come with the next block.
//!
//! Each block's frames are prepared and encoded on their own: the vision encoder attends
//! within one temporal grid, so a block's grids give the same embeddings as the whole video.

use anyhow::{Context as _, Result, ensure};
use candle_core::{Device, Tensor};

use super::input::InputBlock;
use crate::media::image::RgbView;
use crate::media::mel::{FloorPolicy, LogMel, MelStream};
use crate::media::video::VideoPreprocessor;
use crate::model::thinker::audio_encoder::{AudioEncoder, AudioEncoderStream};
use crate::model::thinker::vision_encoder::VisionEncoder;

/// The encoders and front ends of a session (cheap clones of the loaded model's).
#[derive(Clone)]
pub struct MediaEncoders {
    pub audio: AudioEncoder,
    pub vision: VisionEncoder,
    pub mel: LogMel,
    pub video: VideoPreprocessor,
    pub device: Device,
}

/// A block's camera frames, encoded.
#[derive(Debug, Clone)]
pub struct EncodedVideo {
    /// `[tokens, hidden]` vision embeddings, temporal grid after temporal grid.
    pub embeds: Tensor,
    /// Each temporal grid's (h, w) in patches.
    pub grids: Vec<(usize, usize)>,
}

impl MediaEncoders {
    /// Prepares and encodes the frames of one block (any number; padded to the temporal
    /// patch by repeating the last).
    pub fn encode_frames(
        &self,
        frames: &[crate::engine::session::VideoInput],
    ) -> Result<EncodedVideo> {
        ensure!(!frames.is_empty(), "no camera frames to encode");
        let views = frames
            .iter()
            .map(|f| RgbView::new(f.width, f.height, &f.rgb))
            .collect::<Result<Vec<_>, _>>()
            .context("camera frame")?;
        let prepared = self
            .video
            .prepare(&views)
            .context("preparing camera frames")?;
        let [t, h, w] = prepared.patches.grid_thw;
        let pixels = prepared.patches.to_tensor(&self.device)?;
        let embeds = self
            .vision
            .forward(&pixels, &[[t, h, w]])
            .context("vision encoder")?;
        Ok(EncodedVideo {
            embeds,
            grids: vec![(h, w); t],
        })
    }

    /// A fresh audio state for a new turn.
    pub fn turn_audio(&self) -> Result<TurnAudio> {
        let mel = self
            .mel
            .stream(FloorPolicy::Groups(self.audio.chunk_frames()))
            .context("log-mel stream")?;
        Ok(TurnAudio {
            mel,
            stream: self.audio.stream(),
            next_block_at: 0,
            fed: 0,
            ready: Vec::new(),
            ready_rows: 0,
            taken: 0,
            finished: false,
        })
    }
}

/// The audio of one turn on its way to embeddings.
#[derive(Clone)]
pub struct TurnAudio {
    mel: MelStream,
    stream: AudioEncoderStream,
    /// Turn sample index where the next block starts, and of the next sample to feed.
    next_block_at: usize,
    fed: usize,
    /// Embeddings computed and not yet taken, in order.
    ready: Vec<Tensor>,
    ready_rows: usize,
    taken: usize,
    finished: bool,
}

impl TurnAudio {
    /// Feeds a block's audio (and its look-ahead); embeddings of every encoder chunk it
    /// completes become [`TurnAudio::available`].
    pub fn push_block(&mut self, encoders: &MediaEncoders, block: &InputBlock) -> Result<()> {
        ensure!(!self.finished, "audio pushed after the turn's end");
        let start = self.next_block_at;
        self.next_block_at += block.audio.len();
        // The previous block's look-ahead already fed the first samples of this one.
        let skip = self.fed.saturating_sub(start).min(block.audio.len());
        self.feed(encoders, &block.audio[skip..])?;
        if !block.last {
            self.feed(encoders, &block.lookahead)?;
        }
        Ok(())
    }

    /// Ends the turn's audio: the last frames (zeros to their right) and the last partial
    /// encoder chunk.
    pub fn finish(&mut self, encoders: &MediaEncoders) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let frames = self.mel.flush();
        if !frames.is_empty() {
            let t = frames.to_tensor(&encoders.device)?;
            if let Some(e) = self.stream.push(&encoders.audio, &t)? {
                self.keep(e)?;
            }
        }
        if let Some(e) = self.stream.flush(&encoders.audio)? {
            self.keep(e)?;
        }
        Ok(())
    }

    fn feed(&mut self, encoders: &MediaEncoders, samples: &[f32]) -> Result<()> {
        if samples.is_empty() {
            return Ok(());
        }
        self.fed += samples.len();
        let frames = self.mel.push(samples).context("log-mel features")?;
        if frames.is_empty() {
            return Ok(());
        }
        let t = frames.to_tensor(&encoders.device)?;
        if let Some(e) = self
            .stream
            .push(&encoders.audio, &t)
            .context("audio encoder")?
        {
            self.keep(e)?;
        }
        Ok(())
    }

    fn keep(&mut self, embeds: Tensor) -> Result<()> {
        self.ready_rows += embeds.dim(0)?;
        self.ready.push(embeds);
        Ok(())
    }

    /// Embeddings computed and not yet taken.
    pub fn available(&self) -> usize {
        self.ready_rows
    }

    /// Embeddings taken so far (the turn's audio token index of the next one).
    pub fn taken(&self) -> usize {
        self.taken
    }

    /// Whether the turn's audio is complete (every embedding is computed).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The next `n` embeddings `[n, hidden]` (`0 < n <= available()`).
    pub fn take(&mut self, n: usize) -> Result<Tensor> {
        ensure!(
            n > 0 && n <= self.ready_rows,
            "{n} audio embeddings asked, {} ready",
            self.ready_rows
        );
        let all = if self.ready.len() == 1 {
            self.ready.pop().expect("one piece")
        } else {
            Tensor::cat(&std::mem::take(&mut self.ready), 0)?
        };
        let rest = all.dim(0)? - n;
        self.ready = if rest > 0 {
            vec![all.narrow(0, n, rest)?]
        } else {
            Vec::new()
        };
        self.ready_rows = rest;
        self.taken += n;
        Ok(all.narrow(0, 0, n)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::blocks::Block;
    use crate::model::loading::ModelFiles;
    use crate::model::omni::OmniModel;
    use candle_core::DType;
    use std::time::Duration;

    fn encoders() -> MediaEncoders {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let model = OmniModel::load(
            &ModelFiles::from_dir(&dir).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        MediaEncoders {
            audio: model.audio_encoder.clone(),
            vision: model.vision_encoder.clone(),
            mel: LogMel::new(&model.processor.feature_extractor).unwrap(),
            video: VideoPreprocessor::new(&model.processor.video_processor, 2.0).unwrap(),
            device: Device::Cpu,
        }
    }

    fn signal(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f32 / 16_000.0;
                0.3 * (2.0 * std::f32::consts::PI * 180.0 * t).sin() * (3.0 * t).sin()
            })
            .collect()
    }

    #[test]
    fn blocks_with_lookahead_give_the_embeddings_of_the_whole_turn() -> Result<()> {
        let enc = encoders();
        let rate = enc.mel.sampling_rate();
        let block = 2 * rate;
        let lookahead = enc.mel.n_fft() / 2;
        let audio = signal(5 * rate + rate / 3);
        // The whole turn through one stream.
        let mut whole = enc.turn_audio()?;
        whole.feed(&enc, &audio)?;
        whole.finish(&enc)?;
        let want = whole.take(whole.available())?;
        // Block by block, each with its look-ahead.
        let mut turn = enc.turn_audio()?;
        let mut got = Vec::new();
        let mut start = 0;
        let mut index = 0;
        while start < audio.len() {
            let end = (start + block).min(audio.len());
            let last = end == audio.len();
            let b: InputBlock = Block {
                index,
                start: Duration::from_secs_f64(start as f64 / rate as f64),
                duration: Duration::from_secs_f64((end - start) as f64 / rate as f64),
                audio: audio[start..end].to_vec(),
                frames: Vec::new(),
                last,
                lookahead: if last {
                    Vec::new()
                } else {
                    audio[end..(end + lookahead).min(audio.len())].to_vec()
                },
            };
            turn.push_block(&enc, &b)?;
            if last {
                turn.finish(&enc)?;
            }
            if turn.available() > 0 {
                got.push(turn.take(turn.available())?);
            }
            start = end;
            index += 1;
        }
        assert!(turn.finished());
        let got = Tensor::cat(&got, 0)?;
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        assert!(turn.take(1).is_err(), "nothing left");
        Ok(())
    }

    #[test]
    fn a_block_of_frames_is_one_grid_per_temporal_patch() -> Result<()> {
        let enc = encoders();
        let frame = crate::engine::session::VideoInput {
            at: Duration::ZERO,
            width: 64,
            height: 48,
            rgb: std::sync::Arc::new(vec![90u8; 64 * 48 * 3]),
        };
        let video = enc.encode_frames(&[frame.clone(), frame.clone(), frame.clone(), frame])?;
        assert_eq!(video.grids.len(), 2);
        let (h, w) = video.grids[0];
        assert_eq!(video.embeds.dim(0)?, 2 * h * w / 4);
        assert!(enc.encode_frames(&[]).is_err());
        Ok(())
    }
}
