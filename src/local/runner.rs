//! The call itself: opens the input, output and camera, creates the session, moves media in
//! and events out until the call ends, and reports what happened.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use crossbeam_channel::{Receiver, Sender, select};

use super::camera::CameraCapture;
use super::device::{MicSource, SpeakerSink};
use super::echo::{
    EchoMode, EchoStage, EchoStageConfig, EchoStageStats, GateStats, HalfDuplexGate,
    SpeakerActivity,
};
use super::sink::{AudioSink, DiscardSink, SinkStats, VoiceFrame, VoicePlacer, WavSink};
use super::source::{AudioSource, FileSource, SourceEvent, SourceStats, samples_to_duration};
use super::transcript::Transcript;
use super::{AudioIn, AudioOut, LocalOptions, SessionFactory};
use crate::engine::clock::Clock;
use crate::engine::session::{
    AudioInput, Control, ReplyMode, SessionEvent, SessionHandle, TurnTimings,
};
use crate::engine::turn::TurnState;
use crate::media::echo::CancellerConfig;

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The input file was over and the session idle again.
    InputEnded,
    /// A stop was asked (Ctrl-C, `/quit`).
    Requested,
    /// `max_duration` passed.
    MaxDuration,
    /// The input file was over but the session was still busy after `answer_timeout`.
    AnswerTimeout,
    /// The session closed its event stream.
    SessionEnded,
}

/// A user turn the session took.
#[derive(Debug, Clone, PartialEq)]
pub struct UserTurnRecord {
    pub turn: u64,
    /// Session time the turn was reported.
    pub at: Duration,
    pub audio: Duration,
    pub video_frames: usize,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AnswerOutcome {
    Done,
    Interrupted {
        heard: Duration,
    },
    /// Neither done nor interrupted when the call ended.
    Unfinished,
}

/// The model's answer to one turn, as this transport received it.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerRecord {
    pub turn: u64,
    pub text: String,
    /// 20 ms frames of voice received.
    pub frames: u64,
    pub voice: Duration,
    /// Session time of its first voice frame, and the end of its last.
    pub first_frame_at: Option<Duration>,
    pub voice_end: Option<Duration>,
    pub outcome: AnswerOutcome,
}

/// What happened in a call.
#[derive(Debug, Clone)]
pub struct LocalSummary {
    /// Session time the input started at: sample 0 of an input file, and of an output file.
    pub origin: Duration,
    /// Session time the call ended.
    pub ended_at: Duration,
    /// Session time an input file ended.
    pub input_ended_at: Option<Duration>,
    pub stopped: StopCause,
    pub input: String,
    pub output: String,
    pub camera: Option<String>,
    pub user_turns: Vec<UserTurnRecord>,
    pub answers: Vec<AnswerRecord>,
    pub timings: Vec<TurnTimings>,
    pub session_errors: Vec<String>,
    pub source: SourceStats,
    pub sink: SinkStats,
    /// What the half-duplex gate did, when it was on.
    pub gate: Option<GateStats>,
    /// The echo canceller's and the simulated echo's settings and what they did, when on.
    pub echo_stage: Option<(EchoStageConfig, EchoStageStats)>,
    pub video_frames_sent: u64,
}

/// What the feeder thread tells the event loop.
enum FeederReport {
    InputEnded(Duration),
    Failed(String),
}

#[derive(Debug, Default, Clone, Copy)]
struct FeederStats {
    source: SourceStats,
    gate: Option<GateStats>,
    echo_stage: Option<EchoStageStats>,
}

/// What the feeder does to the microphone before the session hears it: the echo stage
/// (simulated echo, echo canceller), then the gate.
struct MicPath {
    echo: Option<EchoStage>,
    gate: Option<HalfDuplexGate>,
}

/// A typed line from the keyboard.
enum Typed {
    Message(String),
    Interrupt,
    Voice(String),
    ReplyMode(ReplyMode),
    Quit,
}

