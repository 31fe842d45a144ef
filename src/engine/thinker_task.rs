//! The Thinker thread of a session: the conversation in the KV cache, each block encoded and
//! prefilled as it closes, the answer generated token by token and streamed to the Talker.
//!
//! # Talker mirroring
//!
//! Every batch prefilled into the Thinker is also sent to the Talker thread as prompt rows
//! (the batch's post-norm hidden states plus its input embeddings with the media rows
//! zeroed, at the Talker's TMRoPE positions), so the Talker's cache holds the same
//! conversation entry for entry and an answer only runs the two rows after it
//! ([`TalkerTurn::after_cached_prompt`]). After an answer (or a barge-in) the Talker's cache
//! is rolled back to the answer's start and the kept answer tokens are appended as prompt
//! rows (their decode-time hidden state plus embedding, the same rows the reference's prompt
//! would give them on the next turn), then the closing `<|im_end|>\n`.
//!
//! Deviations from the reference's `generate()`: the reference rebuilds the Talker prompt from
//! the whole conversation each turn; here it is built incrementally, which gives the same
//! rows as long as the Thinker's cache is not edited by the context policy (forgotten
//! entries are forgotten by both caches, positions unchanged, so both see the same shorter
//! context). The token generated at the `max_answer_tokens` limit is fed back (the reference
//! leaves its last token out of the context), so that the context ends on a whole answer.
//!
//! # Interrupted answers
//!
//! On a stop the answer is cut to the tokens the user heard ([`super::heard`]): the Thinker's
//! cache is truncated to them and the assistant turn is closed with `<|im_end|>\n`. Text-only
//! answers keep every token fed back (they were all shown).

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender};

use super::activity::Activity;
use super::activity::WorkToken;
use super::cancel::Cancellation;
use super::context::{Context, EntryKind, MarkerIds};
use super::events::{AnswerMarks, EventSink};
use super::heard::{SpokenAnswer, tokens_heard};
use super::input::InputBlock;
use super::pacer::Pacer;
use super::probe::{CutAnswer, ProbeRecord};
use super::profile::{ModelProfile, Stage};
use super::session::{SessionConfig, SessionEvent};
use super::talker_task::{SpeechMeter, SpeechProgress, TalkerMsg};
use super::turn_media::{MediaEncoders, TurnAudio};
use crate::media::mel::LogMel;
use crate::media::video::VideoPreprocessor;
use crate::model::chat::{SamplingOverrides, sampling_options};
use crate::model::omni::OmniModel;
use crate::model::sampling::Sampler;
use crate::model::talker::{TalkerText, TalkerTextRows, multimodal_placeholder_ids, prompt_rows};
use crate::model::thinker::rope::{RopeIndexConfig, text_positions};
use crate::model::thinker::{LogitsFor, MultimodalEmbeds};

use std::sync::Arc;

/// What the control thread tells the Thinker thread.
#[derive(Debug)]
pub(crate) enum ThinkerMsg {
    TurnStarted {
        turn: u64,
    },
    Block {
        turn: u64,
        block: InputBlock,
    },
    /// Answer with `voice` (`None`: text only).
    TurnEnded {
        turn: u64,
        final_block: Option<InputBlock>,
        epoch: u64,
        voice: Option<String>,
    },
    TurnCancelled {
        turn: u64,
    },
    /// A speculative end of `turn` starts here: remember the state to come back to.
    Speculate {
        turn: u64,
    },
    /// The speculative answer to `turn` is dropped: back to where `Speculate` found things.
    DropSpeculation {
        turn: u64,
    },
    Typed {
        turn: u64,
        text: String,
        epoch: u64,
        voice: Option<String>,
    },
    /// The answer to `turn` was stopped after `frames` pacer frames (`heard` of audio).
    Stop {
        turn: Option<u64>,
        heard: Duration,
        voice: bool,
        frame_samples: usize,
        frames: u64,
    },
}

/// What the Thinker thread tells the control thread.
#[derive(Debug)]
pub(crate) enum ThinkerReport {
    /// A text-only answer is complete.
    TextAnswerDone { turn: u64 },
}

