//! How a session's Thinker and Talker tasks reach their networks. [`ThinkerAccess`] and
//! [`TalkerAccess`] run each pass either on the session's own clone of the loaded model (its KV
//! cache is the session's context: the behaviour before the scheduler) or through a
//! [`SessionLink`] to the loaded model's shared [`Scheduler`], which holds the session's
//! contexts and batches its decode steps with the other sessions'. A task asks only for what
//! it uses; the cache lengths it reads come from the access (the shared one counts the rows
//! it sent, so no model clone is asked).
//!
//! Each of the two tasks opens its own link (a scheduler session whose Thinker or Talker
//! context it alone uses), since a link's requests are answered in order and the tasks run on
//! different threads. [`VocoderAccess`] does the same for token2wav's DiT windows, which the
//! scheduler batches across sessions when it has the DiT (BigVGAN, which follows each window,
//! stays on the session's vocoder thread); the audio and vision encoders stay per session.
//!
//! **Deadlines** ([`Due`]) are on the scheduler's clock ([`SessionLink::now`]; a session's own
//! clock may have started later): work a listener needs next (decode steps, the Talker's steps
//! and mirrored rows, the prefill that ends a turn) is due when the audio the pacer has queued
//! runs out, which is now while the listener waits for an answer's first audio; a prefill that
//! starts no answer (a block while the user speaks, the system prompt, an answer's closing) is
//! needed a block later at the earliest, so decode steps of other sessions go first.
//!
//! **Barge-in.** A task waits for each request it submits ([`SessionLink::run`]), so when it
//! handles a stop nothing of its session is queued: the truncations it sends run after the one
//! request that was running, in order, and there is nothing for [`SessionLink::cancel`] to
//! drop. A hang-up drops the tasks, hence the links, and the scheduler forgets the contexts.
//! While a task waits it holds its work token, so a simulated clock stands still (compute takes
//! no simulated time).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use candle_core::Tensor;

use super::pacer::Pacer;
use super::scheduler::{Outcome, Scheduler, SessionLink, Work};
use crate::model::talker::{Talker, TalkerPlan, TalkerStep, TalkerTurn};
use crate::model::thinker::{DecodeStep, LogitsFor, Thinker, ThinkerOutput};
use crate::model::token2wav::Token2Wav;
use crate::model::token2wav::dit::{OdeSchedule, SpeakerCondition};
use crate::model::token2wav::streaming::WindowSampler;

/// Where a session's Thinker and Talker passes run ([`super::session::SessionConfig`]).
#[derive(Clone, Default)]
pub enum ModelPasses {
    /// On the session's own clone of the loaded model (weights shared, caches its own).
    #[default]
    OwnClone,
    /// Through the loaded model's scheduler, batched with the other sessions' passes. It must
    /// run the model the session was spawned with.
    Shared(Arc<Scheduler>),
}

impl std::fmt::Debug for ModelPasses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::OwnClone => "OwnClone",
            Self::Shared(_) => "Shared",
        })
    }
}

/// How soon shared work is needed (see the module notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// The listener needs it next: due when the queued audio runs out.
    Playout,
    /// Starts no answer: needed a block later at the earliest.
    NextBlock,
}

/// A session's end of the scheduler, with what its deadlines are read from.
pub(crate) struct SharedLink {
    link: SessionLink,
    pacer: Arc<Pacer>,
    block_len: Duration,
}

impl SharedLink {
    fn open(scheduler: &Scheduler, pacer: Arc<Pacer>, block_len: Duration) -> Result<Self> {
        Ok(Self {
            link: scheduler.open_session()?,
            pacer,
            block_len,
        })
    }

    fn run(&mut self, work: Work, due: Due) -> Result<Outcome> {
        let slack = match due {
            Due::Playout => self.pacer.queued_audio(),
            Due::NextBlock => self.block_len,
        };
        let deadline = self.link.now() + slack;
        match self.link.run(work, deadline)? {
            Outcome::Cancelled => bail!("scheduler: the request was cancelled"),
            outcome => Ok(outcome),
        }
    }

    fn edit(&mut self, work: Work) -> Result<()> {
        match self.run(work, Due::Playout)? {
            Outcome::CacheEdited => Ok(()),
            other => bail!("scheduler: a cache edit answered {other:?}"),
        }
    }
}

