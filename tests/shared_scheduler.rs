//! Sessions whose Thinker and Talker passes and token2wav's DiT windows run on one shared
//! model scheduler (`ModelPasses::Shared`), on the tiny model (`models/tiny`, f32, CPU) in simulated time: a
//! session through the scheduler answers as it does on its own model clone, sessions sharing
//! it answer as they do alone, and a barge-in or a hang-up in one never changes another's
//! answer.
//!
//! Calls sharing a scheduler are driven in lock step from one thread: every call gets its next
//! 20 ms of microphone audio, then each is left to settle, so their threads submit work to the
//! scheduler at the same time. The tests take turns (each already runs several sessions; on
//! two cores, side by side they starved each other's vocoders past the settle timeout).

mod common;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use candle_core::{DType, Device};
use omnicall::engine::clock::SystemClock;
use omnicall::engine::probe::ContextView;
use omnicall::engine::scheduler::{Scheduler, SchedulerConfig, SchedulerModels};
use omnicall::engine::session::{AudioInput, ModelPasses, SessionConfig, SessionEvent};
use omnicall::engine::simulated::SimulatedSession;
use omnicall::engine::turn::TurnDetection;
use omnicall::media::vad::VadConfig;
use omnicall::model::loading::ModelFiles;
use omnicall::model::omni::OmniModel;

const RATE: u32 = 16_000;
const PIECE: Duration = Duration::from_millis(20);
/// Simulated time a call may take before the test gives up on it.
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// Wall time a session may take to settle: token2wav's windows of several sessions at once
/// in a debug build on a busy machine.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);

/// One test at a time (see the module notes).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn model() -> &'static OmniModel {
    static MODEL: OnceLock<OmniModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        OmniModel::load(
            &ModelFiles::from_dir(&dir).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    })
}

/// One scheduler over the tiny model, for the sessions of one test.
fn scheduler() -> Arc<Scheduler> {
    let model = model();
    let models = SchedulerModels::of(model).unwrap();
    let clock = Arc::new(SystemClock::new());
    Arc::new(Scheduler::spawn(models, clock, SchedulerConfig::default()).unwrap())
}

/// The silence rule and WebRTC's VAD (the recordings' timings were set for them).
fn config(seed: u64, passes: ModelPasses) -> SessionConfig {
    let mut config = SessionConfig {
        max_answer_tokens: 24,
        max_speech: Duration::from_secs(4),
        seed,
        model_passes: passes,
        ..SessionConfig::default()
    };
    config.turn.detection = TurnDetection::Silence;
    config.vad = VadConfig::webrtc();
    config
}

/// What a call does once its first answer has played `frames` frames.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Then {
    /// Listens to the end of the answer.
    Listen,
    /// Speaks over the answer again (a barge-in), and listens to the second answer.
    BargeIn { frames: usize },
    /// Hangs up.
    HangUp { frames: usize },
}

/// A session, its script and every event it gave.
struct Call {
    session: Option<SimulatedSession>,
    speech: Vec<f32>,
    /// Microphone samples still to send; silence once empty.
    to_say: VecDeque<f32>,
    then: Then,
    barged_in: bool,
    log: Vec<SessionEvent>,
}

/// What a call answered to its first turn.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    ids: Vec<u32>,
    text: String,
    audio: Vec<f32>,
}

impl Call {
    fn new(speech: &str, config: SessionConfig, then: Then) -> Self {
        let speech = common::load_16k(speech);
        let mut session = SimulatedSession::spawn(model(), config).unwrap();
        session.settle_timeout = SETTLE_TIMEOUT;
        Self {
            session: Some(session),
            to_say: speech.iter().copied().collect(),
            speech,
            then,
            barged_in: false,
            log: Vec::new(),
        }
    }

