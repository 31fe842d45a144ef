//! Turn-taking and barge-in: an explicit state machine driven by voice-activity decisions on the
//! user's audio (media time) and by what the answer pipeline reports.
//!
//! Rules (all thresholds in [`TurnConfig`]):
//! - the user's turn starts once speech has lasted `onset` (the start is dated back to the first
//!   speech frame, minus `pre_roll`, so that the first syllable is not lost);
//! - it ends after `end_of_turn_silence` of silence, provided it held at least `min_turn_speech`
//!   of speech (shorter blips are dropped, not answered);
//! - while the model is thinking or speaking, speech lasting `barge_in_onset` is a barge-in: the
//!   answer stops at once and a new user turn starts; a stop control does the same without
//!   starting a turn.

use std::time::Duration;

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

#[derive(Debug, Clone, PartialEq)]
pub struct TurnConfig {
    pub onset: Duration,
    pub pre_roll: Duration,
    pub end_of_turn_silence: Duration,
    pub min_turn_speech: Duration,
    pub barge_in_onset: Duration,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            onset: Duration::from_millis(100),
            pre_roll: Duration::from_millis(200),
            end_of_turn_silence: Duration::from_millis(600),
            // WebRTC's VAD holds speech 60-140 ms after every burst: a 100 ms cough reads as
            // about 160 ms of speech, a short spoken "yes" as about 380 ms.
            min_turn_speech: Duration::from_millis(250),
            barge_in_onset: Duration::from_millis(200),
        }
    }
}

/// Inputs of the machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TurnInput {
    /// One VAD decision for the audio frame that starts at `at` (media time).
    Voice { speech: bool, at: Duration },
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
    /// The user's turn ended: their speech stopped at `speech_end` and the silence rule
    /// decided it at `decided_at` (media time): finish its prefill and answer.
    EndUserTurn {
        speech_end: Duration,
        decided_at: Duration,
    },
    /// Stop the answer now: no frame after this one, cancel work in flight, keep in the
    /// context only what was played.
    StopAnswer,
    /// The state shown to clients changed.
    State(TurnState),
}

#[derive(Debug, Clone)]
pub struct TurnTaking {
    config: TurnConfig,
    state: TurnState,
    /// Start of the current run of speech frames, if the last frame was speech.
    speech_since: Option<Duration>,
    /// Start of the current run of silence frames, if the last frame was silence.
    silence_since: Option<Duration>,
    /// Speech accumulated in the current user turn.
    turn_speech: Duration,
    last_frame_at: Option<Duration>,
}

impl TurnTaking {
    pub fn new(config: TurnConfig) -> Self {
        Self {
            config,
            state: TurnState::Listening,
            speech_since: None,
            silence_since: None,
            turn_speech: Duration::ZERO,
            last_frame_at: None,
        }
    }

    pub fn state(&self) -> TurnState {
        self.state
    }