/// Where the session's vocoder task samples its DiT windows.
pub(crate) enum VocoderAccess {
    /// On the vocoder task's own thread.
    Own,
    /// On the scheduler, batched with other sessions' windows of the same length; due when
    /// the audio the pacer has queued runs out.
    Shared(SharedLink),
}

impl VocoderAccess {
    /// The scheduler's when `passes` share one that has this DiT on this schedule, else its
    /// own (a shared scheduler with another DiT or schedule is an error).
    pub fn for_passes(
        passes: &ModelPasses,
        t2w: &Token2Wav,
        schedule: &OdeSchedule,
        pacer: Arc<Pacer>,
    ) -> Result<Self> {
        let ModelPasses::Shared(scheduler) = passes else {
            return Ok(Self::Own);
        };
        match scheduler.runs_vocoder(t2w.dit(), schedule) {
            None => Ok(Self::Own),
            Some(false) => {
                bail!(
                    "the shared model scheduler runs another DiT or ODE schedule than this session's"
                )
            }
            // every window is due at playout: no block deadline is read
            Some(true) => Ok(Self::Shared(SharedLink::open(
                scheduler,
                pacer,
                Duration::ZERO,
            )?)),
        }
    }
}

impl WindowSampler for VocoderAccess {
    fn sample_window(
        &mut self,
        t2w: &Token2Wav,
        speaker: &SpeakerCondition,
        codes: &[u32],
        noise: &Tensor,
        schedule: &OdeSchedule,
    ) -> candle_core::Result<Tensor> {
        let link = match self {
            Self::Own => return t2w.mel(speaker, codes, noise, schedule),
            Self::Shared(link) => link,
        };
        let work = Work::DitWindow {
            speaker: Arc::new(speaker.clone()),
            codes: t2w.codes_tensor(codes)?,
            noise: noise.clone(),
        };
        match link.run(work, Due::Playout) {
            Ok(Outcome::Mel(mel)) => Ok(mel),
            Ok(other) => candle_core::bail!("scheduler: a DiT window answered {other:?}"),
            Err(e) => Err(candle_core::Error::Msg(format!("{e:#}"))),
        }
    }
}

/// The Thinker as the session's Thinker task uses it.
pub(crate) enum ThinkerAccess {
    Own(Thinker),
    Shared {
        link: SharedLink,
        /// Positions the session's context holds in the scheduler.
        cache_len: usize,
    },
}

impl ThinkerAccess {
    /// On a clone of `thinker` (its cache as it is).
    pub fn own(thinker: &Thinker) -> Self {
        Self::Own(thinker.clone())
    }

    /// On a new, empty context in `scheduler`; deadlines read `pacer`'s queued audio and the
    /// session's `block_len`.
    pub fn shared(scheduler: &Scheduler, pacer: Arc<Pacer>, block_len: Duration) -> Result<Self> {
        Ok(Self::Shared {
            link: SharedLink::open(scheduler, pacer, block_len)?,
            cache_len: 0,
        })
    }

    pub fn cache_len(&self) -> usize {
        match self {
            Self::Own(thinker) => thinker.cache_len(),
            Self::Shared { cache_len, .. } => *cache_len,
        }
    }

    /// Runs `embeds` (t, hidden) at `positions` (3, t) after the context.
    pub fn prefill(
        &mut self,
        embeds: &Tensor,
        positions: &Tensor,
        logits: LogitsFor,
        due: Due,
    ) -> Result<ThinkerOutput> {
        match self {
            Self::Own(thinker) => Ok(thinker.forward(embeds, positions, logits)?),
            Self::Shared { link, cache_len } => {
                let work = Work::ThinkerPrefill {
                    embeds: embeds.clone(),
                    positions: positions.clone(),
                    logits,
                };
                match link.run(work, due)? {
                    Outcome::Prefilled(out) => {
                        *cache_len += embeds.dim(0)?;
                        Ok(out)
                    }
                    other => bail!("scheduler: a Thinker prefill answered {other:?}"),
                }
            }
        }
    }

    /// Feeds token `id` at `cache_len + rope_delta`.
    pub fn decode_step(&mut self, id: u32, rope_delta: i64) -> Result<DecodeStep> {
        match self {
            Self::Own(thinker) => Ok(thinker.decode_step(id, rope_delta)?),
            Self::Shared { link, cache_len } => {
                match link.run(Work::ThinkerDecode { id, rope_delta }, Due::Playout)? {
                    Outcome::Decoded(step) => {
                        *cache_len += 1;
                        Ok(step)
                    }
                    other => bail!("scheduler: a Thinker decode step answered {other:?}"),
                }
            }
        }
    }

