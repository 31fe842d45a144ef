//! The Thinker's side of a user turn: each block laid out in the context (audio, and video
//! interleaved the reference's way) and prefilled as it closes, the turn's end with the
//! assistant header, the context policy's forgetting, and going back (a cancelled turn, a
//! dropped speculative answer).

use anyhow::{Context as _, Result, bail};
use candle_core::Tensor;

use crate::engine::context::EntryKind;
use crate::engine::input::InputBlock;
use crate::engine::model_access::Due;
use crate::engine::profile::Stage;
use crate::engine::talker_task::TalkerMsg;
use crate::model::talker::prompt_rows;
use crate::model::thinker::{LogitsFor, MultimodalEmbeds};

use super::{OpenTurn, PendingMedia, ThinkerTask};

impl ThinkerTask {
    /// Goes back to where the speculative answer to `turn` began: the context as it was (token
    /// for token, position for position), both caches truncated to it, the open turn with its
    /// audio stream as it was.
    pub(super) fn drop_speculation(&mut self, turn: u64) -> Result<()> {
        let Some(snapshot) = self.snapshot.take_if(|s| s.turn == turn) else {
            return Ok(());
        };
        self.last = None;
        self.pending_media = PendingMedia::default();
        if snapshot.forgotten != self.forgotten {
            // The final prefill made the context policy forget entries: the turn cannot be
            // taken back to where it was, so it is dropped as a whole.
            let start = snapshot
                .open
                .as_ref()
                .map_or(self.context.len(), |o| o.start);
            self.open = snapshot.open.map(|o| OpenTurn { failed: true, ..o });
            self.roll_back(start.min(self.context.len()));
            bail!(
                "turn {turn}: the context was full when its answer was started early; \
                 the turn is dropped (raise max_context)"
            );
        }
        // The snapshot may hold entries laid out and not prefilled yet (a turn shorter than a
        // block: its user header): the caches go back to what was prefilled then, and those
        // entries are prefilled again with the turn's next batch.
        let prefilled = snapshot.context.len() - snapshot.context.pending();
        self.context = snapshot.context;
        self.thinker.truncate(prefilled)?;
        self.talker(TalkerMsg::Truncate(prefilled));
        self.open = snapshot.open;
        Ok(())
    }

    /// Forgets the context from entry `len` on, in both caches.
    pub(super) fn roll_back(&mut self, len: usize) {
        self.pending_media = PendingMedia::default();
        self.context.truncate(len);
        self.truncate_thinker(len);
        self.talker(TalkerMsg::Truncate(len));
    }

    /// Lays out and encodes one block of the open turn, then prefills it.
    pub(super) fn block(&mut self, turn: u64, block: &InputBlock) -> Result<()> {
        self.lay_out_block(turn, block)?;
        self.prefill_pending(turn, false)?;
        Ok(())
    }

    /// The batch's media embeddings, gathered while laying out.
    pub(super) fn lay_out_block(&mut self, turn: u64, block: &InputBlock) -> Result<()> {
        let open = self.open.as_mut().context("no open turn")?;
        let video = *open.video.get_or_insert(!block.frames.is_empty());
        if !self.context.segment_open() {
            self.context
                .open_segment(turn, video.then_some(self.second_per_grid as f32))?;
        }
        let encoders = &self.encoders;
        self.links
            .profile
            .timed(Stage::Encoders, || -> Result<()> {
                open.audio.push_block(encoders, block)?;
                if block.last {
                    open.audio.finish(encoders)?;
                }
                Ok(())
            })?;
        let per_block = self.tokens_per_block;
        if video {
            // Tokens of the previous chunk that came with this block's audio go first.
            let boundary = block.index * per_block;
            let open = self.open.as_mut().expect("open turn");
            let n = boundary
                .saturating_sub(open.audio.taken())
                .min(open.audio.available());
            if n > 0 {
                self.pending_media.audio.push(open.audio.take(n)?);
                self.context
                    .push_audio(n, turn, block.index.saturating_sub(1))?;
            }
            if !block.frames.is_empty() {
                let encoded = self.links.profile.timed(Stage::Encoders, || {
                    self.encoders.encode_frames(&block.frames)
                })?;
                self.context.push_video(&encoded.grids, turn, block.index)?;
                self.pending_media.video.push(encoded.embeds);
                if let Some(open) = self.open.as_mut() {
                    open.video_frames += block.frames.len();
                }
            }
            let open = self.open.as_mut().expect("open turn");
            let end = if block.last {
                usize::MAX
            } else {
                (block.index + 1) * per_block
            };
            let n = end
                .saturating_sub(open.audio.taken())
                .min(open.audio.available());
            if n > 0 {
                self.pending_media.audio.push(open.audio.take(n)?);
                self.context.push_audio(n, turn, block.index)?;
            }
        } else {
            // Audio only (frames arriving after the turn's first block are not shown).
            let open = self.open.as_mut().expect("open turn");
            let n = open.audio.available();
            if n > 0 {
                self.pending_media.audio.push(open.audio.take(n)?);
                self.context.push_audio(n, turn, block.index)?;
            }
        }
        if block.last {
            self.context.close_segment(turn)?;
        }
        Ok(())
    }

