//! The Talker thread of a session: keeps the Talker's KV cache in step with the Thinker's
//! context (mirrored prompt rows, truncations, forgotten ranges) and turns each spoken
//! answer's rows into codec codes for the vocoder, at most `speech_lead` ahead of playback.
//!
//! Messages are handled in order. An answer's rows are consumed as they come; a mirror or
//! truncation that follows an answer first lets the answer run to its end (its text is
//! complete by then), unless the answer was stopped, in which case it is dropped at once.

use std::ops::Range;

use anyhow::{Context as _, Result};
use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender};

use super::activity::WorkToken;
use super::links::{ModelLinks, SpeechProgress};
use super::model_access::TalkerAccess;
use super::profile::Stage;
use super::session::SessionConfig;
use super::vocoder_task::VocoderMsg;
use crate::model::omni::{OmniModel, Speech};
use crate::model::talker::{TalkerOptions, TalkerStep, TalkerText, TalkerTextRows, TalkerTurn};
use crate::model::token2wav::streaming::StreamingOptions;

/// What the Thinker thread tells the Talker thread.
#[derive(Debug)]
pub(crate) enum TalkerMsg {
    /// Prompt rows `[T, E]` to append at Talker positions `[3, T]`.
    Mirror { rows: Tensor, positions: Tensor },
    /// Keep the first `len` cached positions.
    Truncate(usize),
    /// Forget cached positions `range`.
    Remove(Range<usize>),
    /// A spoken answer starts after the `cached_len` prompt rows.
    Begin {
        turn: u64,
        epoch: u64,
        cached_len: usize,
        tail_positions: Tensor,
        rope_delta: i64,
        text_rows: TalkerTextRows,
        voice: String,
    },
    /// A row of the answer (or its end).
    Text {
        turn: u64,
        epoch: u64,
        text: TalkerText,
    },
}

impl TalkerMsg {
    /// The message's name, for traces.
    fn kind(&self) -> String {
        match self {
            Self::Mirror { rows, .. } => format!("mirror {:?}", rows.dims()),
            Self::Truncate(len) => format!("truncate {len}"),
            Self::Remove(range) => format!("remove {range:?}"),
            Self::Begin {
                turn,
                epoch,
                cached_len,
                ..
            } => format!("begin {turn} epoch {epoch} after {cached_len}"),
            Self::Text { turn, text, .. } => match text {
                TalkerText::Finished => format!("text {turn} finished"),
                _ => format!("text {turn}"),
            },
        }
    }
}

struct Answer {
    turn: u64,
    epoch: u64,
    state: TalkerTurn,
    codes: usize,
}

pub(crate) struct TalkerTask {
    /// The session's Talker context: what the mirror and the steps run on.
    talker: TalkerAccess,
    links: ModelLinks,
    vocoder: Sender<(VocoderMsg, WorkToken)>,
    options: TalkerOptions,
    seed: u64,
    /// Codes the Talker may run ahead of playback.
    lead_codes: usize,
    samples_per_code: usize,
    answer: Option<Answer>,
}

impl TalkerTask {
    pub fn new(
        model: &OmniModel,
        speech: &Speech,
        talker: TalkerAccess,
        links: ModelLinks,
        config: &SessionConfig,
        vocoder: Sender<(VocoderMsg, WorkToken)>,
    ) -> Result<Self> {
        let t2w = &speech.token2wav;
        let dit = &model.config.token2wav_config.dit_config;
        let code_time = t2w.samples_per_code() as f64 / t2w.sample_rate() as f64;
        let mut options = TalkerOptions::reference(config.seed, dit.num_embeds);
        options.max_codes = ((config.max_speech.as_secs_f64() / code_time) as usize).max(1);
        // The vocoder voices a chunk only once the codes of its look-ahead are in: the
        // Talker must be allowed at least the largest chunk plus that look-ahead (and a block
        // of margin) ahead of playback, or both would wait for each other.
        let stream = StreamingOptions::low_latency();
        let floor = (stream.max_chunk_blocks + stream.future_blocks + 1) * dit.block_size;
        let floor = floor.div_ceil(dit.repeats.max(1));
        let lead_codes = ((config.speech_lead.as_secs_f64() / code_time) as usize).max(floor);
        Ok(Self {
            talker,
            links,
            vocoder,
            options,
            seed: config.seed,
            lead_codes,
            samples_per_code: t2w.samples_per_code(),
            answer: None,
        })
    }

    pub fn run(mut self, rx: Receiver<(TalkerMsg, WorkToken)>) {
        self.links.probe.set_talker_cache(self.talker.cache_len());
        while let Ok((msg, token)) = rx.recv() {
            let kind = tracing::enabled!(tracing::Level::TRACE).then(|| msg.kind());
            if let Err(e) = self.on_message(msg) {
                self.links.events.error(format!("Talker: {e:#}"));
                self.abandon(true);
            }
            tracing::trace!(
                message = kind.as_deref().unwrap_or_default(),
                cache = self.talker.cache_len(),
                "talker"
            );
            self.links.probe.set_talker_cache(self.talker.cache_len());
            drop(token);
        }
    }

    fn vocoder(&self, msg: VocoderMsg) {
        let _ = self.vocoder.send((msg, self.links.activity.token()));
    }