    /// Keeps the context's first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        match self {
            Self::Own(thinker) => thinker.truncate_cache(len),
            Self::Shared { link, cache_len } => {
                // Sent even when nothing is counted past `len`: a failed pass may have left
                // rows behind.
                link.edit(Work::TruncateThinker(len))?;
                *cache_len = (*cache_len).min(len);
            }
        }
        Ok(())
    }

    /// Forgets positions `range` (the context policy).
    pub fn forget(&mut self, range: Range<usize>) -> Result<()> {
        match self {
            Self::Own(thinker) => thinker.remove_cache_range(range)?,
            Self::Shared { link, cache_len } => {
                let removed = range.len();
                link.edit(Work::ForgetThinker(range))?;
                *cache_len -= removed;
            }
        }
        Ok(())
    }
}

/// The Talker as the session's Talker task uses it.
pub(crate) enum TalkerAccess {
    Own(Talker),
    Shared {
        /// The loaded Talker, for its weights only: a turn plans its steps with it (its own
        /// cache stays empty).
        weights: Talker,
        link: SharedLink,
        /// Positions the session's context holds in the scheduler.
        cache_len: usize,
    },
}

impl TalkerAccess {
    /// On a clone of `talker` (its cache as it is).
    pub fn own(talker: &Talker) -> Self {
        Self::Own(talker.clone())
    }

    /// On a new, empty context in `scheduler` (whose Talker must be `talker`); deadlines
    /// read `pacer`'s queued audio.
    pub fn shared(scheduler: &Scheduler, talker: &Talker, pacer: Arc<Pacer>) -> Result<Self> {
        let mut weights = talker.clone();
        weights.clear_cache();
        Ok(Self::Shared {
            weights,
            link: SharedLink::open(scheduler, pacer, Duration::ZERO)?,
            cache_len: 0,
        })
    }

    /// The Talker whose weights a turn plans its steps with.
    pub fn weights(&self) -> &Talker {
        match self {
            Self::Own(talker) => talker,
            Self::Shared { weights, .. } => weights,
        }
    }

    pub fn cache_len(&self) -> usize {
        match self {
            Self::Own(talker) => talker.cache_len(),
            Self::Shared { cache_len, .. } => *cache_len,
        }
    }

    /// Appends prompt rows `[1, T, E]` at Talker positions `[3, T]` (the Thinker's mirror).
    pub fn mirror(&mut self, rows: &Tensor, positions: &Tensor) -> Result<()> {
        match self {
            Self::Own(talker) => {
                talker.forward(rows, positions)?;
            }
            Self::Shared {
                link, cache_len, ..
            } => {
                let forward = crate::model::talker::TalkerForward {
                    input: rows.clone(),
                    positions: positions.clone(),
                    restart: false,
                    cached_len: None,
                };
                match link.run(Work::TalkerForward(forward), Due::Playout)? {
                    // The codec logits of a prompt's last row are not used.
                    Outcome::TalkerLogits(_) => *cache_len += rows.dim(1)?,
                    other => bail!("scheduler: a Talker mirror answered {other:?}"),
                }
            }
        }
        Ok(())
    }

    /// Runs `turn`'s next step if its input is known ([`TalkerTurn::step`]).
    pub fn step(&mut self, turn: &mut TalkerTurn) -> Result<TalkerStep> {
        match self {
            Self::Own(talker) => Ok(turn.step(talker)?),
            Self::Shared {
                weights,
                link,
                cache_len,
            } => {
                let forward = match turn.plan(weights)? {
                    TalkerPlan::Forward(forward) => forward,
                    TalkerPlan::NeedText => return Ok(TalkerStep::NeedText),
                    TalkerPlan::Finished(reason) => return Ok(TalkerStep::Finished(reason)),
                };
                let (restart, rows) = (forward.restart, forward.input.dim(1)?);
                match link.run(Work::TalkerForward(forward), Due::Playout)? {
                    Outcome::TalkerLogits(logits) => {
                        if restart {
                            *cache_len = 0;
                        }
                        *cache_len += rows;
                        Ok(turn.accept(logits)?)
                    }
                    other => bail!("scheduler: a Talker step answered {other:?}"),
                }
            }
        }
    }

