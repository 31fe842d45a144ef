//! The running session: [`spawn`] starts its threads and hands back a [`SessionHandle`].
//!
//! # Threads
//!
//! ```text
//!  transport ──SessionInput──▶ control ──ThinkerMsg──▶ thinker ──TalkerMsg──▶ talker
//!      ▲                        │  ▲  ▲                  │                     │
//!      │                 ticks ─┘  │  └── reports ───────┘               VocoderMsg
//!      │                           │                                           ▼
//!      │                           └── first frame, end ── pacer ◀── pcm ── vocoder
//!      │                                                     │
//!      └──────SessionEvent (voice frames) ───────────────────┘
//! ```
//!
//! * **control** owns the [`InputStage`] (resampling, VAD, turn-taking, blocks). It is ticked
//!   every 20 ms on the session clock by a ticker thread, forwards the stage's events to the
//!   Thinker, and tells the stage when an answer became audible (the pacer's first frame of
//!   it, which the control thread hands on after the answer's state) or ended. The pacer
//!   hands every later frame to the transport itself, so the voice never waits for a busy
//!   control thread. On a barge-in or a stop it stops the pacer *first* (no frame
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
//! The Thinker's and the Talker's passes (and token2wav's DiT windows) run on the session's own
//! model clone, or, with [`SessionConfig::model_passes`] `Shared`, on the loaded model's
//! scheduler thread, batched with other sessions' ([`super::model_access`]); the encoders and
//! BigVGAN run here either way.
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
//! present time, no tick due. [`SimulatedSession`](super::simulated::SimulatedSession) drives
//! a session that way: it advances a [`SimulatedClock`](super::clock::SimulatedClock) in steps
//! and waits for quiescence after each, so a test sees the same events whatever the threads'
//! timing.
//!
//! # What the threads share
//!
//! Small leaves, each handed only to the threads that use it (`…Links`): the cancellation
//! epoch ([`super::cancel`]), the event sink and the answers' timing marks
//! ([`super::events`]), the model profile ([`super::profile`]), the Talker's progress, the
//! pacer, the queue counters ([`super::queues`]) and what a probe reads ([`super::probe`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, select};

use super::activity::{Activity, WorkToken};
use super::blocks::BlockConfig;
use super::cancel::Cancellation;
use super::clock::Clock;
use super::end_of_turn::{self, END_OF_TURN_RATE, Prediction, PredictionRequest, smart_turn};
use super::events::{AnswerMarks, EventSink};
use super::input::{InputConfig, InputEvent, InputStage};
use super::links::{ModelLinks, SpeechMeter};
use super::model_access::{ModelPasses, TalkerAccess, ThinkerAccess};
use super::pacer::{FRAME, FrameSink, Pacer, PacerOutput, VoiceFrame};
pub use super::probe::{ContextView, CutAnswer, SessionProbe};
use super::probe::{ProbeParts, ProbeRecord};
use super::profile::ModelProfile;
pub use super::profile::ModelTimes;
use super::queues::{
    ModelQueues, PACER_QUEUE, PREDICTION_QUEUE, QueueCounters, REPORT_QUEUE, ShedReporter,
    TALKER_QUEUE, THINKER_QUEUE, TICK_QUEUE, VOCODER_QUEUE, depth_of, session_channels,
};
use super::session::{
    Control, ReplyMode, SessionConfig, SessionEvent, SessionHandle, SessionInput, TurnTimings,
};
use super::talker_task;
use super::thinker_task::{self, ThinkerMsg, ThinkerReport};
use super::threads::{ReleaseMemoryOnExit, name_compute_pool};
pub use super::threads::{SESSION_THREADS, thread_cpu, threads_cpu};
use super::turn::TurnDetection;
use super::vocoder_task;
use crate::media::mel::LogMel;
use crate::model::omni::OmniModel;