fn parse_typed(line: &str) -> Option<Typed> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    Some(match line.split_once(' ').unwrap_or((line, "")) {
        ("/quit" | "/q", _) => Typed::Quit,
        ("/stop", _) => Typed::Interrupt,
        ("/voice", name) if !name.trim().is_empty() => Typed::Voice(name.trim().to_string()),
        ("/text", _) => Typed::ReplyMode(ReplyMode::Text),
        ("/speech", _) => Typed::ReplyMode(ReplyMode::Voice),
        _ => Typed::Message(line.to_string()),
    })
}

fn spawn_keyboard() -> anyhow::Result<Receiver<Typed>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    // Detached: a read of stdin cannot be cancelled; the thread ends with the process.
    std::thread::Builder::new()
        .name("keyboard".into())
        .spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { return };
                if let Some(typed) = parse_typed(&line)
                    && tx.send(typed).is_err()
                {
                    return;
                }
            }
        })
        .context("cannot start the keyboard thread")?;
    Ok(rx)
}

struct Feeder {
    stop: Arc<AtomicBool>,
    reports: Receiver<FeederReport>,
    stats: Arc<Mutex<FeederStats>>,
}

fn spawn_feeder(
    mut source: Box<dyn AudioSource>,
    mut mic: MicPath,
    activity: Arc<SpeakerActivity>,
    session: SessionHandle,
) -> anyhow::Result<Feeder> {
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(FeederStats::default()));
    let (tx, reports) = crossbeam_channel::unbounded();
    {
        let (stop, stats) = (stop.clone(), stats.clone());
        // Not joined at the end: a file source on a simulated clock may sleep until the clock
        // moves again; it stops at its next piece.
        std::thread::Builder::new()
            .name("audio-feeder".into())
            .spawn(move || {
                feed(
                    &mut *source,
                    &mut mic,
                    &activity,
                    &session,
                    &stop,
                    &stats,
                    &tx,
                )
            })
            .context("cannot start the audio feeder thread")?;
    }
    Ok(Feeder {
        stop,
        reports,
        stats,
    })
}

fn feed(
    source: &mut dyn AudioSource,
    mic: &mut MicPath,
    activity: &SpeakerActivity,
    session: &SessionHandle,
    stop: &AtomicBool,
    stats: &Mutex<FeederStats>,
    reports: &Sender<FeederReport>,
) {
    const WAIT: Duration = Duration::from_millis(50);
    while !stop.load(Ordering::Acquire) {
        let event = match source.next(WAIT) {
            Ok(event) => event,
            Err(e) => {
                let _ = reports.send(FeederReport::Failed(format!("{e:#}")));
                return;
            }
        };
        match event {
            SourceEvent::Audio(piece) => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let piece = match mic.echo.as_mut() {
                    None => Some(piece),
                    Some(echo) => match echo.process(piece) {
                        Ok(processed) => processed,
                        Err(e) => {
                            let _ = reports.send(FeederReport::Failed(format!("echo: {e:#}")));
                            return;
                        }
                    },
                };
                // (the canceller holds back audio short of a whole 10 ms frame)
                if let Some(mut piece) = piece {
                    if let Some(gate) = mic.gate.as_mut() {
                        gate.process(piece.at, piece.sample_rate, &mut piece.samples, activity);
                    }
                    let pushed = session.push_audio(AudioInput {
                        at: piece.at,
                        sample_rate: piece.sample_rate,
                        samples: piece.samples,
                    });
                    if !pushed {
                        let _ = reports.send(FeederReport::Failed(
                            "the session stopped taking audio".into(),
                        ));
                        return;
                    }
                }
            }
            SourceEvent::Nothing => {}
            SourceEvent::Ended { at } => {
                let _ = reports.send(FeederReport::InputEnded(at));
            }
        }
        if let Ok(mut s) = stats.lock() {
            s.source = source.stats();
            s.gate = mic.gate.as_ref().map(HalfDuplexGate::stats);
            s.echo_stage = mic.echo.as_ref().map(EchoStage::stats);
        }
    }
}

/// The event loop's view of the call.
struct Call {
    clock: Arc<dyn Clock>,
    session: SessionHandle,
    sink: Box<dyn AudioSink>,
    transcript: Transcript,
    placer: VoicePlacer,
    state: TurnState,
    /// Turns taken and not yet answered or cut.
    unanswered: BTreeSet<u64>,
    user_turns: Vec<UserTurnRecord>,
    answers: BTreeMap<u64, AnswerRecord>,
    timings: Vec<TurnTimings>,
    session_errors: Vec<String>,
}

