//! Test harness of the transport (never shipped): a stand-in session behind the real
//! `SessionHandle` API. It records every input the transport hands it and answers each user
//! turn (speech then silence, or a typed message) with state changes, text, timing marks and a
//! 440 Hz tone as 20 ms voice frames at 24 kHz, paced in real time; optionally, speech over an
//! answer cuts it (barge-in). Tests of the transport's own behaviour use it; the end-to-end
//! tests run the real engine on the tiny model through the same factory seam
//! ([`engine_factory`]).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use crossbeam_channel::{Receiver, Sender, unbounded};
use omnicall::engine::clock::{Clock, SystemClock};
use omnicall::engine::scheduler::{Scheduler, SchedulerConfig, SchedulerModels};
use omnicall::engine::session::{
    Control, ModelPasses, ReplyMode, SessionConfig, SessionEvent, SessionHandle, SessionInput,
    TurnTimings,
};
use omnicall::engine::turn::TurnState;
use omnicall::model::loading::ModelFiles;
use omnicall::model::omni::OmniModel;
use omnicall::rtc::SessionFactory;
use omnicall::rtc::client::CallClient;
use omnicall::rtc::protocol::ServerMessage;

pub const TONE_HZ: f32 = 440.0;
pub const VOICE_RATE: u32 = 24_000;
/// Length of each answer's voice.
pub const ANSWER: Duration = Duration::from_millis(1_200);

/// Sessions of the real engine on the tiny model (f32, CPU), one per call, each on its own
/// wall clock started with the call, their Thinker and Talker passes on one shared model
/// scheduler: as `omnicall serve` makes them.
pub fn engine_factory() -> SessionFactory {
    engine_factory_and_scheduler().0
}

/// [`engine_factory`] and the scheduler its sessions share (for the server's
/// `ServeConfig::model_scheduler`).
pub fn engine_factory_and_scheduler() -> (SessionFactory, Arc<Scheduler>) {
    let model_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    let files = ModelFiles::locate(model_dir.to_str().unwrap()).unwrap();
    let model = OmniModel::load(&files, DType::F32, &Device::Cpu).unwrap();
    let models = SchedulerModels::of(&model).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let scheduler = Arc::new(Scheduler::spawn(models, clock, SchedulerConfig::default()).unwrap());
    let passes = ModelPasses::Shared(scheduler.clone());
    let factory: SessionFactory = Arc::new(move |mut config: SessionConfig| {
        config.model_passes = passes.clone();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        omnicall::engine::runtime::spawn(&model, config, clock)
    });
    (factory, scheduler)
}

pub fn media(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/media")
        .join(name)
}

/// Logs to the test output (RUST_LOG picks the level; warnings by default).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,omnicall=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A camera frame as the session saw it.
#[derive(Debug, Clone)]
pub struct SeenFrame {
    pub at: Duration,
    pub width: usize,
    pub height: usize,
    /// Mean of each colour channel.
    pub mean_rgb: [f32; 3],
}

/// Everything one session received.
#[derive(Debug, Default)]
pub struct SessionLog {
    pub config: Option<SessionConfig>,
    pub audio_samples: usize,
    pub audio_rates: Vec<u32>,
    /// Media times of the audio pieces, in arrival order.
    pub audio_times: Vec<Duration>,
    pub audio_energy: f64,
    pub peak: f32,
    pub frames: Vec<SeenFrame>,
    pub controls: Vec<Control>,
    pub turns_answered: u64,
    pub closed: bool,
}

impl SessionLog {
    pub fn audio_seconds(&self) -> f64 {
        self.audio_samples as f64 / 48_000.0
    }

    pub fn rms(&self) -> f64 {
        (self.audio_energy / self.audio_samples.max(1) as f64).sqrt()
    }
}

pub type Log = Arc<Mutex<SessionLog>>;

/// How the stand-in session behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct HarnessOptions {
    /// The onset of speech while the model answers cuts the answer, as the engine's barge-in
    /// does (off by default: a browser's fake microphone loops its file over the answers).
    pub barge_in: bool,
}

/// A factory of harness sessions and the logs of every session it made.
pub fn harness_factory() -> (SessionFactory, Arc<Mutex<Vec<Log>>>) {
    harness_factory_with(HarnessOptions::default())
}

