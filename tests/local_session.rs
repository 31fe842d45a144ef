//! `omnicall local` through a session handle, on WAV files in simulated time.
//!
//! The session here is a transport test harness, not the engine: the engine's real input
//! stage (resampling, WebRTC VAD, turn-taking, barge-in) and its real output pacer, with a
//! fixed tone standing in for the model's answer. It lives in this test only; the product
//! path is whatever session factory the caller gives `local::run`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use omnicall::engine::blocks::BlockConfig;
use omnicall::engine::clock::{Clock, SimulatedClock};
use omnicall::engine::input::{InputConfig, InputEvent, InputStage};
use omnicall::engine::pacer::{FRAME, Pacer, PacerOutput, VoiceFrame};
use omnicall::engine::session::{
    Control, SessionConfig, SessionEvent, SessionHandle, SessionInput, TurnTimings,
};
use omnicall::engine::turn::TurnDetection;
use omnicall::local::{
    AnswerOutcome, AudioIn, AudioOut, EchoMode, GateConfig, LocalOptions, LocalSummary,
    SessionFactory, StopCause, run_with_clock,
};
use omnicall::media::vad::VadConfig;
use omnicall::model::config::{Config, ProcessorConfig};

const VOICE_RATE: u32 = 24_000;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn block_config() -> BlockConfig {
    let dir = common::model_dir();
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
    };
    let model = Config::from_json(&read("config.json")).unwrap();
    let processor = ProcessorConfig::from_json(&read("processor_config.json")).unwrap();
    BlockConfig::for_model(
        &model.thinker_config,
        &processor,
        SessionConfig::default().video_fps,
    )
    .unwrap()
}

/// A 16 kHz test recording.
fn load(name: &str) -> Vec<f32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/media")
        .join(name);
    let mut reader = hound::WavReader::open(&path).unwrap();
    assert_eq!(reader.spec().sample_rate, 16_000);
    reader
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect()
}

fn silence(seconds: f64) -> Vec<f32> {
    vec![0.0; (seconds * 16_000.0).round() as usize]
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("omnicall-local-{}-{name}", std::process::id()))
}

fn write_wav(path: &Path, rate: u32, samples: &[f32]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &x in samples {
        w.write_sample((x.clamp(-1.0, 1.0) * 32767.0) as i16)
            .unwrap();
    }
    w.finalize().unwrap();
}

fn read_wav(path: &Path) -> (u32, Vec<f32>) {
    let mut r = hound::WavReader::open(path).unwrap();
    let rate = r.spec().sample_rate;
    let samples = r
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect();
    (rate, samples)
}

/// The answer: a 440 Hz tone at half scale.
fn tone(seconds: f64) -> Vec<f32> {
    (0..(seconds * VOICE_RATE as f64) as usize)
        .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / VOICE_RATE as f32).sin())
        .collect()
}

/// Runs of samples louder than `level` (merged across gaps shorter than `gap` samples), as
/// (first, end) sample indices.
fn loud_runs(samples: &[f32], level: f32, gap: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, x) in samples.iter().enumerate() {
        if x.abs() > level {
            match runs.last_mut() {
                Some((_, end)) if i <= *end + gap => *end = i + 1,
                _ => runs.push((i, i + 1)),
            }
        }
    }
    runs
}

/// What the harness saw, for the checks.
#[derive(Debug, Default)]
struct HarnessLog {
    /// Session time each answer's first frame was released at.
    first_release: Vec<(u64, Duration)>,
    /// Turns ended: (turn, speech end, decided at).
    turns: Vec<(u64, Duration, Duration)>,
    /// Audio pieces taken: (at, samples, rate).
    audio: Vec<(Duration, usize, u32)>,
    /// Session time up to which the harness has done everything due: taken the audio a
    /// microphone would have delivered and sent every frame the pacer had to release. The test
    /// moves the simulated clock on only from there, so that a starved thread on a busy machine
    /// cannot make time run ahead of the call.
    settled: Duration,
}

