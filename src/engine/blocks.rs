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
//! - a turn with no camera frame at all is an audio-only turn.

use std::collections::BTreeMap;
use std::time::Duration;

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
}

#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub sample_rate: u32,
    pub block_len: Duration,
    pub video_fps: f64,
    pub temporal_patch_size: usize,
}

/// Counters of input that could not be placed, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AssemblerStats {
    pub late_audio_samples: u64,
    pub video_frames_seen: u64,
}

pub struct BlockAssembler<F> {
    config: BlockConfig,
    turn_start: Duration,
    next_index: usize,
    /// Audio of the open block, indexed by sample offset from its start.
    audio: Vec<f32>,
    /// Video frames by media time (ns); old ones are pruned as blocks close.
    frames: BTreeMap<u128, F>,
    /// The last frame before the open block (what a frozen camera still shows).
    carried: Option<F>,
    stats: AssemblerStats,
}

impl<F: Clone> BlockAssembler<F> {
    /// Starts a turn whose first block begins at `turn_start` (media time).
    pub fn new(config: BlockConfig, turn_start: Duration) -> Self {
        let samples = block_samples(&config, config.block_len);
        Self {
            config,
            turn_start,
            next_index: 0,
            audio: vec![0.0; samples],
            frames: BTreeMap::new(),
            carried: None,
            stats: AssemblerStats::default(),
        }
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

    /// Records a camera frame captured at media time `at`.
    pub fn push_video(&mut self, at: Duration, frame: F) {
        self.stats.video_frames_seen += 1;
        self.frames.insert(at.as_nanos(), frame);
    }

    /// Closes every block that ends at or before media time `now`.
    pub fn advance_to(&mut self, now: Duration) -> Vec<Block<F>> {
        let mut closed = Vec::new();
        while self.block_start(self.next_index + 1) <= now {
            closed.push(self.close(self.config.block_len, false));
        }
        closed
    }

    /// Ends the turn at media time `end`: closes the blocks before it and the partial last one.
    pub fn finish(mut self, end: Duration) -> Vec<Block<F>> {
        let mut closed = self.advance_to(end);
        let rest = end.saturating_sub(self.block_start(self.next_index));
        if rest > Duration::ZERO || closed.is_empty() {
            closed.push(self.close(rest, true));
        } else if let Some(last) = closed.last_mut() {
            last.last = true;
        }
        closed
    }

    fn close(&mut self, duration: Duration, last: bool) -> Block<F> {
        let start = self.block_start(self.next_index);
        let n = block_samples(&self.config, duration);
        let full = block_samples(&self.config, self.config.block_len);
        let mut audio: Vec<f32> = self.audio.drain(..n.min(self.audio.len())).collect();
        audio.resize(n, 0.0);
        if !last {
            // Keep the buffer aligned on the next block: drop what is left of this one.
            let extra = full - n;
            self.audio.drain(..extra.min(self.audio.len()));
            if self.audio.len() < full {
                self.audio.resize(full, 0.0);
            }
        }
        let frames = self.sample_frames(start, duration);
        self.next_index += 1;
        Block {
            index: self.next_index - 1,
            start,
            duration,
            audio,
            frames,
            last,
        }
    }

    fn sample_frames(&mut self, start: Duration, duration: Duration) -> Vec<F> {
        let fps = self.config.video_fps;
        let count = (duration.as_secs_f64() * fps).round() as usize;
        let mut out = Vec::with_capacity(count + self.config.temporal_patch_size);
        for j in 0..count.max(1) {
            let instant = start.as_secs_f64() + j as f64 / fps;
            let key = Duration::from_secs_f64(instant).as_nanos();
            let frame = self
                .frames
                .range(..=key)
                .next_back()
                .map(|(_, f)| f.clone())
                .or_else(|| self.carried.clone())
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
        if let Some((_, f)) = self.frames.iter().next_back() {
            self.carried = Some(f.clone());
        }
        self.frames = keep;
        out
    }
}

fn block_samples(config: &BlockConfig, duration: Duration) -> usize {
    (duration.as_secs_f64() * config.sample_rate as f64).round() as usize
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
        let mut a = BlockAssembler::<u32>::new(config(), ms(500));
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
        let mut a = BlockAssembler::<u32>::new(config(), ms(0));
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
        let mut a = BlockAssembler::<u32>::new(config(), ms(0));
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
}
