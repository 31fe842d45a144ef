//! The conversation as the Thinker's KV cache holds it, position by position: what each entry
//! is (template text, a typed message, a media marker, an audio or video placeholder of some
//! block, a token of an answer), which turn it belongs to, and its TMRoPE position for the
//! Thinker and for the Talker. This is pure bookkeeping (no model): it lays out what is to be
//! prefilled, knows where the next turn's positions start after a truncation, and plans what
//! to forget when the context would outgrow its limit.
//!
//! # Layout of a conversation
//!
//! ```text
//! <|im_start|>system\n{system prompt}<|im_end|>\n                 turn 0, prefilled at start
//! <|im_start|>user\n                                            spoken turn N, at its start
//!   audio only:  <|audio_bos|> [audio of each block...] <|audio_eos|>
//!   with camera: <|vision_bos|><|audio_bos|> [video of block k][audio of block k]...
//!                <|audio_eos|><|vision_eos|>                    (use_audio_in_video layout)
//! <|im_end|>\n<|im_start|>assistant\n                           at the turn's end
//! {answer tokens}<|im_end|>\n                                   the answer as heard
//! ```
//!
//! Typed turns are `<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n`. The Talker's
//! positions are laid out by the same rules with the Talker's rope settings: its cache mirrors
//! the Thinker's entry for entry between answers.
//!
//! # Positions
//!
//! Text, markers and audio advance all three rows together; an interleaved segment gives its
//! bos pair one id, then each block's video grids and audio tokens share the segment's
//! temporal origin ([`InterleavedSegment`]), then the eos pair takes the id after the last
//! piece. The next id after any piece is that piece's largest id plus one, as in the
//! reference's `get_rope_index`. Entries keep their absolute positions forever: dropping some
//! (the context policy) leaves the others valid, and decoding continues from the cursor.
//!
//! # Context policy (`max_context`)
//!
//! Before a batch is prefilled, the context must have room for it plus a reserve (the
//! closing template, the longest answer and its end tokens). When it has not, entries are
//! forgotten in this order until it has: (1) the video tokens of the oldest blocks, any turn,
//! oldest first (speech carries the conversation; old pictures matter least); (2) the oldest
//! whole exchanges (a user turn and its answer), never the system prompt nor the turn being
//! taken; (3) the oldest audio blocks of the turn being taken, never its newest. If that still
//! is not enough (the limit is smaller than the system prompt plus one block plus the reserve)
//! the batch is refused with [`ContextError::Full`].

use std::ops::Range;

use crate::model::thinker::rope::{
    InterleavedSegment, PositionIds, RopeIndexConfig, text_positions,
};

/// What one context entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EntryKind {
    /// Template text: role headers, turn markers, the system prompt.
    Template,
    /// A typed user message.
    UserText,
    /// A media segment's bos or eos marker.
    MediaMarker,
    /// An audio placeholder of block `block` of its turn.
    Audio { block: usize },
    /// A video placeholder of block `block` of its turn.
    Video { block: usize },
    /// A token of the model's answer.
    Answer,
}

/// One position of the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    pub id: u32,
    pub kind: EntryKind,
    /// 0 for the system prompt, else the user turn (and its answer).
    pub turn: u64,
    /// Largest of the entry's three Thinker position ids.
    pub position: i64,
    /// Largest of its three Talker position ids.
    pub talker_position: i64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ContextError {
    #[error(
        "the context cannot hold {needed} more tokens within max_context {limit}: after \
         forgetting everything it may, {kept} remain (system prompt and the newest block)"
    )]
    Full {
        needed: usize,
        limit: usize,
        kept: usize,
    },
    #[error("{0}")]
    Layout(String),
}

/// Entries laid out since the last [`Context::take_batch`], with their positions: what the
/// next forward pass runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Index of the batch's first entry in the context.
    pub start: usize,
    pub ids: Vec<u32>,
    pub positions: PositionIds,
    pub talker_positions: PositionIds,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The open media segment of a user turn.
#[derive(Debug, Clone)]
enum Segment {
    AudioOnly,
    Interleaved {
        thinker: InterleavedSegment,
        talker: InterleavedSegment,
    },
}