/// The user turn being prefilled.
#[derive(Clone)]
struct OpenTurn {
    turn: u64,
    /// Context index of its first entry.
    start: usize,
    audio: TurnAudio,
    /// Decided at the first block: whether the turn's segment interleaves video.
    video: Option<bool>,
    /// Camera frames encoded into the context so far.
    video_frames: usize,
    failed: bool,
}

/// Where a speculative answer began: the conversation and the open turn as they were.
struct Snapshot {
    turn: u64,
    context: Context,
    open: Option<OpenTurn>,
    /// `forgotten` then: if the context policy forgot entries since, the caches cannot go
    /// back to this point.
    forgotten: u64,
}

/// The last answer, until the next user turn: what a stop cuts.
struct LastAnswer {
    turn: u64,
    /// Context index of its first token.
    start: usize,
    ids: Vec<u32>,
    /// Talker prompt rows of each token fed back: hidden + embedding.
    rows: Vec<Tensor>,
    /// Characters of the answer's text after each token.
    chars: Vec<usize>,
    /// Whether it is closed in the context (`<|im_end|>\n` after it).
    closed: bool,
}

/// What the Thinker thread shares with the rest of its session.
pub(crate) struct ThinkerLinks {
    pub activity: Arc<Activity>,
    /// Told that a spoken answer with nothing to say is over.
    pub pacer: Arc<Pacer>,
    pub cancel: Arc<Cancellation>,
    pub events: Arc<EventSink>,
    pub marks: Arc<AnswerMarks>,
    pub profile: Arc<ModelProfile>,
    /// How much of the answer the Talker has voiced (for a stop's heard estimate).
    pub speech: Arc<SpeechMeter>,
    pub probe: Arc<ProbeRecord>,
}

pub(crate) struct ThinkerTask {
    model: OmniModel,
    encoders: MediaEncoders,
    context: Context,
    config: SessionConfig,
    links: ThinkerLinks,
    talker: Option<Sender<(TalkerMsg, WorkToken)>>,
    reports: Sender<(ThinkerReport, WorkToken)>,
    open: Option<OpenTurn>,
    last: Option<LastAnswer>,
    placeholders: [u32; 3],
    eos: Vec<u32>,
    /// `<|im_start|>user\n`, `<|im_end|>\n<|im_start|>assistant\n`, `<|im_end|>\n`.
    user_header: Vec<u32>,
    assistant_header: Vec<u32>,
    closing: Vec<u32>,
    /// Audio tokens per block (TMRoPE ids per 2-s chunk: one audio token per id).
    tokens_per_block: usize,
    second_per_grid: f64,
    /// Room kept free for the answer and the template around it.
    reserve: usize,
    samples_per_code: usize,
    /// Media embeddings of the entries laid out and not yet prefilled, in order.
    pending_media: PendingMedia,
    snapshot: Option<Snapshot>,
    /// Ranges the context policy has forgotten so far.
    forgotten: u64,
}

#[derive(Default)]
struct PendingMedia {
    audio: Vec<Tensor>,
    video: Vec<Tensor>,
}

