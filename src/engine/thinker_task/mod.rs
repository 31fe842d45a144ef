//! The Thinker thread of a session: the conversation in the KV cache, each block encoded and
//! prefilled as it closes, the answer generated token by token and streamed to the Talker.
//!
//! This module has the messages, the task's state and its dispatch; [`prefill`] lays out and
//! prefills a user turn (and goes back from a cancelled turn or a dropped speculative answer),
//! [`answer`] decodes the answer, closes it in the context and cuts it on a stop.
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

use anyhow::{Context as _, Result};
use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender};

use super::activity::WorkToken;
use super::context::{Context, EntryKind, MarkerIds};
use super::input::InputBlock;
use super::links::ModelLinks;
use super::model_access::ThinkerAccess;
use super::session::SessionConfig;
use super::talker_task::TalkerMsg;
use super::turn_media::{MediaEncoders, TurnAudio};
use crate::media::mel::LogMel;
use crate::media::video::VideoPreprocessor;
use crate::model::omni::OmniModel;
use crate::model::talker::multimodal_placeholder_ids;
use crate::model::thinker::rope::RopeIndexConfig;

mod answer;
mod prefill;

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

impl ThinkerMsg {
    /// Whether this message cuts or takes back a cancelled answer to `turn` (its stop, or the
    /// drop of its speculation).
    fn settles(&self, answer: u64) -> bool {
        match self {
            Self::Stop { turn, .. } => *turn == Some(answer),
            Self::DropSpeculation { turn } => *turn == answer,
            _ => false,
        }
    }

    /// The message's name and turn, for traces.
    fn kind(&self) -> String {
        match self {
            Self::TurnStarted { turn } => format!("turn started {turn}"),
            Self::Block { turn, .. } => format!("block {turn}"),
            Self::TurnEnded { turn, epoch, .. } => format!("turn ended {turn} epoch {epoch}"),
            Self::TurnCancelled { turn } => format!("turn cancelled {turn}"),
            Self::Speculate { turn } => format!("speculate {turn}"),
            Self::DropSpeculation { turn } => format!("drop speculation {turn}"),
            Self::Typed { turn, epoch, .. } => format!("typed {turn} epoch {epoch}"),
            Self::Stop { turn, frames, .. } => format!("stop {turn:?} after {frames} frames"),
        }
    }
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
    /// Whether the Talker voiced it.
    spoken: bool,
}

