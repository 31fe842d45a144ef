//! Turn-taking, end of turn and interruptions: an explicit state machine driven by
//! voice-activity decisions on the user's audio (media time), by the end-of-turn model's
//! predictions and by what the answer pipeline reports.
//!
//! Rules (all thresholds in [`TurnConfig`]):
//! - the user's turn starts once speech has lasted `onset` (the start is dated back to the first
//!   speech frame, minus `pre_roll`, so that the first syllable is not lost);
//! - its end ([`TurnDetection`]): with `Silence`, after `end_of_turn_silence` of silence; with
//!   `Smart`, the end-of-turn model is asked once per pause, after `smart.pause` of silence,
//!   about the turn's audio so far. A complete utterance (probability ≥ `smart.threshold`)
//!   starts the answer speculatively at once and is confirmed after `smart.complete_silence`;
//!   a likely one (≥ `smart.likely_threshold`) too, confirmed after `smart.likely_silence`;
//!   an unfinished one waits up to `smart.max_silence`. Speech before the confirmation drops
//!   the speculative answer and the turn goes on. Either way a turn needs `min_turn_speech` of
//!   speech (shorter blips are dropped, not answered);
//! - while the model is thinking or speaking, the first speech decision pauses the answer
//!   (nothing more is played); speech that adds up to `interruption.barge_in_speech` is a
//!   barge-in (the answer stops, keeping what was heard, and a user turn starts at the pause),
//!   while `interruption.resume_silence` of silence before that (a backchannel, a cough, a
//!   noise) resumes the answer where it paused; a stop control stops it without a turn.

use std::time::Duration;

use crate::media::vad::{VadBackend, VadConfig};

/// What the user and the model are doing, as shown to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnState {
    /// Nobody is speaking; the model waits for the user.
    Listening,
    /// The user is speaking (their turn is being prefilled block by block).
    UserSpeaking,
    /// The user's turn ended; the model is preparing its answer.
    Thinking,
    /// The model's voice is being played out.
    Speaking,
}

/// How the end of a user turn is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnDetection {
    /// The end-of-turn model (Smart Turn) with the VAD's silence and a longest-silence fallback.
    Smart,
    /// A fixed silence after the speech (`end_of_turn_silence`).
    Silence,
}

/// Thresholds of the `Smart` end of turn.
#[derive(Debug, Clone, PartialEq)]
pub struct SmartTurnConfig {
    /// Silence after which the end-of-turn model is asked (once per pause).
    pub pause: Duration,
    /// Probability of a complete utterance from which the turn ends after `complete_silence`.
    pub threshold: f32,
    /// Silence that confirms a complete utterance (its answer was started at the prediction).
    pub complete_silence: Duration,
    /// A lower probability (≥ this, < `threshold`) from which the turn ends after
    /// `likely_silence`: an utterance that is likely but not surely over waits longer.
    pub likely_threshold: f32,
    /// Silence that confirms a likely-complete utterance (its answer, too, was started at the
    /// prediction).
    pub likely_silence: Duration,
    /// Longest silence: an utterance the model thinks unfinished ends here all the same.
    pub max_silence: Duration,
}

impl Default for SmartTurnConfig {
    fn default() -> Self {
        // From `omnicall bench turn` on the spoken set (docs/engine.md, *Turn-taking*): the
        // lowest endpointing delay with at most 10 % of the mid-sentence pauses answered.
        Self {
            pause: Duration::from_millis(200),
            threshold: 0.95,
            complete_silence: Duration::from_millis(600),
            likely_threshold: 0.1,
            likely_silence: Duration::from_millis(1000),
            max_silence: Duration::from_millis(1500),
        }
    }
}

/// Rules for speech over an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct InterruptionConfig {
    /// Speech over the paused answer adding up to this is a barge-in.
    pub barge_in_speech: Duration,
    /// Silence after a shorter sound that resumes the paused answer.
    pub resume_silence: Duration,
}

