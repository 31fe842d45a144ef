//! TMRoPE: 3-D position ids for text, audio, image and video, and the rope deltas.
//!
//! [`get_rope_index`] reproduces the reference's `get_rope_index` (Thinker and Talker share it):
//! text and audio tokens advance all three rows together, an image or video block gets
//! (temporal, height, width) ids starting at the next free id, and the position after any block is
//! the largest id of that block plus one. With `use_audio_in_video` a video and its sound track
//! are laid out in 2-second chunks (that chunk's video tokens, then its audio tokens) sharing one
//! temporal origin.
//!
//! The same rules are exposed as building blocks ([`text_positions`], [`vision_positions`],
//! [`InterleavedSegment`]) so that a live turn can be laid out block by block, with positions that
//! continue across blocks exactly as the whole-prompt computation would give them.

use std::ops::Range;

use anyhow::{Context, bail, ensure};
use candle_core::{Device, Tensor};

use crate::model::config::{TalkerConfig, ThinkerConfig};

/// The token ids and timing constants the position rules read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeIndexConfig {
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub audio_token_id: u32,
    pub vision_start_token_id: u32,
    pub audio_start_token_id: u32,
    /// Side of the square of patches merged into one token (2: 2x2 patches per token).
    pub spatial_merge_size: usize,
    /// Temporal ids per second of media (25: one per 40 ms).
    pub position_id_per_seconds: usize,
    /// Length of one audio/video interleaving chunk in seconds.
    pub seconds_per_chunk: usize,
}

impl From<&ThinkerConfig> for RopeIndexConfig {
    fn from(c: &ThinkerConfig) -> Self {
        Self {
            image_token_id: c.image_token_index,
            video_token_id: c.video_token_index,
            audio_token_id: c.audio_token_index,
            vision_start_token_id: c.vision_start_token_id,
            audio_start_token_id: c.audio_start_token_id,
            spatial_merge_size: c.vision_config.spatial_merge_size,
            position_id_per_seconds: c.position_id_per_seconds,
            seconds_per_chunk: c.seconds_per_chunk,
        }
    }
}

impl From<&TalkerConfig> for RopeIndexConfig {
    fn from(c: &TalkerConfig) -> Self {
        Self {
            image_token_id: c.image_token_index,
            video_token_id: c.video_token_index,
            audio_token_id: c.audio_token_index,
            vision_start_token_id: c.vision_start_token_id,
            audio_start_token_id: c.audio_start_token_id,
            spatial_merge_size: c.spatial_merge_size,
            position_id_per_seconds: c.position_id_per_seconds,
            seconds_per_chunk: c.seconds_per_chunk,
        }
    }
}

impl RopeIndexConfig {
    /// Temporal ids per interleaving chunk (50 for 25 ids/s and 2 s chunks).
    pub fn ids_per_chunk(&self) -> i64 {
        (self.position_id_per_seconds * self.seconds_per_chunk) as i64
    }

    /// Temporal id of each temporal grid of a video, relative to the video's origin:
    /// `floor(t * second_per_grid * position_id_per_seconds)`, computed in f32 as the reference
    /// does so that chunk boundaries fall on the same grids.
    pub fn video_time_ids(&self, grid_t: usize, second_per_grid: f32) -> Vec<i64> {
        (0..grid_t)
            .map(|t| video_time_id(t, second_per_grid, self.position_id_per_seconds))
            .collect()
    }
}

fn video_time_id(t: usize, second_per_grid: f32, position_id_per_seconds: usize) -> i64 {
    ((t as f32 * second_per_grid) * position_id_per_seconds as f32) as i64
}

/// An image's or video's grid in patches, as the image processor reports it (`grid_thw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionGrid {
    pub t: usize,
    pub h: usize,
    pub w: usize,
}

impl VisionGrid {
    pub fn new(t: usize, h: usize, w: usize) -> Self {
        Self { t, h, w }
    }

    /// Number of tokens the vision encoder yields: `t * h * w / merge^2`.
    pub fn merged_tokens(&self, spatial_merge_size: usize) -> usize {
        self.t * self.h * self.w / (spatial_merge_size * spatial_merge_size)
    }

    /// Tokens of one temporal grid: `(h / merge) * (w / merge)`.
    pub fn tokens_per_frame(&self, spatial_merge_size: usize) -> usize {
        (self.h / spatial_merge_size) * (self.w / spatial_merge_size)
    }
}