impl Call {
    fn answer(&mut self, turn: u64) -> &mut AnswerRecord {
        self.answers.entry(turn).or_insert_with(|| AnswerRecord {
            turn,
            text: String::new(),
            frames: 0,
            voice: Duration::ZERO,
            first_frame_at: None,
            voice_end: None,
            outcome: AnswerOutcome::Unfinished,
        })
    }

    fn on_event(&mut self, event: SessionEvent) -> anyhow::Result<()> {
        let now = self.clock.now();
        self.transcript.event(now, &event);
        match event {
            SessionEvent::State(state) => self.state = state,
            SessionEvent::UserTurn {
                turn,
                audio,
                video_frames,
                text,
            } => {
                self.unanswered.insert(turn);
                self.user_turns.push(UserTurnRecord {
                    turn,
                    at: now,
                    audio,
                    video_frames,
                    text,
                });
            }
            SessionEvent::AssistantText { turn, delta } => self.answer(turn).text.push_str(&delta),
            SessionEvent::Audio {
                turn,
                index,
                sample_rate,
                pcm,
                ..
            } => {
                if sample_rate == 0 {
                    bail!("the session sent voice frame {index} of turn {turn} at 0 Hz");
                }
                if matches!(
                    self.answers.get(&turn).map(|a| a.outcome),
                    Some(AnswerOutcome::Interrupted { .. })
                ) {
                    // nothing of a cut answer is played, whatever is still in flight
                    return Ok(());
                }
                let length = samples_to_duration(pcm.len() as u64, sample_rate);
                let at = self.placer.place(turn, index, length, now);
                self.sink.play(VoiceFrame {
                    turn,
                    index,
                    at,
                    sample_rate,
                    pcm: &pcm,
                })?;
                let answer = self.answer(turn);
                answer.frames += 1;
                answer.voice += length;
                answer.first_frame_at.get_or_insert(at);
                answer.voice_end = Some(at + length);
            }
            SessionEvent::Interrupted { turn, heard, .. } => {
                self.placer.reset();
                self.sink.interrupt(turn)?;
                self.unanswered.remove(&turn);
                self.answer(turn).outcome = AnswerOutcome::Interrupted { heard };
            }
            SessionEvent::AnswerDone { turn } => {
                self.sink.answer_done(turn)?;
                self.unanswered.remove(&turn);
                let answer = self.answer(turn);
                if answer.outcome == AnswerOutcome::Unfinished {
                    answer.outcome = AnswerOutcome::Done;
                }
            }
            SessionEvent::Timings(timings) => self.timings.push(timings),
            SessionEvent::Error(message) => self.session_errors.push(message),
            SessionEvent::Paused { .. } | SessionEvent::Resumed { .. } => {}
        }
        Ok(())
    }

    fn on_typed(&mut self, typed: Typed, stop: &super::StopHandle) {
        let now = self.clock.now();
        match typed {
            Typed::Quit => stop.stop(),
            Typed::Interrupt => {
                self.session.control(Control::Interrupt);
            }
            Typed::Voice(name) => {
                self.transcript
                    .note(now, &format!("voice {name} from the next answer on"));
                self.session.control(Control::Voice(name));
            }
            Typed::ReplyMode(mode) => {
                self.session.control(Control::ReplyMode(mode));
            }
            Typed::Message(text) => {
                self.session.control(Control::Text(text));
            }
        }
    }

    /// Someone is speaking, an answer is on its way, or voice is still queued to play.
    fn busy(&self) -> bool {
        self.state != TurnState::Listening
            || !self.unanswered.is_empty()
            || self.sink.pending() > Duration::ZERO
    }
}

fn open_source(
    options: &LocalOptions,
    clock: &Arc<dyn Clock>,
) -> anyhow::Result<Box<dyn AudioSource>> {
    Ok(match &options.input {
        AudioIn::Microphone(choice) => Box::new(MicSource::open(choice, &**clock)?),
        AudioIn::File(path) => Box::new(FileSource::open(path, clock.clone())?),
    })
}