    /// Ends the open turn: its last block (or what is left of its audio), the closing
    /// template and the assistant header, prefilled with the logits of the first answer token.
    pub(super) fn end_turn(
        &mut self,
        turn: u64,
        final_block: Option<&InputBlock>,
    ) -> Result<Option<Tensor>> {
        if let Some(block) = final_block {
            self.lay_out_block(turn, block)?;
        }
        if self.context.segment_open() {
            // The turn ended on a block boundary: the rest of the audio, then the segment's end.
            let open = self.open.as_mut().context("no open turn")?;
            let encoders = &self.encoders;
            self.links
                .profile
                .timed(Stage::Encoders, || open.audio.finish(encoders))?;
            let n = open.audio.available();
            if n > 0 {
                let block = self
                    .context
                    .entries()
                    .iter()
                    .rev()
                    .find_map(|e| match e.kind {
                        EntryKind::Audio { block } | EntryKind::Video { block } => Some(block),
                        _ => None,
                    })
                    .unwrap_or(0);
                self.pending_media.audio.push(open.audio.take(n)?);
                self.context.push_audio(n, turn, block)?;
            }
            self.context.close_segment(turn)?;
        } else if self.open.as_ref().is_some_and(|o| o.video.is_none()) {
            // A turn without a single block: an empty audio segment.
            self.context.open_segment(turn, None)?;
            self.context.close_segment(turn)?;
        }
        self.context
            .push_text(&self.assistant_header.clone(), EntryKind::Template, turn);
        let logits = self.prefill_pending(turn, true)?;
        let video_frames = self.open.as_ref().map_or(0, |o| o.video_frames);
        self.links.marks.mark(turn, |t, now| {
            t.prefill_done.get_or_insert(now);
            t.video_frames_prefilled = video_frames;
        });
        Ok(logits)
    }

    pub(super) fn prefill_pending(&mut self, turn: u64, logits: bool) -> Result<Option<Tensor>> {
        let audio = std::mem::take(&mut self.pending_media.audio);
        let video = std::mem::take(&mut self.pending_media.video);
        self.prefill(turn, audio, video, logits)
    }

    /// Prefills the entries laid out since the last batch (with these media embeddings, in
    /// order) into the Thinker, mirrors them into the Talker, after making room by the context
    /// policy. Returns the last row's logits when asked.
    pub(super) fn prefill(
        &mut self,
        turn: u64,
        audio: Vec<Tensor>,
        video: Vec<Tensor>,
        logits: bool,
    ) -> Result<Option<Tensor>> {
        let incoming = self.context.pending();
        if incoming == 0 {
            return Ok(None);
        }
        let plan =
            match self
                .context
                .plan_room(incoming, self.reserve, self.config.max_context, turn)
            {
                Ok(plan) => plan,
                Err(e) => {
                    let keep = self.context.len() - incoming;
                    self.context.truncate(keep);
                    bail!(e);
                }
            };
        for range in plan {
            tracing::debug!(?range, "context policy: forgetting entries");
            self.forgotten += 1;
            if let Some(open) = self.open.as_mut() {
                if range.end <= open.start {
                    open.start -= range.len();
                } else if range.start < open.start {
                    open.start = range.start;
                }
            }
            self.context.remove(range.clone());
            self.thinker.forget(range.clone())?;
            self.talker(TalkerMsg::Remove(range));
        }
        let batch = self.context.take_batch();
        let result = (|| -> Result<(Tensor, Tensor, Option<Tensor>)> {
            let device = self.model.thinker.device().clone();
            let cat = |parts: Vec<Tensor>| -> Result<Option<Tensor>> {
                Ok(match parts.len() {
                    0 => None,
                    1 => parts.into_iter().next(),
                    _ => Some(Tensor::cat(&parts, 0)?),
                })
            };
            let media = MultimodalEmbeds {
                audio: cat(audio)?,
                image: None,
                video: cat(video)?,
            };
            let (weights, thinker) = (&self.model.thinker, &mut self.thinker);
            // The prefill that starts an answer is awaited; any other is a block ahead of need.
            let (wanted, due) = if logits {
                (LogitsFor::Last, Due::Playout)
            } else {
                (LogitsFor::None, Due::NextBlock)
            };
            let (embeds, out) = self.links.profile.timed(Stage::Thinker, || -> Result<_> {
                let embeds = weights.embed_prompt(&batch.ids, &media)?;
                let positions = batch.positions.to_tensor(&device)?;
                let out = thinker.prefill(&embeds, &positions, wanted, due)?;
                Ok((embeds, out))
            })?;
            let logits = match out.logits {
                Some(l) => Some(l.squeeze(0)?),
                None => None,
            };
            Ok((out.hidden, embeds, logits))
        })();
        match result {
            Ok((hidden, embeds, logits)) => {
                if self.talker.is_some() {
                    let rows = prompt_rows(&hidden, &embeds, &batch.ids, &self.placeholders)?;
                    let positions = batch
                        .talker_positions
                        .to_tensor(self.model.thinker.device())?;
                    self.talker(TalkerMsg::Mirror { rows, positions });
                }
                Ok(logits)
            }
            Err(e) => {
                self.context.truncate(batch.start);
                self.truncate_thinker(batch.start);
                Err(e.context("Thinker prefill"))
            }
        }
    }
}