/// [`harness_factory`] with these options.
pub fn harness_factory_with(options: HarnessOptions) -> (SessionFactory, Arc<Mutex<Vec<Log>>>) {
    let logs: Arc<Mutex<Vec<Log>>> = Arc::default();
    let made = Arc::clone(&logs);
    let factory: SessionFactory = Arc::new(move |config: SessionConfig| {
        let log: Log = Arc::default();
        log.lock().unwrap().config = Some(config.clone());
        made.lock().unwrap().push(Arc::clone(&log));
        Ok(spawn_session(config, options, log))
    });
    (factory, logs)
}

fn spawn_session(config: SessionConfig, options: HarnessOptions, log: Log) -> SessionHandle {
    let (input_tx, input_rx) = unbounded::<SessionInput>();
    let (event_tx, event_rx) = unbounded::<SessionEvent>();
    std::thread::spawn(move || run_session(config, options, log, input_rx, event_tx));
    SessionHandle::new(input_tx, event_rx)
}

struct Answering {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

fn run_session(
    config: SessionConfig,
    options: HarnessOptions,
    log: Log,
    inputs: Receiver<SessionInput>,
    events: Sender<SessionEvent>,
) {
    let start = Instant::now();
    let mut reply_mode = config.reply_mode;
    let mut turn = 0u64;
    // energy-based turn taking on media time
    let mut speech_from: Option<Duration> = None;
    let mut last_speech: Option<Duration> = None;
    let mut answering: Option<Answering> = None;
    let _ = events.send(SessionEvent::State(TurnState::Listening));
    while let Ok(input) = inputs.recv() {
        match input {
            SessionInput::Audio(a) => {
                let mut l = log.lock().unwrap();
                l.audio_samples += a.samples.len();
                l.audio_times.push(a.at);
                if !l.audio_rates.contains(&a.sample_rate) {
                    l.audio_rates.push(a.sample_rate);
                }
                let energy: f64 = a.samples.iter().map(|s| (*s as f64).powi(2)).sum();
                l.audio_energy += energy;
                l.peak = a.samples.iter().fold(l.peak, |m, s| m.max(s.abs()));
                drop(l);
                let rms = (energy / a.samples.len().max(1) as f64).sqrt();
                let end =
                    a.at + Duration::from_secs_f64(a.samples.len() as f64 / a.sample_rate as f64);
                if rms > 0.02 {
                    if speech_from.is_none() {
                        speech_from = Some(a.at);
                        if options.barge_in
                            && let Some(a) = answering.take()
                        {
                            stop(a, turn, &events);
                        }
                        let _ = events.send(SessionEvent::State(TurnState::UserSpeaking));
                    }
                    last_speech = Some(end);
                } else if let (Some(from), Some(last)) = (speech_from, last_speech)
                    && end.saturating_sub(last) >= Duration::from_millis(500)
                {
                    speech_from = None;
                    if last - from >= Duration::from_millis(300) && answering_done(&answering) {
                        turn += 1;
                        let frames = log.lock().unwrap().frames.len();
                        let _ = events.send(SessionEvent::UserTurn {
                            turn,
                            audio: last - from,
                            video_frames: frames,
                            text: None,
                        });
                        answering = Some(answer(
                            turn,
                            reply_mode,
                            format!("I heard {:.1} s of speech", (last - from).as_secs_f32()),
                            // the end of turn when it was decided, on the session clock (the
                            // piece's media time `end` runs a frame ahead of its arrival)
                            Some((last, start.elapsed())),
                            start,
                            events.clone(),
                            Arc::clone(&log),
                        ));
                    }
                }
            }
            SessionInput::Video(v) => {
                let n = (v.width * v.height).max(1) as f32;
                let mut mean = [0f32; 3];
                for px in v.rgb.chunks_exact(3) {
                    for c in 0..3 {
                        mean[c] += px[c] as f32;
                    }
                }
                log.lock().unwrap().frames.push(SeenFrame {
                    at: v.at,
                    width: v.width,
                    height: v.height,
                    mean_rgb: mean.map(|m| m / n),
                });
            }
            SessionInput::Control(c) => {
                log.lock().unwrap().controls.push(c.clone());
                match c {
                    Control::Text(text) => {
                        if let Some(a) = answering.take() {
                            stop(a, turn, &events);
                        }
                        turn += 1;
                        let _ = events.send(SessionEvent::UserTurn {
                            turn,
                            audio: Duration::ZERO,
                            video_frames: 0,
                            text: Some(text.clone()),
                        });
                        answering = Some(answer(
                            turn,
                            reply_mode,
                            format!("You wrote: {text}"),
                            None,
                            start,
                            events.clone(),
                            Arc::clone(&log),
                        ));
                    }
                    Control::Interrupt => {
                        if let Some(a) = answering.take() {
                            stop(a, turn, &events);
                        }
                    }
                    Control::ReplyMode(m) => reply_mode = m,
                    Control::Voice(_) => {}
                }
            }
            SessionInput::Close => break,
        }
    }
    if let Some(a) = answering.take() {
        a.stop.store(true, Ordering::SeqCst);
        let _ = a.thread.join();
    }
    log.lock().unwrap().closed = true;
    // dropping `events` tells the transport the session is gone
}

fn answering_done(a: &Option<Answering>) -> bool {
    a.as_ref().is_none_or(|a| a.thread.is_finished())
}

fn stop(a: Answering, turn: u64, events: &Sender<SessionEvent>) {
    let was_running = !a.thread.is_finished();
    a.stop.store(true, Ordering::SeqCst);
    let _ = a.thread.join();
    if was_running {
        let _ = events.send(SessionEvent::Interrupted {
            turn,
            heard: Duration::from_millis(200),
            kept_text: "I heard".into(),
        });
        let _ = events.send(SessionEvent::State(TurnState::Listening));
    }
}

/// Answers a turn on its own thread: text, then (voice mode) the tone paced at 20 ms a frame.
fn answer(
    turn: u64,
    mode: ReplyMode,
    text: String,
    speech: Option<(Duration, Duration)>,
    start: Instant,
    events: Sender<SessionEvent>,
    log: Log,
) -> Answering {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        let now = || start.elapsed();
        let _ = events.send(SessionEvent::State(TurnState::Thinking));
        let mut timings = TurnTimings {
            turn,
            speech_end: speech.map(|s| s.0),
            end_of_turn: speech.map(|s| s.1),
            prefill_done: Some(now()),
            ..Default::default()
        };
        for (i, word) in text.split_inclusive(' ').enumerate() {
            if i == 0 {
                timings.first_text_token = Some(now());
            }
            let _ = events.send(SessionEvent::AssistantText {
                turn,
                delta: word.to_string(),
            });
        }
        if mode == ReplyMode::Voice {
            let _ = events.send(SessionEvent::State(TurnState::Speaking));
            let frame = VOICE_RATE as usize / 50;
            let frames = (ANSWER.as_millis() / 20) as u64;
            let begin = Instant::now();
            for index in 0..frames {
                if flag.load(Ordering::SeqCst) {
                    // the marks of a cut answer, as far as it got
                    let _ = events.send(SessionEvent::Timings(timings));
                    return;
                }
                let pcm: Vec<f32> = (0..frame)
                    .map(|j| {
                        let t = (index as usize * frame + j) as f32 / VOICE_RATE as f32;
                        (2.0 * std::f32::consts::PI * TONE_HZ * t).sin() * 0.5
                    })
                    .collect();
                if index == 0 {
                    timings.first_codec_token = Some(now());
                    timings.first_waveform_chunk = Some(now());
                    timings.first_audio_frame = Some(now());
                }
                let _ = events.send(SessionEvent::Audio {
                    turn,
                    index,
                    at: now(),
                    sample_rate: VOICE_RATE,
                    pcm,
                });
                let due = begin + Duration::from_millis(20 * (index + 1));
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
        log.lock().unwrap().turns_answered += 1;
        let _ = events.send(SessionEvent::AnswerDone { turn });
        let _ = events.send(SessionEvent::Timings(timings));
        let _ = events.send(SessionEvent::State(TurnState::Listening));
    });
    Answering { stop, thread }
}

/// Waits (polling) until `cond` holds, up to `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Frequency from upward zero crossings.
pub fn frequency(x: &[f32], rate: u32) -> f32 {
    let ups = x.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count();
    ups as f32 * rate as f32 / x.len().max(1) as f32
}

pub fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32).sqrt()
}