impl ThinkerTask {
    pub fn new(
        model: OmniModel,
        config: SessionConfig,
        links: ThinkerLinks,
        talker: Option<Sender<(TalkerMsg, WorkToken)>>,
        reports: Sender<(ThinkerReport, WorkToken)>,
    ) -> Result<Self> {
        let thinker_cfg = &model.config.thinker_config;
        let thinker_rope = RopeIndexConfig::from(thinker_cfg);
        let talker_rope = RopeIndexConfig::from(&model.config.talker_config);
        let s = model.tokenizer.special();
        let markers = MarkerIds {
            audio: s.audio.id,
            video: s.video.id,
            audio_bos: s.audio_bos.id,
            audio_eos: s.audio_eos.id,
            vision_bos: s.vision_bos.id,
            vision_eos: s.vision_eos.id,
        };
        let context = Context::new(thinker_rope.clone(), talker_rope, markers)?;
        let video = VideoPreprocessor::new(&model.processor.video_processor, config.video_fps)
            .context("video settings")?
            .with_pixel_bounds(config.video_min_pixels, config.video_max_pixels);
        let encoders = MediaEncoders {
            audio: model.audio_encoder.clone(),
            vision: model.vision_encoder.clone(),
            mel: LogMel::new(&model.processor.feature_extractor).context("log-mel settings")?,
            video,
            device: model.thinker.device().clone(),
        };
        let tok = &model.tokenizer;
        let (im_start, im_end) = (&s.im_start.text, &s.im_end.text);
        let user_header = tok.encode(&format!("{im_start}user\n"))?;
        let assistant_header = tok.encode(&format!("{im_end}\n{im_start}assistant\n"))?;
        let closing = tok.encode(&format!("{im_end}\n"))?;
        let reserve = assistant_header.len() + config.max_answer_tokens + closing.len();
        let samples_per_code = model
            .speech
            .as_ref()
            .map_or(1, |s| s.token2wav.samples_per_code());
        let mut eos = model
            .generation_options(1, crate::model::sampling::SamplingOptions::greedy())
            .eos_token_ids;
        eos.push(s.im_end.id);
        Ok(Self {
            placeholders: multimodal_placeholder_ids(thinker_cfg),
            tokens_per_block: thinker_rope.ids_per_chunk() as usize,
            second_per_grid: encoders.video.second_per_grid(),
            encoders,
            pending_media: PendingMedia::default(),
            context,
            config,
            links,
            talker,
            reports,
            open: None,
            last: None,
            eos,
            user_header,
            assistant_header,
            closing,
            reserve,
            samples_per_code,
            model,
            snapshot: None,
            forgotten: 0,
        })
    }

    pub fn run(mut self, rx: Receiver<(ThinkerMsg, WorkToken)>, startup: WorkToken) {
        if let Err(e) = self.system_prompt() {
            self.links
                .events
                .error(format!("system prompt: {e:#}; the session has no context"));
        }
        self.publish();
        drop(startup);
        while let Ok((msg, token)) = rx.recv() {
            if let Err(e) = self.on_message(msg) {
                self.links.events.error(format!("{e:#}"));
            }
            self.publish();
            drop(token);
        }
    }

    fn publish(&self) {
        if !self.links.probe.probed() {
            return;
        }
        self.links.probe.set_view(
            self.context.entries().to_vec(),
            self.model.thinker.cache_len(),
        );
    }

    fn system_prompt(&mut self) -> Result<()> {
        let s = self.model.tokenizer.special();
        let text = format!(
            "{}system\n{}{}\n",
            s.im_start.text, self.config.system_prompt, s.im_end.text
        );
        let ids = self.model.tokenizer.encode(&text)?;
        self.context.push_text(&ids, EntryKind::Template, 0);
        self.prefill(0, Vec::new(), Vec::new(), false)?;
        Ok(())
    }

    fn talker(&self, msg: TalkerMsg) {
        if let Some(tx) = &self.talker {
            let _ = tx.send((msg, self.links.activity.token()));
        }
    }