fn open_sink(
    options: &LocalOptions,
    clock: &Arc<dyn Clock>,
    activity: &Arc<SpeakerActivity>,
) -> anyhow::Result<Box<dyn AudioSink>> {
    Ok(match &options.output {
        AudioOut::Speaker(choice) => Box::new(SpeakerSink::open(
            choice,
            &**clock,
            activity.clone(),
            options.playback_buffer,
        )?),
        AudioOut::File { path, sample_rate } => {
            Box::new(WavSink::create(path, *sample_rate, activity.clone())?)
        }
        AudioOut::Discard => Box::new(DiscardSink::default()),
    })
}

/// The echo handling the options ask for: the gate, the canceller's settings. `Auto` cancels
/// the echo when the microphone hears the speaker (both are devices, or the echo is
/// simulated).
fn echo_handling(
    options: &LocalOptions,
) -> anyhow::Result<(Option<HalfDuplexGate>, Option<CancellerConfig>)> {
    let hears_speaker = super::microphone_hears_speaker(
        &options.input,
        &options.output,
        options.simulate_echo.is_some(),
    );
    Ok(match &options.echo {
        EchoMode::Off => (None, None),
        EchoMode::HalfDuplex(config) => (
            Some(HalfDuplexGate::new(config.clone()).context("echo gate")?),
            None,
        ),
        EchoMode::Cancel(config) => (None, Some(*config)),
        EchoMode::Auto if hears_speaker => (None, Some(CancellerConfig::default())),
        EchoMode::Auto => (None, None),
    })
}

/// The echo stage the options ask for, reading what `sink` plays.
fn echo_stage(
    options: &LocalOptions,
    cancel: Option<CancellerConfig>,
    sink: &mut dyn AudioSink,
    clock: &Arc<dyn Clock>,
) -> anyhow::Result<Option<EchoStage>> {
    let config = EchoStageConfig {
        cancel,
        simulate: options.simulate_echo,
    };
    let what = match (&config.cancel, &config.simulate) {
        (None, None) => return Ok(None),
        (Some(_), _) => "the echo canceller",
        (None, Some(_)) => "a simulated echo",
    };
    let far_end = sink.take_far_end().with_context(|| {
        format!(
            "{what} needs an output that plays the model's voice (a speaker or --output-file),              not {}",
            sink.describe()
        )
    })?;
    Ok(Some(EchoStage::new(config, far_end, clock.clone())?))
}

fn check_options(options: &LocalOptions) -> anyhow::Result<()> {
    if options.playback_buffer > Duration::from_secs(2) {
        bail!(
            "playback buffer {:?} is over 2 s: answers would start that late",
            options.playback_buffer
        );
    }
    if options.answer_timeout.is_zero() {
        bail!("the answer timeout must be > 0");
    }
    if options.max_duration.is_some_and(|d| d.is_zero()) {
        bail!("the maximum duration must be > 0");
    }
    if options.simulate_echo.is_some() && !matches!(options.input, AudioIn::File(_)) {
        bail!(
            "a simulated echo needs an input file (--input-file): a microphone hears the real \
             speaker"
        );
    }
    if let Some(path) = options.camera.path()
        && !path.exists()
    {
        bail!(
            "camera {} not found: there is no such video device (list cameras with \
             --list-devices, or run without --camera)",
            path.display()
        );
    }
    Ok(())
}

