//! Multimodal rotary positions as the reference's `get_rope_index` lays them out for Qwen3-Omni:
//! text counts on all three rows, audio counts on (one token per encoder output), an image or a
//! video frame grid takes (time, row, column) rows where time is absolute (`position_id_per_seconds`
//! per second of video), and audio inside a video is interleaved with the frames by time.
//!
//! Positions are `f32`, as the reference computes them: a video sampled so that a temporal patch
//! is not a whole number of 1/`position_id_per_seconds` s gets fractional time positions.

use candle_core::{Device, Result, Tensor};

use crate::model::qwen3_omni::config::{TalkerConfig, ThinkerConfig};

/// The ids and constants `get_rope_index` reads from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeIndexTokens {
    pub image: u32,
    pub video: u32,
    pub audio: u32,
    pub vision_start: u32,
    pub audio_start: u32,
    pub position_id_per_seconds: f32,
    pub spatial_merge_size: usize,
    /// The audio encoder's `n_window`, which the token count of an audio clip depends on.
    pub audio_n_window: usize,
}

impl RopeIndexTokens {
    pub fn thinker(c: &ThinkerConfig) -> Self {
        Self {
            image: c.image_token_id,
            video: c.video_token_id,
            audio: c.audio_token_id,
            vision_start: c.vision_start_token_id,
            audio_start: c.audio_start_token_id,
            position_id_per_seconds: c.position_id_per_seconds as f32,
            spatial_merge_size: c.vision_config.spatial_merge_size,
            audio_n_window: c.audio_config.n_window,
        }
    }

    /// The Talker's own ids (it reads the user turn's multimodal tokens too); the audio window
    /// comes from the Thinker's audio encoder.
    pub fn talker(c: &TalkerConfig, thinker: &ThinkerConfig) -> Self {
        Self {
            image: c.image_token_id,
            video: c.video_token_id,
            audio: c.audio_token_id,
            vision_start: c.vision_start_token_id,
            audio_start: c.audio_start_token_id,
            position_id_per_seconds: c.position_id_per_seconds as f32,
            spatial_merge_size: c.spatial_merge_size,
            audio_n_window: thinker.audio_config.n_window,
        }
    }
}

/// What the prompt's media look like, in prompt order within each kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MediaLayout {
    /// (t, h, w) patch grids of the images.
    pub image_grid_thw: Vec<[usize; 3]>,
    /// (t, h, w) patch grids of the videos.
    pub video_grid_thw: Vec<[usize; 3]>,
    /// Seconds per temporal patch of each video.
    pub video_second_per_grid: Vec<f32>,
    /// Mel frames of each audio clip (those inside videos included, in order).
    pub audio_feature_lengths: Vec<usize>,
    /// Videos carry their audio track, interleaved with the frames.
    pub use_audio_in_video: bool,
}

/// Rotary positions (3 rows) of a prompt and the offset of later decode positions.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeIndex {
    pub rows: [Vec<f32>; 3],
    /// Largest position + 1 - prompt length: decode step at cache length `n` sits at `n + delta`.
    pub delta: f32,
}

impl RopeIndex {
    /// (3, len) f32 positions.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let len = self.rows[0].len();
        let flat: Vec<f32> = self.rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (3, len), device)
    }

    fn push_same(&mut self, start: f32, len: usize) {
        for row in &mut self.rows {
            row.extend((0..len).map(|i| i as f32 + start));
        }
    }

    fn push(&mut self, t: f32, h: f32, w: f32) {
        self.rows[0].push(t);
        self.rows[1].push(h);
        self.rows[2].push(w);
    }

    /// The reference's `llm_pos_ids_list[-1].max() + 1`: one past the largest position of the
    /// last piece added (`pieces` marks where each piece starts).
    fn next_start(&self, last_piece: usize) -> f32 {
        let max = self
            .rows
            .iter()
            .flat_map(|row| row[last_piece..].iter().copied())
            .fold(f32::NEG_INFINITY, f32::max);
        if max.is_finite() { max + 1.0 } else { 0.0 }
    }
}

/// Positions (3, len) of `len` tokens decoded after `cache_len` cached ones: the reference adds
/// the prompt's `delta` to the text position.
pub fn decode_positions(
    cache_len: usize,
    delta: f32,
    len: usize,
    device: &Device,
) -> Result<Tensor> {
    let row: Vec<f32> = (0..len).map(|i| (cache_len + i) as f32 + delta).collect();
    Tensor::from_vec(row, (1, len), device)?.repeat((3, 1))
}