    /// Sends the next 20 ms of microphone audio, captured over the clock's next piece.
    fn say_next_piece(&mut self) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let piece = (RATE as u128 * PIECE.as_millis() / 1000) as usize;
        let take = piece.min(self.to_say.len());
        let mut samples: Vec<f32> = self.to_say.drain(..take).collect();
        samples.resize(piece, 0.0);
        let at = session.now();
        session.clock.set(at + PIECE);
        session
            .push_audio(AudioInput {
                at,
                sample_rate: RATE,
                samples,
            })
            .unwrap();
    }

    /// Waits for the session to settle, takes its events and plays its script.
    fn settle(&mut self) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        session.settle().unwrap();
        self.log.extend(session.events());
        let frames = self.frames(1);
        match self.then {
            Then::BargeIn { frames: at } if frames >= at && !self.barged_in => {
                self.barged_in = true;
                self.to_say.extend(self.speech.clone());
            }
            Then::HangUp { frames: at } if frames >= at => {
                self.session.take().unwrap().close().unwrap();
            }
            _ => {}
        }
    }

    fn frames(&self, turn: u64) -> usize {
        self.log
            .iter()
            .filter(|e| matches!(e, SessionEvent::Audio { turn: t, .. } if *t == turn))
            .count()
    }

    fn answer_done(&self, turn: u64) -> bool {
        self.log
            .iter()
            .any(|e| matches!(e, SessionEvent::AnswerDone { turn: t } if *t == turn))
    }

    /// Whether the script has played out.
    fn over(&self) -> bool {
        match self.then {
            Then::Listen => self.answer_done(1),
            Then::BargeIn { .. } => self.answer_done(2),
            Then::HangUp { .. } => self.session.is_none(),
        }
    }

    fn errors(&self) -> Vec<&String> {
        self.log
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Error(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    /// What the session's context and caches hold now.
    fn view(&self) -> ContextView {
        let session = self.session.as_ref().expect("the call is on");
        session.probe.context()
    }

    /// The first turn's answer: the ids the context kept, the text shown, the audio played.
    fn answer(&self) -> Answer {
        let view = self.view();
        let text = self
            .log
            .iter()
            .filter_map(|e| match e {
                SessionEvent::AssistantText { turn: 1, delta } => Some(delta.as_str()),
                _ => None,
            })
            .collect();
        let audio = self
            .log
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Audio { turn: 1, pcm, .. } => Some(pcm.iter().copied()),
                _ => None,
            })
            .flatten()
            .collect();
        Answer {
            ids: common::answer_ids(&view.entries, 1),
            text,
            audio,
        }
    }

    /// Both caches hold the context entry for entry (the shared access counts them).
    fn assert_caches_in_step(&self) {
        let view = self.view();
        assert_eq!(view.thinker_cache, view.entries.len(), "Thinker cache");
        assert_eq!(view.talker_cache, Some(view.entries.len()), "Talker cache");
    }

    fn close(self) {
        if let Some(session) = self.session {
            session.close().unwrap();
        }
    }
}

/// Plays the calls' scripts in lock step until each has played out.
fn run(calls: &mut [Call]) {
    let pieces = CALL_LIMIT.as_millis() / PIECE.as_millis();
    for _ in 0..pieces {
        if calls.iter().all(Call::over) {
            return;
        }
        for call in calls.iter_mut() {
            call.say_next_piece();
        }
        for call in calls.iter_mut() {
            call.settle();
        }
    }
    let states: Vec<(Then, usize, bool)> = calls
        .iter()
        .map(|c| (c.then, c.frames(1), c.answer_done(1)))
        .collect();
    panic!("the calls did not play out in {CALL_LIMIT:?}: {states:?}");
}

/// Calls sharing one new scheduler, one a `(recording, seed, script)`.
fn shared_calls<const N: usize>(scripts: [(&str, u64, Then); N]) -> (Arc<Scheduler>, [Call; N]) {
    let scheduler = scheduler();
    let calls = scripts.map(|(speech, seed, then)| {
        Call::new(
            speech,
            config(seed, ModelPasses::Shared(scheduler.clone())),
            then,
        )
    });
    (scheduler, calls)
}

/// The answer of a call alone, on its own model clone.
fn alone(speech: &str, seed: u64) -> Answer {
    let mut calls = [Call::new(
        speech,
        config(seed, ModelPasses::OwnClone),
        Then::Listen,
    )];
    run(&mut calls);
    let [call] = calls;
    assert!(call.errors().is_empty(), "{:?}", call.errors());
    let answer = call.answer();
    call.close();
    answer
}

/// The references, each computed once for the whole file.
fn alone_speech() -> &'static Answer {
    static ANSWER: OnceLock<Answer> = OnceLock::new();
    ANSWER.get_or_init(|| alone("speech.wav", 7))
}

fn alone_utterance() -> &'static Answer {
    static ANSWER: OnceLock<Answer> = OnceLock::new();
    ANSWER.get_or_init(|| alone("utterance_short.wav", 11))
}