/// A video's grid and the seconds one temporal grid spans (temporal_patch_size / fps).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoGrid {
    pub grid: VisionGrid,
    pub second_per_grid: f32,
}

/// The sizes of the media items of a prompt, in the order they appear.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MediaLayout {
    pub images: Vec<VisionGrid>,
    pub videos: Vec<VideoGrid>,
    /// Audio embeddings per audio (`audio_encoder::output_len` of its mel frames), including the
    /// sound tracks of videos when `use_audio_in_video` is set.
    pub audio_tokens: Vec<usize>,
    /// Each video is followed in `audio_tokens` by its own sound track, interleaved with it.
    pub use_audio_in_video: bool,
}

/// (temporal, height, width) position ids of a token sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PositionIds {
    pub t: Vec<i64>,
    pub h: Vec<i64>,
    pub w: Vec<i64>,
}

impl PositionIds {
    pub fn len(&self) -> usize {
        self.t.len()
    }

    pub fn is_empty(&self) -> bool {
        self.t.is_empty()
    }

    pub fn push(&mut self, t: i64, h: i64, w: i64) {
        self.t.push(t);
        self.h.push(h);
        self.w.push(w);
    }

    pub fn extend(&mut self, other: &PositionIds) {
        self.t.extend_from_slice(&other.t);
        self.h.extend_from_slice(&other.h);
        self.w.extend_from_slice(&other.w);
    }

    /// The largest id on any row.
    pub fn max(&self) -> Option<i64> {
        self.t.iter().chain(&self.h).chain(&self.w).copied().max()
    }

    /// The id the next block starts at when this is the last block laid out.
    pub fn next_start(&self) -> Option<i64> {
        self.max().map(|m| m + 1)
    }

    /// Positions `range` of the sequence.
    pub fn slice(&self, range: Range<usize>) -> PositionIds {
        PositionIds {
            t: self.t[range.clone()].to_vec(),
            h: self.h[range.clone()].to_vec(),
            w: self.w[range].to_vec(),
        }
    }

    /// A (3, len) i64 tensor, rows (temporal, height, width), as the decoder takes it.
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        let mut flat = Vec::with_capacity(3 * self.len());
        flat.extend_from_slice(&self.t);
        flat.extend_from_slice(&self.h);
        flat.extend_from_slice(&self.w);
        Tensor::from_vec(flat, (3, self.len()), device)
    }
}

/// `len` tokens advancing all three rows together from `start` (text, bos/eos, audio).
pub fn text_positions(start: i64, len: usize) -> PositionIds {
    let row: Vec<i64> = (start..start + len as i64).collect();
    PositionIds {
        t: row.clone(),
        h: row.clone(),
        w: row,
    }
}

/// The ids of merged vision tokens, temporal-major then row then column: temporal id
/// `start + time_ids[t]`, height `start + row`, width `start + column`, on a grid of
/// `rows x cols` merged tokens per temporal grid.
pub fn vision_positions(start: i64, time_ids: &[i64], rows: usize, cols: usize) -> PositionIds {
    let mut out = PositionIds::default();
    for &time in time_ids {
        for r in 0..rows as i64 {
            for c in 0..cols as i64 {
                out.push(start + time, start + r, start + c);
            }
        }
    }
    out
}

/// Splits a non-decreasing list of temporal ids (relative to the segment origin) into chunks of
/// `ids_per_chunk`, exactly as the reference's `get_chunked_index`: the chunk counter advances by
/// one each time a token reaches the next boundary, so a jump over several boundaries still only
/// closes one chunk per token.
pub fn chunk_ranges(time_ids: &[i64], ids_per_chunk: i64) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut chunk = 1;
    for (i, &value) in time_ids.iter().enumerate() {
        if value >= chunk * ids_per_chunk {
            ranges.push(start..i);
            start = i;
            chunk += 1;
        }
    }
    ranges.push(start..time_ids.len());
    ranges
}

/// One video with its sound track laid out as the reference does with `use_audio_in_video`,
/// built chunk by chunk: `<|vision_bos|><|audio_bos|>` share one id, then for each chunk that
/// chunk's video tokens followed by its audio tokens (video and audio start at the same temporal
/// origin, one temporal id per 40 ms), then `<|audio_eos|><|vision_eos|>` share one id.
///
/// A live turn pushes one 2-second block at a time; the positions equal [`get_rope_index`] on the
/// whole segment as long as each chunk carries the grids whose temporal ids fall in it (always
/// the case at 2 fps; the reference's chunker only differs when consecutive grids are more than
/// one chunk apart, i.e. below 1 fps).
#[derive(Debug, Clone)]
pub struct InterleavedSegment {
    origin: i64,
    second_per_grid: f32,
    position_id_per_seconds: usize,
    spatial_merge_size: usize,
    grids: usize,
    audio_tokens: usize,
    /// Largest id of the last non-empty piece laid out: the closing pair comes right after it.
    last_piece_max: i64,
}