/// Token ids of the media markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkerIds {
    pub audio: u32,
    pub video: u32,
    pub audio_bos: u32,
    pub audio_eos: u32,
    pub vision_bos: u32,
    pub vision_eos: u32,
}

#[derive(Debug, Clone)]
pub struct Context {
    entries: Vec<Entry>,
    thinker_rope: RopeIndexConfig,
    talker_rope: RopeIndexConfig,
    markers: MarkerIds,
    /// Next free position id of the Thinker and the Talker.
    next: i64,
    talker_next: i64,
    segment: Option<Segment>,
    /// Entries laid out but not yet taken as a batch start here.
    batch_start: usize,
    batch_positions: PositionIds,
    batch_talker_positions: PositionIds,
}

impl Context {
    /// The Talker sees the Thinker's placeholders, so both must merge vision patches alike.
    pub fn new(
        thinker_rope: RopeIndexConfig,
        talker_rope: RopeIndexConfig,
        markers: MarkerIds,
    ) -> Result<Self, ContextError> {
        if thinker_rope.spatial_merge_size != talker_rope.spatial_merge_size {
            return Err(ContextError::Layout(format!(
                "the Thinker merges {0}x{0} vision patches per token, the Talker's config says \
                 {1}x{1}: they must see the same tokens",
                thinker_rope.spatial_merge_size, talker_rope.spatial_merge_size
            )));
        }
        Ok(Self {
            entries: Vec::new(),
            thinker_rope,
            talker_rope,
            markers,
            next: 0,
            talker_next: 0,
            segment: None,
            batch_start: 0,
            batch_positions: PositionIds::default(),
            batch_talker_positions: PositionIds::default(),
        })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().map(|e| e.id)
    }

    /// The position id the next text token gets (Thinker, Talker).
    pub fn next_positions(&self) -> (i64, i64) {
        (self.next, self.talker_next)
    }

    pub fn markers(&self) -> MarkerIds {
        self.markers
    }

    /// Whether a media segment is open (its eos is still to come).
    pub fn segment_open(&self) -> bool {
        self.segment.is_some()
    }

    /// Whether the open segment interleaves video (false: audio only, or none open).
    pub fn segment_has_video(&self) -> bool {
        matches!(self.segment, Some(Segment::Interleaved { .. }))
    }

    fn push(
        &mut self,
        ids: &[u32],
        kind: EntryKind,
        turn: u64,
        thinker: PositionIds,
        talker: PositionIds,
    ) {
        debug_assert_eq!(ids.len(), thinker.len());
        for (i, &id) in ids.iter().enumerate() {
            let max = |p: &PositionIds| p.t[i].max(p.h[i]).max(p.w[i]);
            self.entries.push(Entry {
                id,
                kind,
                turn,
                position: max(&thinker),
                talker_position: max(&talker),
            });
        }
        self.batch_positions.extend(&thinker);
        self.batch_talker_positions.extend(&talker);
    }

    /// Text tokens (template, typed text, answer tokens) at plain positions.
    pub fn push_text(&mut self, ids: &[u32], kind: EntryKind, turn: u64) {
        if ids.is_empty() {
            return;
        }
        let thinker = text_positions(self.next, ids.len());
        let talker = text_positions(self.talker_next, ids.len());
        self.next += ids.len() as i64;
        self.talker_next += ids.len() as i64;
        self.push(ids, kind, turn, thinker, talker);
    }

    /// Opens the turn's media segment: `<|audio_bos|>` for an audio-only turn, the shared
    /// `<|vision_bos|><|audio_bos|>` pair when the turn has camera frames, whose temporal grids
    /// each span `second_per_grid` seconds.
    pub fn open_segment(&mut self, turn: u64, video: Option<f32>) -> Result<(), ContextError> {
        if self.segment.is_some() {
            return Err(ContextError::Layout(
                "a media segment is already open".into(),
            ));
        }
        let m = self.markers;
        match video {
            None => {
                self.push_text(&[m.audio_bos], EntryKind::MediaMarker, turn);
                self.segment = Some(Segment::AudioOnly);
            }
            Some(second_per_grid) => {
                let (thinker, bos) =
                    InterleavedSegment::open(&self.thinker_rope, self.next, second_per_grid);
                let (talker, talker_bos) =
                    InterleavedSegment::open(&self.talker_rope, self.talker_next, second_per_grid);
                self.push(
                    &[m.vision_bos, m.audio_bos],
                    EntryKind::MediaMarker,
                    turn,
                    bos,
                    talker_bos,
                );
                self.segment = Some(Segment::Interleaved { thinker, talker });
            }
        }
        Ok(())
    }

