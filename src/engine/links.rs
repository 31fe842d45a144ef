//! What a session's model threads (Thinker, Talker, vocoder) share with the rest of it: small
//! leaves, built once by the runtime. The Thinker and the Talker use all of [`ModelLinks`];
//! the vocoder gets the part it uses ([`ModelLinks::vocoder`]).

use std::sync::{Arc, Mutex};

use super::activity::Activity;
use super::cancel::Cancellation;
use super::events::{AnswerMarks, EventSink};
use super::pacer::Pacer;
use super::probe::ProbeRecord;
use super::profile::ModelProfile;

/// How far the Talker got with the answer of `turn`: codes produced, and whether it had
/// finished (what a stop's heard estimate reads).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SpeechProgress {
    pub turn: u64,
    pub codes: usize,
    pub finished: bool,
}

/// [`SpeechProgress`] as the Talker thread last wrote it, for the Thinker thread.
#[derive(Debug, Default)]
pub(crate) struct SpeechMeter(Mutex<SpeechProgress>);

impl SpeechMeter {
    pub fn get(&self) -> SpeechProgress {
        *self.0.lock().expect("speech lock")
    }

    pub fn set(&self, progress: SpeechProgress) {
        *self.0.lock().expect("speech lock") = progress;
    }
}

/// What the Thinker and the Talker threads share with the rest of their session.
#[derive(Clone)]
pub(crate) struct ModelLinks {
    /// Counts the messages they send (quiescence on simulated time).
    pub activity: Arc<Activity>,
    /// The Talker waits on it for playback; the Thinker ends an answer with nothing to say.
    pub pacer: Arc<Pacer>,
    pub cancel: Arc<Cancellation>,
    pub events: Arc<EventSink>,
    pub marks: Arc<AnswerMarks>,
    pub profile: Arc<ModelProfile>,
    /// Written by the Talker, read by the Thinker on a stop.
    pub speech: Arc<SpeechMeter>,
    pub probe: Arc<ProbeRecord>,
}

/// What the vocoder thread shares with the rest of its session.
pub(crate) struct VocoderLinks {
    /// Where the samples go.
    pub pacer: Arc<Pacer>,
    pub cancel: Arc<Cancellation>,
    pub events: Arc<EventSink>,
    pub marks: Arc<AnswerMarks>,
    pub profile: Arc<ModelProfile>,
}

impl ModelLinks {
    pub fn vocoder(&self) -> VocoderLinks {
        VocoderLinks {
            pacer: self.pacer.clone(),
            cancel: self.cancel.clone(),
            events: self.events.clone(),
            marks: self.marks.clone(),
            profile: self.profile.clone(),
        }
    }
}

/// The tiny checkpoint of `models/tiny`, for the tasks' unit tests.
#[cfg(test)]
pub(crate) fn tiny_model() -> crate::model::omni::OmniModel {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    let files = crate::model::loading::ModelFiles::from_dir(&dir).unwrap();
    crate::model::omni::OmniModel::load(&files, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap()
}

/// Links of a task under test: a simulated clock, a pacer at `sample_rate`, and the events
/// the task sends.
#[cfg(test)]
pub(crate) fn for_tests(
    sample_rate: u32,
) -> (
    ModelLinks,
    Arc<crate::engine::clock::SimulatedClock>,
    crossbeam_channel::Receiver<crate::engine::session::SessionEvent>,
) {
    use crossbeam_channel::unbounded;

    use super::queues::QueueCounters;

    let clock = Arc::new(crate::engine::clock::SimulatedClock::new());
    let (frames, _) = unbounded();
    let (events, events_rx) = unbounded();
    let links = ModelLinks {
        activity: Activity::new(),
        pacer: Arc::new(Pacer::new(clock.clone(), sample_rate, frames)),
        cancel: Arc::new(Cancellation::default()),
        events: Arc::new(EventSink::new(events, QueueCounters::new())),
        marks: Arc::new(AnswerMarks::new(clock.clone())),
        profile: Arc::new(ModelProfile::new(false)),
        speech: Arc::new(SpeechMeter::default()),
        probe: Arc::new(ProbeRecord::new(false)),
    };
    (links, clock, events_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_speech_meter_hands_the_talkers_progress_to_the_thinker() {
        let meter = SpeechMeter::default();
        assert_eq!(meter.get().codes, 0);
        meter.set(SpeechProgress {
            turn: 3,
            codes: 12,
            finished: true,
        });
        let p = meter.get();
        assert_eq!((p.turn, p.codes, p.finished), (3, 12, true));
    }

    #[test]
    fn the_vocoder_shares_the_same_leaves() {
        let (links, _, _) = for_tests(24_000);
        let vocoder = links.vocoder();
        assert!(Arc::ptr_eq(&vocoder.pacer, &links.pacer));
        assert!(Arc::ptr_eq(&vocoder.cancel, &links.cancel));
        assert!(Arc::ptr_eq(&vocoder.events, &links.events));
    }
}