/// Waits for an `error` message mentioning `needle`; returns its text.
pub async fn expect_error(timeout: Duration, call: &mut CallClient, needle: &str) -> String {
    let msg = call
        .wait_for_message(
            timeout,
            |m| matches!(m, ServerMessage::Error { message } if message.contains(needle)),
        )
        .await
        .unwrap_or_else(|e| panic!("no error mentioning {needle:?}: {e}"));
    let ServerMessage::Error { message } = msg.message else {
        unreachable!()
    };
    message
}

/// An H.264 sequence parameter set (Baseline) declaring `width` x `height`.
pub fn h264_sps(width: u32, height: u32) -> Vec<u8> {
    let mut bits: Vec<bool> = vec![];
    let mut put = |value: u32, n: u32| {
        for i in (0..n).rev() {
            bits.push((value >> i) & 1 == 1);
        }
    };
    let ue = |put: &mut dyn FnMut(u32, u32), v: u32| {
        let x = v + 1;
        let len = 32 - x.leading_zeros();
        put(0, len - 1);
        put(x, len);
    };
    put(66, 8); // profile_idc
    put(0xc0, 8); // constraint flags
    put(31, 8); // level
    ue(&mut put, 0); // seq_parameter_set_id
    ue(&mut put, 0); // log2_max_frame_num_minus4
    ue(&mut put, 0); // pic_order_cnt_type
    ue(&mut put, 0); // log2_max_pic_order_cnt_lsb_minus4
    ue(&mut put, 1); // max_num_ref_frames
    put(0, 1); // gaps_in_frame_num_value_allowed_flag
    ue(&mut put, width / 16 - 1);
    ue(&mut put, height / 16 - 1);
    put(1, 1); // frame_mbs_only_flag
    put(1, 1); // direct_8x8_inference_flag
    put(0, 1); // frame_cropping_flag
    put(0, 1); // vui_parameters_present_flag
    put(1, 1); // rbsp stop bit
    while !bits.len().is_multiple_of(8) {
        bits.push(false);
    }
    let rbsp: Vec<u8> = bits
        .chunks(8)
        .map(|b| b.iter().fold(0u8, |acc, &bit| (acc << 1) | bit as u8))
        .collect();
    // NAL header, then the payload with emulation prevention
    let mut nal = vec![0x67];
    let mut zeros = 0;
    for b in rbsp {
        if zeros >= 2 && b <= 3 {
            nal.push(3);
            zeros = 0;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        nal.push(b);
    }
    nal
}

/// This process's threads: (thread id, name).
pub fn threads() -> Vec<(u64, String)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let id = t.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            Some((id, name.trim().to_string()))
        })
        .collect()
}

