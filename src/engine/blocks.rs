//! The block assembler: cuts a user turn's live audio and video into blocks of
//! `seconds_per_chunk` (2 s) aligned on media timestamps, the unit the streaming Thinker
//! prefills. Video is sampled at the model's fps at fixed instants of each block.
//!
//! Robustness rules:
//! - a block closes when media time passes its end (`advance_to`), whatever the camera does;
//! - missing audio (a gap in timestamps) is silence; audio older than the open block is dropped
//!   (it arrived too late) and counted; overlapping audio overwrites;
//! - each video sample instant takes the newest frame at or before it; a camera that froze
//!   keeps showing its last picture; frames from before the turn or out of order are fine;
//!   of the frames between two instants only the newest is kept (the only one an instant can
//!   take), so a 30 fps camera costs the memory of the 2 fps the model sees; frames older than
//!   the open block are dropped and counted;
//! - a turn with no camera frame at all is an audio-only turn.
//!
//! The sample instants are `turn_start + k / fps` for k = 0, 1, ... over the whole turn, which
//! is why a block must hold a whole number of temporal patches of frames
//! ([`BlockConfig::validate`]): each block then starts a new temporal grid of the vision
//! encoder, one grid every `temporal_patch_size / fps` seconds, as the reference's 2-s
//! interleaving of video and audio tokens assumes.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::config::{ProcessorConfig, ThinkerConfig};

/// One closed block of a user turn.
#[derive(Debug, Clone)]
pub struct Block<F> {
    /// 0-based index within the turn.
    pub index: usize,
    /// Media time of the block start.
    pub start: Duration,
    /// Length of the block (`block_len`, shorter for the last block of a turn).
    pub duration: Duration,
    /// Mono audio at the assembler's rate covering the block.
    pub audio: Vec<f32>,
    /// Video frames sampled at the model's fps, padded to a multiple of the temporal patch
    /// (by repeating the last one); empty for an audio-only turn.
    pub frames: Vec<F>,
    /// Whether this block ends the turn.
    pub last: bool,
    /// The audio right after the block (the first samples of the next one), as much of the
    /// assembler's look-ahead as the turn has: the right context the log-mel features of the
    /// block's last frames need. Empty for the last block and without look-ahead.
    pub lookahead: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockConfig {
    /// Rate of the blocks' audio: the model's feature extractor rate.
    pub sample_rate: u32,
    /// Length of a full block: the Thinker's `seconds_per_chunk`.
    pub block_len: Duration,
    /// Camera frames sampled per second of the turn.
    pub video_fps: f64,
    /// Frames per temporal patch of the vision encoder.
    pub temporal_patch_size: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BlockConfigError {
    #[error("block sample rate must be > 0")]
    SampleRate,
    #[error("block length must be > 0 (thinker_config.seconds_per_chunk)")]
    BlockLen,
    #[error("video fps {0} must be finite and > 0")]
    Fps(f64),
    #[error("temporal_patch_size must be > 0")]
    TemporalPatch,
    #[error("block look-ahead {lookahead:?} is longer than a block ({block_len:?})")]
    Lookahead {
        lookahead: Duration,
        block_len: Duration,
    },
    #[error(
        "a {block_len:?} block at {fps} fps holds {frames} frames, not a whole multiple of \
         temporal_patch_size {temporal_patch_size}: blocks would not start on a temporal grid"
    )]
    Grid {
        block_len: Duration,
        fps: f64,
        frames: f64,
        temporal_patch_size: usize,
    },
}

