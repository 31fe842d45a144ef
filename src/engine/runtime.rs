//! The running session: [`spawn`] starts its threads and hands back a [`SessionHandle`].
//!
//! # Threads
//!
//! ```text
//!  transport ──SessionInput──▶ control ──ThinkerMsg──▶ thinker ──TalkerMsg──▶ talker
//!      ▲                        │  ▲  ▲                  │                     │
//!      │                 ticks ─┘  │  └── reports ───────┘               VocoderMsg
//!      │                           │                                           ▼
//!      └──────SessionEvent─────────┴─────── PacerOutput ◀── pacer ◀── pcm ── vocoder
//! ```
//!
//! * **control** owns the [`InputStage`] (resampling, VAD, turn-taking, blocks). It is ticked
//!   every 20 ms on the session clock by a ticker thread, forwards the stage's events to the
//!   Thinker, releases the pacer's frames to the transport and tells the stage when an answer
//!   became audible or ended. On a barge-in or a stop it stops the pacer *first* (no frame
//!   after that), then moves the cancellation epoch on (every compute loop checks it at each
//!   step and drops stale work), then tells the Thinker how much was heard.
//! * **thinker** ([`super::thinker_task`]) keeps the conversation in the Thinker's KV cache,
//!   encodes and prefills each block as it closes, generates the answer and streams its rows
//!   to the Talker; it also mirrors every prefilled row into the Talker's cache.
//! * **talker** ([`super::talker_task`]) turns rows into codec codes, running at most
//!   `speech_lead` ahead of playback.
//! * **vocoder** ([`super::vocoder_task`]) renders codes with the streaming token2wav into the
//!   pacer, which releases 20 ms frames on the clock.
//!
//! `SessionInput::Close`, or dropping every clone of the handle, ends every thread; the pacer
//! and the ticker exit when they next wake.
//!
//! # Event order of one answer
//!
//! `State(UserSpeaking)`, `UserTurn`, `State(Thinking)`, `AssistantText`..., (voice:)
//! `State(Speaking)`, `Audio`... then either `AnswerDone`, `Timings`, `State(Listening)`, or
//! on a barge-in / stop `State(..)`, `Interrupted`, `Timings`. Text deltas and audio frames
//! interleave (text runs ahead of speech).
//!
//! # Simulated time
//!
//! [`spawn_probed`] also returns a [`SessionProbe`] that says when the session is quiescent:
//! every input handled, no work counted in its [`Activity`], no frame due at the clock's
//! present time, no tick due. [`SimulatedSession`] drives a session that way: it advances a
//! [`SimulatedClock`] in steps and waits for quiescence after each, so a test sees the same
//! events whatever the threads' timing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use crossbeam_channel::{Receiver, Sender, select, unbounded};

use super::activity::{Activity, WorkToken};
use super::blocks::BlockConfig;
use super::clock::{Clock, SimulatedClock};
use super::context::Entry;
use super::end_of_turn::{self, END_OF_TURN_RATE, Prediction, PredictionRequest, smart_turn};
use super::input::{InputConfig, InputEvent, InputStage};
use super::pacer::{FRAME, Pacer, PacerOutput};
use super::queues::{QueueCounters, ShedReporter, session_channels};
use super::session::{
    AudioInput, Control, ReplyMode, SessionConfig, SessionEvent, SessionHandle, SessionInput,
    TurnTimings, VideoInput,
};
use super::talker_task::{self, TalkerMsg};
use super::thinker_task::{self, ThinkerMsg, ThinkerReport};
use super::threads::name_compute_pool;
pub use super::threads::{SESSION_THREADS, thread_cpu, threads_cpu};
use super::turn::TurnDetection;
use super::vocoder_task;
use crate::media::mel::LogMel;
use crate::model::omni::OmniModel;

/// How often the input stage is ticked on the session clock.
pub const TICK: Duration = Duration::from_millis(20);

/// What the session's threads share.
pub(crate) struct Shared {
    pub clock: Arc<dyn Clock>,
    pub activity: Arc<Activity>,
    /// Moves on at every stop: work started under an older epoch is stale.
    epoch: AtomicU64,
    events: Sender<SessionEvent>,
    /// Counters of the channels to and from the transport.
    queues: Arc<QueueCounters>,
    /// Marks of the answers under way, by turn (removed when emitted).
    timings: Mutex<HashMap<u64, TurnTimings>>,
    pub pacer: Arc<Pacer>,
    /// Codes the Talker produced for the answer of `turn`, and whether it had finished.
    speech: Mutex<SpeechProgress>,
    closed: AtomicBool,
    /// What the Thinker's context holds, for tests and diagnostics.
    view: Mutex<ContextView>,
    /// Whether a [`SessionProbe`] reads `view`: without one, the Thinker does not copy its
    /// context there after every message.
    probed: bool,
    /// Positions in the Talker's cache after its last message.
    talker_cache: AtomicU64,
    /// CPU time of the model's calls, when profiled.
    profile: Option<ModelTime>,
    /// The text of a speculative answer, held until its turn is confirmed (or dropped).
    held_text: Mutex<Option<(u64, Vec<SessionEvent>)>>,
    /// Speculative answers started and dropped so far.
    speculations: AtomicU64,
    speculations_dropped: AtomicU64,
}