/// Threads the transport started for these calls (named `oc-..-{first 8 of the id}`).
pub fn call_threads(ids: &[&str]) -> Vec<String> {
    threads()
        .into_iter()
        .map(|(_, name)| name)
        .filter(|name| name.starts_with("oc-") && ids.iter().any(|id| name.ends_with(&id[..8])))
        .collect()
}

/// Ids of the threads named like an engine session's (`session-*`, `pacer`). Unnamed threads
/// inherit their creator's name, so a compute pool started by a session thread shows up too:
/// compare sets of ids taken around a session's start, not counts.
pub fn engine_threads() -> std::collections::BTreeSet<u64> {
    threads()
        .into_iter()
        .filter(|(_, name)| name.starts_with("session-") || name == "pacer")
        .map(|(id, _)| id)
        .collect()
}

/// The errors a VP8 call's garbage gets, in order: bad Opus packets, a VP8 payload descriptor
/// that runs past its end, a key frame declaring 16000x16000 pixels (each one error event,
/// spaced past the transport's problem throttle).
pub struct Vp8GarbageErrors {
    pub opus: String,
    pub descriptor: String,
    pub huge_frame: String,
}

/// Sends that garbage on `call` and returns the error each part got.
pub async fn send_vp8_garbage(timeout: Duration, call: &mut CallClient) -> Vp8GarbageErrors {
    let media = call.media();
    for junk in [&[0x0b, 0x3c, 1, 2][..], &[0x03, 0x00][..], &[][..]] {
        media
            .send_opus(junk, Duration::from_millis(20))
            .await
            .unwrap();
    }
    let opus = expect_error(timeout, call, "invalid opus packet").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    media
        .send_raw_video_payload(&[0x90, 0x80, 0x80], true, 3_000)
        .await
        .unwrap();
    let descriptor = expect_error(timeout, call, "bad VP8 RTP payload").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut huge = vec![0x50, 0x02, 0x00, 0x9d, 0x01, 0x2a];
    huge.extend(16_000u16.to_le_bytes());
    huge.extend(16_000u16.to_le_bytes());
    huge.extend([0u8; 200]);
    media
        .send_video_frame(&huge, Duration::from_millis(33))
        .await
        .unwrap();
    let huge_frame = expect_error(timeout, call, "VP8 frame of 16000x16000").await;
    Vp8GarbageErrors {
        opus,
        descriptor,
        huge_frame,
    }
}