/// The audio encoder's output length for `input_len` mel frames, exactly as the reference's
/// `_get_feat_extract_output_lengths` computes it (its 13 tokens per full window are those of
/// the published 100-frame window, whatever `n_window` is).
pub fn audio_output_length(input_len: usize, n_window: usize) -> usize {
    let chunk = n_window * 2;
    let leave = input_len % chunk;
    // The reference's integer divisions floor; (leave - 1) // 2 is -1 for leave 0.
    let feat = (leave as i64 - 1).div_euclid(2) + 1;
    let out = ((feat - 1).div_euclid(2) + 1 - 1).div_euclid(2) + 1;
    (out + (input_len / chunk) as i64 * 13) as usize
}

/// (t, h, w) positions of a vision grid's merged tokens from `start`, frame times `t_index`.
fn vision_positions(
    start: f32,
    t_index: &[f32],
    grid: [usize; 3],
    merge: usize,
) -> Vec<(f32, f32, f32)> {
    let (gh, gw) = (grid[1] / merge, grid[2] / merge);
    let mut out = Vec::with_capacity(t_index.len() * gh * gw);
    for &t in t_index {
        for h in 0..gh {
            for w in 0..gw {
                out.push((t + start, h as f32 + start, w as f32 + start));
            }
        }
    }
    out
}