/// Which part of the model a timed call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Log-mel features, audio encoder, frame preparation, vision encoder.
    Encoders,
    /// Thinker prefill and decode steps (with sampling).
    Thinker,
    /// Talker mirroring and steps.
    Talker,
    /// Streaming token2wav.
    Vocoder,
}

/// CPU time spent in model calls, by stage, in ns.
#[derive(Debug, Default)]
struct ModelTime {
    stages: [AtomicU64; 4],
}

/// CPU time of the model's calls in a profiled session, by stage (CPU time of the calling
/// thread: work the math library hands to helper threads is not in it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ModelTimes {
    pub encoders: Duration,
    pub thinker: Duration,
    pub talker: Duration,
    pub vocoder: Duration,
}

impl ModelTimes {
    pub fn total(&self) -> Duration {
        self.encoders + self.thinker + self.talker + self.vocoder
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SpeechProgress {
    pub turn: u64,
    pub codes: usize,
    pub finished: bool,
}

impl Shared {
    /// Runs a model call, timing it when the session is profiled.
    pub fn timed<T>(&self, stage: Stage, call: impl FnOnce() -> T) -> T {
        let Some(profile) = &self.profile else {
            return call();
        };
        let before = thread_cpu();
        let out = call();
        if let (Some(a), Some(b)) = (before, thread_cpu()) {
            profile.stages[stage as usize]
                .fetch_add(b.saturating_sub(a).as_nanos() as u64, Ordering::Relaxed);
        }
        out
    }

    pub fn emit(&self, event: SessionEvent) {
        if let SessionEvent::AssistantText { turn, .. } = &event {
            let mut held = self.held_text.lock().expect("held text lock");
            if let Some((_, events)) = held.as_mut().filter(|(t, _)| t == turn) {
                events.push(event);
                return;
            }
        }
        self.queues.deliver(&self.events, event);
    }

    /// Holds the answer text of `turn` from now on.
    fn hold_text(&self, turn: u64) {
        *self.held_text.lock().expect("held text lock") = Some((turn, Vec::new()));
    }

    /// Sends the held text of `turn` (`release`) or forgets it, and stops holding.
    fn end_hold(&self, turn: u64, release: bool) {
        let mut held = self.held_text.lock().expect("held text lock");
        if held.as_ref().is_some_and(|(t, _)| *t == turn) {
            let (_, events) = held.take().expect("held text");
            if release {
                for event in events {
                    self.queues.deliver(&self.events, event);
                }
            }
        }
    }

    pub fn error(&self, error: impl std::fmt::Display) {
        tracing::warn!("session error: {error}");
        self.emit(SessionEvent::Error(error.to_string()));
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub fn cancelled(&self, epoch: u64) -> bool {
        self.epoch() != epoch || self.closed.load(Ordering::SeqCst)
    }

    /// Sets a timing mark of the answer to `turn` (the first time only).
    pub fn mark(&self, turn: u64, set: impl FnOnce(&mut TurnTimings, Duration)) {
        let now = self.clock.now();
        let mut timings = self.timings.lock().expect("timings lock");
        if let Some(t) = timings.get_mut(&turn) {
            set(t, now);
        }
    }

    pub fn emit_timings(&self, turn: u64) {
        let t = self.timings.lock().expect("timings lock").remove(&turn);
        if let Some(t) = t {
            self.emit(SessionEvent::Timings(t));
        }
    }

    pub fn speech_progress(&self) -> SpeechProgress {
        *self.speech.lock().expect("speech lock")
    }

    pub fn set_speech_progress(&self, progress: SpeechProgress) {
        *self.speech.lock().expect("speech lock") = progress;
    }

    pub fn set_talker_cache(&self, len: usize) {
        self.talker_cache.store(len as u64, Ordering::SeqCst);
    }

    /// Whether the context view is read (see [`Shared::set_view`]).
    pub fn probed(&self) -> bool {
        self.probed
    }

    pub fn set_view(&self, entries: Vec<Entry>, thinker_cache: usize) {
        let mut view = self.view.lock().expect("view lock");
        view.entries = entries;
        view.thinker_cache = thinker_cache;
    }

    pub fn record_cut(&self, cut: CutAnswer) {
        self.view.lock().expect("view lock").cut_answers.push(cut);
    }
}

/// The Thinker's context as last published by its thread.
#[derive(Debug, Clone, Default)]
pub struct ContextView {
    pub entries: Vec<Entry>,
    /// Positions in the Thinker's KV cache (equal to `entries.len()` between batches).
    pub thinker_cache: usize,
    /// Positions in the Talker's cache (`None` without a Talker); between answers it mirrors
    /// the Thinker's entry for entry.
    pub talker_cache: Option<usize>,
    /// Answers cut by a stop, oldest first.
    pub cut_answers: Vec<CutAnswer>,
}

/// How an interrupted answer was cut.
#[derive(Debug, Clone, PartialEq)]
pub struct CutAnswer {
    pub turn: u64,
    /// Every token fed back into the Thinker before the stop.
    pub generated: Vec<u32>,
    /// Characters of the answer's text after each of them.
    pub cumulative_chars: Vec<usize>,
    /// Codec codes heard, and all the codes if the Talker had finished.
    pub heard_codes: usize,
    pub total_codes: Option<usize>,
    /// Tokens kept in the context.
    pub kept: usize,
}

/// A running session's internals, for tests and benchmarks on simulated time.
pub struct SessionProbe {
    shared: Arc<Shared>,
    processed: Arc<AtomicU64>,
    /// Session-clock time (ns) of the ticker's next tick.
    next_tick: Arc<AtomicU64>,
    /// The Talker's queue (only its length is read): messages that wait behind a Talker
    /// parked until playback catches up cannot be handled before the clock moves.
    talker_queue: Option<Receiver<(TalkerMsg, WorkToken)>>,
    threads: Vec<JoinHandle<()>>,
}

impl SessionProbe {
    /// Whether the session has done everything it can at the clock's present time, given that
    /// `inputs_sent` inputs were sent to its handle.
    pub fn quiescent(&self, inputs_sent: u64) -> bool {
        let now = self.shared.clock.now().as_nanos() as u64;
        let before = self.shared.activity.pending();
        // A parked Talker is uncounted (the pacer wakes and counts it again); what is queued
        // for it waits for the clock too.
        let blocked = match &self.talker_queue {
            Some(queue) if self.shared.pacer.parked() > 0 => queue.len() as i64,
            _ => 0,
        };
        let after = self.shared.activity.pending();
        self.processed.load(Ordering::SeqCst) == inputs_sent
            && before == after
            && before == blocked
            && self.shared.pacer.quiescent()
            && now < self.next_tick.load(Ordering::SeqCst)
    }

    /// Waits (wall time) until [`SessionProbe::quiescent`]; false after `timeout`.
    pub fn wait_quiescent(&self, inputs_sent: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.quiescent(inputs_sent) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if !self
                .shared
                .activity
                .wait_zero(left.min(Duration::from_millis(5)))
            {
                continue;
            }
            if !self.quiescent(inputs_sent) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// CPU time of the model's calls so far (`None` unless spawned with profiling).
    pub fn model_time(&self) -> Option<ModelTimes> {
        let p = self.shared.profile.as_ref()?;
        let get = |s: Stage| Duration::from_nanos(p.stages[s as usize].load(Ordering::Relaxed));
        Some(ModelTimes {
            encoders: get(Stage::Encoders),
            thinker: get(Stage::Thinker),
            talker: get(Stage::Talker),
            vocoder: get(Stage::Vocoder),
        })
    }

    /// The timing marks so far of the answer to `turn`, while it is under way (they are
    /// handed out in a `Timings` event when it ends).
    pub fn timings(&self, turn: u64) -> Option<TurnTimings> {
        self.shared
            .timings
            .lock()
            .expect("timings lock")
            .get(&turn)
            .cloned()
    }

    /// Speculative answers started so far, and how many of them were dropped.
    pub fn speculations(&self) -> (u64, u64) {
        (
            self.shared.speculations.load(Ordering::SeqCst),
            self.shared.speculations_dropped.load(Ordering::SeqCst),
        )
    }

    /// The Thinker's context as its thread last published it.
    pub fn context(&self) -> ContextView {
        let mut view = self.shared.view.lock().expect("view lock").clone();
        let talker = self.shared.talker_cache.load(Ordering::SeqCst);
        view.talker_cache = (talker != u64::MAX).then_some(talker as usize);
        view
    }

    /// Waits for the session's compute threads to end (after `Close` or a dropped handle);
    /// false if some still run after `timeout`.
    pub fn join(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.threads.iter().any(|t| !t.is_finished()) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in self.threads {
            let _ = t.join();
        }
        true
    }
}

/// Starts a session of `model` (cloned: weights shared, caches its own) on `clock`.
pub fn spawn(
    model: &OmniModel,
    config: SessionConfig,
    clock: Arc<dyn Clock>,
) -> Result<SessionHandle> {
    start(model, config, clock, false, false).map(|(handle, _probe)| handle)
}

/// [`spawn`], also returning the session's [`SessionProbe`].
pub fn spawn_probed(
    model: &OmniModel,
    config: SessionConfig,
    clock: Arc<dyn Clock>,
) -> Result<(SessionHandle, SessionProbe)> {
    spawn_with(model, config, clock, false)
}

/// [`spawn_probed`]; with `profile`, the CPU time of every model call is measured
/// ([`SessionProbe::model_time`]).
pub fn spawn_with(
    model: &OmniModel,
    config: SessionConfig,
    clock: Arc<dyn Clock>,
    profile: bool,
) -> Result<(SessionHandle, SessionProbe)> {
    start(model, config, clock, profile, true)
}

fn start(
    model: &OmniModel,
    config: SessionConfig,
    clock: Arc<dyn Clock>,
    profile: bool,
    probed: bool,
) -> Result<(SessionHandle, SessionProbe)> {
    // before any session thread computes: the pool's threads would take that thread's name
    name_compute_pool();
    let model = model.clone();
    let blocks = BlockConfig::for_model(
        &model.config.thinker_config,
        &model.processor,
        config.video_fps,
    )
    .context("session blocks")?;
    let mel = LogMel::new(&model.processor.feature_extractor).context("log-mel settings")?;
    let end_of_turn = match config.turn.detection {
        TurnDetection::Silence => None,
        TurnDetection::Smart => {
            anyhow::ensure!(
                blocks.sample_rate == END_OF_TURN_RATE,
                "smart turn detection reads {END_OF_TURN_RATE} Hz audio, this model's is {} Hz: \
                 use the silence rule",
                blocks.sample_rate
            );
            let factory = config.end_of_turn.clone().unwrap_or_else(smart_turn);
            Some(factory.make().context("loading the end-of-turn model")?)
        }
    };
    let mut input_config = InputConfig::new(blocks.clone(), &config);
    input_config.block_lookahead =
        Duration::from_secs_f64((mel.n_fft() / 2) as f64 / blocks.sample_rate as f64);
    let stage = InputStage::new(input_config, clock.clone()).context("session input")?;
    if let Some(speech) = &model.speech {
        speech
            .voices
            .get(&config.voice)
            .with_context(|| format!("session voice {:?}", config.voice))?;
    } else if config.reply_mode == ReplyMode::Voice {
        tracing::info!("the model has no Talker: the session answers in text");
    }

    let activity = Activity::new();
    let ((input_tx, input_rx), (event_tx, event_rx)) = session_channels();
    let queues = QueueCounters::new();
    let (pacer_tx, pacer_rx) = unbounded();
    let sample_rate = model
        .speech
        .as_ref()
        .map_or(24_000, |s| s.token2wav.sample_rate());
    let pacer = Arc::new(Pacer::with_activity(
        clock.clone(),
        sample_rate,
        pacer_tx,
        activity.clone(),
    ));
    let shared = Arc::new(Shared {
        clock: clock.clone(),
        activity: activity.clone(),
        epoch: AtomicU64::new(0),
        events: event_tx,
        queues: queues.clone(),
        timings: Mutex::new(HashMap::new()),
        pacer,
        speech: Mutex::new(SpeechProgress::default()),
        closed: AtomicBool::new(false),
        view: Mutex::new(ContextView::default()),
        probed,
        talker_cache: AtomicU64::new(u64::MAX),
        profile: (profile && thread_cpu().is_some()).then(ModelTime::default),
        held_text: Mutex::new(None),
        speculations: AtomicU64::new(0),
        speculations_dropped: AtomicU64::new(0),
    });

    let mut threads = Vec::new();
    let spawn_thread = |name: &str, f: Box<dyn FnOnce() + Send>| {
        let (shared, thread) = (shared.clone(), name.to_string());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // A bug in a session thread ends that session with an error, never the process.
                if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    shared.error(format!("the session's {thread} thread failed: {what}"));
                }
            })
            .with_context(|| format!("cannot start the session's {name} thread"))
    };

    // Vocoder and Talker exist only for a model that can speak.
    let mut talker_queue = None;
    let talker_tx = match &model.speech {
        Some(speech) => {
            let (vocoder_tx, vocoder_rx) = unbounded();
            let (talker_tx, talker_rx) = unbounded();
            talker_queue = Some(talker_rx.clone());
            let vocoder = vocoder_task::VocoderTask::new(speech, shared.clone(), config.seed)?;
            threads.push(spawn_thread(
                "session-vocoder",
                Box::new(move || vocoder.run(vocoder_rx)),
            )?);
            let talker =
                talker_task::TalkerTask::new(&model, speech, shared.clone(), &config, vocoder_tx)?;
            threads.push(spawn_thread(
                "session-talker",
                Box::new(move || talker.run(talker_rx)),
            )?);
            Some(talker_tx)
        }
        None => None,
    };

    let (thinker_tx, thinker_rx) = unbounded();
    let (report_tx, report_rx) = unbounded();
    // Counted until the system prompt is prefilled.
    let startup = activity.token();
    let thinker = thinker_task::ThinkerTask::new(
        model.clone(),
        config.clone(),
        shared.clone(),
        talker_tx,
        report_tx,
    )?;
    threads.push(spawn_thread(
        "session-thinker",
        Box::new(move || thinker.run(thinker_rx, startup)),
    )?);

    let (predict_tx, predict_rx) = unbounded();
    let (prediction_tx, prediction_rx) = unbounded();
    if let Some(model) = end_of_turn {
        let errors = shared.clone();
        threads.push(spawn_thread(
            "session-turn",
            Box::new(move || {
                end_of_turn::run(model, predict_rx, prediction_tx, |e| errors.error(e))
            }),
        )?);
    }

    let (tick_tx, tick_rx) = unbounded();
    let next_tick = Arc::new(AtomicU64::new((clock.now() + TICK).as_nanos() as u64));
    {
        let (shared, next_tick) = (shared.clone(), next_tick.clone());
        // Not joined: on a simulated clock it sleeps until the clock moves again.
        spawn_thread(
            "session-ticker",
            Box::new(move || ticker(&shared, &next_tick, tick_tx)),
        )?;
    }

    let processed = Arc::new(AtomicU64::new(0));
    let control = ControlLoop {
        stage,
        shared: shared.clone(),
        thinker: thinker_tx,
        reply_mode: config.reply_mode,
        voice: config.voice.clone(),
        can_speak: model.speech.is_some(),
        voices: model
            .speech
            .as_ref()
            .map(|s| s.voices.names().iter().map(|n| n.to_string()).collect())
            .unwrap_or_default(),
        sample_rate,
        processed: processed.clone(),
        answers: Vec::new(),
        speculation: None,
        confirmed: None,
        predict: predict_tx,
        shed: ShedReporter::default(),
    };
    threads.push(spawn_thread(
        "session-control",
        Box::new(move || control.run(input_rx, tick_rx, pacer_rx, report_rx, prediction_rx)),
    )?);

    let handle = SessionHandle::with_counters(input_tx, event_rx, queues);
    let probe = SessionProbe {
        shared,
        processed,
        next_tick,
        talker_queue,
        threads,
    };
    Ok((handle, probe))
}

fn ticker(shared: &Shared, next_tick: &AtomicU64, tx: Sender<WorkToken>) {
    let mut next = Duration::from_nanos(next_tick.load(Ordering::SeqCst));
    loop {
        shared.clock.sleep_until(next);
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        // Counted before the next due time moves on: the session never looks idle between.
        if tx.send(shared.activity.token()).is_err() {
            return;
        }
        next += TICK;
        next_tick.store(next.as_nanos() as u64, Ordering::SeqCst);
    }
}

/// How the answer to a turn is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    turn: u64,
    voice: bool,
}