impl InterleavedSegment {
    /// Opens a segment whose bos pair sits at `start` (the next free id); returns the segment
    /// and the positions of the bos pair.
    pub fn open(cfg: &RopeIndexConfig, start: i64, second_per_grid: f32) -> (Self, PositionIds) {
        let mut bos = text_positions(start, 1);
        bos.extend(&text_positions(start, 1));
        let segment = Self {
            origin: start + 1,
            second_per_grid,
            position_id_per_seconds: cfg.position_id_per_seconds,
            spatial_merge_size: cfg.spatial_merge_size,
            grids: 0,
            audio_tokens: 0,
            last_piece_max: start,
        };
        (segment, bos)
    }

    /// The segment's temporal origin: the id of its first video and first audio token.
    pub fn origin(&self) -> i64 {
        self.origin
    }

    /// Temporal grids and audio tokens laid out so far.
    pub fn counts(&self) -> (usize, usize) {
        (self.grids, self.audio_tokens)
    }

    /// Lays out one chunk: the temporal grids `frames` (each (h, w) in patches, one temporal
    /// grid = temporal_patch_size frames), then `audio_tokens` audio tokens. Returns their
    /// positions in that order.
    pub fn push_chunk(
        &mut self,
        frames: &[(usize, usize)],
        audio_tokens: usize,
    ) -> anyhow::Result<PositionIds> {
        let merge = self.spatial_merge_size;
        let mut out = PositionIds::default();
        if !frames.is_empty() {
            let mut video = PositionIds::default();
            for &(h, w) in frames {
                ensure!(
                    h.is_multiple_of(merge) && w.is_multiple_of(merge),
                    "video grid {h}x{w} patches is not a multiple of the spatial merge size {merge}"
                );
                let time = video_time_id(
                    self.grids,
                    self.second_per_grid,
                    self.position_id_per_seconds,
                );
                video.extend(&vision_positions(
                    self.origin,
                    &[time],
                    h / merge,
                    w / merge,
                ));
                self.grids += 1;
            }
            self.last_piece_max = video.max().unwrap_or(self.last_piece_max);
            out.extend(&video);
        }
        if audio_tokens > 0 {
            let audio = text_positions(self.origin + self.audio_tokens as i64, audio_tokens);
            self.audio_tokens += audio_tokens;
            self.last_piece_max = audio.max().unwrap_or(self.last_piece_max);
            out.extend(&audio);
        }
        Ok(out)
    }

    /// Closes the segment: the positions of the `<|audio_eos|><|vision_eos|>` pair. The next
    /// block starts at the returned positions' `next_start()`.
    pub fn close(self) -> PositionIds {
        let end = self.last_piece_max + 1;
        let mut eos = text_positions(end, 1);
        eos.extend(&text_positions(end, 1));
        eos
    }
}

/// Builds positions by appending blocks, each starting right after the previous block's largest
/// id, as the reference's `st_idx = llm_pos_ids_list[-1].max() + 1`.
#[derive(Debug, Default)]
struct Layout {
    positions: PositionIds,
    next: i64,
}

impl Layout {
    fn push(&mut self, block: PositionIds) {
        if let Some(next) = block.next_start() {
            self.next = next;
        }
        self.positions.extend(&block);
    }

    fn text(&mut self, len: usize) {
        if len > 0 {
            self.push(text_positions(self.next, len));
        }
    }
}

fn find_from(ids: &[u32], id: u32, from: usize) -> Option<usize> {
    ids.get(from..)?
        .iter()
        .position(|&x| x == id)
        .map(|i| from + i)
}