/// Runs a call on `clock` until it ends: a stop request, `max_duration`, the session closing,
/// or, with a file input, the file over and the session idle again (or still busy
/// `answer_timeout` after the file ended). Devices and files are opened before the session is
/// created, so a missing one fails before the model loads. Devices need a wall clock; files
/// follow any clock (a simulated one moves them as fast as it is advanced).
pub fn run_with_clock(
    mut options: LocalOptions,
    clock: Arc<dyn Clock>,
    factory: SessionFactory,
) -> anyhow::Result<LocalSummary> {
    check_options(&options)?;
    let (gate, cancel) = echo_handling(&options)?;
    let activity = Arc::new(SpeakerActivity::new());
    let source = open_source(&options, &clock)?;
    let mut sink = open_sink(&options, &clock, &activity)?;
    let echo = echo_stage(&options, cancel, &mut *sink, &clock)?;
    let mic = MicPath { echo, gate };
    let input = source.describe();
    let output = sink.describe();
    let transcript = Transcript::new(
        options
            .transcript
            .take()
            .unwrap_or_else(|| Box::new(std::io::sink())),
        options.verbose,
    );
    let session =
        factory(options.session.clone(), clock.clone()).context("cannot start the session")?;
    let mut call = Call {
        clock: clock.clone(),
        session: session.clone(),
        sink,
        transcript,
        placer: VoicePlacer::new(),
        state: TurnState::Listening,
        unanswered: BTreeSet::new(),
        user_turns: Vec::new(),
        answers: BTreeMap::new(),
        timings: Vec::new(),
        session_errors: Vec::new(),
    };
    let result = converse(&mut call, &options, source, mic, activity);
    // whatever happened, the session is closed and the output file is finished
    session.close();
    let ended_at = clock.now();
    let finished = call.sink.finish(ended_at);
    call.transcript.finish(&call.timings);
    let mut summary = result?;
    finished?;
    summary.ended_at = ended_at;
    summary.input = input;
    summary.output = output;
    summary.user_turns = std::mem::take(&mut call.user_turns);
    summary.answers = std::mem::take(&mut call.answers).into_values().collect();
    summary.timings = std::mem::take(&mut call.timings);
    summary.session_errors = std::mem::take(&mut call.session_errors);
    summary.sink = call.sink.stats();
    Ok(summary)
}