impl Default for InterruptionConfig {
    fn default() -> Self {
        Self {
            // the spoken test set's backchannels ("yeah" .. "mm hmm") last 0.1-0.72 s, its
            // interruptions 2.2-2.6 s; the VAD's hangover adds up to 140 ms
            barge_in_speech: Duration::from_millis(1000),
            // longer than the gaps between the words of one sentence
            resume_silence: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TurnConfig {
    pub detection: TurnDetection,
    pub onset: Duration,
    pub pre_roll: Duration,
    /// The `Silence` rule's silence.
    pub end_of_turn_silence: Duration,
    pub smart: SmartTurnConfig,
    pub min_turn_speech: Duration,
    pub interruption: InterruptionConfig,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            detection: TurnDetection::Smart,
            onset: Duration::from_millis(100),
            pre_roll: Duration::from_millis(200),
            end_of_turn_silence: Duration::from_millis(600),
            smart: SmartTurnConfig::default(),
            // WebRTC's VAD holds speech 60-140 ms after every burst: a 100 ms cough reads as
            // about 160 ms of speech, a short spoken "yes" as about 380 ms.
            min_turn_speech: Duration::from_millis(250),
            interruption: InterruptionConfig::default(),
        }
    }
}

impl TurnConfig {
    /// Checks that the thresholds make sense together.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.smart;
        if !(0.0..=1.0).contains(&s.threshold) {
            return Err(format!(
                "smart turn threshold {} is outside 0..=1",
                s.threshold
            ));
        }
        if !(0.0..=s.threshold).contains(&s.likely_threshold) {
            return Err(format!(
                "smart turn likely threshold {} is outside 0..=threshold ({})",
                s.likely_threshold, s.threshold
            ));
        }
        if !(s.pause <= s.complete_silence
            && s.complete_silence <= s.likely_silence
            && s.likely_silence <= s.max_silence)
        {
            return Err(format!(
                "smart turn silences must grow: pause {:?} <= complete {:?} <= likely {:?} <= max {:?}",
                s.pause, s.complete_silence, s.likely_silence, s.max_silence
            ));
        }
        if self.interruption.barge_in_speech.is_zero() {
            return Err("interruption barge_in_speech must be above zero".into());
        }
        Ok(())
    }

    /// The longest silence after which a turn has surely ended.
    pub fn longest_silence(&self) -> Duration {
        match self.detection {
            TurnDetection::Silence => self.end_of_turn_silence,
            TurnDetection::Smart => self.smart.max_silence,
        }
    }

    /// The longest stretch of audio before a turn's start decision that the turn may need
    /// (its pre-roll and the speech that decided it).
    pub fn lookback(&self) -> Duration {
        self.pre_roll
            + self
                .onset
                .max(self.interruption.barge_in_speech + self.interruption.resume_silence)
    }
}

/// Inputs of the machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TurnInput {
    /// One VAD decision for the audio frame that starts at `at` and lasts `frame` (media time).
    Voice {
        speech: bool,
        at: Duration,
        frame: Duration,
    },
    /// The end-of-turn model's answer for the pause `pause` (see
    /// [`TurnAction::PredictEndOfTurn`]): the probability that the utterance is complete.
    EndOfTurnPrediction { pause: u64, probability: f32 },
    /// The first frame of the answer was released to the user.
    AnswerAudible,
    /// The answer is complete and fully played out (or, text-only, fully sent).
    AnswerFinished,
    /// A stop control from the client.
    Stop,
    /// A typed message from the client: a complete user turn on its own.
    TypedMessage,
}