/// TMRoPE position ids of a prompt and its rope delta (`max id + 1 - len`): decode steps then
/// sit at `past_len + delta` on all three rows.
///
/// `ids` is the processor-expanded prompt (every placeholder repeated to its token count);
/// `media` gives the items' sizes in order. Items are matched to placeholders in the order
/// they appear, as the reference does.
pub fn get_rope_index(
    cfg: &RopeIndexConfig,
    ids: &[u32],
    media: &MediaLayout,
) -> anyhow::Result<(PositionIds, i64)> {
    let merge = cfg.spatial_merge_size;
    ensure!(merge > 0, "spatial_merge_size must be > 0");
    let audio_items = ids
        .iter()
        .filter(|&&id| id == cfg.audio_start_token_id)
        .count();
    let after_vision_start = ids
        .windows(2)
        .filter(|w| w[0] == cfg.vision_start_token_id)
        .map(|w| w[1]);
    let (mut image_items, mut video_items) = (0, 0);
    for next in after_vision_start {
        if next == cfg.image_token_id {
            image_items += 1;
        } else if next
            == if media.use_audio_in_video {
                cfg.audio_start_token_id
            } else {
                cfg.video_token_id
            }
        {
            video_items += 1;
        }
    }
    ensure!(
        image_items <= media.images.len(),
        "the prompt has {image_items} images but {} image grids were given",
        media.images.len()
    );
    ensure!(
        video_items <= media.videos.len(),
        "the prompt has {video_items} videos but {} video grids were given",
        media.videos.len()
    );
    ensure!(
        audio_items <= media.audio_tokens.len(),
        "the prompt has {audio_items} audio items but {} audio lengths were given",
        media.audio_tokens.len()
    );

    let items = if media.use_audio_in_video {
        image_items + audio_items
    } else {
        image_items + video_items + audio_items
    };
    let (mut remain_images, mut remain_videos, mut remain_audios) =
        (image_items, video_items, audio_items);
    let (mut image_idx, mut video_idx, mut audio_idx) = (0, 0, 0);
    let mut layout = Layout::default();
    let mut st = 0usize;
    let not_found = ids.len() + 1;
    let find = |id: u32, remaining: usize, st: usize| -> anyhow::Result<usize> {
        if remaining == 0 || !ids.contains(&id) {
            return Ok(not_found);
        }
        find_from(ids, id, st).with_context(|| {
            format!("placeholder {id} expected after position {st} but the prompt has no more")
        })
    };

    for _ in 0..items {
        let ed_image = find(cfg.image_token_id, remain_images, st)?;
        let ed_video = find(cfg.video_token_id, remain_videos, st)?;
        let ed_audio = find(cfg.audio_token_id, remain_audios, st)?;
        let min_ed = ed_image.min(ed_video).min(ed_audio);
        if min_ed == not_found {
            bail!("the prompt has fewer media placeholders than its bos tokens announce");
        }
        if min_ed == ed_audio {
            let text_len = placeholder_text_len(min_ed, st, 1)?;
            layout.text(text_len);
            layout.text(1);
            let n = media.audio_tokens[audio_idx];
            layout.text(n);
            layout.text(1);
            st += text_len + n + 2;
            audio_idx += 1;
            remain_audios -= 1;
        } else if min_ed == ed_image {
            let text_len = placeholder_text_len(min_ed, st, 1)?;
            layout.text(text_len);
            layout.text(1);
            let grid = media.images[image_idx];
            check_grid(&grid, merge, "image")?;
            // Images are one instant: temporal ids 0, 25, ... per temporal grid (1 s apart).
            let time_ids: Vec<i64> = (0..grid.t as i64)
                .map(|t| t * cfg.position_id_per_seconds as i64)
                .collect();
            layout.push(vision_positions(
                layout.next,
                &time_ids,
                grid.h / merge,
                grid.w / merge,
            ));
            layout.text(1);
            st += text_len + grid.merged_tokens(merge) + 2;
            image_idx += 1;
            remain_images -= 1;
        } else if !media.use_audio_in_video {
            let text_len = placeholder_text_len(min_ed, st, 1)?;
            layout.text(text_len);
            layout.text(1);
            let video = media.videos[video_idx];
            check_grid(&video.grid, merge, "video")?;
            let time_ids = cfg.video_time_ids(video.grid.t, video.second_per_grid);
            layout.push(vision_positions(
                layout.next,
                &time_ids,
                video.grid.h / merge,
                video.grid.w / merge,
            ));
            layout.text(1);
            st += text_len + video.grid.merged_tokens(merge) + 2;
            video_idx += 1;
            remain_videos -= 1;
        } else {
            let text_len = placeholder_text_len(min_ed, st, 2)?;
            layout.text(text_len);
            let video = media.videos[video_idx];
            check_grid(&video.grid, merge, "video")?;
            let n_audio = media.audio_tokens[audio_idx];
            // <|vision_bos|> and <|audio_bos|> share one id; video and audio share the origin.
            let bos = layout.next;
            layout.positions.extend(&text_positions(bos, 1));
            layout.positions.extend(&text_positions(bos, 1));
            let origin = bos + 1;
            let time_ids = cfg.video_time_ids(video.grid.t, video.second_per_grid);
            let video_pos = vision_positions(
                origin,
                &time_ids,
                video.grid.h / merge,
                video.grid.w / merge,
            );
            let audio_pos = text_positions(origin, n_audio);
            let mut last_piece_max = bos;
            for chunk in interleaved_chunks(cfg, &video, n_audio) {
                for piece in [video_pos.slice(chunk.video), audio_pos.slice(chunk.audio)] {
                    if let Some(max) = piece.max() {
                        last_piece_max = max;
                        layout.positions.extend(&piece);
                    }
                }
            }
            // <|audio_eos|> and <|vision_eos|> share the id after the last piece.
            layout.push(text_positions(last_piece_max + 1, 1));
            layout
                .positions
                .extend(&text_positions(last_piece_max + 1, 1));
            st += text_len + 4 + n_audio + video.grid.merged_tokens(merge);
            audio_idx += 1;
            video_idx += 1;
            remain_videos -= 1;
            remain_audios -= 1;
        }
    }
    if st < ids.len() {
        layout.text(ids.len() - st);
    }
    let positions = layout.positions;
    ensure!(
        positions.len() == ids.len(),
        "the media sizes give {} positions for a prompt of {} tokens: the placeholder counts do \
         not match the media (expand each placeholder to its encoder output length)",
        positions.len(),
        ids.len()
    );
    let delta = positions.max().map(|m| m + 1).unwrap_or(0) - ids.len() as i64;
    Ok((positions, delta))
}