/// The event loop, from the start of the media to the end of the call.
fn converse(
    call: &mut Call,
    options: &LocalOptions,
    mut source: Box<dyn AudioSource>,
    mic: MicPath,
    activity: Arc<SpeakerActivity>,
) -> anyhow::Result<LocalSummary> {
    const TICK: Duration = Duration::from_millis(10);
    let clock = call.clock.clone();
    let origin = clock.now();
    call.transcript.set_origin(origin);
    call.transcript
        .note(origin, &format!("input: {}", source.describe()));
    call.transcript
        .note(origin, &format!("output: {}", call.sink.describe()));
    if let Some(gate) = &mic.gate {
        call.transcript.note(
            origin,
            &format!(
                "echo: half-duplex gate, barge-in over the model from {} dBFS",
                gate.config().barge_in_level_dbfs
            ),
        );
    }
    let echo_config = mic.echo.as_ref().map(|echo| echo.config().clone());
    if let Some(config) = &echo_config {
        if let Some(path) = config.simulate {
            call.transcript.note(
                origin,
                &format!(
                    "simulated echo: the model's voice as played, {path}, through a short room \
                     response, added to the input"
                ),
            );
        }
        if let Some(cancel) = config.cancel {
            call.transcript.note(
                origin,
                &format!("echo: WebRTC AEC3 echo canceller ({cancel})"),
            );
        }
    }
    if echo_config.is_none() && mic.gate.is_none() {
        call.transcript.note(origin, "echo: no echo handling");
    }
    call.sink.start(origin)?;
    source.start(origin)?;
    let feeder = spawn_feeder(source, mic, activity, call.session.clone())?;
    let stop_feeder = StopOnDrop(feeder.stop.clone());
    let camera = match options.camera.path() {
        Some(_) => {
            let camera = CameraCapture::start(
                &options.camera,
                &options.camera_settings,
                clock.clone(),
                call.session.clone(),
            )?;
            call.transcript.note(clock.now(), camera.describe());
            Some(camera)
        }
        None => None,
    };
    let keyboard = if options.keyboard {
        call.transcript.note(
            clock.now(),
            "type a message and Enter to send it; /stop cuts the answer, /quit ends the call",
        );
        spawn_keyboard()?
    } else {
        crossbeam_channel::never()
    };
    // Long enough for the input stage to hear the end of the file's last turn: its end-of-turn
    // silence, plus the VAD's hangover and the input's wait for late audio.
    let settle = options.session.turn.longest_silence() + Duration::from_secs(1);
    let events = call.session.events.clone();
    let mut input_ended: Option<Duration> = None;
    // the canceller's state goes into a verbose transcript once a second
    let mut next_echo_report = origin + ECHO_REPORT_EVERY;
    let stopped = loop {
        select! {
            recv(events) -> event => match event {
                Ok(event) => call.on_event(event)?,
                Err(_) => break StopCause::SessionEnded,
            },
            recv(feeder.reports) -> report => match report {
                Ok(FeederReport::InputEnded(at)) => {
                    input_ended = Some(at);
                    call.transcript.note(clock.now(), "input file ended; waiting for the answers");
                }
                Ok(FeederReport::Failed(message)) => bail!("audio input: {message}"),
                Err(_) => bail!("audio input: the feeder thread ended"),
            },
            recv(keyboard) -> typed => if let Ok(typed) = typed {
                call.on_typed(typed, &options.stop);
            },
            default(TICK) => {}
        }
        if let Some(camera) = &camera
            && let Some(failure) = camera.failure()
        {
            bail!("{failure}");
        }
        let now = clock.now();
        if options.verbose && now >= next_echo_report {
            next_echo_report = now + ECHO_REPORT_EVERY;
            let stats = feeder.stats.lock().ok().and_then(|s| s.echo_stage);
            if let Some(canceller) = stats.and_then(|s| s.canceller) {
                call.transcript
                    .note(now, &format!("echo canceller: {canceller}"));
            }
        }
        if options.stop.is_stopped() {
            break StopCause::Requested;
        }
        if options.max_duration.is_some_and(|max| now >= origin + max) {
            break StopCause::MaxDuration;
        }
        if let Some(end) = input_ended {
            if now >= end + settle && !call.busy() {
                break StopCause::InputEnded;
            }
            if now >= end + options.answer_timeout {
                break StopCause::AnswerTimeout;
            }
        }
    };
    let now = clock.now();
    call.transcript.note(
        now,
        match stopped {
            StopCause::InputEnded => "input over and every answer done: ending the call",
            StopCause::Requested => "stop requested: ending the call",
            StopCause::MaxDuration => "maximum duration reached: ending the call",
            StopCause::AnswerTimeout => "still busy long after the input ended: ending the call",
            StopCause::SessionEnded => "the session ended",
        },
    );
    drop(stop_feeder);
    let feeder_stats = feeder.stats.lock().map(|s| *s).unwrap_or_default();
    Ok(LocalSummary {
        origin,
        ended_at: now,
        input_ended_at: input_ended,
        stopped,
        input: String::new(),
        output: String::new(),
        camera: camera.as_ref().map(|c| c.describe().to_string()),
        user_turns: Vec::new(),
        answers: Vec::new(),
        timings: Vec::new(),
        session_errors: Vec::new(),
        source: feeder_stats.source,
        sink: SinkStats::default(),
        gate: feeder_stats.gate,
        echo_stage: echo_config.zip(feeder_stats.echo_stage),
        video_frames_sent: camera.as_ref().map_or(0, CameraCapture::frames_sent),
    })
}

/// How often a verbose transcript shows the echo canceller's state.
const ECHO_REPORT_EVERY: Duration = Duration::from_secs(1);

/// Stops the feeder when the event loop ends, on every path.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lines_become_controls() {
        assert!(matches!(parse_typed("  /quit "), Some(Typed::Quit)));
        assert!(matches!(parse_typed("/stop"), Some(Typed::Interrupt)));
        assert!(matches!(parse_typed("/voice Ethan"), Some(Typed::Voice(v)) if v == "Ethan"));
        assert!(matches!(
            parse_typed("/text"),
            Some(Typed::ReplyMode(ReplyMode::Text))
        ));
        assert!(
            matches!(parse_typed("hello there"), Some(Typed::Message(m)) if m == "hello there")
        );
        assert!(parse_typed("   ").is_none());
        // "/voice" without a name is a message, not a control that would fail
        assert!(matches!(parse_typed("/voice"), Some(Typed::Message(_))));
    }
}