    fn on_message(&mut self, msg: ThinkerMsg) -> Result<()> {
        match msg {
            ThinkerMsg::TurnStarted { turn } => {
                self.last = None;
                self.snapshot = None;
                if let Some(open) = self.open.take() {
                    self.roll_back(open.start);
                }
                let start = self.context.len();
                self.context
                    .push_text(&self.user_header.clone(), EntryKind::Template, turn);
                self.open = Some(OpenTurn {
                    turn,
                    start,
                    audio: self.encoders.turn_audio()?,
                    video: None,
                    video_frames: 0,
                    failed: false,
                });
                Ok(())
            }
            ThinkerMsg::Block { turn, block } => self.guarded(turn, |me| me.block(turn, &block)),
            ThinkerMsg::TurnCancelled { turn } => {
                if let Some(open) = self.open.take_if(|o| o.turn == turn) {
                    self.roll_back(open.start);
                }
                Ok(())
            }
            ThinkerMsg::Speculate { turn } => {
                self.snapshot = Some(Snapshot {
                    turn,
                    context: self.context.clone(),
                    open: self.open.clone(),
                    forgotten: self.forgotten,
                });
                Ok(())
            }
            ThinkerMsg::DropSpeculation { turn } => self.drop_speculation(turn),
            ThinkerMsg::TurnEnded {
                turn,
                final_block,
                epoch,
                voice,
            } => {
                let prefilled = self.guarded(turn, |me| me.end_turn(turn, final_block.as_ref()));
                let open = self.open.take_if(|o| o.turn == turn);
                match (prefilled, open) {
                    (Ok(Some(logits)), Some(open)) if !open.failed => {
                        self.answer(turn, epoch, logits, voice)
                    }
                    (result, _) => {
                        // Nothing to answer from: end the answer at once.
                        self.end_without_answer(turn, voice.is_some());
                        result.map(|_| ())
                    }
                }
            }
            ThinkerMsg::Typed {
                turn,
                text,
                epoch,
                voice,
            } => {
                self.last = None;
                self.snapshot = None;
                if let Some(open) = self.open.take() {
                    self.roll_back(open.start);
                }
                let start = self.context.len();
                let result = (|| -> Result<Tensor> {
                    let ids = self.model.tokenizer.encode(&text)?;
                    self.context
                        .push_text(&self.user_header.clone(), EntryKind::Template, turn);
                    self.context.push_text(&ids, EntryKind::UserText, turn);
                    self.context.push_text(
                        &self.assistant_header.clone(),
                        EntryKind::Template,
                        turn,
                    );
                    let logits = self.prefill(turn, Vec::new(), Vec::new(), true)?;
                    logits.context("the prefill gave no logits")
                })();
                match result {
                    Ok(logits) => {
                        self.links.marks.mark(turn, |t, now| {
                            t.prefill_done.get_or_insert(now);
                        });
                        self.answer(turn, epoch, logits, voice)
                    }
                    Err(e) => {
                        self.roll_back(start);
                        self.end_without_answer(turn, voice.is_some());
                        Err(e.context("typed turn"))
                    }
                }
            }
            ThinkerMsg::Stop {
                turn,
                heard,
                voice,
                frame_samples,
                frames,
            } => self.stop(turn, heard, voice, frames as usize * frame_samples),
        }
    }