/// A speculative answer, until its turn is confirmed or dropped.
#[derive(Debug, Default)]
struct Speculation {
    turn: u64,
    /// The `UserTurn` event to send when confirmed.
    user_turn: Option<SessionEvent>,
    /// A text answer that was complete before the confirmation.
    done: bool,
}

/// The control thread's state.
struct ControlLoop {
    stage: InputStage,
    shared: Arc<Shared>,
    thinker: Sender<(ThinkerMsg, WorkToken)>,
    reply_mode: ReplyMode,
    voice: String,
    can_speak: bool,
    voices: Vec<String>,
    sample_rate: u32,
    processed: Arc<AtomicU64>,
    /// Answers started and not yet done or stopped (at most one in practice).
    answers: Vec<Answer>,
    speculation: Option<Speculation>,
    /// A speculative answer confirmed by the events being handled (and whether it is done).
    confirmed: Option<(u64, bool)>,
    /// Questions for the end-of-turn thread (unanswered without one: silence rule).
    predict: Sender<(PredictionRequest, WorkToken)>,
    /// Reports input the transport shed because this session was behind.
    shed: ShedReporter,
}

impl ControlLoop {
    fn run(
        mut self,
        inputs: Receiver<SessionInput>,
        ticks: Receiver<WorkToken>,
        pacer: Receiver<PacerOutput>,
        reports: Receiver<(ThinkerReport, WorkToken)>,
        predictions: Receiver<(Prediction, WorkToken)>,
    ) {
        loop {
            select! {
                recv(inputs) -> input => {
                    match input {
                        Ok(SessionInput::Close) | Err(_) => break,
                        Ok(input) => self.on_input(input),
                    }
                    self.processed.fetch_add(1, Ordering::SeqCst);
                    if self.shared.queues.closing() {
                        break;
                    }
                }
                recv(ticks) -> token => {
                    let result = self.stage.tick();
                    self.after_stage(result);
                    self.report_queues();
                    drop(token);
                }
                recv(pacer) -> output => {
                    if let Ok(output) = output {
                        self.on_pacer(output);
                        self.shared.activity.end();
                    }
                }
                recv(reports) -> report => {
                    if let Ok((report, token)) = report {
                        self.on_report(report);
                        drop(token);
                    }
                }
                recv(predictions) -> prediction => {
                    if let Ok((prediction, token)) = prediction {
                        if let Some(p) = prediction.probability {
                            let result = self.stage.end_of_turn_prediction(prediction.pause, p);
                            self.after_stage(result);
                        }
                        drop(token);
                    }
                }
            }
        }
        // Closing: stale every piece of work, release waiting producers, stop the ticker.
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.pacer.shutdown();
        // Frames and reports still queued were counted.
        for _ in pacer.try_iter() {
            self.shared.activity.end();
        }
    }

