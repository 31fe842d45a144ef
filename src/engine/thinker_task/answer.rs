//! The Thinker's answer: decoding token by token from the prefill's logits, streaming text to
//! the transport and rows to the Talker, closing the answer in the context, and cutting it
//! to what was heard on a stop.

use std::time::Duration;

use anyhow::{Context as _, Result};
use candle_core::Tensor;

use crate::engine::context::EntryKind;
use crate::engine::heard::{SpokenAnswer, tokens_heard};
use crate::engine::links::SpeechProgress;
use crate::engine::probe::CutAnswer;
use crate::engine::profile::Stage;
use crate::engine::session::SessionEvent;
use crate::engine::talker_task::TalkerMsg;
use crate::model::chat::{SamplingOverrides, sampling_options};
use crate::model::sampling::Sampler;
use crate::model::talker::{TalkerText, TalkerTextRows};
use crate::model::thinker::rope::text_positions;

use super::{LastAnswer, ThinkerReport, ThinkerTask};

impl ThinkerTask {
    /// An answer that cannot be given (its turn failed): ends it at once so that the session
    /// listens again.
    pub(super) fn end_without_answer(&mut self, turn: u64, voice: bool) {
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
    pub(super) fn answer(
        &mut self,
        turn: u64,
        epoch: u64,
        logits: Tensor,
        voice: Option<String>,
    ) -> Result<()> {
        let start = self.context.len();
        let (next, talker_next) = self.context.next_positions();
        let rope_delta = next - self.thinker.cache_len() as i64;
        let spoken = voice.is_some() && self.talker.is_some();
        if let Err(e) = self.begin_speech(turn, epoch, start, talker_next, voice.as_deref()) {
            self.end_without_answer(turn, spoken);
            return Err(e.context("starting the Talker"));
        }
        self.generate(turn, epoch, logits, start, rope_delta, spoken)
    }

    /// Starts the Talker's answer (nothing for a text answer).
    pub(super) fn begin_speech(
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

    pub(super) fn generate(
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
            spoken,
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
                let thinker = &mut self.thinker;
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
                    self.truncate_thinker(fed);
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
            // The stop (or the dropped speculation) that cancelled it follows and cuts and
            // closes it; if what follows is not about this answer, `close_unstopped` does.
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
    pub(super) fn close_answer(&mut self, answer: &mut LastAnswer, kept: usize) -> Result<()> {
        let keep = answer.start + kept;
        self.context.truncate(keep);
        self.thinker.truncate(keep)?;
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

    /// Closes a cancelled answer that no stop of its own follows: the epoch also moves on for
    /// a stop or a dropped speculation naming another turn (a speculation dropped while this
    /// answer's text was still being generated after its voice had ended). Nothing stopped its
    /// voice, so the user heard what the Talker made of it. Called before the next message
    /// touches the context, so the answer is still the context's tail.
    pub(super) fn close_unstopped(&mut self) -> Result<()> {
        let Some(mut answer) = self.last.take() else {
            return Ok(());
        };
        let kept = if answer.spoken {
            let (codes, total_codes) = self.voiced(answer.turn);
            let rate = self
                .model
                .speech
                .as_ref()
                .map_or(1, |s| s.token2wav.sample_rate());
            tokens_heard(SpokenAnswer {
                cumulative_chars: &answer.chars,
                heard_codes: codes,
                total_codes,
                heard: Duration::from_secs_f64(
                    (codes * self.samples_per_code) as f64 / rate as f64,
                ),
            })
        } else {
            answer.ids.len()
        };
        tracing::debug!(
            turn = answer.turn,
            generated = answer.ids.len(),
            kept,
            "a cancelled answer without a stop of its own: closed"
        );
        let closed = self.close_answer(&mut answer, kept);
        self.last = Some(answer);
        closed.context("closing a cancelled answer")
    }

    /// Codes the Talker has made of the answer to `turn`, and all of them once it has ended
    /// the answer's speech.
    fn voiced(&self, turn: u64) -> (usize, Option<usize>) {
        let progress = self.links.speech.get();
        if progress.turn != turn {
            return (0, None);
        }
        (progress.codes, progress.finished.then_some(progress.codes))
    }

    /// A stop: cuts the last answer to what was heard (`heard_samples` of its voice) and
    /// closes it.
    pub(super) fn stop(
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
        let (_, total_codes) = self.voiced(turn);
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