    /// Runs a step of the open turn `turn`; on an error the turn is rolled back and ignored
    /// from then on (its answer comes from nothing: see `end_without_answer`).
    fn guarded<T: Default>(
        &mut self,
        turn: u64,
        step: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        match self.open.as_ref() {
            Some(o) if o.turn == turn && !o.failed => {}
            _ => return Ok(T::default()),
        }
        match step(self) {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Some(open) = self.open.as_mut() {
                    open.failed = true;
                    let start = open.start;
                    self.roll_back(start);
                }
                Err(e.context(format!("turn {turn}: its input is dropped")))
            }
        }
    }

    /// Goes back to where the speculative answer to `turn` began: the context as it was (token
    /// for token, position for position), both caches truncated to it, the open turn with its
    /// audio stream as it was.
    fn drop_speculation(&mut self, turn: u64) -> Result<()> {
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
        let len = snapshot.context.len();
        self.context = snapshot.context;
        self.model.thinker.truncate_cache(len);
        self.talker(TalkerMsg::Truncate(len));
        self.open = snapshot.open;
        Ok(())
    }

    /// Forgets the context from entry `len` on, in both caches.
    fn roll_back(&mut self, len: usize) {
        self.pending_media = PendingMedia::default();
        self.context.truncate(len);
        self.model.thinker.truncate_cache(len);
        self.talker(TalkerMsg::Truncate(len));
    }

    /// Lays out and encodes one block of the open turn, then prefills it.
    fn block(&mut self, turn: u64, block: &InputBlock) -> Result<()> {
        self.lay_out_block(turn, block)?;
        self.prefill_pending(turn, false)?;
        Ok(())
    }

    /// The batch's media embeddings, gathered while laying out.
    fn lay_out_block(&mut self, turn: u64, block: &InputBlock) -> Result<()> {
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
    fn end_turn(&mut self, turn: u64, final_block: Option<&InputBlock>) -> Result<Option<Tensor>> {
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

    fn prefill_pending(&mut self, turn: u64, logits: bool) -> Result<Option<Tensor>> {
        let audio = std::mem::take(&mut self.pending_media.audio);
        let video = std::mem::take(&mut self.pending_media.video);
        self.prefill(turn, audio, video, logits)
    }

    /// Prefills the entries laid out since the last batch (with these media embeddings, in
    /// order) into the Thinker, mirrors them into the Talker, after making room by the context
    /// policy. Returns the last row's logits when asked.
    fn prefill(
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
            self.model.thinker.remove_cache_range(range.clone())?;
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
            let thinker = &mut self.model.thinker;
            let (embeds, out) = self.links.profile.timed(Stage::Thinker, || -> Result<_> {
                let embeds = thinker.embed_prompt(&batch.ids, &media)?;
                let positions = batch.positions.to_tensor(&device)?;
                let out = thinker.forward(
                    &embeds,
                    &positions,
                    if logits {
                        LogitsFor::Last
                    } else {
                        LogitsFor::None
                    },
                )?;
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
                self.model.thinker.truncate_cache(batch.start);
                Err(e.context("Thinker prefill"))
            }
        }
    }

    /// An answer that cannot be given (its turn failed): ends it at once so that the session
    /// listens again.
    fn end_without_answer(&mut self, turn: u64, voice: bool) {
        if voice {
            self.links.pacer.finish(turn);
        } else {
            let _ = self.reports.send((
                ThinkerReport::TextAnswerDone { turn },
                self.links.activity.token(),
            ));
        }
    }

    /// Generates the answer to `turn` from the first token's `logits`, streaming its text to
    /// the transport and its rows to the Talker; stops early when `epoch` is stale.
    fn answer(
        &mut self,
        turn: u64,
        epoch: u64,
        logits: Tensor,
        voice: Option<String>,
    ) -> Result<()> {
        let start = self.context.len();
        let (next, talker_next) = self.context.next_positions();
        let rope_delta = next - self.model.thinker.cache_len() as i64;
        let spoken = voice.is_some() && self.talker.is_some();
        if let Err(e) = self.begin_speech(turn, epoch, start, talker_next, voice.as_deref()) {
            self.end_without_answer(turn, spoken);
            return Err(e.context("starting the Talker"));
        }
        self.generate(turn, epoch, logits, start, rope_delta, spoken)
    }

    /// Starts the Talker's answer (nothing for a text answer).
    fn begin_speech(
        &mut self,
        turn: u64,
        epoch: u64,
        start: usize,
        talker_next: i64,
        voice: Option<&str>,
    ) -> Result<()> {
        if let (Some(voice), true) = (voice, self.talker.is_some()) {
            let speech = self.model.speech()?;
            let bos = speech.voices.get(voice)?.bos_token;
            let thinker = &self.model.thinker;
            let text_rows = TalkerTextRows::from_thinker_embedding(
                &self.model.config.talker_config,
                bos,
                |id| thinker.embed(&[id]),
            )?;
            self.links.speech.set(SpeechProgress {
                turn,
                ..Default::default()
            });
            self.talker(TalkerMsg::Begin {
                turn,
                epoch,
                cached_len: start,
                tail_positions: text_positions(talker_next, 2)
                    .to_tensor(self.model.thinker.device())?,
                rope_delta: talker_next - start as i64,
                text_rows,
                voice: voice.to_string(),
            });
        }
        Ok(())
    }

    fn generate(
        &mut self,
        turn: u64,
        epoch: u64,
        mut logits: Tensor,
        start: usize,
        rope_delta: i64,
        spoken: bool,
    ) -> Result<()> {
        let sampling = sampling_options(
            &self.model.generation,
            &SamplingOverrides {
                seed: self.config.seed.wrapping_add(turn),
                ..Default::default()
            },
        );
        let mut sampler = Sampler::new(sampling);
        let mut history: Vec<u32> = self.context.ids().collect();
        let mut stream = self.model.tokenizer.stream();
        let mut answer = LastAnswer {
            turn,
            start,
            ids: Vec::new(),
            rows: Vec::new(),
            chars: Vec::new(),
            closed: false,
        };
        let mut text_len = 0;
        let mut failure = None;
        let mut cancelled = false;
        loop {
            if self.links.cancel.cancelled(epoch) {
                cancelled = true;
                break;
            }
            if answer.ids.len() >= self.config.max_answer_tokens {
                break;
            }
            let step = (|| -> Result<Option<_>> {
                let id = self
                    .links
                    .profile
                    .timed(Stage::Thinker, || sampler.sample(&logits, &history, &[]))?;
                self.links.marks.mark(turn, |t, now| {
                    t.first_text_token.get_or_insert(now);
                });
                if self.eos.contains(&id) {
                    return Ok(None);
                }
                if let Some(delta) = stream.push(id)? {
                    text_len += delta.chars().count();
                    self.links
                        .events
                        .emit(SessionEvent::AssistantText { turn, delta });
                }
                let thinker = &mut self.model.thinker;
                let step = self
                    .links
                    .profile
                    .timed(Stage::Thinker, || thinker.decode_step(id, rope_delta))?;
                Ok(Some((id, step)))
            })();
            match step {
                Ok(Some((id, step))) => {
                    history.push(id);
                    self.context.push_text(&[id], EntryKind::Answer, turn);
                    self.context.take_batch();
                    answer.ids.push(id);
                    answer.chars.push(text_len);
                    answer.rows.push((&step.hidden + &step.embed)?);
                    if spoken {
                        self.talker(TalkerMsg::Text {
                            turn,
                            epoch,
                            text: TalkerText::Reply {
                                hidden: step.hidden,
                                embedding: step.embed,
                            },
                        });
                    }
                    logits = step.logits;
                }
                Ok(None) => break,
                Err(e) => {
                    // What was generated stands; the answer ends here.
                    failure = Some(e.context("answer generation"));
                    let fed = start + answer.ids.len();
                    self.context.truncate(fed);
                    self.model.thinker.truncate_cache(fed);
                    break;
                }
            }
        }
        if let Ok(Some(delta)) = stream.finish() {
            self.links
                .events
                .emit(SessionEvent::AssistantText { turn, delta });
        }
        if cancelled {
            // The stop that cancelled it follows: it cuts and closes the answer.
            self.last = Some(answer);
            return failure.map_or(Ok(()), Err);
        }
        if spoken {
            self.talker(TalkerMsg::Text {
                turn,
                epoch,
                text: TalkerText::Finished,
            });
        }
        let kept = answer.ids.len();
        let closed = self.close_answer(&mut answer, kept);
        self.last = Some(answer);
        if !spoken {
            let _ = self.reports.send((
                ThinkerReport::TextAnswerDone { turn },
                self.links.activity.token(),
            ));
        }
        match (failure, closed) {
            (Some(e), _) => Err(e),
            (None, closed) => closed.context("closing the answer"),
        }
    }

    /// Keeps the first `kept` tokens of `answer` in both caches and closes the assistant turn.
    fn close_answer(&mut self, answer: &mut LastAnswer, kept: usize) -> Result<()> {
        let keep = answer.start + kept;
        self.context.truncate(keep);
        self.model.thinker.truncate_cache(keep);
        answer.ids.truncate(kept);
        answer.rows.truncate(kept);
        answer.chars.truncate(kept);
        if self.talker.is_some() {
            // The Talker's cache goes back to the answer's start, then takes the kept tokens
            // as prompt rows.
            self.talker(TalkerMsg::Truncate(answer.start));
            if kept > 0 {
                let (_, talker_next) = self.context.next_positions();
                let first = talker_next - kept as i64;
                self.talker(TalkerMsg::Mirror {
                    rows: Tensor::stack(&answer.rows, 0)?,
                    positions: text_positions(first, kept)
                        .to_tensor(self.model.thinker.device())?,
                });
            }
        }
        self.context
            .push_text(&self.closing.clone(), EntryKind::Template, answer.turn);
        self.prefill(answer.turn, Vec::new(), Vec::new(), false)?;
        answer.closed = true;
        Ok(())
    }

    /// A stop: cuts the last answer to what was heard (`heard_samples` of its voice) and
    /// closes it.
    fn stop(
        &mut self,
        turn: Option<u64>,
        heard: Duration,
        voice: bool,
        heard_samples: usize,
    ) -> Result<()> {
        let Some(turn) = turn else {
            return Ok(());
        };
        let Some(mut answer) = self.last.take_if(|a| a.turn == turn) else {
            // Its answer never started (its turn failed): nothing was said.
            self.links.events.emit(SessionEvent::Interrupted {
                turn,
                heard,
                kept_text: String::new(),
            });
            self.links.marks.emit(turn, &self.links.events);
            return Ok(());
        };
        let progress = self.links.speech.get();
        let total_codes = (progress.turn == turn && progress.finished).then_some(progress.codes);
        let heard_codes = heard_samples / self.samples_per_code.max(1);
        let kept = if voice {
            tokens_heard(SpokenAnswer {
                cumulative_chars: &answer.chars,
                heard_codes,
                total_codes,
                heard,
            })
        } else {
            answer.ids.len()
        };
        tracing::debug!(
            turn,
            heard_codes,
            ?total_codes,
            generated = answer.ids.len(),
            chars = answer.chars.last().copied().unwrap_or(0),
            kept,
            "answer cut"
        );
        self.links.probe.record_cut(CutAnswer {
            turn,
            generated: answer.ids.clone(),
            cumulative_chars: answer.chars.clone(),
            heard_codes,
            total_codes,
            kept,
        });
        let kept_text = self.model.tokenizer.decode(&answer.ids[..kept])?;
        if !(answer.closed && kept == answer.ids.len()) {
            self.close_answer(&mut answer, kept)?;
        }
        self.links.events.emit(SessionEvent::Interrupted {
            turn,
            heard,
            kept_text,
        });
        self.links.marks.emit(turn, &self.links.events);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use crossbeam_channel::unbounded;

    use super::*;
    use crate::engine::clock::SimulatedClock;
    use crate::engine::queues::QueueCounters;
    use crate::engine::session::ReplyMode;
    use crate::model::loading::ModelFiles;

    #[test]
    fn a_typed_message_is_answered_in_text_and_closed_in_the_context() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let model = OmniModel::load(
            &ModelFiles::from_dir(&dir).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let clock = Arc::new(SimulatedClock::new());
        let (frames, _) = unbounded();
        let (events, events_rx) = unbounded();
        let links = ThinkerLinks {
            activity: Activity::new(),
            pacer: Arc::new(Pacer::new(clock.clone(), 24_000, frames)),
            cancel: Arc::new(Cancellation::default()),
            events: Arc::new(EventSink::new(events, QueueCounters::new())),
            marks: Arc::new(AnswerMarks::new(clock)),
            profile: Arc::new(ModelProfile::new(false)),
            speech: Arc::new(SpeechMeter::default()),
            probe: Arc::new(ProbeRecord::new(false)),
        };
        let config = SessionConfig {
            reply_mode: ReplyMode::Text,
            max_answer_tokens: 4,
            ..SessionConfig::default()
        };
        let (reports, reports_rx) = unbounded();
        let mut task = ThinkerTask::new(model, config, links, None, reports).unwrap();
        task.system_prompt().unwrap();
        let system = task.context.len();
        assert!(system > 0);
        assert_eq!(task.model.thinker.cache_len(), system, "prefilled");

        task.on_message(ThinkerMsg::Typed {
            turn: 1,
            text: "Hello there".into(),
            epoch: 0,
            voice: None,
        })
        .unwrap();
        let (report, _) = reports_rx.try_recv().expect("a report");
        assert!(matches!(report, ThinkerReport::TextAnswerDone { turn: 1 }));
        assert!(
            events_rx
                .try_iter()
                .all(|e| !matches!(e, SessionEvent::Error(_))),
            "no error"
        );
        // user header, text, assistant header, at most 4 answer tokens, closing
        let entries = task.context.entries();
        let ids: Vec<u32> = entries.iter().map(|e| e.id).collect();
        assert!(ids.ends_with(&task.closing), "the answer is closed");
        let text = task.model.tokenizer.encode("Hello there").unwrap().len();
        let template = task.user_header.len() + task.assistant_header.len() + task.closing.len();
        let answer = ids.len() - system - text - template;
        assert!(
            answer <= task.config.max_answer_tokens,
            "{answer} answer tokens"
        );
        assert_eq!(task.model.thinker.cache_len(), ids.len());
        assert!(entries[system..].iter().all(|e| e.turn == 1));
    }
}