    fn on_input(&mut self, input: SessionInput) {
        match input {
            SessionInput::Audio(audio) => {
                let result = self.stage.push_audio(audio);
                self.after_stage(result);
            }
            SessionInput::Video(frame) => {
                let result = self.stage.push_video(frame);
                self.after_stage(result);
            }
            SessionInput::Control(control) => self.on_control(control),
            SessionInput::Close => {}
        }
    }

    /// Publishes the stage's re-timed counts; reports input the transport shed.
    fn report_queues(&mut self) {
        let stats = self.stage.stats();
        let queues = &self.shared.queues;
        queues.set_retimed(stats.retimed_audio, stats.retimed_video_frames);
        if let Some(message) = self.shed.report(queues, self.shared.clock.now()) {
            self.shared.error(message);
        }
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Interrupt => {
                let events = self.stage.interrupt();
                self.on_events(events);
            }
            Control::Text(text) => {
                let result = self.stage.typed_text(text);
                self.after_stage(result);
            }
            Control::Voice(name) => {
                if !self.can_speak {
                    self.shared
                        .error("this model has no Talker: it cannot speak in any voice");
                } else if self.voices.contains(&name) {
                    self.voice = name;
                } else {
                    self.shared.error(format!(
                        "unknown voice {name:?}; this model has {}",
                        self.voices.join(", ")
                    ));
                }
            }
            Control::ReplyMode(mode) => {
                if mode == ReplyMode::Voice && !self.can_speak {
                    self.shared
                        .error("this model has no Talker: it can only answer in text");
                }
                self.reply_mode = mode;
            }
        }
    }

    fn after_stage<E: std::fmt::Display>(&mut self, result: Result<Vec<InputEvent>, E>) {
        match result {
            Ok(events) => self.on_events(events),
            Err(e) => self.shared.error(e),
        }
    }

    fn send_thinker(&self, msg: ThinkerMsg) {
        let _ = self.thinker.send((msg, self.shared.activity.token()));
    }

    /// Starts the answer to `turn`: its timing marks and, for a spoken one, the pacer.
    fn start_answer(&mut self, turn: u64, speech_end: Option<Duration>, end_of_turn: Duration) {
        // The decision's media time is the end of the piece it was taken on, which a transport
        // may stamp slightly ahead of the session clock; the turn cannot have ended after the
        // engine decided it, and the later marks are taken on the clock.
        let end_of_turn = end_of_turn.min(self.shared.clock.now());
        let voice = self.reply_mode == ReplyMode::Voice && self.can_speak;
        self.shared.timings.lock().expect("timings lock").insert(
            turn,
            TurnTimings {
                turn,
                speech_end,
                end_of_turn: Some(end_of_turn),
                ..TurnTimings::default()
            },
        );
        if voice {
            self.shared.pacer.begin(turn);
        }
        self.answers.push(Answer { turn, voice });
    }

    fn answer_voice(&self, turn: u64) -> Option<String> {
        self.answers
            .iter()
            .find(|a| a.turn == turn)
            .and_then(|a| a.voice.then(|| self.voice.clone()))
    }

    fn on_events(&mut self, events: Vec<InputEvent>) {
        for event in events {
            match event {
                InputEvent::VoiceActivity { .. } => {}
                InputEvent::PredictEndOfTurn { pause, audio, .. } => {
                    let request = PredictionRequest { pause, audio };
                    let _ = self.predict.send((request, self.shared.activity.token()));
                }
                InputEvent::SpeculationStarted { turn, .. } => {
                    self.shared.speculations.fetch_add(1, Ordering::SeqCst);
                    self.shared.hold_text(turn);
                    self.speculation = Some(Speculation {
                        turn,
                        ..Default::default()
                    });
                    self.send_thinker(ThinkerMsg::Speculate { turn });
                }
                InputEvent::TurnConfirmed { turn, at } => self.confirm(turn, at),
                InputEvent::SpeculationDropped { turn, .. } => {
                    // No frame or text of it reaches the user; its work is stale.
                    self.shared
                        .speculations_dropped
                        .fetch_add(1, Ordering::SeqCst);
                    self.shared.pacer.stop();
                    self.shared.epoch.fetch_add(1, Ordering::SeqCst);
                    self.shared.end_hold(turn, false);
                    self.shared
                        .timings
                        .lock()
                        .expect("timings lock")
                        .remove(&turn);
                    self.answers.retain(|a| a.turn != turn);
                    self.speculation = None;
                    self.send_thinker(ThinkerMsg::DropSpeculation { turn });
                }
                InputEvent::AnswerPaused { turn, .. } => {
                    self.shared.pacer.hold();
                    if let Some(turn) = turn {
                        self.shared.emit(SessionEvent::Paused { turn });
                    }
                }
                InputEvent::AnswerResumed { turn, .. } => {
                    self.shared.pacer.release();
                    if let Some(turn) = turn {
                        self.shared.emit(SessionEvent::Resumed { turn });
                    }
                }
                InputEvent::State { state, .. } => self.shared.emit(SessionEvent::State(state)),
                InputEvent::StopAnswer { turn, .. } => {
                    // No frame after this line.
                    let released = self.shared.pacer.stop();
                    self.shared.epoch.fetch_add(1, Ordering::SeqCst);
                    let answer = turn.and_then(|t| self.answers.iter().find(|a| a.turn == t));
                    let heard = match answer {
                        Some(a) if a.voice => FRAME * released as u32,
                        _ => Duration::ZERO,
                    };
                    let voice = answer.is_some_and(|a| a.voice);
                    self.answers.clear();
                    self.send_thinker(ThinkerMsg::Stop {
                        turn,
                        heard,
                        voice,
                        frame_samples: self.shared.pacer.frame_samples(),
                        frames: released,
                    });
                }
                InputEvent::TurnStarted { turn, .. } => {
                    self.send_thinker(ThinkerMsg::TurnStarted { turn });
                }
                InputEvent::Block { turn, block } => {
                    self.send_thinker(ThinkerMsg::Block { turn, block });
                }
                InputEvent::TurnEnded {
                    turn,
                    from,
                    speech_end,
                    decided_at,
                    end,
                    final_block,
                    video_frames,
                    speculative,
                } => {
                    let user_turn = SessionEvent::UserTurn {
                        turn,
                        audio: end.saturating_sub(from),
                        video_frames,
                        text: None,
                    };
                    self.start_answer(turn, Some(speech_end), decided_at);
                    match self
                        .speculation
                        .as_mut()
                        .filter(|s| speculative && s.turn == turn)
                    {
                        Some(speculation) => {
                            speculation.user_turn = Some(user_turn);
                            self.shared.pacer.hold();
                            self.shared.mark(turn, |t, now| {
                                t.end_of_turn = None;
                                t.speculated_at = Some(decided_at.min(now));
                            });
                        }
                        None => self.shared.emit(user_turn),
                    }
                    let epoch = self.shared.epoch();
                    let voice = self.answer_voice(turn);
                    self.send_thinker(ThinkerMsg::TurnEnded {
                        turn,
                        final_block,
                        epoch,
                        voice,
                    });
                }
                InputEvent::TurnCancelled { turn, .. } => {
                    self.send_thinker(ThinkerMsg::TurnCancelled { turn });
                }
                InputEvent::TypedTurn { turn, text, at } => {
                    self.shared.emit(SessionEvent::UserTurn {
                        turn,
                        audio: Duration::ZERO,
                        video_frames: 0,
                        text: Some(text.clone()),
                    });
                    self.start_answer(turn, None, at);
                    let epoch = self.shared.epoch();
                    let voice = self.answer_voice(turn);
                    self.send_thinker(ThinkerMsg::Typed {
                        turn,
                        text,
                        epoch,
                        voice,
                    });
                }
            }
        }
        self.release_confirmed();
    }

    fn on_pacer(&mut self, output: PacerOutput) {
        match output {
            PacerOutput::Frame {
                answer,
                index,
                at,
                pcm,
            } => {
                if index == 0 {
                    self.shared.mark(answer, |t, _| {
                        t.first_audio_frame.get_or_insert(at);
                    });
                    let events = self.stage.answer_audible(answer);
                    self.on_events(events);
                }
                self.shared.emit(SessionEvent::Audio {
                    turn: answer,
                    index,
                    at,
                    sample_rate: self.sample_rate,
                    pcm,
                });
            }
            PacerOutput::Finished { answer, .. } => self.answer_done(answer),
        }
    }

    fn on_report(&mut self, report: ThinkerReport) {
        match report {
            ThinkerReport::TextAnswerDone { turn } => {
                match self.speculation.as_mut().filter(|s| s.turn == turn) {
                    Some(speculation) => speculation.done = true,
                    None => self.answer_done(turn),
                }
            }
        }
    }

    /// The speculative answer to `turn` is the answer: out with what it holds.
    fn confirm(&mut self, turn: u64, at: Duration) {
        let Some(speculation) = self.speculation.take_if(|s| s.turn == turn) else {
            return;
        };
        if let Some(user_turn) = speculation.user_turn {
            self.shared.emit(user_turn);
        }
        let at = at.min(self.shared.clock.now());
        self.shared.mark(turn, |t, _| t.end_of_turn = Some(at));
        // released once the decision's other events (the state change) are out
        self.confirmed = Some((turn, speculation.done));
    }

    /// Releases what a confirmed speculative answer holds.
    fn release_confirmed(&mut self) {
        if let Some((turn, done)) = self.confirmed.take() {
            self.shared.end_hold(turn, true);
            self.shared.pacer.release();
            if done {
                self.answer_done(turn);
            }
        }
    }

    fn answer_done(&mut self, turn: u64) {
        let Some(k) = self.answers.iter().position(|a| a.turn == turn) else {
            return;
        };
        self.answers.remove(k);
        self.shared.emit(SessionEvent::AnswerDone { turn });
        self.shared.emit_timings(turn);
        let events = self.stage.answer_finished(turn);
        self.on_events(events);
    }
}