fn placeholder_text_len(
    placeholder_at: usize,
    st: usize,
    bos_tokens: usize,
) -> anyhow::Result<usize> {
    placeholder_at
        .checked_sub(st + bos_tokens)
        .with_context(|| {
            format!("media placeholder at {placeholder_at} is not preceded by its bos token")
        })
}

fn check_grid(grid: &VisionGrid, merge: usize, what: &str) -> anyhow::Result<()> {
    ensure!(
        grid.t > 0 && grid.h.is_multiple_of(merge) && grid.w.is_multiple_of(merge),
        "{what} grid {}x{}x{} is not a whole number of {merge}x{merge} merged tokens",
        grid.t,
        grid.h,
        grid.w
    );
    Ok(())
}

/// One interleaving chunk of a video with its sound track: which of the video's tokens and which
/// audio tokens it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterleavedChunk {
    pub video: Range<usize>,
    pub audio: Range<usize>,
}

/// The chunks of a video with `audio_tokens` of sound, in the reference's order: chunk k holds
/// the video tokens whose temporal ids fall in it and audio tokens [k*50, k*50 + 50); whichever
/// stream is longer keeps producing chunks after the other ends.
pub fn interleaved_chunks(
    cfg: &RopeIndexConfig,
    video: &VideoGrid,
    audio_tokens: usize,
) -> Vec<InterleavedChunk> {
    let per_chunk = cfg.ids_per_chunk();
    let frame_tokens = video.grid.tokens_per_frame(cfg.spatial_merge_size);
    let token_times: Vec<i64> = cfg
        .video_time_ids(video.grid.t, video.second_per_grid)
        .into_iter()
        .flat_map(|t| std::iter::repeat_n(t, frame_tokens))
        .collect();
    let video_chunks = chunk_ranges(&token_times, per_chunk);
    let audio_times: Vec<i64> = (0..audio_tokens as i64).collect();
    let audio_chunks = chunk_ranges(&audio_times, per_chunk);
    let n = video_chunks.len().max(audio_chunks.len());
    (0..n)
        .map(|k| InterleavedChunk {
            video: video_chunks.get(k).cloned().unwrap_or(0..0),
            audio: audio_chunks.get(k).cloned().unwrap_or(0..0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RopeIndexConfig {
        RopeIndexConfig {
            image_token_id: 12,
            video_token_id: 13,
            audio_token_id: 3,
            vision_start_token_id: 9,
            audio_start_token_id: 4,
            spatial_merge_size: 2,
            position_id_per_seconds: 25,
            seconds_per_chunk: 2,
        }
    }
    const VISION_END: u32 = 10;
    const AUDIO_END: u32 = 5;

    #[test]
    fn text_only_is_plain_positions() {
        let ids = [100, 101, 102, 103];
        let (pos, delta) = get_rope_index(&cfg(), &ids, &MediaLayout::default()).unwrap();
        assert_eq!(pos, text_positions(0, 4));
        assert_eq!(delta, 0);
    }

    #[test]
    fn image_block_advances_by_its_largest_side() {
        let c = cfg();
        // text, bos, 2x3 merged tokens (grid 1x4x6), eos, text
        let mut ids = vec![100, 9];
        ids.extend(std::iter::repeat_n(12, 6));
        ids.extend([10, 101]);
        let media = MediaLayout {
            images: vec![VisionGrid::new(1, 4, 6)],
            ..Default::default()
        };
        let (pos, delta) = get_rope_index(&c, &ids, &media).unwrap();
        assert_eq!(pos.t, vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(pos.h, vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(pos.w, vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        assert_eq!(delta, 7 - 10);
    }

    #[test]
    fn mismatched_counts_are_clear_errors() {
        let c = cfg();
        let ids = [100, 4, 3, 3, 5];
        let media = MediaLayout {
            audio_tokens: vec![3],
            ..Default::default()
        };
        let err = get_rope_index(&c, &ids, &media).unwrap_err().to_string();
        assert!(err.contains("placeholder counts"), "{err}");
        let err = get_rope_index(&c, &ids, &MediaLayout::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("audio"), "{err}");
    }

    #[test]
    fn chunker_matches_reference_quirks() {
        assert_eq!(chunk_ranges(&[0, 0, 25, 25, 50, 75], 50), vec![0..4, 4..6]);
        // A jump over two boundaries closes only one chunk per token.
        assert_eq!(chunk_ranges(&[0, 0, 120, 120], 50), vec![0..2, 2..3, 3..4]);
        assert_eq!(chunk_ranges(&[], 50), vec![0..0]);
    }

    /// Expanded ids of a video with its audio (as the processor writes them), for `grid`.
    fn av_ids(c: &RopeIndexConfig, video: &VideoGrid, n_audio: usize) -> Vec<u32> {
        let mut ids = vec![100, 101, c.vision_start_token_id, c.audio_start_token_id];
        for chunk in interleaved_chunks(c, video, n_audio) {
            ids.extend(std::iter::repeat_n(c.video_token_id, chunk.video.len()));
            ids.extend(std::iter::repeat_n(c.audio_token_id, chunk.audio.len()));
        }
        ids.extend([AUDIO_END, VISION_END, 102]);
        ids
    }

    #[test]
    fn live_segment_built_chunk_by_chunk_equals_the_whole_prompt() {
        let c = cfg();
        // 2 fps (1 s per temporal grid): 6 s of video against 3.2, 6 and 8 s of audio.
        for (grids, n_audio) in [(6, 80), (6, 150), (6, 200), (3, 150), (1, 20)] {
            let video = VideoGrid {
                grid: VisionGrid::new(grids, 4, 6),
                second_per_grid: 1.0,
            };
            let ids = av_ids(&c, &video, n_audio);
            let media = MediaLayout {
                videos: vec![video],
                audio_tokens: vec![n_audio],
                use_audio_in_video: true,
                ..Default::default()
            };
            let (whole, _) = get_rope_index(&c, &ids, &media).unwrap();

            let mut live = text_positions(0, 2);
            let (mut seg, bos) = InterleavedSegment::open(&c, 2, video.second_per_grid);
            live.extend(&bos);
            // Blocks of 2 s: two temporal grids and 50 audio tokens each, while they last.
            let mut block = 0;
            loop {
                let g0 = (2 * block).min(grids);
                let g1 = (2 * block + 2).min(grids);
                let a0 = (50 * block).min(n_audio);
                let a1 = (50 * block + 50).min(n_audio);
                if g0 == g1 && a0 == a1 {
                    break;
                }
                let frames = vec![(4, 6); g1 - g0];
                live.extend(&seg.push_chunk(&frames, a1 - a0).unwrap());
                block += 1;
            }
            let eos = seg.close();
            let next = eos.next_start().unwrap();
            live.extend(&eos);
            live.extend(&text_positions(next, 1));
            assert_eq!(live, whole, "grids {grids}, audio {n_audio}");
        }
    }
}