    pub fn config(&self) -> &TurnConfig {
        &self.config
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
            TurnInput::Voice { speech, at } => self.on_voice(speech, at, &mut actions),
            TurnInput::AnswerAudible => {
                if self.state == TurnState::Thinking {
                    self.set_state(TurnState::Speaking, &mut actions);
                }
            }
            TurnInput::AnswerFinished => {
                if matches!(self.state, TurnState::Thinking | TurnState::Speaking) {
                    self.set_state(TurnState::Listening, &mut actions);
                }
            }
            TurnInput::Stop => {
                if matches!(self.state, TurnState::Thinking | TurnState::Speaking) {
                    actions.push(TurnAction::StopAnswer);
                    self.set_state(TurnState::Listening, &mut actions);
                }
            }
            TurnInput::TypedMessage => {
                if matches!(self.state, TurnState::Thinking | TurnState::Speaking) {
                    actions.push(TurnAction::StopAnswer);
                }
                if self.state == TurnState::UserSpeaking {
                    actions.push(TurnAction::CancelUserTurn);
                }
                self.turn_speech = Duration::ZERO;
                self.set_state(TurnState::Thinking, &mut actions);
            }
        }
        actions
    }

    fn on_voice(&mut self, speech: bool, at: Duration, actions: &mut Vec<TurnAction>) {
        let frame = self
            .last_frame_at
            .map(|last| at.saturating_sub(last))
            .unwrap_or_default();
        self.last_frame_at = Some(at);
        if speech {
            self.silence_since = None;
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
                TurnState::UserSpeaking => self.turn_speech += frame,
                TurnState::Thinking | TurnState::Speaking if run >= self.config.barge_in_onset => {
                    actions.push(TurnAction::StopAnswer);
                    self.turn_speech = run;
                    actions.push(TurnAction::StartUserTurn {
                        from: since.saturating_sub(self.config.pre_roll),
                    });
                    self.set_state(TurnState::UserSpeaking, actions);
                }
                _ => {}
            }
        } else {
            self.speech_since = None;
            let since = *self.silence_since.get_or_insert(at);
            if self.state == TurnState::UserSpeaking
                && at.saturating_sub(since) + frame >= self.config.end_of_turn_silence
            {
                if self.turn_speech >= self.config.min_turn_speech {
                    actions.push(TurnAction::EndUserTurn {
                        speech_end: since,
                        decided_at: at + frame,
                    });
                    self.set_state(TurnState::Thinking, actions);
                } else {
                    actions.push(TurnAction::CancelUserTurn);
                    self.set_state(TurnState::Listening, actions);
                }
                self.turn_speech = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(20);

    /// Feeds `ms` milliseconds of 20 ms VAD frames starting at `*t`.
    fn feed(m: &mut TurnTaking, t: &mut Duration, speech: bool, ms: u64) -> Vec<TurnAction> {
        let mut out = Vec::new();
        for _ in 0..ms / 20 {
            out.extend(m.on(TurnInput::Voice { speech, at: *t }));
            *t += FRAME;
        }
        out
    }

    #[test]
    fn a_turn_starts_on_speech_and_ends_after_silence() {
        let mut m = TurnTaking::new(TurnConfig::default());
        let mut t = Duration::ZERO;
        assert!(feed(&mut m, &mut t, false, 1000).is_empty());
        let start = feed(&mut m, &mut t, true, 1000);
        assert_eq!(
            start[0],
            TurnAction::StartUserTurn {
                from: Duration::from_millis(800)
            }
        );
        assert_eq!(start[1], TurnAction::State(TurnState::UserSpeaking));
        let end = feed(&mut m, &mut t, false, 1000);
        assert_eq!(
            end,
            vec![
                TurnAction::EndUserTurn {
                    speech_end: Duration::from_millis(2000),
                    decided_at: Duration::from_millis(2600)
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
        let config = TurnConfig {
            min_turn_speech: Duration::from_millis(300),
            ..Default::default()
        };
        let mut m = TurnTaking::new(config);
        let mut t = Duration::ZERO;
        feed(&mut m, &mut t, true, 120);
        assert_eq!(m.state(), TurnState::UserSpeaking);
        let end = feed(&mut m, &mut t, false, 1000);
        assert_eq!(end[0], TurnAction::CancelUserTurn);
        assert_eq!(m.state(), TurnState::Listening);
    }

    #[test]
    fn speech_over_the_answer_is_a_barge_in() {
        let mut m = TurnTaking::new(TurnConfig::default());
        let mut t = Duration::ZERO;
        feed(&mut m, &mut t, true, 1000);
        feed(&mut m, &mut t, false, 800);
        m.on(TurnInput::AnswerAudible);
        assert_eq!(m.state(), TurnState::Speaking);
        // a short noise is not enough
        assert!(feed(&mut m, &mut t, true, 100).is_empty());
        feed(&mut m, &mut t, false, 100);
        let barge = feed(&mut m, &mut t, true, 300);
        assert_eq!(barge[0], TurnAction::StopAnswer);
        assert!(matches!(barge[1], TurnAction::StartUserTurn { .. }));
        assert_eq!(m.state(), TurnState::UserSpeaking);
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
}