    /// Keeps the context's first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        match self {
            Self::Own(talker) => talker.truncate_cache(len),
            Self::Shared {
                link, cache_len, ..
            } => {
                link.edit(Work::TruncateTalker(len))?;
                *cache_len = (*cache_len).min(len);
            }
        }
        Ok(())
    }

    /// Forgets positions `range` (the context policy, mirrored).
    pub fn forget(&mut self, range: Range<usize>) -> Result<()> {
        match self {
            Self::Own(talker) => talker.remove_cache_range(range)?,
            Self::Shared {
                link, cache_len, ..
            } => {
                let removed = range.len();
                link.edit(Work::ForgetTalker(range))?;
                *cache_len -= removed;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crossbeam_channel::unbounded;

    use super::*;
    use crate::engine::clock::{Clock, SystemClock};
    use crate::engine::scheduler::{SchedulerConfig, SchedulerModels};
    use crate::model::omni::OmniModel;
    use crate::model::talker::{TalkerOptions, TalkerTextRows};
    use crate::model::thinker::decoder::sequential_positions;
    use crate::model::token2wav::dit::SamplerOptions;

    /// The tiny model, a scheduler over it and a pacer with nothing queued.
    fn shared() -> (OmniModel, Scheduler, Arc<Pacer>) {
        let model = crate::engine::links::tiny_model();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let models = SchedulerModels::of(&model).unwrap();
        let scheduler =
            Scheduler::spawn(models, clock.clone(), SchedulerConfig::default()).unwrap();
        let (frames, _) = unbounded();
        let pacer = Arc::new(Pacer::new(clock, 24_000, frames));
        (model, scheduler, pacer)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all());
        diff.and_then(|d| d.to_scalar::<f32>()).unwrap()
    }

    fn greedy(logits: &Tensor) -> u32 {
        logits.argmax(0).unwrap().to_scalar::<u32>().unwrap()
    }

    /// A DiT window sampled through the scheduler is the one the vocoder samples itself, and a
    /// scheduler with another schedule is refused.
    #[test]
    fn a_shared_dit_window_is_the_own_window() {
        let (model, scheduler, pacer) = shared();
        let speech = model.speech.as_ref().unwrap();
        let t2w = &speech.token2wav;
        let schedule = t2w.schedule(&SamplerOptions::default()).unwrap();
        let passes = ModelPasses::Shared(Arc::new(scheduler));
        let mut shared = VocoderAccess::for_passes(&passes, t2w, &schedule, pacer.clone()).unwrap();
        assert!(matches!(shared, VocoderAccess::Shared(_)));
        let voice = speech.voices.get(speech.voices.names()[0]).unwrap();
        let speaker = t2w.speaker(voice).unwrap();
        let dit = &t2w.config().dit_config;
        let codes: Vec<u32> = (0..8).map(|i| (i * 7 % dit.num_embeds) as u32).collect();
        let (repeats, mel_dim) = (dit.repeats, dit.mel_dim);
        let noise = Tensor::randn(
            0f32,
            1.0,
            (1, codes.len() * repeats, mel_dim),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let own = VocoderAccess::Own
            .sample_window(t2w, &speaker, &codes, &noise, &schedule)
            .unwrap();
        let through = shared
            .sample_window(t2w, &speaker, &codes, &noise, &schedule)
            .unwrap();
        assert_eq!(own.dims(), through.dims());
        assert_eq!(
            max_diff(&own, &through),
            0.0,
            "one window alone is the same pass"
        );
        let other = t2w
            .schedule(&SamplerOptions {
                steps: 4,
                ..SamplerOptions::default()
            })
            .unwrap();
        let err = VocoderAccess::for_passes(&passes, t2w, &other, pacer)
            .err()
            .expect("another schedule");
        assert!(format!("{err:#}").contains("ODE schedule"), "{err:#}");
    }

    /// A prefill, greedy decode steps, a forgotten range and a roll-back give the same logits
    /// and cache lengths through the scheduler as on the session's own clone.
    #[test]
    fn a_shared_thinker_gives_what_the_own_clone_gives() {
        let (model, scheduler, pacer) = shared();
        let mut own = ThinkerAccess::own(&model.thinker);
        let mut shared = ThinkerAccess::shared(&scheduler, pacer, Duration::from_secs(2)).unwrap();
        let ids = model.tokenizer.encode("Hello, who are you?").unwrap();
        let embeds = model.thinker.embed(&ids).unwrap();
        let positions = sequential_positions(0, ids.len(), model.thinker.device()).unwrap();
        let mut logits = Vec::new();
        for (access, due) in [(&mut own, Due::Playout), (&mut shared, Due::NextBlock)] {
            let out = access
                .prefill(&embeds, &positions, LogitsFor::Last, due)
                .unwrap();
            logits.push(out.logits.unwrap().squeeze(0).unwrap());
            assert_eq!(access.cache_len(), ids.len());
        }
        assert!(max_diff(&logits[0], &logits[1]) < 1e-5);
        let (mut a, mut b) = (logits[0].clone(), logits[1].clone());
        for step in 0..6 {
            let (id_a, id_b) = (greedy(&a), greedy(&b));
            assert_eq!(id_a, id_b, "step {step}");
            if step == 2 {
                // the context policy forgets two entries; positions stay as they were
                own.forget(1..3).unwrap();
                shared.forget(1..3).unwrap();
                assert_eq!(own.cache_len(), shared.cache_len());
            }
            let rope_delta = if step > 2 { 2 } else { 0 };
            let (sa, sb) = (
                own.decode_step(id_a, rope_delta).unwrap(),
                shared.decode_step(id_b, rope_delta).unwrap(),
            );
            assert!(max_diff(&sa.hidden, &sb.hidden) < 1e-5);
            assert_eq!(own.cache_len(), shared.cache_len());
            (a, b) = (sa.logits, sb.logits);
        }
        own.truncate(4).unwrap();
        shared.truncate(4).unwrap();
        assert_eq!((own.cache_len(), shared.cache_len()), (4, 4));
        // the shared context really is back at 4: the next step sees the same cache
        let (sa, sb) = (
            own.decode_step(ids[4], 2).unwrap(),
            shared.decode_step(ids[4], 2).unwrap(),
        );
        assert!(max_diff(&sa.logits, &sb.logits) < 1e-5);
        // a bad range fails through the scheduler as on the clone, and counts nothing
        assert!(own.forget(3..99).is_err());
        assert!(shared.forget(3..99).is_err());
        assert_eq!(shared.cache_len(), 5);
    }

    /// Mirrored prompt rows and a spoken turn's steps give the same codes and cache lengths
    /// through the scheduler as on the session's own clone.
    #[test]
    fn a_shared_talker_gives_the_codes_of_the_own_clone() {
        let (model, scheduler, pacer) = shared();
        let speech = model.speech.as_ref().unwrap();
        let mut own = TalkerAccess::own(&speech.talker);
        let mut shared = TalkerAccess::shared(&scheduler, &speech.talker, pacer).unwrap();
        let width = model.thinker.hidden_size();
        let device = model.thinker.device();
        let prompt = Tensor::randn(0f32, 1.0, (1, 5, width), device).unwrap();
        let positions = sequential_positions(0, 5, device).unwrap();
        let bos = speech.voices.get("Chelsie").unwrap().bos_token;
        let cfg = &model.config.talker_config;
        let text_rows =
            TalkerTextRows::from_thinker_embedding(cfg, bos, |id| model.thinker.embed(&[id]))
                .unwrap();
        let replies: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f32, 1.0, width, device).unwrap())
            .collect();
        let mut codes = Vec::new();
        for access in [&mut own, &mut shared] {
            access.mirror(&prompt, &positions).unwrap();
            access.truncate(4).unwrap();
            access.forget(0..1).unwrap();
            assert_eq!(access.cache_len(), 3);
            let options = TalkerOptions {
                max_codes: 8,
                ..TalkerOptions::reference(3, 32)
            };
            let mut turn = TalkerTurn::after_cached_prompt(
                access.weights(),
                3,
                sequential_positions(4, 2, device).unwrap(),
                1,
                text_rows.clone(),
                options,
            )
            .unwrap();
            for row in &replies {
                turn.push_reply_row(row.clone()).unwrap();
            }
            turn.finish_text();
            let mut steps = Vec::new();
            loop {
                let step = access.step(&mut turn).unwrap();
                steps.push(step);
                if matches!(step, TalkerStep::Finished(_)) {
                    break;
                }
            }
            codes.push((steps, access.cache_len()));
        }
        assert_eq!(codes[0], codes[1]);
        assert!(codes[0].0.len() > 1, "{:?}", codes[0]);
    }
}