/// A session on a [`SimulatedClock`], driven deterministically: inputs are counted, and time
/// moves only once the session has done everything it can (see the module doc).
pub struct SimulatedSession {
    pub clock: Arc<SimulatedClock>,
    pub handle: SessionHandle,
    pub probe: SessionProbe,
    sent: u64,
    /// How long to wait (wall time) for the session to settle before giving up.
    pub settle_timeout: Duration,
}

impl SimulatedSession {
    pub fn spawn(model: &OmniModel, config: SessionConfig) -> Result<Self> {
        let clock = Arc::new(SimulatedClock::new());
        let (handle, probe) = spawn_probed(model, config, clock.clone())?;
        let mut session = Self {
            clock,
            handle,
            probe,
            sent: 0,
            settle_timeout: Duration::from_secs(120),
        };
        session.settle()?;
        Ok(session)
    }

    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    pub fn send(&mut self, input: SessionInput) -> Result<()> {
        self.handle
            .input
            .send(input)
            .map_err(|_| anyhow::anyhow!("the session has ended"))?;
        self.sent += 1;
        Ok(())
    }

    pub fn push_audio(&mut self, audio: AudioInput) -> Result<()> {
        self.send(SessionInput::Audio(audio))
    }

    pub fn push_video(&mut self, frame: VideoInput) -> Result<()> {
        self.send(SessionInput::Video(frame))
    }