/// `got` is `want`: the same ids and text, audio within 1e-4.
fn assert_same_answer(got: &Answer, want: &Answer, what: &str) {
    assert!(
        !want.ids.is_empty() && !want.audio.is_empty(),
        "{what}: {want:?}"
    );
    assert_eq!(got.ids, want.ids, "{what}: answer ids");
    assert_eq!(got.text, want.text, "{what}: text");
    assert_eq!(got.audio.len(), want.audio.len(), "{what}: audio length");
    let worst = got
        .audio
        .iter()
        .zip(&want.audio)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "{what}: audio differs by {worst}");
}

#[test]
fn a_session_through_the_shared_scheduler_answers_as_on_its_own_clone() {
    let _turn = one_at_a_time();
    let (scheduler, mut calls) = shared_calls([("speech.wav", 7, Then::Listen)]);
    run(&mut calls);
    let [call] = calls;
    assert!(call.errors().is_empty(), "{:?}", call.errors());
    assert_same_answer(&call.answer(), alone_speech(), "through the scheduler");
    call.assert_caches_in_step();
    // The passes ran on the scheduler: the Thinker task's, the Talker task's and the
    // vocoder task's links (its DiT windows).
    let headroom = scheduler.headroom();
    assert!(headroom.passes > 0, "{headroom:?}");
    assert_eq!(headroom.sessions, 3, "{headroom:?}");
    call.close();
}

#[test]
fn sessions_sharing_one_scheduler_each_answer_as_alone() {
    let _turn = one_at_a_time();
    let (scheduler, mut calls) = shared_calls([
        ("speech.wav", 7, Then::Listen),
        ("utterance_short.wav", 11, Then::Listen),
        ("speech.wav", 7, Then::Listen),
    ]);
    run(&mut calls);
    let want = [alone_speech(), alone_utterance(), alone_speech()];
    for (i, (call, want)) in calls.iter().zip(want).enumerate() {
        assert!(call.errors().is_empty(), "call {i}: {:?}", call.errors());
        assert_same_answer(&call.answer(), want, &format!("call {i}"));
        call.assert_caches_in_step();
    }
    assert_eq!(scheduler.headroom().sessions, 9);
    for call in calls {
        call.close();
    }
    // Hung up: the scheduler forgets every context.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scheduler.headroom().sessions > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(scheduler.headroom().sessions, 0);
}

#[test]
fn a_barge_in_or_a_hang_up_in_one_session_never_changes_another_answer() {
    let _turn = one_at_a_time();
    let (_scheduler, mut calls) = shared_calls([
        ("speech.wav", 7, Then::Listen),
        ("utterance_short.wav", 11, Then::BargeIn { frames: 5 }),
        ("speech.wav", 7, Then::HangUp { frames: 5 }),
    ]);
    run(&mut calls);
    let [listener, barging, hung_up] = calls;
    assert!(listener.errors().is_empty(), "{:?}", listener.errors());
    assert_same_answer(&listener.answer(), alone_speech(), "the listener");
    listener.assert_caches_in_step();
    // The barge-in cut its own answer and was answered in turn, its caches in step.
    assert!(barging.errors().is_empty(), "{:?}", barging.errors());
    assert!(
        barging
            .log
            .iter()
            .any(|e| matches!(e, SessionEvent::Interrupted { turn: 1, .. }))
    );
    let cut = barging.answer();
    let whole = alone_utterance();
    assert!(whole.ids.starts_with(&cut.ids), "{cut:?} of {whole:?}");
    barging.assert_caches_in_step();
    assert!(hung_up.errors().is_empty(), "{:?}", hung_up.errors());
    listener.close();
    barging.close();
    hung_up.close();
}

#[test]
fn a_session_of_another_model_is_refused_by_the_scheduler() {
    // the same checkpoint loaded again: equal weights, but not the tensors the scheduler runs
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    let other = OmniModel::load(
        &ModelFiles::from_dir(&dir).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let scheduler = scheduler();
    let clock = Arc::new(omnicall::engine::clock::SimulatedClock::new());
    let err = omnicall::engine::runtime::spawn(
        &other,
        config(7, ModelPasses::Shared(scheduler.clone())),
        clock.clone(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("another model"), "{err:#}");
    assert_eq!(scheduler.headroom().sessions, 0);
    // the scheduler's own model is welcome
    let handle =
        omnicall::engine::runtime::spawn(model(), config(7, ModelPasses::Shared(scheduler)), clock)
            .unwrap();
    drop(handle);
}