pub(crate) struct ThinkerTask {
    /// The loaded model: its weights (embeddings, tokenizer, settings), not its caches.
    model: OmniModel,
    /// The session's Thinker context: what the passes run on.
    thinker: ThinkerAccess,
    encoders: MediaEncoders,
    context: Context,
    config: SessionConfig,
    links: ModelLinks,
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
        thinker: ThinkerAccess,
        config: SessionConfig,
        links: ModelLinks,
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
            thinker,
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
            let kind = tracing::enabled!(tracing::Level::TRACE).then(|| msg.kind());
            if let Err(e) = self.on_message(msg) {
                self.links.events.error(format!("{e:#}"));
            }
            // Both caches' lengths after each message: what a Talker out of step is traced by.
            tracing::trace!(
                message = kind.as_deref().unwrap_or_default(),
                context = self.context.len(),
                cache = self.thinker.cache_len(),
                "thinker"
            );
            self.publish();
            drop(token);
        }
    }

    fn publish(&self) {
        if !self.links.probe.probed() {
            return;
        }
        self.links
            .probe
            .set_view(self.context.entries().to_vec(), self.thinker.cache_len());
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

    /// Rolls the Thinker's cache back to `len` where no caller can take the error (going back
    /// from a dropped turn, after a failed pass): a failure is the session's error event.
    fn truncate_thinker(&mut self, len: usize) {
        if let Err(e) = self.thinker.truncate(len) {
            self.links
                .events
                .error(format!("rolling the Thinker's context back: {e:#}"));
        }
    }

    fn talker(&self, msg: TalkerMsg) {
        if let Some(tx) = &self.talker {
            let _ = tx.send((msg, self.links.activity.token()));
        }
    }

    fn on_message(&mut self, msg: ThinkerMsg) -> Result<()> {
        if self
            .last
            .as_ref()
            .is_some_and(|a| !a.closed && !msg.settles(a.turn))
        {
            self.close_unstopped()?;
        }
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
}

#[cfg(test)]
mod tests {
    use crossbeam_channel::unbounded;

    use super::*;
    use crate::engine::links::SpeechProgress;
    use crate::engine::session::{ReplyMode, SessionEvent};
    use crate::model::talker::TalkerText;

    /// A spoken answer cancelled by work meant for another turn (here: the epoch moves on
    /// after its third token, and no stop of its own follows) is closed with what its voice
    /// said before the next turn enters the context, in the Talker's cache too.
    #[test]
    fn an_answer_cancelled_without_its_own_stop_is_closed_before_the_next_turn() {
        let model = crate::engine::links::tiny_model();
        let thinker = ThinkerAccess::own(&model.thinker);
        let (links, _, _events) = crate::engine::links::for_tests(24_000);
        let cancel = links.cancel.clone();
        let speech = links.speech.clone();
        let config = SessionConfig {
            max_answer_tokens: 32,
            ..SessionConfig::default()
        };
        let (talker_tx, talker_rx) = unbounded::<(TalkerMsg, WorkToken)>();
        let (reports, _reports_rx) = unbounded();
        let mut task =
            ThinkerTask::new(model, thinker, config, links, Some(talker_tx), reports).unwrap();
        task.system_prompt().unwrap();
        // the Talker's side: after the answer's third row the epoch moves on
        let watcher = std::thread::spawn(move || {
            let mut rows = 0;
            let mut seen = Vec::new();
            for (msg, _) in talker_rx.iter() {
                if let TalkerMsg::Text {
                    text: TalkerText::Reply { .. },
                    ..
                } = &msg
                {
                    rows += 1;
                    if rows == 3 {
                        cancel.advance();
                    }
                }
                seen.push(msg);
            }
            seen
        });
        task.on_message(ThinkerMsg::Typed {
            turn: 1,
            text: "Tell me a long story".into(),
            epoch: 0,
            voice: Some("Chelsie".into()),
        })
        .unwrap();
        let answer = task.last.as_ref().expect("the answer");
        assert!(!answer.closed, "cancelled: it waits for what follows");
        let (start, generated) = (answer.start, answer.ids.len());
        assert!(generated >= 3, "{generated} tokens");
        assert_eq!(task.context.len(), start + generated);
        // its voice had made 40 codes, all of them played
        speech.set(SpeechProgress {
            turn: 1,
            codes: 40,
            finished: true,
        });
        task.on_message(ThinkerMsg::TurnStarted { turn: 2 })
            .unwrap();
        let ids: Vec<u32> = task.context.entries().iter().map(|e| e.id).collect();
        let before_turn = ids.len() - task.user_header.len();
        assert!(
            ids[..before_turn].ends_with(&task.closing),
            "the answer is closed before the next turn"
        );
        let kept = before_turn - task.closing.len() - start;
        assert!(kept >= 1 && kept <= generated, "{kept} of {generated}");
        assert_eq!(task.thinker.cache_len(), before_turn);

        drop(task);
        let seen = watcher.join().unwrap();
        let truncate = seen
            .iter()
            .position(|m| matches!(m, TalkerMsg::Truncate(len) if *len == start))
            .expect("the Talker's cache goes back to the answer's start");
        match &seen[truncate + 1] {
            TalkerMsg::Mirror { rows, .. } => assert_eq!(rows.dim(0).unwrap(), kept),
            other => panic!("the kept rows follow, not {other:?}"),
        }
    }

    #[test]
    fn a_typed_message_is_answered_in_text_and_closed_in_the_context() {
        let model = crate::engine::links::tiny_model();
        let thinker = ThinkerAccess::own(&model.thinker);
        let (links, _, events_rx) = crate::engine::links::for_tests(24_000);
        let config = SessionConfig {
            reply_mode: ReplyMode::Text,
            max_answer_tokens: 4,
            ..SessionConfig::default()
        };
        let (reports, reports_rx) = unbounded();
        let mut task = ThinkerTask::new(model, thinker, config, links, None, reports).unwrap();
        task.system_prompt().unwrap();
        let system = task.context.len();
        assert!(system > 0);
        assert_eq!(task.thinker.cache_len(), system, "prefilled");

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
        assert_eq!(task.thinker.cache_len(), ids.len());
        assert!(entries[system..].iter().all(|e| e.turn == 1));
    }
}