/// The transport test harness: the engine's input stage and pacer, a tone for an answer.
fn harness(
    config: SessionConfig,
    clock: Arc<dyn Clock>,
    answer: Vec<f32>,
    log: Arc<Mutex<HarnessLog>>,
) -> SessionHandle {
    let (input, input_rx) = unbounded::<SessionInput>();
    let (events_tx, events) = unbounded::<SessionEvent>();
    // The harness has no end-of-turn model: the silence rule, on the VAD these timings were
    // set for (the engine's own tests cover Smart Turn and Silero).
    let mut config = config;
    config.turn.detection = TurnDetection::Silence;
    config.vad = VadConfig::webrtc();
    std::thread::spawn(move || {
        let mut stage =
            InputStage::new(InputConfig::new(block_config(), &config), clock.clone()).unwrap();
        let (pacer_tx, pacer_rx) = unbounded();
        let pacer = Pacer::new(clock.clone(), VOICE_RATE, pacer_tx);
        let mut timings: Option<TurnTimings> = None;
        let send = |e: SessionEvent| {
            let _ = events_tx.send(e);
        };
        let frames_of_answer = answer.len().div_ceil(pacer.frame_samples()) as u64;
        // the answer being released: its first frame's time and the frames sent so far
        let mut releasing: Option<(Option<Duration>, u64)> = None;
        let mut audio_end: Option<Duration> = None;
        loop {
            let now = clock.now();
            let mut produced = Vec::new();
            match input_rx.recv_timeout(std::time::Duration::from_micros(250)) {
                Ok(SessionInput::Audio(a)) => {
                    let end = a.at
                        + Duration::from_secs_f64(a.samples.len() as f64 / a.sample_rate as f64);
                    audio_end = Some(audio_end.map_or(end, |e| e.max(end)));
                    log.lock()
                        .unwrap()
                        .audio
                        .push((a.at, a.samples.len(), a.sample_rate));
                    match stage.push_audio(a) {
                        Ok(e) => produced.extend(e),
                        Err(e) => send(SessionEvent::Error(e.to_string())),
                    }
                }
                Ok(SessionInput::Video(v)) => match stage.push_video(v) {
                    Ok(e) => produced.extend(e),
                    Err(e) => send(SessionEvent::Error(e.to_string())),
                },
                Ok(SessionInput::Control(Control::Interrupt)) => produced.extend(stage.interrupt()),
                Ok(SessionInput::Control(Control::Text(t))) => match stage.typed_text(t) {
                    Ok(e) => produced.extend(e),
                    Err(e) => send(SessionEvent::Error(e.to_string())),
                },
                Ok(SessionInput::Control(_)) => {}
                Ok(SessionInput::Close)
                | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return;
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
            produced.extend(stage.tick().unwrap());
            for out in pacer_rx.try_iter() {
                match out {
                    PacerOutput::Frame(VoiceFrame {
                        answer,
                        index,
                        at,
                        pcm,
                    }) => {
                        if let Some((start, sent)) = releasing.as_mut() {
                            start.get_or_insert(at);
                            *sent += 1;
                        }
                        if index == 0 {
                            log.lock().unwrap().first_release.push((answer, at));
                            produced.extend(stage.answer_audible(answer));
                            if let Some(mut t) = timings.take() {
                                t.first_audio_frame = Some(at);
                                send(SessionEvent::Timings(t));
                            }
                        }
                        send(SessionEvent::Audio {
                            turn: answer,
                            index,
                            at,
                            sample_rate: VOICE_RATE,
                            pcm,
                        });
                    }
                    PacerOutput::Finished { answer, .. } => {
                        releasing = None;
                        send(SessionEvent::AnswerDone { turn: answer });
                        produced.extend(stage.answer_finished(answer));
                    }
                }
            }
            let released_all_due = match releasing {
                None => true,
                Some((None, sent)) => sent > 0,
                Some((Some(start), sent)) => {
                    let due = (now.saturating_sub(start).as_nanos() / FRAME.as_nanos()) as u64 + 1;
                    sent >= due.min(frames_of_answer)
                }
            };
            // (no audio yet: the call has not started its input)
            if released_all_due && audio_end.is_none_or(|end| end + FRAME >= now) {
                let mut log = log.lock().unwrap();
                log.settled = log.settled.max(now);
            }
            for event in produced {
                match event {
                    InputEvent::State { state, .. } => send(SessionEvent::State(state)),
                    InputEvent::StopAnswer {
                        turn: Some(turn), ..
                    } => {
                        let heard = FRAME * pacer.stop() as u32;
                        releasing = None;
                        send(SessionEvent::Interrupted {
                            turn,
                            heard,
                            kept_text: String::new(),
                        });
                    }
                    InputEvent::TurnEnded {
                        turn,
                        from,
                        speech_end,
                        decided_at,
                        end,
                        video_frames,
                        ..
                    } => {
                        log.lock()
                            .unwrap()
                            .turns
                            .push((turn, speech_end, decided_at));
                        send(SessionEvent::UserTurn {
                            turn,
                            audio: end - from,
                            video_frames,
                            text: None,
                        });
                        send(SessionEvent::AssistantText {
                            turn,
                            delta: "(a tone)".into(),
                        });
                        timings = Some(TurnTimings {
                            turn,
                            speech_end: Some(speech_end),
                            end_of_turn: Some(decided_at),
                            ..Default::default()
                        });
                        pacer.begin(turn);
                        pacer.push(turn, &answer);
                        pacer.finish(turn);
                        releasing = Some((None, 0));
                    }
                    InputEvent::AnswerPaused {
                        turn: Some(turn), ..
                    } => {
                        // nothing is due while paused; the schedule restarts on resuming
                        pacer.hold();
                        releasing = None;
                        send(SessionEvent::Paused { turn });
                    }
                    InputEvent::AnswerResumed {
                        turn: Some(turn), ..
                    } => {
                        pacer.release();
                        releasing = Some((None, 0));
                        send(SessionEvent::Resumed { turn });
                    }
                    InputEvent::TypedTurn { turn, text, .. } => {
                        send(SessionEvent::UserTurn {
                            turn,
                            audio: Duration::ZERO,
                            video_frames: 0,
                            text: Some(text),
                        });
                        pacer.begin(turn);
                        pacer.push(turn, &answer);
                        pacer.finish(turn);
                        releasing = Some((None, 0));
                    }
                    _ => {}
                }
            }
        }
    });
    SessionHandle::new(input, events)
}

/// A call on `input_file` into `output_file` through the harness, in simulated time moved
/// forward in 5 ms steps while the session keeps up.
fn call(
    input_file: &Path,
    output_file: &Path,
    echo: EchoMode,
    answer: Vec<f32>,
) -> (LocalSummary, Arc<Mutex<HarnessLog>>, String) {
    let clock = Arc::new(SimulatedClock::new());
    let log = Arc::new(Mutex::new(HarnessLog::default()));
    let channels: Arc<Mutex<Option<SessionHandle>>> = Arc::default();
    let factory: SessionFactory = {
        let (log, channels) = (log.clone(), channels.clone());
        Arc::new(move |config, clock| {
            let handle = harness(config, clock, answer.clone(), log.clone());
            *channels.lock().unwrap() = Some(handle.clone());
            Ok(handle)
        })
    };
    let transcript = Arc::new(Mutex::new(Vec::<u8>::new()));
    let options = LocalOptions {
        input: AudioIn::File(input_file.to_path_buf()),
        output: AudioOut::File {
            path: output_file.to_path_buf(),
            sample_rate: VOICE_RATE,
        },
        echo,
        transcript: Some(Box::new(SharedText(transcript.clone()))),
        answer_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let worker = {
        let clock: Arc<dyn Clock> = clock.clone();
        std::thread::spawn(move || run_with_clock(options, clock, factory))
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    while !worker.is_finished() {
        assert!(Instant::now() < deadline, "the call did not end");
        // the session does what is due and the call takes what the session sent before time
        // moves on (bounded: once the call stops feeding audio, nothing settles any more)
        let Some(handle) = channels.lock().unwrap().clone() else {
            // time starts with the session
            std::thread::sleep(std::time::Duration::from_micros(300));
            continue;
        };
        {
            let wait = Instant::now() + std::time::Duration::from_millis(300);
            let now = clock.now();
            while !(handle.input.is_empty()
                && handle.events.is_empty()
                && log.lock().unwrap().settled >= now)
                && Instant::now() < wait
            {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
        clock.advance(ms(5));
        std::thread::sleep(std::time::Duration::from_micros(300));
    }
    let summary = worker.join().unwrap().unwrap();
    let text = String::from_utf8(transcript.lock().unwrap().clone()).unwrap();
    (summary, log, text)
}

struct SharedText(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn seconds_at(sample: usize, rate: u32) -> f64 {
    sample as f64 / rate as f64
}

#[test]
fn a_spoken_turn_is_answered_in_the_output_file_at_its_time() {
    let utterance = load("utterance_long.wav");
    let mut input = silence(0.5);
    input.extend(&utterance);
    input.extend(silence(0.5));
    let input_path = temp_path("answer-in.wav");
    let output_path = temp_path("answer-out.wav");
    write_wav(&input_path, 16_000, &input);
    let answer = tone(1.5);
    let (summary, log, transcript) = call(&input_path, &output_path, EchoMode::Auto, answer);
    eprintln!("{transcript}");
    let log = log.lock().unwrap();

    assert_eq!(summary.stopped, StopCause::InputEnded);
    assert_eq!(summary.user_turns.len(), 1, "{:?}", summary.user_turns);
    assert_eq!(summary.answers.len(), 1);
    assert_eq!(summary.answers[0].outcome, AnswerOutcome::Done);
    assert_eq!(summary.answers[0].frames, 75);
    assert!(summary.gate.is_none(), "files need no echo gate");
    assert!(transcript.contains("you (turn 1)"), "{transcript}");
    assert!(
        transcript.contains("model (turn 1): (a tone)"),
        "{transcript}"
    );

    // the file was played in as 20 ms pieces back to back from the origin
    for (k, (at, n, rate)) in log.audio.iter().enumerate().take(300) {
        assert_eq!((*n, *rate), (320, 16_000));
        assert_eq!(*at, summary.origin + FRAME * k as u32, "piece {k}");
    }
    let input_end = summary.input_ended_at.unwrap() - summary.origin;
    assert_eq!(input_end.as_secs_f64(), input.len() as f64 / 16_000.0);

    // the output: as long as the call, silent but for the tone, which starts where the
    // session released it, after the end of the user's speech in the input
    let (rate, out) = read_wav(&output_path);
    assert_eq!(rate, VOICE_RATE);
    let call_length = (summary.ended_at - summary.origin).as_secs_f64();
    assert!((seconds_at(out.len(), rate) - call_length).abs() < 0.001);
    assert!(out.len() as f64 / rate as f64 >= input.len() as f64 / 16_000.0);
    let runs = loud_runs(&out, 0.05, 100);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let (onset, end) = runs[0];
    let released = log.first_release[0].1 - summary.origin;
    assert!(
        (seconds_at(onset, rate) - released.as_secs_f64()).abs() < 0.03,
        "tone at {} s in the file, released at {released:?}",
        seconds_at(onset, rate)
    );
    assert!((seconds_at(end - onset, rate) - 1.5).abs() < 0.01);
    let speech_end_in_file = 0.5 + utterance.len() as f64 / 16_000.0;
    let (_, _, decided_at) = log.turns[0];
    let decided = (decided_at - summary.origin).as_secs_f64();
    assert!(decided > speech_end_in_file && decided < speech_end_in_file + 1.2);
    assert!(seconds_at(onset, rate) >= decided - 0.001);
    assert!(seconds_at(onset, rate) < decided + 0.25);

    // the turn's timing marks came through
    assert_eq!(summary.timings.len(), 1);
    assert!(
        transcript.contains("| turn | speech end (s) |"),
        "{transcript}"
    );
    let _ = std::fs::remove_file(&input_path);
    let _ = std::fs::remove_file(&output_path);
}

/// The first utterance, a pause, then `barge_in` speaking over the answer.
fn two_turns(barge_in: &[f32]) -> Vec<f32> {
    let mut input = silence(0.3);
    input.extend(load("utterance_long.wav"));
    // the answer starts about 0.75 s after the speech ends; speak 0.6 s into it
    input.extend(silence(1.35));
    input.extend(barge_in);
    input.extend(silence(0.3));
    input
}

#[test]
fn speech_over_the_answer_cuts_it_in_the_output_file() {
    let second = load("utterance_short.wav");
    let input = two_turns(&second);
    let input_path = temp_path("barge-in.wav");
    let output_path = temp_path("barge-out.wav");
    write_wav(&input_path, 16_000, &input);
    let (summary, log, transcript) = call(&input_path, &output_path, EchoMode::Off, tone(4.0));
    eprintln!("{transcript}");
    let log = log.lock().unwrap();

    assert_eq!(summary.stopped, StopCause::InputEnded);
    assert_eq!(summary.user_turns.len(), 2, "{:?}", summary.user_turns);
    let (first, second_answer) = (&summary.answers[0], &summary.answers[1]);
    let AnswerOutcome::Interrupted { heard } = first.outcome else {
        panic!("the first answer was not cut: {first:?}");
    };
    assert_eq!(second_answer.outcome, AnswerOutcome::Done);
    assert!(
        transcript.contains("[interrupted] answer to turn 1"),
        "{transcript}"
    );

    let (rate, out) = read_wav(&output_path);
    let runs = loud_runs(&out, 0.05, 100);
    assert_eq!(runs.len(), 2, "{runs:?}");
    // the first answer plays exactly what was heard, and pauses as soon as the VAD hears the
    // user over it (the barge-in is decided later: nothing more of it plays)
    let heard_in_file = seconds_at(runs[0].1 - runs[0].0, rate);
    assert!((heard_in_file - heard.as_secs_f64()).abs() < 0.02);
    let barge_in_starts = 0.3 + (load("utterance_long.wav").len() as f64) / 16_000.0 + 1.35;
    let cut = seconds_at(runs[0].1, rate);
    assert!(
        cut > barge_in_starts && cut < barge_in_starts + 0.15,
        "cut at {cut} s, the barge-in starts at {barge_in_starts} s"
    );
    // the second answer comes after the second utterance, where the session released it
    let released = (log.first_release[1].1 - summary.origin).as_secs_f64();
    assert!((seconds_at(runs[1].0, rate) - released).abs() < 0.03);
    assert!(seconds_at(runs[1].0, rate) > barge_in_starts + second.len() as f64 / 16_000.0);
    assert!((seconds_at(runs[1].1 - runs[1].0, rate) - 4.0).abs() < 0.01);
    let _ = std::fs::remove_file(&input_path);
    let _ = std::fs::remove_file(&output_path);
}

#[test]
fn the_half_duplex_gate_keeps_quiet_echo_from_barging_in_but_not_the_user() {
    // the "echo": 2.5 s of the user's first sentence again, 26 dB down, playing over the
    // (4 s) answer and ending before it, as an echo does
    let echo: Vec<f32> = load("utterance_long.wav")[..40_000]
        .iter()
        .map(|x| x * 0.05)
        .collect();
    let input = two_turns(&echo);
    let input_path = temp_path("echo.wav");
    write_wav(&input_path, 16_000, &input);
    let gate = EchoMode::HalfDuplex(GateConfig::default());

    // without the gate, the echo reads as speech and cuts the answer
    let output_path = temp_path("echo-off.wav");
    let (ungated, _, transcript) = call(&input_path, &output_path, EchoMode::Off, tone(4.0));
    assert!(
        matches!(
            ungated.answers[0].outcome,
            AnswerOutcome::Interrupted { .. }
        ),
        "the quiet copy must be loud enough for the VAD: {transcript}"
    );

    // with the gate, the answer plays to its end
    let (gated, _, transcript) = call(&input_path, &output_path, gate.clone(), tone(4.0));
    assert_eq!(gated.answers.len(), 1, "{transcript}");
    assert_eq!(
        gated.answers[0].outcome,
        AnswerOutcome::Done,
        "{transcript}"
    );
    let stats = gated.gate.expect("the gate was on");
    assert!(stats.gated > Duration::from_secs(3), "{stats:?}");
    assert_eq!(stats.passed_over_speaker, Duration::ZERO, "{stats:?}");

    // and a user speaking at full level over the answer still barges in through it
    let loud = two_turns(&load("utterance_short.wav"));
    write_wav(&input_path, 16_000, &loud);
    let (barged, _, transcript) = call(&input_path, &output_path, gate, tone(4.0));
    assert!(
        matches!(barged.answers[0].outcome, AnswerOutcome::Interrupted { .. }),
        "{transcript}"
    );
    // (the answer pauses at the VAD's first speech decision: from then on the speaker is
    // quiet, so only the onset passed over it)
    assert!(barged.gate.unwrap().passed_over_speaker > Duration::ZERO);
    let _ = std::fs::remove_file(&input_path);
    let _ = std::fs::remove_file(&output_path);
}

#[test]
fn a_missing_input_file_fails_before_the_session_starts() {
    let started = Arc::new(Mutex::new(0));
    let factory: SessionFactory = {
        let started = started.clone();
        Arc::new(move |_, _| {
            *started.lock().unwrap() += 1;
            anyhow::bail!("not reached")
        })
    };
    let options = LocalOptions {
        input: AudioIn::File(temp_path("no-such-input.wav")),
        output: AudioOut::Discard,
        transcript: None,
        ..Default::default()
    };
    let err = run_with_clock(options, Arc::new(SimulatedClock::new()), factory).unwrap_err();
    assert!(format!("{err:#}").contains("no-such-input.wav"), "{err:#}");
    assert_eq!(*started.lock().unwrap(), 0);
}

#[test]
fn a_session_that_fails_to_start_is_a_clear_error() {
    let input_path = temp_path("factory-fails.wav");
    write_wav(&input_path, 16_000, &silence(0.2));
    let factory: SessionFactory = Arc::new(|_, _| anyhow::bail!("no model in models/none"));
    let options = LocalOptions {
        input: AudioIn::File(input_path.clone()),
        output: AudioOut::Discard,
        transcript: None,
        ..Default::default()
    };
    let err = run_with_clock(options, Arc::new(SimulatedClock::new()), factory).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("cannot start the session") && text.contains("models/none"),
        "{text}"
    );
    let _ = std::fs::remove_file(&input_path);
}