impl BlockConfig {
    /// The blocks the model expects: `seconds_per_chunk` of the Thinker, audio at the feature
    /// extractor's rate, frames at `video_fps` grouped by the vision encoder's temporal patch.
    pub fn for_model(
        thinker: &ThinkerConfig,
        processor: &ProcessorConfig,
        video_fps: f64,
    ) -> Result<Self, BlockConfigError> {
        let config = Self {
            sample_rate: u32::try_from(processor.feature_extractor.sampling_rate)
                .map_err(|_| BlockConfigError::SampleRate)?,
            block_len: Duration::from_secs(thinker.seconds_per_chunk as u64),
            video_fps,
            temporal_patch_size: thinker.vision_config.temporal_patch_size,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), BlockConfigError> {
        if self.sample_rate == 0 {
            return Err(BlockConfigError::SampleRate);
        }
        if self.block_len.is_zero() {
            return Err(BlockConfigError::BlockLen);
        }
        if !(self.video_fps.is_finite() && self.video_fps > 0.0) {
            return Err(BlockConfigError::Fps(self.video_fps));
        }
        if self.temporal_patch_size == 0 {
            return Err(BlockConfigError::TemporalPatch);
        }
        let frames = self.block_len.as_secs_f64() * self.video_fps;
        let whole = frames.round();
        if (frames - whole).abs() > 1e-6
            || whole < 1.0
            || !(whole as usize).is_multiple_of(self.temporal_patch_size)
        {
            return Err(BlockConfigError::Grid {
                block_len: self.block_len,
                fps: self.video_fps,
                frames,
                temporal_patch_size: self.temporal_patch_size,
            });
        }
        Ok(())
    }

    /// Frames sampled in a full block.
    pub fn frames_per_block(&self) -> usize {
        (self.block_len.as_secs_f64() * self.video_fps).round() as usize
    }

    /// Audio samples in a full block.
    pub fn samples_per_block(&self) -> usize {
        block_samples(self, self.block_len)
    }

    /// Seconds of turn one temporal grid of the vision encoder covers
    /// (`temporal_patch_size / fps`: the reference's `second_per_grid`).
    pub fn seconds_per_grid(&self) -> f64 {
        self.temporal_patch_size as f64 / self.video_fps
    }
}

/// Counters of input that could not be placed, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AssemblerStats {
    pub late_audio_samples: u64,
    pub video_frames_seen: u64,
    /// Frames older than the open block, dropped.
    pub late_video_frames: u64,
}

#[derive(Clone)]
pub struct BlockAssembler<F> {
    config: BlockConfig,
    /// Samples of audio after a block's end that must have arrived before it closes.
    lookahead: usize,
    turn_start: Duration,
    next_index: usize,
    /// Audio of the open block, indexed by sample offset from its start.
    audio: Vec<f32>,
    /// Video frames by media time (ns); old ones are pruned as blocks close.
    frames: BTreeMap<u128, F>,
    /// The last frame before the open block (what a frozen camera still shows), with its time
    /// (ns).
    carried: Option<(u128, F)>,
    stats: AssemblerStats,
}

impl<F: Clone> BlockAssembler<F> {
    /// Starts a turn whose first block begins at `turn_start` (media time).
    pub fn new(config: BlockConfig, turn_start: Duration) -> Result<Self, BlockConfigError> {
        Self::with_lookahead(config, turn_start, Duration::ZERO)
    }

    /// Like [`BlockAssembler::new`], but a block closes only once `lookahead` of audio after
    /// its end has arrived, and carries that audio in [`Block::lookahead`]: the feature
    /// extractor can then finish the block's last frames at once instead of waiting for the
    /// next block.
    pub fn with_lookahead(
        config: BlockConfig,
        turn_start: Duration,
        lookahead: Duration,
    ) -> Result<Self, BlockConfigError> {
        config.validate()?;
        let samples = block_samples(&config, config.block_len);
        let lookahead = block_samples(&config, lookahead);
        if lookahead > samples {
            return Err(BlockConfigError::Lookahead {
                lookahead: samples_duration(&config, lookahead),
                block_len: config.block_len,
            });
        }
        Ok(Self {
            config,
            lookahead,
            turn_start,
            next_index: 0,
            audio: vec![0.0; samples],
            frames: BTreeMap::new(),
            carried: None,
            stats: AssemblerStats::default(),
        })
    }

    /// Media time of the turn's first block.
    pub fn turn_start(&self) -> Duration {
        self.turn_start
    }

    /// Media time where the open block starts (everything before it is closed).
    pub fn open_block_start(&self) -> Duration {
        self.block_start(self.next_index)
    }

    /// Index of the open block.
    pub fn open_block_index(&self) -> usize {
        self.next_index
    }

    pub fn stats(&self) -> AssemblerStats {
        self.stats
    }

    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    fn block_start(&self, index: usize) -> Duration {
        self.turn_start + self.config.block_len * index as u32
    }