/// `get_rope_index` for one unpadded prompt.
pub fn rope_index(ids: &[u32], tokens: &RopeIndexTokens, media: &MediaLayout) -> Result<RopeIndex> {
    let mut index = RopeIndex {
        rows: [Vec::new(), Vec::new(), Vec::new()],
        delta: 0.0,
    };
    // The reference lays out media only when an image or a video grid is given; otherwise (text,
    // or audio alone) every token counts on.
    if media.image_grid_thw.is_empty() && media.video_grid_thw.is_empty() {
        index.push_same(0.0, ids.len());
        return Ok(index);
    }
    let followed_by = |id: u32| {
        ids.windows(2)
            .filter(|w| w[0] == tokens.vision_start && w[1] == id)
            .count()
    };
    let audio_nums = ids.iter().filter(|&&id| id == tokens.audio_start).count();
    let image_nums = followed_by(tokens.image);
    let video_nums = if media.use_audio_in_video {
        followed_by(tokens.audio_start)
    } else {
        followed_by(tokens.video)
    };
    let media_nums = if media.use_audio_in_video {
        image_nums + audio_nums
    } else {
        image_nums + video_nums + audio_nums
    };
    let has_vision = ids.contains(&tokens.image) || ids.contains(&tokens.video);
    let has_audio = ids.contains(&tokens.audio);
    let find = |id: u32, from: usize| -> Result<usize> {
        ids[from.min(ids.len())..]
            .iter()
            .position(|&x| x == id)
            .map(|p| p + from)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("rope index: no token {id} after position {from}"))
            })
    };
    let grid = |grids: &[[usize; 3]], i: usize, what: &str| -> Result<[usize; 3]> {
        grids.get(i).copied().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "rope index: the prompt has more {what}s than grids ({})",
                grids.len()
            ))
        })
    };
    let audio_len = |i: usize| -> Result<usize> {
        media
            .audio_feature_lengths
            .get(i)
            .map(|&n| audio_output_length(n, tokens.audio_n_window))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "rope index: the prompt has more audio clips than feature lengths ({})",
                    media.audio_feature_lengths.len()
                ))
            })
    };
    let video_times = |i: usize, grid_t: usize| -> Result<Vec<f32>> {
        let per_grid = *media.video_second_per_grid.get(i).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "rope index: no video_second_per_grid for video {i}"
            ))
        })?;
        Ok((0..grid_t)
            .map(|k| k as f32 * per_grid * tokens.position_id_per_seconds)
            .collect())
    };
    let merge = tokens.spatial_merge_size;
    let merged_len = |g: [usize; 3]| g[0] * g[1] * g[2] / (merge * merge);

    let (mut image_idx, mut video_idx, mut audio_idx) = (0, 0, 0);
    let (mut remain_images, mut remain_videos, mut remain_audios) =
        (image_nums, video_nums, audio_nums);
    let mut st = 0usize;
    let mut last_piece = 0usize;
    for _ in 0..media_nums {
        let mut st_idx = index.next_start(last_piece);
        let ed_vision_start = if has_vision && (remain_videos > 0 || remain_images > 0) {
            find(tokens.vision_start, st)?
        } else {
            ids.len() + 1
        };
        let ed_audio_start = if has_audio && remain_audios > 0 {
            find(tokens.audio_start, st)?
        } else {
            ids.len() + 1
        };
        let min_ed = ed_vision_start.min(ed_audio_start);
        let text_len = min_ed - st;
        if text_len != 0 {
            index.push_same(st_idx, text_len);
            st_idx += text_len as f32;
        }
        let audio_in_video = min_ed == ed_vision_start && ed_vision_start + 1 == ed_audio_start;
        let (bos_len, eos_len) = if audio_in_video { (2, 2) } else { (1, 1) };
        last_piece = index.rows[0].len();
        index.push_same(st_idx, bos_len);
        st_idx += bos_len as f32;
        let next = ids.get(ed_vision_start + 1).copied();
        if min_ed == ed_audio_start {
            let n = audio_len(audio_idx)?;
            last_piece = index.rows[0].len();
            index.push_same(st_idx, n);
            st += text_len + bos_len + n + eos_len;
            audio_idx += 1;
            remain_audios -= 1;
        } else if min_ed == ed_vision_start && next == Some(tokens.image) {
            let g = grid(&media.image_grid_thw, image_idx, "image")?;
            let times: Vec<f32> = (0..g[0])
                .map(|k| (k * tokens.position_id_per_seconds as usize) as f32)
                .collect();
            last_piece = index.rows[0].len();
            for (t, h, w) in vision_positions(st_idx, &times, g, merge) {
                index.push(t, h, w);
            }
            st += text_len + bos_len + merged_len(g) + eos_len;
            image_idx += 1;
            remain_images = remain_images.saturating_sub(1);
        } else if min_ed == ed_vision_start && next == Some(tokens.video) {
            let g = grid(&media.video_grid_thw, video_idx, "video")?;
            let times = video_times(video_idx, g[0])?;
            last_piece = index.rows[0].len();
            for (t, h, w) in vision_positions(st_idx, &times, g, merge) {
                index.push(t, h, w);
            }
            st += text_len + bos_len + merged_len(g) + eos_len;
            video_idx += 1;
            remain_videos = remain_videos.saturating_sub(1);
        } else if audio_in_video {
            let n = audio_len(audio_idx)?;
            let g = grid(&media.video_grid_thw, video_idx, "video")?;
            let times = video_times(video_idx, g[0])?;
            let video = vision_positions(st_idx, &times, g, merge);
            let audio: Vec<f32> = (0..n).map(|i| i as f32 + st_idx).collect();
            // Merged by time, a frame before the audio at the same time; each token is its own
            // piece in the reference, so the next start is one past the last token's largest row.
            let (mut v, mut a) = (0, 0);
            while v < video.len() && a < audio.len() {
                last_piece = index.rows[0].len();
                if video[v].0 <= audio[a] {
                    index.push(video[v].0, video[v].1, video[v].2);
                    v += 1;
                } else {
                    index.push(audio[a], audio[a], audio[a]);
                    a += 1;
                }
            }
            if v < video.len() {
                last_piece = index.rows[0].len();
                for &(t, h, w) in &video[v..] {
                    index.push(t, h, w);
                }
            }
            if a < audio.len() {
                last_piece = index.rows[0].len();
                for &p in &audio[a..] {
                    index.push(p, p, p);
                }
            }
            st += text_len + bos_len + n + merged_len(g) + eos_len;
            audio_idx += 1;
            video_idx += 1;
            remain_videos = remain_videos.saturating_sub(1);
            remain_audios = remain_audios.saturating_sub(1);
        } else {
            candle_core::bail!(
                "rope index: the media start at position {min_ed} is neither audio, an image nor a video"
            );
        }
        let st_idx = index.next_start(last_piece);
        last_piece = index.rows[0].len();
        index.push_same(st_idx, eos_len);
    }
    if st < ids.len() {
        let st_idx = index.next_start(last_piece);
        index.push_same(st_idx, ids.len() - st);
    }
    if index.rows[0].len() != ids.len() {
        candle_core::bail!(
            "rope index: the media layout gives {} positions for {} ids (token counts and grids disagree)",
            index.rows[0].len(),
            ids.len()
        );
    }
    let max = index
        .rows
        .iter()
        .flatten()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    index.delta = max + 1.0 - ids.len() as f32;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_output_length_follows_the_reference_formula() {
        // The published window (n_window 50): 100 frames make 13 tokens.
        assert_eq!(audio_output_length(100, 50), 13);
        assert_eq!(audio_output_length(200, 50), 26);
        assert_eq!(audio_output_length(1, 50), 1);
        assert_eq!(audio_output_length(150, 50), 13 + 7);
    }

    #[test]
    fn text_only_counts_on() {
        let tokens = RopeIndexTokens {
            image: 9,
            video: 8,
            audio: 7,
            vision_start: 6,
            audio_start: 5,
            position_id_per_seconds: 25.0,
            spatial_merge_size: 2,
            audio_n_window: 50,
        };
        let index = rope_index(&[1, 2, 3], &tokens, &MediaLayout::default()).unwrap();
        assert_eq!(index.rows[2], vec![0.0, 1.0, 2.0]);
        assert_eq!(index.delta, 0.0);
    }
}