/// What the engine must do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TurnAction {
    /// Start a user turn whose audio begins at `from` (media time).
    StartUserTurn { from: Duration },
    /// Drop the user turn started earlier: it held too little speech to answer.
    CancelUserTurn,
    /// The user's turn ended: their speech stopped at `speech_end` and the rule decided it at
    /// `decided_at` (media time): finish its prefill and answer.
    EndUserTurn {
        speech_end: Duration,
        decided_at: Duration,
    },
    /// Ask the end-of-turn model whether the turn's audio so far is a complete utterance;
    /// answer with [`TurnInput::EndOfTurnPrediction`] for `pause`.
    PredictEndOfTurn { pause: u64 },
    /// The turn looks complete: prepare its answer (as `EndUserTurn` does) but hold everything
    /// it produces until `ConfirmEndOfTurn`; the user turn stays open.
    SpeculateEndOfTurn {
        speech_end: Duration,
        decided_at: Duration,
    },
    /// The speculative end of turn is confirmed at `at`: release its answer.
    ConfirmEndOfTurn { at: Duration },
    /// The user went on speaking: drop the speculative answer, roll back to before it and go
    /// on with the turn.
    DropSpeculation,
    /// Stop playing the answer for now (speech over it).
    PauseAnswer,
    /// Play the paused answer on from where it paused (it was a backchannel or a noise).
    ResumeAnswer,
    /// Stop the answer now: no frame after this one, cancel work in flight, keep in the
    /// context only what was played.
    StopAnswer,
    /// The state shown to clients changed.
    State(TurnState),
}

/// Speech over an answer, while it is paused.
#[derive(Debug, Clone, Copy)]
struct Interruption {
    /// First speech frame.
    onset: Duration,
    speech: Duration,
}

#[derive(Debug, Clone)]
pub struct TurnTaking {
    config: TurnConfig,
    state: TurnState,
    /// Start of the current run of speech frames, if the last frame was speech.
    speech_since: Option<Duration>,
    /// Start of the current run of silence frames, if the last frame was silence.
    silence_since: Option<Duration>,
    /// End of the last frame seen.
    now: Duration,
    /// Speech accumulated in the current user turn.
    turn_speech: Duration,
    /// Pauses asked about so far; the current pause's id once asked.
    pauses: u64,
    asked: Option<u64>,
    /// The silence after which the current pause ends the turn, as predicted (`None`: the
    /// longest silence).
    confirm_after: Option<Duration>,
    /// A speculative answer is under way (its speech end).
    speculating: Option<Duration>,
    interruption: Option<Interruption>,
}

impl TurnTaking {
    pub fn new(config: TurnConfig) -> Self {
        Self {
            config,
            state: TurnState::Listening,
            speech_since: None,
            silence_since: None,
            now: Duration::ZERO,
            turn_speech: Duration::ZERO,
            pauses: 0,
            asked: None,
            confirm_after: None,
            speculating: None,
            interruption: None,
        }
    }

    pub fn state(&self) -> TurnState {
        self.state
    }

    pub fn config(&self) -> &TurnConfig {
        &self.config
    }

    /// Whether a speculative answer is under way.
    pub fn speculating(&self) -> bool {
        self.speculating.is_some()
    }

    /// Whether the answer is paused by speech over it.
    pub fn paused(&self) -> bool {
        self.interruption.is_some()
    }

    fn set_state(&mut self, state: TurnState, actions: &mut Vec<TurnAction>) {
        if self.state != state {
            self.state = state;
            actions.push(TurnAction::State(state));
        }
    }