    /// Places mono audio (at the configured rate) that starts at media time `at`.
    pub fn push_audio(&mut self, at: Duration, samples: &[f32]) {
        let open_start = self.block_start(self.next_index);
        let rate = self.config.sample_rate as f64;
        let offset = (at.as_secs_f64() - open_start.as_secs_f64()) * rate;
        let offset = offset.round() as i64;
        for (i, &s) in samples.iter().enumerate() {
            let pos = offset + i as i64;
            if pos < 0 {
                self.stats.late_audio_samples += 1;
                continue;
            }
            let pos = pos as usize;
            if pos >= self.audio.len() {
                // Audio of later blocks: grow the buffer; it is split when blocks close.
                self.audio.resize(pos + 1, 0.0);
            }
            self.audio[pos] = s;
        }
    }

    /// Records a camera frame captured at media time `at`. Returns false if it can never be
    /// shown: its block is closed, or a newer frame already stands for its sample instant.
    pub fn push_video(&mut self, at: Duration, frame: F) -> bool {
        self.stats.video_frames_seen += 1;
        let key = at.as_nanos();
        if self.next_index > 0 && at < self.block_start(self.next_index) {
            // Still useful if newer than what the open block's first instant would show.
            if self.carried.as_ref().is_none_or(|(t, _)| key > *t) {
                self.carried = Some((key, frame));
                return true;
            }
            self.stats.late_video_frames += 1;
            return false;
        }
        // Only the newest frame between two sample instants can ever be taken.
        let k = self.instant_at_or_after(at);
        let low = if k == 0 {
            0
        } else {
            self.instant(k - 1).as_nanos() + 1
        };
        let high = self.instant(k).as_nanos();
        if self.frames.range(low..=high).any(|(t, _)| *t > key) {
            return false;
        }
        let older: Vec<u128> = self.frames.range(low..=high).map(|(t, _)| *t).collect();
        for t in older {
            self.frames.remove(&t);
        }
        self.frames.insert(key, frame);
        true
    }

    /// The `k`-th sample instant of the turn.
    fn instant(&self, k: u64) -> Duration {
        self.turn_start + Duration::from_secs_f64(k as f64 / self.config.video_fps)
    }

    /// The index of the first sample instant at or after `at`.
    fn instant_at_or_after(&self, at: Duration) -> u64 {
        let offset = at.saturating_sub(self.turn_start).as_secs_f64();
        let mut k = (offset * self.config.video_fps).ceil().max(0.0) as u64;
        while self.instant(k) < at {
            k += 1;
        }
        while k > 0 && self.instant(k - 1) >= at {
            k -= 1;
        }
        k
    }

    /// Closes every block that ends at or before media time `now` (and whose look-ahead has
    /// arrived by then).
    pub fn advance_to(&mut self, now: Duration) -> Vec<Block<F>> {
        let mut closed = Vec::new();
        let lookahead = samples_duration(&self.config, self.lookahead);
        while self.block_start(self.next_index + 1) + lookahead <= now {
            closed.push(self.close(self.config.block_len, false, self.lookahead));
        }
        closed
    }

    /// Ends the turn at media time `end`: closes the blocks before it and the partial last one,
    /// the last returned being flagged `last`. Empty if the blocks already closed reach `end`
    /// (the turn ended on a block boundary, or before the open block). A full block closed
    /// here carries only the look-ahead before `end`: the turn's audio stops there.
    pub fn finish(mut self, end: Duration) -> Vec<Block<F>> {
        let mut closed = Vec::new();
        while self.block_start(self.next_index + 1) <= end {
            let room = end - self.block_start(self.next_index + 1);
            let lookahead = self.lookahead.min(block_samples(&self.config, room));
            closed.push(self.close(self.config.block_len, false, lookahead));
        }
        let rest = end.saturating_sub(self.block_start(self.next_index));
        if block_samples(&self.config, rest) > 0 {
            closed.push(self.close(rest, true, 0));
        } else if let Some(last) = closed.last_mut() {
            last.last = true;
            last.lookahead.clear();
        }
        closed
    }