/// How often the input stage is ticked on the session clock.
pub const TICK: Duration = Duration::from_millis(20);

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

    if let ModelPasses::Shared(scheduler) = &config.model_passes {
        // Its passes would run on the scheduler's weights whatever the session's are.
        let talker = model.speech.as_ref().map(|s| &s.talker);
        anyhow::ensure!(
            scheduler.runs(&model.thinker, talker),
            "the shared model scheduler runs another model than this session's"
        );
    }

    let activity = Activity::new();
    let ((input_tx, input_rx), (event_tx, event_rx)) = session_channels();
    let queues = QueueCounters::new();
    // the leaves the threads share, each handed only to those that use it
    let cancel = Arc::new(Cancellation::default());
    let events = Arc::new(EventSink::new(event_tx, queues.clone()));
    // Each answer's first frame and its end go to the control thread; the voice goes from the
    // pacer straight to the transport.
    let (pacer_tx, pacer_rx) = bounded(PACER_QUEUE);
    let sample_rate = model
        .speech
        .as_ref()
        .map_or(24_000, |s| s.token2wav.sample_rate());
    let voice_out: FrameSink = {
        let events = events.clone();
        Box::new(move |frame| events.emit(audio_event(frame, sample_rate)))
    };
    let pacer = Arc::new(Pacer::handing_frames_to(
        voice_out,
        clock.clone(),
        sample_rate,
        pacer_tx,
        activity.clone(),
    ));
    let marks = Arc::new(AnswerMarks::new(clock.clone()));
    let profile = Arc::new(ModelProfile::new(profile));
    let record = Arc::new(ProbeRecord::new(probed));
    let model_links = ModelLinks {
        activity: activity.clone(),
        pacer: pacer.clone(),
        cancel: cancel.clone(),
        events: events.clone(),
        marks: marks.clone(),
        profile: profile.clone(),
        speech: Arc::new(SpeechMeter::default()),
        probe: record.clone(),
    };

    let mut threads = Vec::new();
    let release_memory = Arc::new(ReleaseMemoryOnExit);
    let spawn_thread = |name: &str, f: Box<dyn FnOnce() + Send>| {
        let (events, thread) = (events.clone(), name.to_string());
        let release_memory = release_memory.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _release_memory = release_memory;
                // A bug in a session thread ends that session with an error, never the process.
                if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    events.error(format!("the session's {thread} thread failed: {what}"));
                }
            })
            .with_context(|| format!("cannot start the session's {name} thread"))
    };

    // Vocoder and Talker exist only for a model that can speak.
    let mut talker_queue = None;
    let mut model_queues = ModelQueues::default();
    let talker_tx = match &model.speech {
        Some(speech_model) => {
            let (vocoder_tx, vocoder_rx) = bounded(VOCODER_QUEUE);
            let (talker_tx, talker_rx) = bounded(TALKER_QUEUE);
            model_queues.talker = Some(depth_of(&talker_rx));
            model_queues.vocoder = Some(depth_of(&vocoder_rx));
            let queued = talker_rx.clone();
            talker_queue =
                Some(Box::new(move || queued.len()) as Box<dyn Fn() -> usize + Send + Sync>);
            let vocoder = vocoder_task::VocoderTask::new(
                speech_model,
                model_links.vocoder(),
                &config.model_passes,
                config.seed,
            )?;
            threads.push(spawn_thread(
                "session-vocoder",
                Box::new(move || vocoder.run(vocoder_rx)),
            )?);
            let links = model_links.clone();
            let access = match &config.model_passes {
                ModelPasses::OwnClone => TalkerAccess::own(&speech_model.talker),
                ModelPasses::Shared(scheduler) => {
                    TalkerAccess::shared(scheduler, &speech_model.talker, pacer.clone())?
                }
            };
            let talker = talker_task::TalkerTask::new(
                &model,
                speech_model,
                access,
                links,
                &config,
                vocoder_tx,
            )?;
            threads.push(spawn_thread(
                "session-talker",
                Box::new(move || talker.run(talker_rx)),
            )?);
            Some(talker_tx)
        }
        None => None,
    };

    let (thinker_tx, thinker_rx) = bounded(THINKER_QUEUE);
    model_queues.thinker = Some(depth_of(&thinker_rx));
    let (report_tx, report_rx) = bounded(REPORT_QUEUE);
    // Counted until the system prompt is prefilled.
    let startup = activity.token();
    let access = match &config.model_passes {
        ModelPasses::OwnClone => ThinkerAccess::own(&model.thinker),
        ModelPasses::Shared(scheduler) => {
            ThinkerAccess::shared(scheduler, pacer.clone(), blocks.block_len)?
        }
    };
    let thinker = thinker_task::ThinkerTask::new(
        model.clone(),
        access,
        config.clone(),
        model_links,
        talker_tx,
        report_tx,
    )?;
    threads.push(spawn_thread(
        "session-thinker",
        Box::new(move || thinker.run(thinker_rx, startup)),
    )?);

    let (predict_tx, predict_rx) = bounded(PREDICTION_QUEUE);
    let (prediction_tx, prediction_rx) = bounded(PREDICTION_QUEUE);
    if let Some(model) = end_of_turn {
        let errors = events.clone();
        threads.push(spawn_thread(
            "session-turn",
            Box::new(move || {
                end_of_turn::run(model, predict_rx, prediction_tx, |e| errors.error(e))
            }),
        )?);
    }

    let (tick_tx, tick_rx) = bounded(TICK_QUEUE);
    let next_tick = Arc::new(AtomicU64::new((clock.now() + TICK).as_nanos() as u64));
    {
        let ticker = Ticker {
            clock: clock.clone(),
            activity: activity.clone(),
            cancel: cancel.clone(),
            next_tick: next_tick.clone(),
        };
        // Not joined: on a simulated clock it sleeps until the clock moves again.
        spawn_thread("session-ticker", Box::new(move || ticker.run(tick_tx)))?;
    }

    let processed = Arc::new(AtomicU64::new(0));
    let control = ControlLoop {
        stage,
        links: ControlLinks {
            clock: clock.clone(),
            activity: activity.clone(),
            pacer: pacer.clone(),
            cancel,
            events: events.clone(),
            marks: marks.clone(),
            queues: queues.clone(),
            probe: record.clone(),
        },
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
        overrun: false,
        confirmed: None,
        predict: predict_tx,
        shed: ShedReporter::default(),
    };
    threads.push(spawn_thread(
        "session-control",
        Box::new(move || control.run(input_rx, tick_rx, pacer_rx, report_rx, prediction_rx)),
    )?);

    let handle = SessionHandle::with_counters(input_tx, event_rx, queues)
        .with_model_queues(model_queues)
        .with_audio_rate(blocks.sample_rate);
    let probe = SessionProbe::new(ProbeParts {
        clock,
        activity,
        pacer,
        record,
        profile,
        marks,
        processed,
        next_tick,
        talker_queue,
        threads,
    });
    Ok((handle, probe))
}

