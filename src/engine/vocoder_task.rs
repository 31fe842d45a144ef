//! The vocoder thread of a session: each spoken answer's codes through the streaming
//! token2wav decoder into the pacer, as soon as a chunk is final.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use crossbeam_channel::Receiver;

use super::activity::WorkToken;
use super::links::VocoderLinks;
use super::model_access::{ModelPasses, VocoderAccess};
use super::profile::Stage;
use crate::model::omni::Speech;
use crate::model::speakers::Voices;
use crate::model::token2wav::Token2Wav;
use crate::model::token2wav::dit::{OdeSchedule, SamplerOptions, SpeakerCondition};
use crate::model::token2wav::streaming::{StreamNoise, StreamingDecoder, StreamingOptions};

/// What the Talker thread tells the vocoder thread.
#[derive(Debug)]
pub(crate) enum VocoderMsg {
    Begin {
        turn: u64,
        epoch: u64,
        voice: String,
    },
    Codes {
        turn: u64,
        epoch: u64,
        codes: Vec<u32>,
    },
    Finish {
        turn: u64,
        epoch: u64,
    },
}

struct Utterance {
    turn: u64,
    epoch: u64,
    decoder: StreamingDecoder,
    voiced: bool,
}

pub(crate) struct VocoderTask {
    token2wav: Token2Wav,
    voices: Voices,
    schedule: OdeSchedule,
    speakers: HashMap<String, SpeakerCondition>,
    links: VocoderLinks,
    /// Where the DiT windows are sampled.
    windows: VocoderAccess,
    seed: u64,
    current: Option<Utterance>,
}

impl VocoderTask {
    pub fn new(
        speech: &Speech,
        links: VocoderLinks,
        passes: &ModelPasses,
        seed: u64,
    ) -> Result<Self> {
        let token2wav = speech.token2wav.clone();
        let schedule = token2wav
            .schedule(&SamplerOptions::default())
            .context("token2wav sampler schedule")?;
        let windows =
            VocoderAccess::for_passes(passes, &token2wav, &schedule, links.pacer.clone())?;
        Ok(Self {
            token2wav,
            voices: speech.voices.clone(),
            schedule,
            speakers: HashMap::new(),
            links,
            windows,
            seed,
            current: None,
        })
    }

    pub fn run(mut self, rx: Receiver<(VocoderMsg, WorkToken)>) {
        while let Ok((msg, token)) = rx.recv() {
            if let Err(e) = self.on_message(msg) {
                self.links.events.error(format!("vocoder: {e:#}"));
                if let Some(u) = self.current.take() {
                    self.links.pacer.finish(u.turn);
                }
            }
            drop(token);
        }
    }

    fn speaker(&mut self, voice: &str) -> Result<SpeakerCondition> {
        if let Some(s) = self.speakers.get(voice) {
            return Ok(s.clone());
        }
        let voice = self.voices.get(voice)?;
        let t2w = &self.token2wav;
        let condition = self
            .links
            .profile
            .timed(Stage::Vocoder, || t2w.speaker(voice))?;
        let voice = &voice.name;
        self.speakers.insert(voice.to_string(), condition.clone());
        Ok(condition)
    }

    fn push(&mut self, samples: Vec<f32>) {
        let Some(u) = self.current.as_mut() else {
            return;
        };
        if samples.is_empty() {
            return;
        }
        if !u.voiced {
            u.voiced = true;
            self.links.marks.mark(u.turn, |t, now| {
                t.first_waveform_chunk.get_or_insert(now);
            });
        }
        self.links.pacer.push(u.turn, &samples);
    }