    fn close(&mut self, duration: Duration, last: bool, lookahead: usize) -> Block<F> {
        let start = self.block_start(self.next_index);
        let n = block_samples(&self.config, duration);
        let full = block_samples(&self.config, self.config.block_len);
        let mut audio: Vec<f32> = self.audio.drain(..n.min(self.audio.len())).collect();
        audio.resize(n, 0.0);
        let mut after: Vec<f32> = self.audio.iter().take(lookahead).copied().collect();
        after.resize(lookahead, 0.0);
        if !last {
            // Keep the buffer aligned on the next block: drop what is left of this one.
            let extra = full - n;
            self.audio.drain(..extra.min(self.audio.len()));
            if self.audio.len() < full {
                self.audio.resize(full, 0.0);
            }
        }
        let frames = self.sample_frames(self.next_index, start, duration);
        self.next_index += 1;
        Block {
            index: self.next_index - 1,
            start,
            duration,
            audio,
            frames,
            last,
            lookahead: after,
        }
    }

    fn sample_frames(&mut self, index: usize, start: Duration, duration: Duration) -> Vec<F> {
        let fps = self.config.video_fps;
        let count = (duration.as_secs_f64() * fps).round() as usize;
        let first = (index * self.config.frames_per_block()) as u64;
        let mut out = Vec::with_capacity(count + self.config.temporal_patch_size);
        for j in 0..count.max(1) {
            let key = self.instant(first + j as u64).as_nanos();
            let frame = self
                .frames
                .range(..=key)
                .next_back()
                .map(|(_, f)| f.clone())
                .or_else(|| self.carried.as_ref().map(|(_, f)| f.clone()))
                // A camera that starts a little after the turn: its first frame stands in.
                .or_else(|| self.frames.values().next().cloned());
            if let Some(frame) = frame {
                out.push(frame);
            }
        }
        if out.is_empty() {
            return out;
        }
        let tp = self.config.temporal_patch_size.max(1);
        while out.len() % tp != 0 {
            out.push(out.last().expect("non-empty").clone());
        }
        // Prune frames before the next block, keeping the newest as what a frozen camera shows.
        let end_key = (start + duration).as_nanos();
        let keep = self.frames.split_off(&end_key);
        if let Some((t, f)) = self.frames.iter().next_back() {
            self.carried = Some((*t, f.clone()));
        }
        self.frames = keep;
        out
    }
}

fn block_samples(config: &BlockConfig, duration: Duration) -> usize {
    (duration.as_secs_f64() * config.sample_rate as f64).round() as usize
}