/// The ticker thread: one tick every [`TICK`] of session clock for the control thread.
struct Ticker {
    clock: Arc<dyn Clock>,
    activity: Arc<Activity>,
    cancel: Arc<Cancellation>,
    /// Session-clock time (ns) of the next tick (the probe reads it).
    next_tick: Arc<AtomicU64>,
}

impl Ticker {
    fn run(self, tx: Sender<WorkToken>) {
        let mut next = Duration::from_nanos(self.next_tick.load(Ordering::SeqCst));
        loop {
            self.clock.sleep_until(next);
            if self.cancel.is_closed() {
                return;
            }
            // Counted before the next due time moves on: the session never looks idle between.
            // A control thread with ticks waiting gets no more (each says only that time went
            // on): this one's count ends with it.
            if let Err(TrySendError::Disconnected(_)) = tx.try_send(self.activity.token()) {
                return;
            }
            next += TICK;
            self.next_tick
                .store(next.as_nanos() as u64, Ordering::SeqCst);
        }
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

/// What the control thread shares with the rest of its session.
struct ControlLinks {
    clock: Arc<dyn Clock>,
    activity: Arc<Activity>,
    /// Releases the answer's frames; stopped first on a stop.
    pacer: Arc<Pacer>,
    cancel: Arc<Cancellation>,
    events: Arc<EventSink>,
    marks: Arc<AnswerMarks>,
    queues: Arc<QueueCounters>,
    probe: Arc<ProbeRecord>,
}

/// The control thread's state.
struct ControlLoop {
    stage: InputStage,
    links: ControlLinks,
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
    /// The Thinker fell too far behind: the session ends.
    overrun: bool,
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
        while !self.overrun {
            select! {
                recv(inputs) -> input => {
                    match input {
                        Ok(SessionInput::Close) | Err(_) => break,
                        Ok(input) => self.on_input(input),
                    }
                    self.processed.fetch_add(1, Ordering::SeqCst);
                    if self.links.queues.closing() {
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
                        self.links.activity.end();
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
        self.links.cancel.close();
        self.links.pacer.shutdown();
        // Frames and reports still queued were counted.
        for _ in pacer.try_iter() {
            self.links.activity.end();
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
        let queues = &self.links.queues;
        queues.set_retimed(stats.retimed_audio, stats.retimed_video_frames);
        if let Some(message) = self.shed.report(queues, self.links.clock.now()) {
            self.links.events.error(message);
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
                    self.links
                        .events
                        .error("this model has no Talker: it cannot speak in any voice");
                } else if self.voices.contains(&name) {
                    self.voice = name;
                } else {
                    self.links.events.error(format!(
                        "unknown voice {name:?}; this model has {}",
                        self.voices.join(", ")
                    ));
                }
            }
            Control::ReplyMode(mode) => {
                if mode == ReplyMode::Voice && !self.can_speak {
                    self.links
                        .events
                        .error("this model has no Talker: it can only answer in text");
                }
                self.reply_mode = mode;
            }
        }
    }

    fn after_stage<E: std::fmt::Display>(&mut self, result: Result<Vec<InputEvent>, E>) {
        match result {
            Ok(events) => self.on_events(events),
            Err(e) => self.links.events.error(e),
        }
    }

    /// Offers `msg` to the Thinker; one that has fallen [`THINKER_QUEUE`] messages behind
    /// cannot serve the call in real time, and the session ends with an error saying so.
    fn send_thinker(&mut self, msg: ThinkerMsg) {
        if let Err(TrySendError::Full(_)) =
            self.thinker.try_send((msg, self.links.activity.token()))
            && !self.overrun
        {
            self.overrun = true;
            self.links.events.error(format!(
                "the model has fallen {THINKER_QUEUE} messages behind this call and cannot \
                 serve it in real time; the call ends"
            ));
        }
    }

    /// Starts the answer to `turn`: its timing marks and, for a spoken one, the pacer.
    fn start_answer(&mut self, turn: u64, speech_end: Option<Duration>, end_of_turn: Duration) {
        // The decision's media time is the end of the piece it was taken on, which a transport
        // may stamp slightly ahead of the session clock; the turn cannot have ended after the
        // engine decided it, and the later marks are taken on the clock.
        let end_of_turn = end_of_turn.min(self.links.clock.now());
        let voice = self.reply_mode == ReplyMode::Voice && self.can_speak;
        self.links.marks.start(TurnTimings {
            turn,
            speech_end,
            end_of_turn: Some(end_of_turn),
            ..TurnTimings::default()
        });
        if voice {
            self.links.pacer.begin(turn);
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
                    // With the model that far behind, the silence rule decides this pause.
                    let _ = self
                        .predict
                        .try_send((request, self.links.activity.token()));
                }
                InputEvent::SpeculationStarted { turn, .. } => {
                    self.links.probe.speculation_started();
                    self.links.events.hold_text(turn);
                    self.speculation = Some(Speculation {
                        turn,
                        ..Default::default()
                    });
                    self.send_thinker(ThinkerMsg::Speculate { turn });
                }
                InputEvent::TurnConfirmed { turn, at } => self.confirm(turn, at),
                InputEvent::SpeculationDropped { turn, .. } => {
                    // No frame or text of it reaches the user; its work is stale.
                    self.links.probe.speculation_dropped();
                    self.links.pacer.stop();
                    self.links.cancel.advance();
                    self.links.events.end_hold(turn, false);
                    self.links.marks.forget(turn);
                    self.answers.retain(|a| a.turn != turn);
                    self.speculation = None;
                    self.send_thinker(ThinkerMsg::DropSpeculation { turn });
                }
                InputEvent::AnswerPaused { turn, .. } => {
                    self.links.pacer.hold();
                    if let Some(turn) = turn {
                        self.links.events.emit(SessionEvent::Paused { turn });
                    }
                }
                InputEvent::AnswerResumed { turn, .. } => {
                    // Said before the voice goes on: the pacer hands frames out at once.
                    if let Some(turn) = turn {
                        self.links.events.emit(SessionEvent::Resumed { turn });
                    }
                    self.links.pacer.release();
                }
                InputEvent::State { state, .. } => {
                    self.links.events.emit(SessionEvent::State(state))
                }
                InputEvent::StopAnswer { turn, .. } => {
                    // No frame after this line.
                    let released = self.links.pacer.stop();
                    self.links.cancel.advance();
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
                        frame_samples: self.links.pacer.frame_samples(),
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
                            self.links.pacer.hold();
                            self.links.marks.mark(turn, |t, now| {
                                t.end_of_turn = None;
                                t.speculated_at = Some(decided_at.min(now));
                            });
                        }
                        None => self.links.events.emit(user_turn),
                    }
                    let epoch = self.links.cancel.epoch();
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
                    self.links.events.emit(SessionEvent::UserTurn {
                        turn,
                        audio: Duration::ZERO,
                        video_frames: 0,
                        text: Some(text.clone()),
                    });
                    self.start_answer(turn, None, at);
                    let epoch = self.links.cancel.epoch();
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
            // An answer's first frame (the pacer hands the others to the transport itself):
            // the answer is announced before any voice of it.
            PacerOutput::Frame(frame) => {
                let (answer, at) = (frame.answer, frame.at);
                self.links.marks.mark(answer, |t, _| {
                    t.first_audio_frame.get_or_insert(at);
                });
                let events = self.stage.answer_audible(answer);
                self.on_events(events);
                self.links.events.emit(audio_event(frame, self.sample_rate));
                self.links.pacer.first_frame_out(answer);
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
            self.links.events.emit(user_turn);
        }
        let at = at.min(self.links.clock.now());
        self.links.marks.mark(turn, |t, _| t.end_of_turn = Some(at));
        // released once the decision's other events (the state change) are out
        self.confirmed = Some((turn, speculation.done));
    }

    /// Releases what a confirmed speculative answer holds.
    fn release_confirmed(&mut self) {
        if let Some((turn, done)) = self.confirmed.take() {
            self.links.events.end_hold(turn, true);
            self.links.pacer.release();
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
        self.links.events.emit(SessionEvent::AnswerDone { turn });
        self.links.marks.emit(turn, &self.links.events);
        let events = self.stage.answer_finished(turn);
        self.on_events(events);
    }
}

/// The transport's event of one frame of voice.
fn audio_event(frame: VoiceFrame, sample_rate: u32) -> SessionEvent {
    SessionEvent::Audio {
        turn: frame.answer,
        index: frame.index,
        at: frame.at,
        sample_rate,
        pcm: frame.pcm,
    }
}
