//! The end-of-turn model's seat in a session: a trait for "the turn's audio so far → the
//! probability that the utterance is complete", and the thread that runs it once per pause,
//! off the control thread (which must keep up with the audio).
//!
//! The session's implementation is Smart Turn v3.2 ([`crate::media::smart_turn`]); tests of the
//! turn machinery may give a session another one through [`EndOfTurnFactory`].

use std::sync::Arc;

use anyhow::Result;
use crossbeam_channel::{Receiver, Sender};

use super::activity::WorkToken;

/// Smart Turn v3.2, the sessions' end-of-turn model.
impl EndOfTurn for crate::media::smart_turn::SmartTurn {
    fn complete_probability(&mut self, audio_16k: &[f32]) -> Result<f32> {
        crate::media::smart_turn::SmartTurn::complete_probability(self, audio_16k)
    }
}

/// The factory of Smart Turn models (the weights are loaded once per process and shared).
pub fn smart_turn() -> EndOfTurnFactory {
    EndOfTurnFactory::new(|| Ok(Box::new(crate::media::smart_turn::SmartTurn::new()?)))
}

/// Sample rate of the audio an [`EndOfTurn`] model reads.
pub const END_OF_TURN_RATE: u32 = 16_000;

/// A model of whether an utterance is complete.
pub trait EndOfTurn: Send {
    /// The probability that `audio_16k` (a turn's audio so far, 16 kHz mono, at most the last
    /// [`super::input::END_OF_TURN_AUDIO`]) ends a complete utterance.
    fn complete_probability(&mut self, audio_16k: &[f32]) -> Result<f32>;
}

/// Makes a session's end-of-turn model (each session owns its own).
#[derive(Clone)]
pub struct EndOfTurnFactory(Arc<dyn Fn() -> Result<Box<dyn EndOfTurn>> + Send + Sync>);

impl EndOfTurnFactory {
    pub fn new(make: impl Fn() -> Result<Box<dyn EndOfTurn>> + Send + Sync + 'static) -> Self {
        Self(Arc::new(make))
    }

    pub fn make(&self) -> Result<Box<dyn EndOfTurn>> {
        (self.0)()
    }
}

impl std::fmt::Debug for EndOfTurnFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndOfTurnFactory")
    }
}

/// A question for the model: is the turn over at this pause?
#[derive(Debug)]
pub(crate) struct PredictionRequest {
    pub pause: u64,
    pub audio: Vec<f32>,
}

/// Its answer (`None`: the model failed; the turn then waits for the longest silence).
#[derive(Debug)]
pub(crate) struct Prediction {
    pub pause: u64,
    pub probability: Option<f32>,
}

/// The end-of-turn thread: one prediction per request, in order. Only the newest waiting
/// request is worth answering (an older pause has been spoken over or decided).
pub(crate) fn run(
    mut model: Box<dyn EndOfTurn>,
    requests: Receiver<(PredictionRequest, WorkToken)>,
    answers: Sender<(Prediction, WorkToken)>,
    errors: impl Fn(String),
) {
    while let Ok(mut next) = requests.recv() {
        for newer in requests.try_iter() {
            next = newer;
        }
        let (request, token) = next;
        let probability = match model.complete_probability(&request.audio) {
            Ok(p) => Some(p),
            Err(e) => {
                errors(format!("end-of-turn model: {e:#}"));
                None
            }
        };
        let answer = Prediction {
            pause: request.pause,
            probability,
        };
        if answers.send((answer, token)).is_err() {
            return;
        }
    }
}