    pub fn control(&mut self, control: Control) -> Result<()> {
        self.send(SessionInput::Control(control))
    }

    /// Waits until the session has done everything it can at the present time.
    pub fn settle(&mut self) -> Result<()> {
        anyhow::ensure!(
            self.probe.wait_quiescent(self.sent, self.settle_timeout),
            "the session did not settle within {:?} at {:?} (activity {})",
            self.settle_timeout,
            self.clock.now(),
            self.probe.shared.activity.pending()
        );
        Ok(())
    }

    /// Moves the clock to `to` in steps of at most one tick, settling after each.
    pub fn advance_to(&mut self, to: Duration) -> Result<()> {
        self.settle()?;
        while self.clock.now() < to {
            let next = (self.clock.now() + TICK).min(to);
            self.clock.set(next);
            self.settle()?;
        }
        Ok(())
    }

    pub fn advance(&mut self, by: Duration) -> Result<()> {
        self.advance_to(self.clock.now() + by)
    }

    /// Events so far.
    pub fn events(&self) -> Vec<SessionEvent> {
        self.handle.events.try_iter().collect()
    }

    /// Ends the session and waits for its threads.
    pub fn close(mut self) -> Result<()> {
        self.send(SessionInput::Close)?;
        let SimulatedSession { handle, probe, .. } = self;
        drop(handle);
        anyhow::ensure!(
            probe.join(Duration::from_secs(60)),
            "the session's threads did not end"
        );
        Ok(())
    }
}