    fn on_message(&mut self, msg: VocoderMsg) -> Result<()> {
        match msg {
            VocoderMsg::Begin { turn, epoch, voice } => {
                self.current = None;
                if self.links.cancel.cancelled(epoch) {
                    return Ok(());
                }
                let speaker = self.speaker(&voice)?;
                let decoder = StreamingDecoder::new(
                    &self.token2wav,
                    speaker,
                    self.schedule.clone(),
                    StreamingOptions::low_latency(),
                    StreamNoise::seeded(&self.token2wav, self.seed.wrapping_add(turn)),
                )?;
                self.current = Some(Utterance {
                    turn,
                    epoch,
                    decoder,
                    voiced: false,
                });
            }
            VocoderMsg::Codes { turn, epoch, codes } => {
                let Some(u) = self.current.as_mut() else {
                    return Ok(());
                };
                if u.turn != turn || u.epoch != epoch {
                    return Ok(());
                }
                if self.links.cancel.cancelled(epoch) {
                    self.current = None;
                    return Ok(());
                }
                let (t2w, windows) = (&self.token2wav, &mut self.windows);
                let samples = self.links.profile.timed(Stage::Vocoder, || {
                    u.decoder.push_codes_with(t2w, windows, &codes)
                })?;
                self.push(samples);
            }
            VocoderMsg::Finish { turn, epoch } => {
                let Some(u) = self.current.as_mut() else {
                    return Ok(());
                };
                if u.turn != turn || u.epoch != epoch {
                    return Ok(());
                }
                if self.links.cancel.cancelled(epoch) {
                    self.current = None;
                    return Ok(());
                }
                let samples = if u.decoder.codes().is_empty() {
                    Vec::new()
                } else {
                    let (t2w, windows) = (&self.token2wav, &mut self.windows);
                    self.links
                        .profile
                        .timed(Stage::Vocoder, || u.decoder.finish_with(t2w, windows))?
                };
                self.push(samples);
                self.links.pacer.finish(turn);
                self.current = None;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::engine::session::TurnTimings;

    #[test]
    fn an_answers_codes_reach_the_pacer_and_stale_ones_do_not() {
        let model = crate::engine::links::tiny_model();
        let speech = model.speech.as_ref().expect("the tiny model speaks");
        let (links, _, _) = crate::engine::links::for_tests(speech.token2wav.sample_rate());
        let (pacer, cancel, marks) = (
            links.pacer.clone(),
            links.cancel.clone(),
            links.marks.clone(),
        );
        let links = links.vocoder();
        let mut task = VocoderTask::new(speech, links, &ModelPasses::OwnClone, 0).unwrap();
        let voice = speech.voices.names()[0].to_string();
        let err = task
            .on_message(VocoderMsg::Begin {
                turn: 1,
                epoch: 0,
                voice: "nobody".into(),
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("nobody"), "{err:#}");

        marks.start(TurnTimings {
            turn: 1,
            ..Default::default()
        });
        pacer.begin(1);
        let codes: Vec<u32> = (0..40).map(|i| i % 7).collect();
        task.on_message(VocoderMsg::Begin {
            turn: 1,
            epoch: 0,
            voice: voice.clone(),
        })
        .unwrap();
        task.on_message(VocoderMsg::Codes {
            turn: 1,
            epoch: 0,
            codes: codes.clone(),
        })
        .unwrap();
        task.on_message(VocoderMsg::Finish { turn: 1, epoch: 0 })
            .unwrap();
        assert!(pacer.queued_samples() > 0, "the answer was voiced");
        assert!(marks.get(1).unwrap().first_waveform_chunk.is_some());

        // a stop moved the epoch on: the old answer's codes are stale
        cancel.advance();
        pacer.begin(2);
        task.on_message(VocoderMsg::Begin {
            turn: 2,
            epoch: 0,
            voice,
        })
        .unwrap();
        task.on_message(VocoderMsg::Codes {
            turn: 2,
            epoch: 0,
            codes,
        })
        .unwrap();
        task.on_message(VocoderMsg::Finish { turn: 2, epoch: 0 })
            .unwrap();
        assert_eq!(pacer.queued_samples(), 0);
        pacer.shutdown();
    }
}