    /// `count` audio placeholders of block `block`.
    pub fn push_audio(
        &mut self,
        count: usize,
        turn: u64,
        block: usize,
    ) -> Result<(), ContextError> {
        if count == 0 {
            return Ok(());
        }
        let ids = vec![self.markers.audio; count];
        let kind = EntryKind::Audio { block };
        match self.segment.as_mut() {
            None => Err(ContextError::Layout("audio outside a media segment".into())),
            Some(Segment::AudioOnly) => {
                self.push_text(&ids, kind, turn);
                Ok(())
            }
            Some(Segment::Interleaved { thinker, talker }) => {
                let p = thinker.push_chunk(&[], count).map_err(layout)?;
                let q = talker.push_chunk(&[], count).map_err(layout)?;
                self.push(&ids, kind, turn, p, q);
                Ok(())
            }
        }
    }

    /// The video placeholders of block `block`: temporal grids of `grids` (h, w) patches each.
    pub fn push_video(
        &mut self,
        grids: &[(usize, usize)],
        turn: u64,
        block: usize,
    ) -> Result<(), ContextError> {
        let Some(Segment::Interleaved { thinker, talker }) = self.segment.as_mut() else {
            return Err(ContextError::Layout(
                "video outside an interleaved segment".into(),
            ));
        };
        let p = thinker.push_chunk(grids, 0).map_err(layout)?;
        let q = talker.push_chunk(grids, 0).map_err(layout)?;
        let ids = vec![self.markers.video; p.len()];
        self.push(&ids, EntryKind::Video { block }, turn, p, q);
        Ok(())
    }

    /// Closes the open segment: `<|audio_eos|>`, or the shared `<|audio_eos|><|vision_eos|>`
    /// pair after the segment's last piece.
    pub fn close_segment(&mut self, turn: u64) -> Result<(), ContextError> {
        let m = self.markers;
        match self.segment.take() {
            None => Err(ContextError::Layout("no media segment to close".into())),
            Some(Segment::AudioOnly) => {
                self.push_text(&[m.audio_eos], EntryKind::MediaMarker, turn);
                Ok(())
            }
            Some(Segment::Interleaved { thinker, talker }) => {
                let eos = thinker.close();
                let talker_eos = talker.close();
                self.next = eos.next_start().unwrap_or(self.next);
                self.talker_next = talker_eos.next_start().unwrap_or(self.talker_next);
                self.push(
                    &[m.audio_eos, m.vision_eos],
                    EntryKind::MediaMarker,
                    turn,
                    eos,
                    talker_eos,
                );
                Ok(())
            }
        }
    }

    /// Entries laid out and not yet taken as a batch.
    pub fn pending(&self) -> usize {
        self.entries.len() - self.batch_start
    }

    /// Entries laid out since the last call: the next forward pass.
    pub fn take_batch(&mut self) -> Batch {
        let start = self.batch_start;
        let batch = Batch {
            start,
            ids: self.entries[start..].iter().map(|e| e.id).collect(),
            positions: std::mem::take(&mut self.batch_positions),
            talker_positions: std::mem::take(&mut self.batch_talker_positions),
        };
        self.batch_start = self.entries.len();
        batch
    }

    /// Rolls the context back to its first `len` entries (a cancelled turn, an interrupted
    /// answer, a failed prefill). The next positions follow the new last entry, which must be
    /// a text token or a marker (every roll-back point is). Any open segment and pending batch
    /// are discarded.
    pub fn truncate(&mut self, len: usize) {
        self.entries.truncate(len);
        let last = self.entries.last();
        self.next = last.map_or(0, |e| e.position + 1);
        self.talker_next = last.map_or(0, |e| e.talker_position + 1);
        self.segment = None;
        self.batch_start = self.entries.len();
        self.batch_positions = PositionIds::default();
        self.batch_talker_positions = PositionIds::default();
    }