    fn on_message(&mut self, msg: TalkerMsg) -> Result<()> {
        match msg {
            TalkerMsg::Mirror { rows, positions } => {
                self.finish_answer()?;
                let talker = &mut self.talker;
                self.links
                    .profile
                    .timed(Stage::Talker, || {
                        talker.mirror(&rows.unsqueeze(0)?, &positions)
                    })
                    .context("mirroring the Thinker's context")?;
            }
            TalkerMsg::Truncate(len) => {
                self.finish_answer()?;
                self.talker.truncate(len)?;
            }
            TalkerMsg::Remove(range) => {
                self.finish_answer()?;
                self.talker.forget(range)?;
            }
            TalkerMsg::Begin {
                turn,
                epoch,
                cached_len,
                tail_positions,
                rope_delta,
                text_rows,
                voice,
            } => {
                self.finish_answer()?;
                if self.links.cancel.cancelled(epoch) {
                    return Ok(());
                }
                let mut options = self.options.clone();
                options.sampling.seed = self.seed.wrapping_add(turn);
                let state = TalkerTurn::after_cached_prompt(
                    self.talker.weights(),
                    cached_len,
                    tail_positions,
                    rope_delta,
                    text_rows,
                    options,
                )?;
                self.answer = Some(Answer {
                    turn,
                    epoch,
                    state,
                    codes: 0,
                });
                self.vocoder(VocoderMsg::Begin { turn, epoch, voice });
            }
            TalkerMsg::Text { turn, epoch, text } => {
                let Some(answer) = self.answer.as_mut() else {
                    return Ok(());
                };
                if answer.turn != turn || answer.epoch != epoch {
                    return Ok(());
                }
                answer.state.feed(text)?;
                self.run_steps()?;
            }
        }
        Ok(())
    }

    /// Lets a running answer finish (its text is complete), or drops a stopped one.
    fn finish_answer(&mut self) -> Result<()> {
        if self.answer.is_some() {
            self.run_steps()?;
        }
        if let Some(answer) = self.answer.take() {
            // Still waiting for text: the Thinker ended without saying so (an error there).
            self.links.speech.set(SpeechProgress {
                turn: answer.turn,
                codes: answer.codes,
                finished: true,
            });
            self.vocoder(VocoderMsg::Finish {
                turn: answer.turn,
                epoch: answer.epoch,
            });
        }
        Ok(())
    }

    /// Drops the answer; with `finish`, the vocoder still ends what it has.
    fn abandon(&mut self, finish: bool) {
        if let Some(answer) = self.answer.take()
            && finish
        {
            self.vocoder(VocoderMsg::Finish {
                turn: answer.turn,
                epoch: answer.epoch,
            });
        }
    }

    /// Runs steps while their rows are there.
    fn run_steps(&mut self) -> Result<()> {
        loop {
            let Some(answer) = self.answer.as_mut() else {
                return Ok(());
            };
            if self.links.cancel.cancelled(answer.epoch) {
                self.abandon(false);
                return Ok(());
            }
            let (turn, epoch) = (answer.turn, answer.epoch);
            let talker = &mut self.talker;
            let step = self
                .links
                .profile
                .timed(Stage::Talker, || talker.step(&mut answer.state))?;
            match step {
                TalkerStep::Code(code) => {
                    answer.codes += 1;
                    let codes = answer.codes;
                    if codes == 1 {
                        self.links.marks.mark(turn, |t, now| {
                            t.first_codec_token.get_or_insert(now);
                        });
                    }
                    self.links.speech.set(SpeechProgress {
                        turn,
                        codes,
                        finished: false,
                    });
                    self.vocoder(VocoderMsg::Codes {
                        turn,
                        epoch,
                        codes: vec![code],
                    });
                    // Run at most `lead_codes` ahead of what has been played.
                    if codes > self.lead_codes {
                        let samples = (codes - self.lead_codes) * self.samples_per_code;
                        let frames = (samples / self.links.pacer.frame_samples()) as u64;
                        if frames > 0 && !self.links.pacer.wait_until_played(turn, frames) {
                            // Stopped meanwhile (or the session is closing).
                            if self.links.cancel.cancelled(epoch) {
                                self.abandon(false);
                                return Ok(());
                            }
                        }
                    }
                }
                TalkerStep::NeedText => return Ok(()),
                TalkerStep::Finished(_) => {
                    let codes = answer.codes;
                    self.answer = None;
                    self.links.speech.set(SpeechProgress {
                        turn,
                        codes,
                        finished: true,
                    });
                    self.vocoder(VocoderMsg::Finish { turn, epoch });
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crossbeam_channel::unbounded;

    use super::*;
    use crate::engine::links;

    /// A Talker task of the tiny model, and its vocoder's sample rate.
    fn task(speech_lead: Duration) -> (TalkerTask, u32) {
        let model = crate::engine::links::tiny_model();
        let speech = model.speech.as_ref().expect("the tiny model speaks");
        let rate = speech.token2wav.sample_rate();
        let (links, _, _) = links::for_tests(rate);
        let config = SessionConfig {
            speech_lead,
            ..SessionConfig::default()
        };
        let (vocoder, _) = unbounded();
        let talker = TalkerAccess::own(&speech.talker);
        let task = TalkerTask::new(&model, speech, talker, links, &config, vocoder).unwrap();
        (task, rate)
    }

    #[test]
    fn the_talker_may_always_run_ahead_by_what_the_vocoder_needs_to_voice_a_chunk() {
        let (short, rate) = task(Duration::ZERO);
        let (long, _) = task(Duration::from_secs(30));
        assert!(
            short.lead_codes > 0,
            "a zero lead would deadlock with the vocoder"
        );
        assert!(long.lead_codes > short.lead_codes);
        let code_time = short.samples_per_code as f64 / rate as f64;
        let expected = (30.0 / code_time) as usize;
        assert!(
            long.lead_codes.abs_diff(expected) <= 1,
            "{} vs {expected}",
            long.lead_codes
        );
    }
}