    /// Feeds one input; returns the actions it triggers, in order.
    pub fn on(&mut self, input: TurnInput) -> Vec<TurnAction> {
        let mut actions = Vec::new();
        match input {
            TurnInput::Voice { speech, at, frame } => {
                self.now = at + frame;
                if speech {
                    self.on_speech(at, frame, &mut actions);
                } else {
                    self.on_silence(at, frame, &mut actions);
                }
            }
            TurnInput::EndOfTurnPrediction { pause, probability } => {
                self.on_prediction(pause, probability, &mut actions)
            }
            TurnInput::AnswerAudible => {
                if self.state == TurnState::Thinking {
                    self.set_state(TurnState::Speaking, &mut actions);
                }
            }
            TurnInput::AnswerFinished => {
                if matches!(self.state, TurnState::Thinking | TurnState::Speaking) {
                    self.interruption = None;
                    self.set_state(TurnState::Listening, &mut actions);
                }
            }
            TurnInput::Stop => {
                if matches!(self.state, TurnState::Thinking | TurnState::Speaking) {
                    self.interruption = None;
                    actions.push(TurnAction::StopAnswer);
                    self.set_state(TurnState::Listening, &mut actions);
                }
            }
            TurnInput::TypedMessage => {
                if matches!(self.state, TurnState::Thinking | TurnState::Speaking) {
                    self.interruption = None;
                    actions.push(TurnAction::StopAnswer);
                }
                if self.state == TurnState::UserSpeaking {
                    if self.speculating.take().is_some() {
                        actions.push(TurnAction::DropSpeculation);
                    }
                    actions.push(TurnAction::CancelUserTurn);
                }
                self.turn_speech = Duration::ZERO;
                self.set_state(TurnState::Thinking, &mut actions);
            }
        }
        actions
    }

    fn on_speech(&mut self, at: Duration, frame: Duration, actions: &mut Vec<TurnAction>) {
        self.silence_since = None;
        self.asked = None;
        self.confirm_after = None;
        let since = *self.speech_since.get_or_insert(at);
        let run = at.saturating_sub(since) + frame;
        match self.state {
            TurnState::Listening if run >= self.config.onset => {
                self.turn_speech = run;
                actions.push(TurnAction::StartUserTurn {
                    from: since.saturating_sub(self.config.pre_roll),
                });
                self.set_state(TurnState::UserSpeaking, actions);
            }
            TurnState::UserSpeaking => {
                self.turn_speech += frame;
                if self.speculating.take().is_some() {
                    actions.push(TurnAction::DropSpeculation);
                }
            }
            TurnState::Thinking | TurnState::Speaking => {
                let interruption = self.interruption.get_or_insert_with(|| {
                    actions.push(TurnAction::PauseAnswer);
                    Interruption {
                        onset: at,
                        speech: Duration::ZERO,
                    }
                });
                interruption.speech += frame;
                if interruption.speech >= self.config.interruption.barge_in_speech {
                    let Interruption { onset, speech } = *interruption;
                    self.interruption = None;
                    actions.push(TurnAction::StopAnswer);
                    self.turn_speech = speech;
                    actions.push(TurnAction::StartUserTurn {
                        from: onset.saturating_sub(self.config.pre_roll),
                    });
                    self.set_state(TurnState::UserSpeaking, actions);
                }
            }
            _ => {}
        }
    }

    fn on_silence(&mut self, at: Duration, frame: Duration, actions: &mut Vec<TurnAction>) {
        self.speech_since = None;
        let since = *self.silence_since.get_or_insert(at);
        let silence = at.saturating_sub(since) + frame;
        match self.state {
            TurnState::UserSpeaking => match self.config.detection {
                TurnDetection::Silence => {
                    if silence >= self.config.end_of_turn_silence {
                        self.end_turn(since, at + frame, actions);
                    }
                }
                TurnDetection::Smart => self.smart_silence(since, silence, actions),
            },
            TurnState::Thinking | TurnState::Speaking => {
                if self.interruption.is_some() && silence >= self.config.interruption.resume_silence
                {
                    self.interruption = None;
                    actions.push(TurnAction::ResumeAnswer);
                }
            }
            TurnState::Listening => {}
        }
    }