    /// Forgets entries `range` (already prefilled: before the pending batch). The positions of
    /// the others do not change.
    pub fn remove(&mut self, range: Range<usize>) {
        debug_assert!(range.end <= self.batch_start);
        let n = range.len();
        self.entries.drain(range);
        self.batch_start -= n;
    }

    /// The ranges to forget so that the prefilled entries plus `incoming` plus `reserve` fit in
    /// `limit`, back to front: removing them in the order given keeps each index valid.
    /// `current_turn` is the turn being taken (its newest block is never forgotten).
    pub fn plan_room(
        &self,
        incoming: usize,
        reserve: usize,
        limit: usize,
        current_turn: u64,
    ) -> Result<Vec<Range<usize>>, ContextError> {
        let prefilled = self.batch_start;
        let needed = incoming + reserve;
        if prefilled + needed <= limit {
            return Ok(Vec::new());
        }
        let mut excess = prefilled + needed - limit;
        // Candidate runs over the prefilled entries, in the policy's order.
        let entries = &self.entries[..prefilled];
        let runs = |pred: &dyn Fn(&Entry) -> Option<(u64, usize)>| -> Vec<Range<usize>> {
            let mut out: Vec<Range<usize>> = Vec::new();
            let mut key = None;
            for (i, e) in entries.iter().enumerate() {
                let k = pred(e);
                match (k, key) {
                    (Some(k), Some(prev)) if k == prev => {
                        if let Some(last) = out.last_mut() {
                            last.end = i + 1;
                        }
                    }
                    (Some(k), _) => {
                        out.push(i..i + 1);
                        key = Some(k);
                    }
                    (None, _) => key = None,
                }
            }
            out
        };
        let newest_block = entries
            .iter()
            .filter(|e| e.turn == current_turn)
            .filter_map(|e| match e.kind {
                EntryKind::Audio { block } | EntryKind::Video { block } => Some(block),
                _ => None,
            })
            .max();
        let video = runs(&|e| match e.kind {
            EntryKind::Video { block } => Some((e.turn, block)),
            _ => None,
        });
        let exchanges = runs(&|e| (e.turn != 0 && e.turn < current_turn).then_some((e.turn, 0)));
        let own_audio = runs(&|e| match e.kind {
            EntryKind::Audio { block } if e.turn == current_turn && Some(block) != newest_block => {
                Some((e.turn, block))
            }
            _ => None,
        });
        // Pick runs until the excess is covered, then express them in removal order.
        let mut picked: Vec<Range<usize>> = Vec::new();
        let overlaps = |r: &Range<usize>, picked: &[Range<usize>]| {
            picked.iter().any(|p| p.start < r.end && r.start < p.end)
        };
        for run in video.into_iter().chain(exchanges).chain(own_audio) {
            if excess == 0 {
                break;
            }
            if overlaps(&run, &picked) {
                // An exchange whose video was already picked: take what is left of it.
                let mut start = run.start;
                let mut pieces = Vec::new();
                let mut sorted: Vec<&Range<usize>> = picked
                    .iter()
                    .filter(|p| p.start < run.end && run.start < p.end)
                    .collect();
                sorted.sort_by_key(|p| p.start);
                for p in sorted {
                    if p.start > start {
                        pieces.push(start..p.start);
                    }
                    start = start.max(p.end);
                }
                if start < run.end {
                    pieces.push(start..run.end);
                }
                for piece in pieces {
                    excess = excess.saturating_sub(piece.len());
                    picked.push(piece);
                }
                continue;
            }
            excess = excess.saturating_sub(run.len());
            picked.push(run);
        }
        if excess > 0 {
            let forgettable: usize = picked.iter().map(|r| r.len()).sum();
            return Err(ContextError::Full {
                needed,
                limit,
                kept: prefilled - forgettable,
            });
        }
        // Removal order: back to front keeps the earlier indices valid; report them as the
        // caller applies them, each relative to the context as it is at that point.
        picked.sort_by_key(|r| std::cmp::Reverse(r.start));
        Ok(picked)
    }
}