fn samples_duration(config: &BlockConfig, samples: usize) -> Duration {
    Duration::from_nanos((samples as u128 * 1_000_000_000 / config.sample_rate as u128) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BlockConfig {
        BlockConfig {
            sample_rate: 16000,
            block_len: Duration::from_secs(2),
            video_fps: 2.0,
            temporal_patch_size: 2,
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn blocks_close_on_two_second_boundaries() {
        let mut a = BlockAssembler::<u32>::new(config(), ms(500)).unwrap();
        // 5 s of audio in 20 ms frames whose value is the frame index
        let mut closed = Vec::new();
        for k in 0..250u64 {
            a.push_audio(ms(500 + 20 * k), &[k as f32; 320]);
            if k % 10 == 0 {
                a.push_video(ms(500 + 20 * k), k as u32);
            }
            closed.extend(a.advance_to(ms(500 + 20 * (k + 1))));
        }
        assert_eq!(closed.len(), 2);
        assert_eq!(closed[0].start, ms(500));
        assert_eq!(closed[1].start, ms(2500));
        assert_eq!(closed[0].audio.len(), 32000);
        assert_eq!(closed[1].audio[0], 100.0);
        // video at 2 fps: instants 0, 0.5, 1.0, 1.5 s into the block
        assert_eq!(closed[0].frames, vec![0, 20, 50, 70]);
        let rest = a.finish(ms(5500));
        assert_eq!(rest.len(), 1);
        assert!(rest[0].last);
        assert_eq!(rest[0].duration, ms(1000));
        assert_eq!(rest[0].audio.len(), 16000);
        assert_eq!(rest[0].frames.len(), 2);
    }

    #[test]
    fn a_frozen_camera_does_not_stall_audio_and_repeats_its_last_picture() {
        let mut a = BlockAssembler::<u32>::new(config(), ms(0)).unwrap();
        a.push_video(ms(100), 7);
        let mut closed = Vec::new();
        for k in 0..300u64 {
            a.push_audio(ms(20 * k), &[0.5; 320]);
            closed.extend(a.advance_to(ms(20 * (k + 1))));
        }
        assert_eq!(closed.len(), 3);
        assert_eq!(closed[2].frames, vec![7, 7, 7, 7]);
    }

    #[test]
    fn gaps_are_silence_and_late_audio_is_dropped() {
        let mut a = BlockAssembler::<u32>::new(config(), ms(0)).unwrap();
        a.push_audio(ms(0), &[1.0; 1600]);
        // nothing between 100 ms and 1900 ms
        a.push_audio(ms(1900), &[1.0; 1600]);
        let closed = a.advance_to(ms(2000));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].audio[1600..30400].iter().sum::<f32>(), 0.0);
        assert!(closed[0].frames.is_empty(), "no camera: audio-only");
        // a burst of late frames for the closed block
        a.push_audio(ms(1000), &[1.0; 800]);
        assert_eq!(a.stats().late_audio_samples, 800);
        // out of order within the open block
        a.push_audio(ms(2500), &[2.0; 160]);
        a.push_audio(ms(2100), &[3.0; 160]);
        let rest = a.finish(ms(3000));
        assert_eq!(rest[0].audio[1600], 3.0);
        assert_eq!(rest[0].audio[8000], 2.0);
    }

    #[test]
    fn the_config_comes_from_the_model_and_must_tile_temporal_grids() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let mut model = crate::model::config::Config::from_json(&text).unwrap();
        let processor = crate::model::config::ProcessorConfig::from_json(
            &std::fs::read_to_string(dir.join("processor_config.json")).unwrap(),
        )
        .unwrap();
        let thinker = &mut model.thinker_config;
        let c = BlockConfig::for_model(thinker, &processor, 2.0).unwrap();
        assert_eq!(
            c.block_len,
            Duration::from_secs(thinker.seconds_per_chunk as u64)
        );
        assert_eq!(
            c.sample_rate as usize,
            processor.feature_extractor.sampling_rate
        );
        assert_eq!(
            c.temporal_patch_size,
            thinker.vision_config.temporal_patch_size
        );
        assert_eq!(c.frames_per_block(), thinker.seconds_per_chunk * 2, "2 fps");
        assert_eq!(
            c.seconds_per_grid(),
            thinker.vision_config.temporal_patch_size as f64 / 2.0
        );
        thinker.seconds_per_chunk = 3;
        thinker.vision_config.temporal_patch_size = 2;
        assert_eq!(
            BlockConfig::for_model(thinker, &processor, 2.0)
                .unwrap()
                .frames_per_block(),
            6
        );
        // 3 s at 1.5 fps: 4.5 frames
        let err = BlockConfig::for_model(thinker, &processor, 1.5).unwrap_err();
        assert!(matches!(err, BlockConfigError::Grid { .. }), "{err}");
        assert!(err.to_string().contains("temporal_patch_size 2"), "{err}");
        thinker.seconds_per_chunk = 1;
        // 1 s at 1 fps: one frame, half a temporal patch
        assert!(BlockConfig::for_model(thinker, &processor, 1.0).is_err());
        thinker.seconds_per_chunk = 0;
        assert_eq!(
            BlockConfig::for_model(thinker, &processor, 2.0),
            Err(BlockConfigError::BlockLen)
        );
        assert!(
            BlockAssembler::<u32>::new(
                BlockConfig {
                    video_fps: f64::NAN,
                    ..config()
                },
                ms(0)
            )
            .is_err()
        );
    }

    #[test]
    fn a_fast_camera_keeps_one_frame_per_sample_instant() {
        // 30 fps for 5 s, frames numbered by their capture time in ms, pushed out of order in
        // pairs; the turn starts between two frames.
        let start = ms(510);
        let mut a = BlockAssembler::<u64>::new(config(), start).unwrap();
        let times: Vec<u64> = (0..150).map(|k| 400 + k * 1000 / 30).collect();
        let mut closed = Vec::new();
        for pair in times.chunks(2) {
            for &t in pair.iter().rev() {
                a.push_video(ms(t), t);
            }
            assert!(a.frames.len() <= 6, "{} frames held", a.frames.len());
            closed.extend(a.advance_to(ms(pair[0])));
        }
        closed.extend(a.finish(ms(5400)));
        let picked: Vec<u64> = closed.iter().flat_map(|b| b.frames.clone()).collect();
        // what the newest-at-or-before rule picks from all frames
        let want: Vec<u64> = (0..10)
            .map(|k| {
                let instant = 510 + k * 500;
                *times.iter().filter(|t| **t <= instant).max().unwrap()
            })
            .collect();
        assert_eq!(picked, want);
        assert_eq!(closed.len(), 3);
    }

    #[test]
    fn a_turn_that_ends_on_a_boundary_has_no_empty_last_block() {
        let mut a = BlockAssembler::<u32>::new(config(), ms(0)).unwrap();
        a.push_audio(ms(0), &[0.1; 64000]);
        assert_eq!(a.advance_to(ms(4000)).len(), 2);
        assert!(a.finish(ms(4000)).is_empty());
        let mut a = BlockAssembler::<u32>::new(config(), ms(0)).unwrap();
        assert_eq!(a.advance_to(ms(2100)).len(), 1);
        // the end of speech was inside the closed block
        assert!(a.finish(ms(1900)).is_empty());
        let a = BlockAssembler::<u32>::new(config(), ms(0)).unwrap();
        let rest = a.finish(ms(4500));
        assert_eq!(rest.len(), 3);
        assert_eq!(
            rest.iter().map(|b| b.last).collect::<Vec<_>>(),
            [false, false, true]
        );
    }

    #[test]
    fn blocks_wait_for_their_lookahead_and_carry_it() {
        let la = Duration::from_micros(12_500);
        let mut a = BlockAssembler::<u32>::with_lookahead(config(), ms(0), la).unwrap();
        // audio whose value is its sample index, in 10 ms pieces
        let mut closed = Vec::new();
        let mut at_close = Vec::new();
        for k in 0..430u64 {
            let piece: Vec<f32> = (k * 160..(k + 1) * 160).map(|i| i as f32).collect();
            a.push_audio(ms(10 * k), &piece);
            let new = a.advance_to(ms(10 * (k + 1)));
            at_close.extend(new.iter().map(|_| ms(10 * (k + 1))));
            closed.extend(new);
        }
        assert_eq!(closed.len(), 2);
        // 2.0 s is not enough: 2.0125 s of audio is needed, which comes with the 2.02 s piece
        assert_eq!(at_close, vec![ms(2020), ms(4020)]);
        assert_eq!(closed[0].lookahead.len(), 200);
        assert_eq!(closed[0].lookahead[0], 32_000.0);
        assert_eq!(closed[1].audio[..200], closed[0].lookahead[..]);
        // the turn ends 5 ms into the third block: a block closed at the end carries only the
        // audio of the turn, the last one none
        let mut a = BlockAssembler::<u32>::with_lookahead(config(), ms(0), la).unwrap();
        a.push_audio(ms(0), &vec![0.5; 16_000 * 5]);
        let rest = a.finish(ms(4005));
        assert_eq!(rest.len(), 3);
        assert_eq!(rest[0].lookahead.len(), 200);
        assert_eq!(rest[1].lookahead.len(), 80);
        assert!(rest[2].last && rest[2].lookahead.is_empty());
        assert_eq!(rest[2].audio.len(), 80);
        assert!(
            BlockAssembler::<u32>::with_lookahead(config(), ms(0), ms(2500)).is_err(),
            "a look-ahead longer than a block"
        );
    }

    #[test]
    fn late_frames_are_dropped_unless_they_are_the_newest_picture() {
        let mut a = BlockAssembler::<u32>::new(config(), ms(0)).unwrap();
        a.push_video(ms(100), 1);
        assert_eq!(a.advance_to(ms(2000))[0].frames, vec![1, 1, 1, 1]);
        // arrives after its block closed, but newer than frame 1: the picture at 2.0 s
        assert!(a.push_video(ms(1990), 2));
        // older than what is shown already: useless
        assert!(!a.push_video(ms(1500), 3));
        assert!(!a.push_video(ms(50), 4));
        assert_eq!(a.stats().late_video_frames, 2);
        assert_eq!(a.stats().video_frames_seen, 4);
        // out of order within the open block: an older frame for the same instant is useless
        assert!(a.push_video(ms(2400), 5));
        assert!(!a.push_video(ms(2300), 6));
        let rest = a.finish(ms(3000));
        assert_eq!(rest[0].frames, vec![2, 5]);
    }
}