    /// One more silent frame of a user turn under the `Smart` rule.
    fn smart_silence(
        &mut self,
        speech_end: Duration,
        silence: Duration,
        actions: &mut Vec<TurnAction>,
    ) {
        let smart = &self.config.smart;
        let enough_speech = self.turn_speech >= self.config.min_turn_speech;
        if silence >= smart.max_silence
            || (!enough_speech && silence >= smart.complete_silence)
            || self.confirm_after.is_some_and(|after| silence >= after)
        {
            self.end_turn(speech_end, self.now, actions);
        } else if silence >= smart.pause && self.asked.is_none() && enough_speech {
            self.pauses += 1;
            self.asked = Some(self.pauses);
            actions.push(TurnAction::PredictEndOfTurn { pause: self.pauses });
        }
    }

    fn on_prediction(&mut self, pause: u64, probability: f32, actions: &mut Vec<TurnAction>) {
        if self.state != TurnState::UserSpeaking || self.asked != Some(pause) {
            return; // the user spoke again meanwhile, or the turn is over
        }
        let Some(speech_end) = self.silence_since else {
            return;
        };
        let smart = &self.config.smart;
        let confirm_after = if probability >= smart.threshold {
            smart.complete_silence
        } else if probability >= smart.likely_threshold {
            smart.likely_silence
        } else {
            return;
        };
        self.confirm_after = Some(confirm_after);
        self.speculating = Some(speech_end);
        actions.push(TurnAction::SpeculateEndOfTurn {
            speech_end,
            decided_at: self.now,
        });
        if self.now.saturating_sub(speech_end) >= confirm_after {
            self.end_turn(speech_end, self.now, actions);
        }
    }

    /// The silence ended the turn at `decided_at`: answered, confirmed, or dropped as a blip.
    fn end_turn(
        &mut self,
        speech_end: Duration,
        decided_at: Duration,
        actions: &mut Vec<TurnAction>,
    ) {
        if self.speculating.take().is_some() {
            actions.push(TurnAction::ConfirmEndOfTurn { at: decided_at });
            self.set_state(TurnState::Thinking, actions);
        } else if self.turn_speech >= self.config.min_turn_speech {
            actions.push(TurnAction::EndUserTurn {
                speech_end,
                decided_at,
            });
            self.set_state(TurnState::Thinking, actions);
        } else {
            actions.push(TurnAction::CancelUserTurn);
            self.set_state(TurnState::Listening, actions);
        }
        self.turn_speech = Duration::ZERO;
        self.asked = None;
        self.confirm_after = None;
    }
}

/// Which voice-activity detector reads the user's audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VadChoice {
    Silero,
    Webrtc,
}

/// The turn-taking flags of the transports (`serve`, `local`), flattened into their own.
#[derive(Debug, Clone, clap::Args)]
pub struct TurnTakingArgs {
    /// How the end of the user's turn is decided: `smart` (Smart Turn's end-of-turn model with
    /// the VAD's silence, answers started speculatively) or `silence` (a fixed 600 ms).
    #[arg(long, value_enum, default_value = "smart")]
    pub turn_detection: TurnDetectionArg,
    /// Voice-activity detector: Silero VAD (neural, 32 ms frames) or WebRTC's.
    #[arg(long, value_enum, default_value = "silero")]
    pub vad: VadChoice,
}

/// [`TurnDetection`] as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TurnDetectionArg {
    Smart,
    Silence,
}