fn layout(e: anyhow::Error) -> ContextError {
    ContextError::Layout(format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::thinker::rope::{
        MediaLayout, VideoGrid, VisionGrid, get_rope_index, interleaved_chunks,
    };

    fn rope() -> RopeIndexConfig {
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

    fn markers() -> MarkerIds {
        MarkerIds {
            audio: 3,
            video: 13,
            audio_bos: 4,
            audio_eos: 5,
            vision_bos: 9,
            vision_eos: 10,
        }
    }

    fn context() -> Context {
        Context::new(rope(), rope(), markers()).unwrap()
    }

    fn all_positions(c: &Context, batches: &[Batch]) -> PositionIds {
        let mut p = PositionIds::default();
        for b in batches {
            p.extend(&b.positions);
        }
        assert_eq!(p.len(), c.len());
        p
    }

    #[test]
    fn a_live_turn_laid_out_block_by_block_equals_the_whole_prompt() {
        // 2 fps, blocks of 2 s: two temporal grids of 4x6 patches and 50 audio tokens each,
        // the last block 1.3 s (one grid, 32 tokens); audio pushed in uneven pieces.
        let mut c = context();
        let mut batches = Vec::new();
        c.push_text(&[100, 101], EntryKind::Template, 0);
        batches.push(c.take_batch());
        c.open_segment(1, Some(1.0)).unwrap();
        c.push_video(&[(4, 6), (4, 6)], 1, 0).unwrap();
        c.push_audio(48, 1, 0).unwrap();
        batches.push(c.take_batch());
        c.push_audio(2, 1, 0).unwrap();
        c.push_video(&[(4, 6), (4, 6)], 1, 1).unwrap();
        c.push_audio(50, 1, 1).unwrap();
        c.push_video(&[(4, 6)], 1, 2).unwrap();
        c.push_audio(32, 1, 2).unwrap();
        c.close_segment(1).unwrap();
        c.push_text(&[102], EntryKind::Template, 1);
        batches.push(c.take_batch());
        let live = all_positions(&c, &batches);

        let video = VideoGrid {
            grid: VisionGrid::new(5, 4, 6),
            second_per_grid: 1.0,
        };
        let mut ids = vec![100, 101, 9, 4];
        for chunk in interleaved_chunks(&rope(), &video, 132) {
            ids.extend(std::iter::repeat_n(13, chunk.video.len()));
            ids.extend(std::iter::repeat_n(3, chunk.audio.len()));
        }
        ids.extend([5, 10, 102]);
        let media = MediaLayout {
            videos: vec![video],
            audio_tokens: vec![132],
            use_audio_in_video: true,
            ..Default::default()
        };
        let (whole, _) = get_rope_index(&rope(), &ids, &media).unwrap();
        assert_eq!(live, whole);
        assert_eq!(c.ids().collect::<Vec<_>>(), ids);
        let kinds: Vec<EntryKind> = c.entries()[4..16].iter().map(|e| e.kind).collect();
        assert!(kinds.iter().all(|k| *k == EntryKind::Video { block: 0 }));
        assert_eq!(c.next_positions().0, live.max().unwrap() + 1);
    }

    #[test]
    fn audio_only_turns_are_plain_and_truncation_restores_the_cursor() {
        let mut c = context();
        c.push_text(&[100, 101, 102], EntryKind::Template, 0);
        let mark = c.len();
        c.open_segment(1, None).unwrap();
        c.push_audio(30, 1, 0).unwrap();
        c.push_audio(12, 1, 1).unwrap();
        c.close_segment(1).unwrap();
        let b = c.take_batch();
        assert_eq!(b.positions, text_positions(0, 3 + 44));
        assert!(
            c.push_video(&[(2, 2)], 1, 2).is_err(),
            "no open interleaved segment"
        );
        c.truncate(mark);
        assert_eq!(c.next_positions(), (3, 3));
        assert_eq!(c.take_batch().len(), 0);
        c.push_text(&[7], EntryKind::UserText, 2);
        assert_eq!(c.take_batch().positions, text_positions(3, 1));
    }

    #[test]
    fn the_talker_track_follows_its_own_rope_settings() {
        let talker = RopeIndexConfig {
            position_id_per_seconds: 50,
            ..rope()
        };
        let mut c = Context::new(rope(), talker, markers()).unwrap();
        c.open_segment(1, Some(1.0)).unwrap();
        c.push_video(&[(4, 6), (4, 6)], 1, 0).unwrap();
        c.close_segment(1).unwrap();
        let b = c.take_batch();
        assert_eq!(b.len(), 2 + 12 + 2);
        // the second grid is 1 s in: temporal id 25 for the Thinker, 50 for the Talker
        assert_eq!(b.positions.t[2 + 6], 1 + 25);
        assert_eq!(b.talker_positions.t[2 + 6], 1 + 50);
        let other = RopeIndexConfig {
            spatial_merge_size: 1,
            ..rope()
        };
        assert!(Context::new(rope(), other, markers()).is_err());
    }

    /// A system prompt, two old exchanges with video, and the open turn.
    fn long_context() -> Context {
        let mut c = context();
        c.push_text(&[1; 10], EntryKind::Template, 0);
        for turn in 1..=2 {
            c.push_text(&[2; 3], EntryKind::Template, turn);
            c.open_segment(turn, Some(1.0)).unwrap();
            for block in 0..2 {
                c.push_video(&[(4, 4); 2], turn, block).unwrap(); // 8 tokens
                c.push_audio(5, turn, block).unwrap();
            }
            c.close_segment(turn).unwrap();
            c.push_text(&[2; 5], EntryKind::Template, turn);
            c.push_text(&[7; 6], EntryKind::Answer, turn);
            c.push_text(&[2; 2], EntryKind::Template, turn);
        }
        c.push_text(&[2; 3], EntryKind::Template, 3);
        c.open_segment(3, None).unwrap();
        c.push_audio(20, 3, 0).unwrap();
        c.push_audio(20, 3, 1).unwrap();
        c.take_batch();
        c
    }

    fn apply(c: &mut Context, plan: &[Range<usize>]) {
        for r in plan {
            c.remove(r.clone());
        }
    }

    #[test]
    fn the_policy_forgets_old_video_then_old_exchanges_then_old_audio() {
        let base = long_context();
        let n = base.len();
        assert_eq!(n, 10 + 2 * (3 + 2 + 2 * 13 + 2 + 5 + 6 + 2) + 3 + 1 + 40);
        // room already
        assert!(base.plan_room(5, 5, n + 10, 3).unwrap().is_empty());
        // 8 tokens short: the oldest video block goes
        let mut c = base.clone();
        let plan = c.plan_room(5, 5, n + 2, 3).unwrap();
        apply(&mut c, &plan);
        assert_eq!(c.len(), n - 8);
        assert!(
            !c.entries()
                .iter()
                .any(|e| e.kind == EntryKind::Video { block: 0 } && e.turn == 1)
        );
        // 40 short: all four video blocks (32), then exchange 1 (what is left of it)
        let mut c = base.clone();
        let plan = c.plan_room(5, 5, n - 30, 3).unwrap();
        apply(&mut c, &plan);
        assert!(c.len() <= n - 40);
        assert!(
            !c.entries()
                .iter()
                .any(|e| matches!(e.kind, EntryKind::Video { .. }))
        );
        assert!(!c.entries().iter().any(|e| e.turn == 1));
        assert!(
            c.entries()
                .iter()
                .any(|e| e.turn == 2 && e.kind == EntryKind::Answer)
        );
        // the system prompt and the open turn's newest block always stay
        let mut c = base.clone();
        let plan = c.plan_room(5, 5, 10 + 3 + 1 + 20 + 10, 3).unwrap();
        apply(&mut c, &plan);
        assert_eq!(c.entries().iter().filter(|e| e.turn == 0).count(), 10);
        assert_eq!(
            c.entries()
                .iter()
                .filter(|e| e.kind == EntryKind::Audio { block: 1 })
                .count(),
            20
        );
        assert_eq!(c.len(), 10 + 3 + 1 + 20);
        // too small for even that: a clear error
        let err = base.plan_room(5, 5, 30, 3).unwrap_err();
        assert!(matches!(err, ContextError::Full { kept: 34, .. }), "{err}");
        // positions of what stays are unchanged, and the cursor too
        let mut c = base.clone();
        let before: Vec<i64> = c.entries().iter().map(|e| e.position).collect();
        let next = c.next_positions();
        let plan = c.plan_room(5, 5, n + 2, 3).unwrap();
        apply(&mut c, &plan);
        let after: Vec<i64> = c.entries().iter().map(|e| e.position).collect();
        assert!(after.iter().all(|p| before.contains(p)));
        assert_eq!(c.next_positions(), next);
    }
}