impl TurnTakingArgs {
    /// Sets a session's turn-taking and VAD settings (`SessionConfig::turn`, `::vad`) from
    /// the flags.
    pub fn apply(&self, turn: &mut TurnConfig, vad: &mut VadConfig) {
        turn.detection = match self.turn_detection {
            TurnDetectionArg::Smart => TurnDetection::Smart,
            TurnDetectionArg::Silence => TurnDetection::Silence,
        };
        *vad = VadConfig::for_backend(match self.vad {
            VadChoice::Silero => VadBackend::Silero,
            VadChoice::Webrtc => VadBackend::WebRtc,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(20);

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Feeds `ms` milliseconds of 20 ms VAD frames starting at `*t`.
    fn feed(m: &mut TurnTaking, t: &mut Duration, speech: bool, ms: u64) -> Vec<TurnAction> {
        let mut out = Vec::new();
        for _ in 0..ms / 20 {
            out.extend(m.on(TurnInput::Voice {
                speech,
                at: *t,
                frame: FRAME,
            }));
            *t += FRAME;
        }
        out
    }

    fn smart() -> TurnConfig {
        TurnConfig {
            detection: TurnDetection::Smart,
            ..Default::default()
        }
    }

    fn silence_rule() -> TurnConfig {
        TurnConfig {
            detection: TurnDetection::Silence,
            ..Default::default()
        }
    }

    fn asked(actions: &[TurnAction]) -> Option<u64> {
        actions.iter().find_map(|a| match a {
            TurnAction::PredictEndOfTurn { pause } => Some(*pause),
            _ => None,
        })
    }

    #[test]
    fn a_turn_starts_on_speech_and_ends_after_silence() {
        let mut m = TurnTaking::new(silence_rule());
        let mut t = Duration::ZERO;
        assert!(feed(&mut m, &mut t, false, 1000).is_empty());
        let start = feed(&mut m, &mut t, true, 1000);
        assert_eq!(start[0], TurnAction::StartUserTurn { from: ms(800) });
        assert_eq!(start[1], TurnAction::State(TurnState::UserSpeaking));
        let end = feed(&mut m, &mut t, false, 1000);
        assert_eq!(
            end,
            vec![
                TurnAction::EndUserTurn {
                    speech_end: ms(2000),
                    decided_at: ms(2600)
                },
                TurnAction::State(TurnState::Thinking)
            ]
        );
        assert!(
            m.on(TurnInput::AnswerAudible)
                .contains(&TurnAction::State(TurnState::Speaking))
        );
        assert_eq!(
            m.on(TurnInput::AnswerFinished),
            vec![TurnAction::State(TurnState::Listening)]
        );
    }

    #[test]
    fn a_blip_is_not_answered() {
        for detection in [TurnDetection::Silence, TurnDetection::Smart] {
            let config = TurnConfig {
                detection,
                min_turn_speech: ms(300),
                ..Default::default()
            };
            let mut m = TurnTaking::new(config);
            let mut t = Duration::ZERO;
            feed(&mut m, &mut t, true, 120);
            assert_eq!(m.state(), TurnState::UserSpeaking);
            let end = feed(&mut m, &mut t, false, 1000);
            assert_eq!(end[0], TurnAction::CancelUserTurn, "{detection:?}");
            assert_eq!(asked(&end), None, "a blip is not worth a prediction");
            assert_eq!(m.state(), TurnState::Listening);
        }
    }

    #[test]
    fn a_complete_utterance_is_answered_speculatively_then_confirmed() {
        let config = smart();
        let smart = config.smart.clone();
        let mut m = TurnTaking::new(config);
        let mut t = Duration::ZERO;
        feed(&mut m, &mut t, true, 1000);
        let pause = feed(&mut m, &mut t, false, smart.pause.as_millis() as u64);
        let id = asked(&pause).expect("asked at the pause");
        assert_eq!(m.state(), TurnState::UserSpeaking);
        let speculate = m.on(TurnInput::EndOfTurnPrediction {
            pause: id,
            probability: smart.threshold,
        });
        assert_eq!(
            speculate,
            vec![TurnAction::SpeculateEndOfTurn {
                speech_end: ms(1000),
                decided_at: ms(1000) + smart.pause
            }]
        );
        assert!(m.speculating());
        let rest = (smart.complete_silence - smart.pause).as_millis() as u64;
        let confirm = feed(&mut m, &mut t, false, rest);
        assert_eq!(
            confirm,
            vec![
                TurnAction::ConfirmEndOfTurn {
                    at: ms(1000) + smart.complete_silence
                },
                TurnAction::State(TurnState::Thinking)
            ]
        );
        assert!(!m.speculating());
    }

    #[test]
    fn a_likely_utterance_is_speculated_at_once_and_confirmed_after_a_longer_silence() {
        let mut config = smart();
        config.smart.pause = ms(60);
        config.smart.threshold = 0.9;
        config.smart.likely_threshold = 0.4;
        config.smart.complete_silence = ms(160);
        config.smart.likely_silence = ms(600);
        let smart = config.smart.clone();
        let mut m = TurnTaking::new(config);
        let mut t = Duration::ZERO;
        feed(&mut m, &mut t, true, 1000);
        let id = asked(&feed(&mut m, &mut t, false, smart.pause.as_millis() as u64)).unwrap();
        let speculate = m.on(TurnInput::EndOfTurnPrediction {
            pause: id,
            probability: 0.6,
        });
        assert!(matches!(
            speculate[..],
            [TurnAction::SpeculateEndOfTurn { .. }]
        ));
        // a sure prediction would be confirmed here; this one waits
        let short = (smart.complete_silence - smart.pause).as_millis() as u64;
        assert!(feed(&mut m, &mut t, false, short).is_empty());
        let rest = (smart.likely_silence - smart.complete_silence).as_millis() as u64;
        assert_eq!(
            feed(&mut m, &mut t, false, rest),
            vec![
                TurnAction::ConfirmEndOfTurn {
                    at: ms(1000) + smart.likely_silence
                },
                TurnAction::State(TurnState::Thinking)
            ]
        );
        // below the likely threshold nothing is started: the longest silence decides
        let mut m = TurnTaking::new(TurnConfig {
            smart: smart.clone(),
            ..self::smart()
        });
        let mut t = Duration::ZERO;
        feed(&mut m, &mut t, true, 1000);
        let id = asked(&feed(&mut m, &mut t, false, smart.pause.as_millis() as u64)).unwrap();
        assert!(
            m.on(TurnInput::EndOfTurnPrediction {
                pause: id,
                probability: 0.3,
            })
            .is_empty()
        );
        assert!(!m.speculating());
    }

    #[test]
    fn speech_before_the_confirmation_drops_the_speculation_and_an_unfinished_turn_waits() {
        let config = smart();
        let smart = config.smart.clone();
        let mut m = TurnTaking::new(config);
        let mut t = Duration::ZERO;
        feed(&mut m, &mut t, true, 1000);
        let id = asked(&feed(&mut m, &mut t, false, smart.pause.as_millis() as u64)).unwrap();
        m.on(TurnInput::EndOfTurnPrediction {
            pause: id,
            probability: smart.threshold,
        });
        assert_eq!(
            feed(&mut m, &mut t, true, 40),
            vec![TurnAction::DropSpeculation]
        );
        assert_eq!(m.state(), TurnState::UserSpeaking);
        // a late answer for the old pause changes nothing
        assert!(
            m.on(TurnInput::EndOfTurnPrediction {
                pause: id,
                probability: 1.0
            })
            .is_empty()
        );
        // the next pause is predicted unfinished: the turn waits for the longest silence
        let pause_at = t;
        let next = asked(&feed(&mut m, &mut t, false, smart.pause.as_millis() as u64)).unwrap();
        assert_ne!(next, id);
        assert!(
            m.on(TurnInput::EndOfTurnPrediction {
                pause: next,
                probability: smart.likely_threshold / 2.0
            })
            .is_empty()
        );
        let wait = (smart.max_silence - smart.pause).as_millis() as u64;
        let end = feed(&mut m, &mut t, false, wait);
        assert_eq!(
            end,
            vec![
                TurnAction::EndUserTurn {
                    speech_end: pause_at,
                    decided_at: pause_at + smart.max_silence
                },
                TurnAction::State(TurnState::Thinking)
            ]
        );
    }

    #[test]
    fn a_late_complete_prediction_ends_the_turn_at_once() {
        let config = smart();
        let smart = config.smart.clone();
        let mut m = TurnTaking::new(config);
        let mut t = Duration::ZERO;
        feed(&mut m, &mut t, true, 1000);
        let id = asked(&feed(
            &mut m,
            &mut t,
            false,
            smart.complete_silence.as_millis() as u64,
        ))
        .unwrap();
        let actions = m.on(TurnInput::EndOfTurnPrediction {
            pause: id,
            probability: smart.threshold,
        });
        assert!(matches!(actions[0], TurnAction::SpeculateEndOfTurn { .. }));
        assert!(matches!(actions[1], TurnAction::ConfirmEndOfTurn { .. }));
        assert_eq!(m.state(), TurnState::Thinking);
    }

    fn speaking(config: TurnConfig) -> (TurnTaking, Duration) {
        let mut m = TurnTaking::new(TurnConfig {
            detection: TurnDetection::Silence,
            ..config
        });
        let mut t = Duration::ZERO;
        feed(&mut m, &mut t, true, 1000);
        feed(&mut m, &mut t, false, 800);
        m.on(TurnInput::AnswerAudible);
        assert_eq!(m.state(), TurnState::Speaking);
        (m, t)
    }

    #[test]
    fn a_backchannel_pauses_the_answer_then_resumes_it() {
        let config = TurnConfig::default();
        let rules = config.interruption.clone();
        let (mut m, mut t) = speaking(config);
        let short = rules.barge_in_speech.as_millis() as u64 - 100;
        let over = feed(&mut m, &mut t, true, short);
        assert_eq!(
            over,
            vec![TurnAction::PauseAnswer],
            "paused at the first frame"
        );
        assert!(m.paused());
        let after = feed(
            &mut m,
            &mut t,
            false,
            rules.resume_silence.as_millis() as u64,
        );
        assert_eq!(after, vec![TurnAction::ResumeAnswer]);
        assert_eq!(m.state(), TurnState::Speaking);
        assert!(!m.paused());
    }

    #[test]
    fn speech_that_goes_on_over_the_paused_answer_is_a_barge_in() {
        let config = TurnConfig::default();
        let rules = config.interruption.clone();
        let pre_roll = config.pre_roll;
        let (mut m, mut t) = speaking(config);
        let onset = t;
        assert_eq!(
            feed(&mut m, &mut t, true, 20),
            vec![TurnAction::PauseAnswer]
        );
        // a short gap inside the interruption does not resume the answer
        assert!(feed(&mut m, &mut t, false, 100).is_empty());
        let barge = feed(
            &mut m,
            &mut t,
            true,
            rules.barge_in_speech.as_millis() as u64,
        );
        assert_eq!(barge[0], TurnAction::StopAnswer);
        assert_eq!(
            barge[1],
            TurnAction::StartUserTurn {
                from: onset - pre_roll
            }
        );
        assert_eq!(m.state(), TurnState::UserSpeaking);
        assert!(!m.paused());
    }

    #[test]
    fn stop_control_ends_the_answer_without_a_turn() {
        let mut m = TurnTaking::new(TurnConfig::default());
        assert!(
            m.on(TurnInput::Stop).is_empty(),
            "nothing to stop while listening"
        );
        assert_eq!(
            m.on(TurnInput::TypedMessage),
            vec![TurnAction::State(TurnState::Thinking)]
        );
        assert_eq!(
            m.on(TurnInput::Stop),
            vec![
                TurnAction::StopAnswer,
                TurnAction::State(TurnState::Listening)
            ]
        );
    }

    #[test]
    fn bad_thresholds_are_refused() {
        let mut config = TurnConfig::default();
        config.smart.threshold = 1.5;
        assert!(config.validate().unwrap_err().contains("threshold"));
        let mut config = TurnConfig::default();
        config.smart.max_silence = ms(100);
        assert!(config.validate().unwrap_err().contains("grow"));
        assert!(TurnConfig::default().validate().is_ok());
    }
}
