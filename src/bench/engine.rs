//! Engine benchmarks.
//!
//! * [`input_stage_cost`]: the input stage per second of call (resampling the microphone to
//!   the model's rate, WebRTC's VAD, the turn machine, the pre-roll history and block
//!   assembly, with a camera), on simulated time; one thread, so wall time is CPU time.
//! * [`bench_engine`]: a whole session on a model of the given shapes with random weights.
//!   (1) The engine's own overhead per second of call: a scripted call (speech bursts from a
//!   48 kHz microphone, a 30 fps camera, spoken answers) on simulated time; the CPU time of the
//!   session's threads minus the CPU time of the model's calls (encoders, Thinker, Talker,
//!   token2wav), which are reported too. (2) End of turn to first output frame, broken down by
//!   stage ([`TurnTimings`]): the user's turn is fed on simulated time (every block is
//!   prefilled before the user stops, as the design assumes), then the clock follows the wall
//!   clock from the user's last word: the silence rule, the last block and the assistant
//!   header, the first token, the Talker, the first token2wav chunk, the pacer, all at this
//!   machine's speed.
//!
//! The random model's prompts come from a byte-level tokenizer ([`byte_level_tokenizer`]:
//! one token per UTF-8 byte, the template's special tokens at the config's ids), so text costs
//! about four times the tokens of the real tokenizer; the spoken turn is audio-only (the
//! vision encoder is built without its blocks: it is never called).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use candle_core::{DType, Device, Tensor};

use super::Measurement;
use crate::engine::blocks::BlockConfig;
use crate::engine::clock::{Clock, SimulatedClock};
use crate::engine::input::{InputConfig, InputEvent, InputStage};
use crate::engine::runtime::{
    ModelTimes, SESSION_THREADS, SessionProbe, TICK, spawn_with, threads_cpu,
};
use crate::engine::session::{
    AudioInput, SessionConfig, SessionEvent, SessionHandle, SessionInput, TurnTimings, VideoInput,
};
use crate::engine::turn::{TurnConfig, TurnDetection};
use crate::media::opus::{OPUS_INPUT_RATES, OpusDecoder, OpusEncoder};
use crate::media::resample::StreamResampler;
use crate::media::vad::{VadConfig, VoiceDetector};
use crate::model::chat::ChatTokenizer;
use crate::model::config::{Config, ProcessorConfig};
use crate::model::loading::GenerationConfig;
use crate::model::omni::{OmniModel, Speech};
use crate::model::random_weights::RandomWeights;
use crate::model::speakers::{Voice, Voices};
use crate::model::talker::Talker;
use crate::model::thinker::Thinker;
use crate::model::thinker::audio_encoder::AudioEncoder;
use crate::model::thinker::vision_encoder::VisionEncoder;
use crate::model::token2wav::Token2Wav;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

const MIC_RATE: u32 = 48_000;
const PIECE_MS: u64 = 20;
const CAMERA_FPS: u64 = 30;
const CAMERA_SIZE: (usize, usize) = (640, 480);

/// A voice-like test signal: 3 s of a 120 Hz harmonic complex with a syllable-rate envelope,
/// then 2 s of silence, repeated; at the microphone's rate.
fn voice_like(seconds: u64) -> Vec<f32> {
    let rate = MIC_RATE as f32;
    (0..seconds * MIC_RATE as u64)
        .map(|i| {
            let t = i as f32 / rate;
            if t % 5.0 >= 3.0 {
                return 0.0;
            }
            let envelope = 0.5 - 0.5 * (2.0 * std::f32::consts::PI * 4.0 * t).cos();
            let voice: f32 = (1..=20)
                .map(|h| (2.0 * std::f32::consts::PI * 120.0 * h as f32 * t).sin() / h as f32)
                .sum();
            0.1 * envelope * voice
        })
        .collect()
}

/// Runs `seconds` of a call through the input stage for the model blocks `blocks`, and the
/// resampler and the VAD alone; reports milliseconds of CPU per second of call.
pub fn input_stage_cost(blocks: &BlockConfig, seconds: u64) -> anyhow::Result<Vec<Measurement>> {
    let mic = voice_like(seconds);
    let piece = (MIC_RATE as u64 * PIECE_MS / 1000) as usize;
    let per_second = |elapsed: Duration| elapsed.as_secs_f64() * 1000.0 / seconds as f64;
    let mut rows = Vec::new();

    let start = Instant::now();
    let mut resampler = StreamResampler::new(MIC_RATE, blocks.sample_rate)?;
    let mut resampled = Vec::with_capacity(mic.len());
    for chunk in mic.chunks(piece) {
        resampled.extend(resampler.push(chunk)?);
    }
    rows.push(Measurement::new(
        "input: resample",
        format!("{MIC_RATE} -> {} Hz, 20 ms pieces", blocks.sample_rate),
        per_second(start.elapsed()),
        "ms CPU / s of call",
    ));

    // The microphone as WebRTC carries it: 20 ms Opus packets, decoded at 48 kHz and
    // resampled, or decoded straight at the model's rate when Opus can (what `serve` does).
    let mut encoder = OpusEncoder::new(MIC_RATE)?;
    let packets = mic
        .chunks_exact(piece)
        .map(|frame| encoder.encode(frame))
        .collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    let mut decoder = OpusDecoder::new()?;
    let mut resampler = StreamResampler::new(MIC_RATE, blocks.sample_rate)?;
    for packet in &packets {
        std::hint::black_box(resampler.push(&decoder.decode(packet)?)?);
    }
    rows.push(Measurement::new(
        "input: Opus decode at 48 kHz + resample",
        format!("{} packets of 20 ms", packets.len()),
        per_second(start.elapsed()),
        "ms CPU / s of call",
    ));
    if OPUS_INPUT_RATES.contains(&blocks.sample_rate) {
        let start = Instant::now();
        let mut decoder = OpusDecoder::with_rate(blocks.sample_rate)?;
        for packet in &packets {
            std::hint::black_box(decoder.decode(packet)?);
        }
        rows.push(Measurement::new(
            "input: Opus decode at the model's rate",
            format!(
                "{} Hz, {} packets of 20 ms",
                blocks.sample_rate,
                packets.len()
            ),
            per_second(start.elapsed()),
            "ms CPU / s of call",
        ));
    }

    let vad_config = VadConfig::default();
    let start = Instant::now();
    let mut vad = VoiceDetector::new(vad_config.clone(), blocks.sample_rate, Duration::ZERO)?;
    let mut speech = 0;
    for chunk in resampled.chunks(piece / 3) {
        speech += vad.push(chunk).iter().filter(|d| d.speech).count();
    }
    rows.push(Measurement::new(
        "input: VAD",
        format!(
            "{:?}, {:?} frames, {speech} speech frames",
            vad_config.backend, vad_config.frame
        ),
        per_second(start.elapsed()),
        "ms CPU / s of call",
    ));

    let clock = Arc::new(SimulatedClock::new());
    // The stage alone has no end-of-turn model: the silence rule ends its turns; Silero does
    // not hear the voice-like signal as speech, WebRTC's VAD does.
    let mut input = InputConfig::new(blocks.clone(), &SessionConfig::default());
    input.turn.detection = TurnDetection::Silence;
    input.vad = VadConfig::webrtc();
    let mut stage = InputStage::new(input, clock.clone())?;
    let picture = Arc::new(vec![128u8; CAMERA_SIZE.0 * CAMERA_SIZE.1 * 3]);
    let (mut turns, mut block_count) = (0, 0);
    let mut count = |events: Vec<InputEvent>, stage: &mut InputStage| {
        for e in events {
            match e {
                InputEvent::TurnEnded { turn, .. } => {
                    turns += 1;
                    // the answer is over at once, so that the next burst is a new turn
                    stage.answer_finished(turn);
                    block_count += 1;
                }
                InputEvent::Block { .. } => block_count += 1,
                _ => {}
            }
        }
    };
    let mut next_frame = 0u64;
    let start = Instant::now();
    for (k, chunk) in mic.chunks(piece).enumerate() {
        let at = Duration::from_millis(k as u64 * PIECE_MS);
        let end = at + Duration::from_millis(PIECE_MS);
        clock.set(end);
        while Duration::from_nanos(next_frame * 1_000_000_000 / CAMERA_FPS) < end {
            let events = stage.push_video(VideoInput {
                at: Duration::from_nanos(next_frame * 1_000_000_000 / CAMERA_FPS),
                width: CAMERA_SIZE.0,
                height: CAMERA_SIZE.1,
                rgb: picture.clone(),
            })?;
            count(events, &mut stage);
            next_frame += 1;
        }
        let events = stage.push_audio(AudioInput {
            at,
            sample_rate: MIC_RATE,
            samples: chunk.to_vec(),
        })?;
        count(events, &mut stage);
        let events = stage.tick()?;
        count(events, &mut stage);
    }
    rows.push(Measurement::new(
        "input: whole stage",
        format!(
            "{seconds} s call, {MIC_RATE} Hz mic in 20 ms pieces, {CAMERA_FPS} fps {}x{} camera, \
             {turns} turns, {block_count} blocks",
            CAMERA_SIZE.0, CAMERA_SIZE.1
        ),
        per_second(start.elapsed()),
        "ms CPU / s of call",
    ));
    Ok(rows)
}

/// A clock that stands still until the driver moves it, then, once [`SwitchClock::run`] is
/// called, follows the wall clock from where it stood.
#[derive(Debug, Default)]
pub struct SwitchClock {
    state: Mutex<(Duration, Option<Instant>)>,
    moved: Condvar,
}

impl SwitchClock {
    pub fn advance(&self, by: Duration) {
        let mut s = self.state.lock().expect("clock lock");
        if s.1.is_none() {
            s.0 += by;
        }
        self.moved.notify_all();
    }

    /// From now on the clock follows the wall clock.
    pub fn run(&self) {
        let mut s = self.state.lock().expect("clock lock");
        if s.1.is_none() {
            s.1 = Some(Instant::now());
        }
        self.moved.notify_all();
    }
}

impl Clock for SwitchClock {
    fn now(&self) -> Duration {
        let s = self.state.lock().expect("clock lock");
        s.0 + s.1.map_or(Duration::ZERO, |since| since.elapsed())
    }

    fn sleep_until(&self, deadline: Duration) {
        let mut s = self.state.lock().expect("clock lock");
        loop {
            let now = s.0 + s.1.map_or(Duration::ZERO, |since| since.elapsed());
            if now >= deadline {
                return;
            }
            if s.1.is_some() {
                drop(s);
                std::thread::sleep(deadline - now);
                s = self.state.lock().expect("clock lock");
            } else {
                s = self.moved.wait(s).expect("clock lock");
            }
        }
    }
}

/// A bench session and the events it gave.
struct Driver {
    clock: Arc<SwitchClock>,
    handle: SessionHandle,
    probe: SessionProbe,
    sent: u64,
    events: Vec<SessionEvent>,
    settle_timeout: Duration,
}

impl Driver {
    fn spawn(model: &OmniModel, config: SessionConfig, settle_timeout: Duration) -> Result<Self> {
        let clock = Arc::new(SwitchClock::default());
        let (handle, probe) = spawn_with(model, config, clock.clone(), true)?;
        let mut driver = Self {
            clock,
            handle,
            probe,
            sent: 0,
            events: Vec::new(),
            settle_timeout,
        };
        driver.settle()?;
        Ok(driver)
    }

    fn send(&mut self, input: SessionInput) -> Result<()> {
        self.handle
            .input
            .send(input)
            .map_err(|_| anyhow::anyhow!("the session ended"))?;
        self.sent += 1;
        Ok(())
    }

    fn collect(&mut self) {
        self.events.extend(self.handle.events.try_iter());
    }

    fn settle(&mut self) -> Result<()> {
        if !self.probe.wait_quiescent(self.sent, self.settle_timeout) {
            bail!(
                "the session did not settle within {:?}",
                self.settle_timeout
            );
        }
        self.collect();
        Ok(())
    }

    /// One 20 ms step of simulated time: a piece of microphone audio (and maybe a camera
    /// frame) sent when it was captured, then everything the session can do.
    fn simulated_step(&mut self, mic: &[f32], frame: Option<VideoInput>) -> Result<()> {
        let at = self.clock.now();
        self.clock.advance(TICK);
        self.settle()?;
        if let Some(frame) = frame {
            self.send(SessionInput::Video(frame))?;
        }
        self.send(SessionInput::Audio(AudioInput {
            at,
            sample_rate: MIC_RATE,
            samples: mic.to_vec(),
        }))?;
        self.settle()
    }

    fn answered(&self, turn: u64) -> bool {
        self.events.iter().any(|e| {
            matches!(e, SessionEvent::AnswerDone { turn: t } | SessionEvent::Interrupted { turn: t, .. } if *t == turn)
        })
    }

    fn errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Error(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    fn close(self) -> Result<()> {
        let _ = self.handle.input.send(SessionInput::Close);
        drop(self.handle);
        // The pacer and the ticker sleep on the clock: let them see the end.
        self.clock.run();
        if !self.probe.join(Duration::from_secs(600)) {
            bail!("the session's threads did not end");
        }
        Ok(())
    }
}

/// The voice-like test signal at the microphone's rate: `on` seconds of a 120 Hz harmonic
/// complex with a syllable-rate envelope, then `off` seconds of silence, repeated.
fn speech_bursts(seconds: f64, on: f64, off: f64) -> Vec<f32> {
    let rate = MIC_RATE as f64;
    (0..(seconds * rate) as usize)
        .map(|i| {
            let t = i as f64 / rate;
            if t % (on + off) >= on {
                return 0.0;
            }
            let envelope = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * 4.0 * t).cos();
            let voice: f64 = (1..=20)
                .map(|h| (2.0 * std::f64::consts::PI * 120.0 * h as f64 * t).sin() / h as f64)
                .sum();
            (0.1 * envelope * voice) as f32
        })
        .collect()
}

/// How much a [`bench_engine`] run does.
#[derive(Debug, Clone)]
pub struct EngineBenchSizes {
    /// Length of the scripted call of the overhead figure (`None`: not measured; it runs the
    /// model for every turn, too slow at full size on a CPU).
    pub overhead_call: Option<Duration>,
    /// Speech of the timed turn.
    pub turn_speech: Duration,
    /// Wall time allowed for the timed turn's first frame.
    pub latency_timeout: Duration,
    /// Tokens of the random model's answers, and the longest spoken answer.
    pub max_answer_tokens: usize,
    pub max_speech: Duration,
    /// Timed turns of the latency figure, each in a fresh session (medians are reported).
    pub turns: usize,
    /// Length of the call with a camera whose KV cache growth is measured (`None`: not
    /// measured; it runs the vision encoder at the camera's size and every answer).
    pub kv_call: Option<Duration>,
}

impl EngineBenchSizes {
    /// The overhead call for models whose Thinker is small (test models), the latency turn
    /// for every model.
    pub fn for_config(config: &Config) -> Self {
        let text = &config.thinker_config.text_config;
        let small = text.hidden_size * text.num_hidden_layers <= 4096;
        Self {
            overhead_call: small.then_some(Duration::from_secs(60)),
            turn_speech: Duration::from_secs(3),
            latency_timeout: Duration::from_secs(if small { 60 } else { 1800 }),
            max_answer_tokens: 48,
            max_speech: Duration::from_secs(if small { 6 } else { 2 }),
            turns: 1,
            kv_call: None,
        }
    }
}

/// The engine's figures for a model of `config`'s shapes with random weights (see the module
/// doc). `omnicall bench model --stages engine`.
pub fn bench_engine(config: &Config, dtype: DType, device: &Device) -> Result<Vec<Measurement>> {
    bench_engine_with(config, dtype, device, EngineBenchSizes::for_config(config))
}

pub fn bench_engine_with(
    config: &Config,
    dtype: DType,
    device: &Device,
    sizes: EngineBenchSizes,
) -> Result<Vec<Measurement>> {
    config.validate().context("engine bench config")?;
    // The KV growth call sends camera frames: the vision tower needs its blocks then.
    let model = random_model_with(config, dtype, device, sizes.kv_call.is_some())
        .context("random model")?;
    let text = &config.thinker_config.text_config;
    let label = format!(
        "{} layers x {}, {dtype:?}, random weights",
        text.num_hidden_layers, text.hidden_size
    );
    bench_engine_on(&model, &label, &sizes)
}

/// The engine's figures on a loaded model (a checkpoint or [`random_model`]).
pub fn bench_engine_on(
    model: &OmniModel,
    label: &str,
    sizes: &EngineBenchSizes,
) -> Result<Vec<Measurement>> {
    let mut rows = Vec::new();
    if let Some(call) = sizes.overhead_call {
        rows.extend(engine_overhead(model, label, call, sizes)?);
    }
    rows.extend(first_frame_latency(model, label, sizes)?);
    if let Some(call) = sizes.kv_call {
        rows.extend(kv_growth(model, label, call, sizes)?);
    }
    Ok(rows)
}

fn session_config(model: &OmniModel, sizes: &EngineBenchSizes) -> SessionConfig {
    let voice = model
        .speech
        .as_ref()
        .and_then(|s| s.voices.names().first().map(|n| n.to_string()))
        .unwrap_or_else(|| BENCH_VOICE.into());
    // The scripted call's bursts are a voice-like signal, not words: Smart Turn has nothing to
    // judge in them and Silero does not hear them as speech, so the silence rule and WebRTC's
    // VAD take its turns.
    let turn = TurnConfig {
        detection: TurnDetection::Silence,
        ..TurnConfig::default()
    };
    SessionConfig {
        voice,
        turn,
        vad: VadConfig::webrtc(),
        system_prompt: "You are a helpful assistant.".into(),
        max_answer_tokens: sizes.max_answer_tokens,
        max_speech: sizes.max_speech,
        // Camera frames of the overhead call: small, so the vision encoder costs little.
        video_min_pixels: 4 * 28 * 28,
        video_max_pixels: 16 * 28 * 28,
        ..SessionConfig::default()
    }
}

/// CPU time of the session's threads outside the model's calls, per second of a scripted
/// call on simulated time.
pub fn engine_overhead(
    model: &OmniModel,
    label: &str,
    call: Duration,
    sizes: &EngineBenchSizes,
) -> Result<Vec<Measurement>> {
    let mut driver = Driver::spawn(
        model,
        session_config(model, sizes),
        Duration::from_secs(600),
    )?;
    let (on, off) = (3.0, 6.0);
    let mic = speech_bursts(call.as_secs_f64(), on, off);
    let piece = (MIC_RATE as u128 * TICK.as_millis() / 1000) as usize;
    let picture = Arc::new(vec![128u8; CAMERA_SIZE.0 * CAMERA_SIZE.1 * 3]);
    let before = threads_cpu(&SESSION_THREADS).context("thread CPU times (Linux /proc)")?;
    let model_before = driver.probe.model_time().unwrap_or_default();
    let mut next_frame = 0u64;
    for chunk in mic.chunks(piece) {
        let end = driver.clock.now() + TICK;
        let frame_at = Duration::from_nanos(next_frame * 1_000_000_000 / CAMERA_FPS);
        let frame = (frame_at < end).then(|| {
            next_frame = (end.as_nanos() as u64 * CAMERA_FPS).div_ceil(1_000_000_000);
            VideoInput {
                at: frame_at,
                width: CAMERA_SIZE.0,
                height: CAMERA_SIZE.1,
                rgb: picture.clone(),
            }
        });
        driver.simulated_step(chunk, frame)?;
    }
    let after = threads_cpu(&SESSION_THREADS).context("thread CPU times")?;
    let model_time = driver.probe.model_time().unwrap_or_default();
    let turns = driver
        .events
        .iter()
        .filter(|e| matches!(e, SessionEvent::UserTurn { .. }))
        .count();
    let frames = driver
        .events
        .iter()
        .filter(|e| matches!(e, SessionEvent::Audio { .. }))
        .count();
    let errors = driver.errors();
    driver.close()?;
    if !errors.is_empty() {
        bail!("the scripted call had errors: {errors:?}");
    }
    let seconds = call.as_secs_f64();
    let per_second = |d: Duration| d.as_secs_f64() * 1e3 / seconds;
    let used = |name: &str| {
        let a = after.get(name).copied().unwrap_or_default();
        a.saturating_sub(before.get(name).copied().unwrap_or_default())
    };
    let model = |f: fn(&ModelTimes) -> Duration| f(&model_time).saturating_sub(f(&model_before));
    // Each thread's CPU outside the model's calls it makes.
    let threads = [
        ("control", used("session-control"), Duration::ZERO),
        ("pacer", used("pacer"), Duration::ZERO),
        ("ticker", used("session-ticker"), Duration::ZERO),
        (
            "thinker",
            used("session-thinker"),
            model(|m| m.encoders) + model(|m| m.thinker),
        ),
        ("talker", used("session-talker"), model(|m| m.talker)),
        ("vocoder", used("session-vocoder"), model(|m| m.vocoder)),
    ];
    let overhead: Duration = threads.iter().map(|(_, t, m)| t.saturating_sub(*m)).sum();
    let setup = format!(
        "{label}; {seconds:.0} s call: {on:.0} s speech bursts at {MIC_RATE} Hz, {CAMERA_FPS} fps \
         {}x{} camera, {turns} turns, {frames} voice frames out",
        CAMERA_SIZE.0, CAMERA_SIZE.1
    );
    let mut rows = vec![Measurement::new(
        "engine: overhead",
        format!("{setup}; session threads' CPU minus the model's calls"),
        per_second(overhead),
        "ms CPU / s of call",
    )];
    for (name, total, in_model) in threads {
        rows.push(Measurement::new(
            &format!("engine: overhead, {name} thread"),
            format!("{label}; same call, outside the model's calls"),
            per_second(total.saturating_sub(in_model)),
            "ms CPU / s of call",
        ));
    }
    for (stage, d) in [
        ("engine: model, encoders", model(|m| m.encoders)),
        ("engine: model, Thinker", model(|m| m.thinker)),
        ("engine: model, Talker", model(|m| m.talker)),
        ("engine: model, token2wav", model(|m| m.vocoder)),
    ] {
        rows.push(Measurement::new(
            stage,
            format!("{label}; same call"),
            per_second(d),
            "ms CPU / s of call",
        ));
    }
    Ok(rows)
}

/// End of turn to first output frame, by stage: the turn fed on simulated time, the clock
/// following the wall clock from the end of the user's speech on; `sizes.turns` turns, each in
/// a fresh session, medians reported.
pub fn first_frame_latency(
    model: &OmniModel,
    label: &str,
    sizes: &EngineBenchSizes,
) -> Result<Vec<Measurement>> {
    let turns = sizes.turns.max(1);
    let mut all = Vec::with_capacity(turns);
    for i in 0..turns {
        let t = timed_turn(model, sizes).with_context(|| format!("timed turn {}", i + 1))?;
        all.push(t);
    }
    latency_rows(&all, label, sizes)
}

/// One spoken turn in a fresh session, its marks once the first frame is out.
fn timed_turn(model: &OmniModel, sizes: &EngineBenchSizes) -> Result<TurnTimings> {
    let mut driver = Driver::spawn(model, session_config(model, sizes), sizes.latency_timeout)?;
    let piece = (MIC_RATE as u128 * TICK.as_millis() / 1000) as usize;
    let speech = speech_bursts(sizes.turn_speech.as_secs_f64(), 1e9, 0.0);
    let silence = vec![0.0f32; piece];
    for _ in 0..10 {
        driver.simulated_step(&silence, None)?;
    }
    for chunk in speech.chunks(piece) {
        driver.simulated_step(chunk, None)?;
    }
    // From the user's last word on, everything runs at this machine's speed.
    driver.clock.run();
    let start = Instant::now();
    let mut next = driver.clock.now();
    let turn = 1;
    let timings = loop {
        if start.elapsed() > sizes.latency_timeout {
            bail!(
                "no output frame and its marks {:?} after the end of speech",
                sizes.latency_timeout
            );
        }
        driver.clock.sleep_until(next + TICK);
        driver.send(SessionInput::Audio(AudioInput {
            at: next,
            sample_rate: MIC_RATE,
            samples: silence.clone(),
        }))?;
        next += TICK;
        driver.collect();
        if driver
            .events
            .iter()
            .any(|e| matches!(e, SessionEvent::Audio { turn: t, .. } if *t == turn))
        {
            if let Some(marks) = driver.probe.timings(turn) {
                break marks;
            }
            // a short answer has ended already: its marks go out in its Timings event
            if let Some(marks) = driver.events.iter().find_map(|e| match e {
                SessionEvent::Timings(t) if t.turn == turn => Some(t.clone()),
                _ => None,
            }) {
                break marks;
            }
            continue;
        }
        if driver.answered(turn) {
            bail!("the answer ended without a sound: {:?}", driver.errors());
        }
    };
    let errors = driver.errors();
    driver.close()?;
    if !errors.is_empty() {
        bail!("the timed turn had errors: {errors:?}");
    }
    Ok(timings)
}

/// KV cache growth per minute of a call with a camera: a scripted call of `call` (speech
/// bursts, a 640x480 camera at 30 fps sampled at the session's rate and pixel bounds, spoken
/// answers) on simulated time; the Thinker's and the Talker's cache lengths before and after,
/// in positions and bytes (K and V of every layer in the model's dtype).
pub fn kv_growth(
    model: &OmniModel,
    label: &str,
    call: Duration,
    sizes: &EngineBenchSizes,
) -> Result<Vec<Measurement>> {
    let config = SessionConfig {
        video_min_pixels: SessionConfig::default().video_min_pixels,
        video_max_pixels: SessionConfig::default().video_max_pixels,
        ..session_config(model, sizes)
    };
    let mut driver = Driver::spawn(model, config, Duration::from_secs(1800))?;
    let before = driver.probe.context();
    let (on, off) = (3.0, 6.0);
    let mic = speech_bursts(call.as_secs_f64(), on, off);
    let piece = (MIC_RATE as u128 * TICK.as_millis() / 1000) as usize;
    let picture = Arc::new(camera_picture());
    let mut next_frame = 0u64;
    for chunk in mic.chunks(piece) {
        let end = driver.clock.now() + TICK;
        let frame_at = Duration::from_nanos(next_frame * 1_000_000_000 / CAMERA_FPS);
        let frame = (frame_at < end).then(|| {
            next_frame = (end.as_nanos() as u64 * CAMERA_FPS).div_ceil(1_000_000_000);
            VideoInput {
                at: frame_at,
                width: CAMERA_SIZE.0,
                height: CAMERA_SIZE.1,
                rgb: picture.clone(),
            }
        });
        driver.simulated_step(chunk, frame)?;
    }
    let after = driver.probe.context();
    let turns = driver
        .events
        .iter()
        .filter(|e| matches!(e, SessionEvent::UserTurn { .. }))
        .count();
    let errors = driver.errors();
    driver.close()?;
    if !errors.is_empty() {
        bail!("the KV growth call had errors: {errors:?}");
    }
    let minutes = call.as_secs_f64() / 60.0;
    let dtype_bytes = model.thinker.dtype().size_in_bytes();
    let text = &model.config.thinker_config.text_config;
    let thinker_head_dim = text
        .head_dim
        .unwrap_or(text.hidden_size / text.num_attention_heads.max(1));
    let thinker_bytes =
        2 * text.num_hidden_layers * text.num_key_value_heads * thinker_head_dim * dtype_bytes;
    let talker = &model.config.talker_config;
    let talker_bytes =
        2 * talker.num_hidden_layers * talker.num_key_value_heads * talker.head_dim * dtype_bytes;
    let setup = format!(
        "{label}; {:.0} s call: {on:.0} s speech bursts, {}x{} camera at {CAMERA_FPS} fps, \
         {turns} turns with spoken answers",
        call.as_secs_f64(),
        CAMERA_SIZE.0,
        CAMERA_SIZE.1
    );
    let grown = |a: usize, b: usize| b.saturating_sub(a) as f64 / minutes;
    let thinker_positions = grown(before.thinker_cache, after.thinker_cache);
    let talker_positions = grown(
        before.talker_cache.unwrap_or(0),
        after.talker_cache.unwrap_or(0),
    );
    Ok(vec![
        Measurement::new(
            "engine: Thinker KV growth",
            setup.clone(),
            thinker_positions,
            "positions / min of call",
        ),
        Measurement::new(
            "engine: Thinker KV growth, bytes",
            format!("{setup}; {thinker_bytes} bytes a position"),
            thinker_positions * thinker_bytes as f64 / 1e6,
            "MB / min of call",
        ),
        Measurement::new(
            "engine: Talker KV growth, bytes",
            format!("{setup}; {talker_bytes} bytes a position"),
            talker_positions * talker_bytes as f64 / 1e6,
            "MB / min of call",
        ),
    ])
}

/// A camera picture with some structure (a gradient), RGB at [`CAMERA_SIZE`].
fn camera_picture() -> Vec<u8> {
    let (w, h) = CAMERA_SIZE;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            rgb.extend([(x * 255 / w) as u8, (y * 255 / h) as u8, 128]);
        }
    }
    rgb
}

fn latency_rows(
    all: &[TurnTimings],
    label: &str,
    sizes: &EngineBenchSizes,
) -> Result<Vec<Measurement>> {
    let mark = |m: Option<Duration>, what: &str| m.with_context(|| format!("no {what} mark"));
    // Per turn: the marks in stage order.
    let mut marks: Vec<[Duration; 7]> = Vec::new();
    for t in all {
        marks.push([
            mark(t.speech_end, "speech_end")?,
            mark(t.end_of_turn, "end_of_turn")?,
            mark(t.prefill_done, "prefill_done")?,
            mark(t.first_text_token, "first_text_token")?,
            mark(t.first_codec_token, "first_codec_token")?,
            mark(t.first_waveform_chunk, "first_waveform_chunk")?,
            mark(t.first_audio_frame, "first_audio_frame")?,
        ]);
    }
    let turns = marks.len();
    let setup = format!(
        "{label}; {:.1} s spoken turn (its blocks prefilled while it was spoken), wall clock \
         from the end of speech{}",
        sizes.turn_speech.as_secs_f64(),
        if turns > 1 {
            format!("; median of {turns} turns, each in a fresh session")
        } else {
            String::new()
        }
    );
    // The median over the turns of the time from mark `a` to mark `b`, and the p90.
    let between = |a: usize, b: usize| -> Vec<f64> {
        let mut v: Vec<f64> = marks
            .iter()
            .map(|m| m[b].saturating_sub(m[a]).as_secs_f64() * 1e3)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let median = |a: usize, b: usize| between(a, b)[turns / 2];
    let mut rows = vec![
        Measurement::new(
            "engine: speech end -> end of turn",
            format!("{setup}; the silence rule"),
            median(0, 1),
            "ms",
        ),
        Measurement::new(
            "engine: end of turn -> prefill done",
            format!("{setup}; last partial block + assistant header"),
            median(1, 2),
            "ms",
        ),
        Measurement::new(
            "engine: prefill done -> first text token",
            setup.clone(),
            median(2, 3),
            "ms",
        ),
        Measurement::new(
            "engine: first text token -> first codec token",
            format!("{setup}; Talker after its mirrored prompt"),
            median(3, 4),
            "ms",
        ),
        Measurement::new(
            "engine: first codec token -> first waveform chunk",
            format!("{setup}; streaming token2wav, low-latency chunks"),
            median(4, 5),
            "ms",
        ),
        Measurement::new(
            "engine: first waveform chunk -> first audio frame",
            format!("{setup}; pacer"),
            median(5, 6),
            "ms",
        ),
        Measurement::new(
            "engine: end of turn -> first audio frame",
            setup.clone(),
            median(1, 6),
            "ms",
        ),
    ];
    if turns > 1 {
        let v = between(1, 6);
        let p90 = v[((turns * 9).div_ceil(10)).saturating_sub(1).min(turns - 1)];
        rows.push(Measurement::new(
            "engine: end of turn -> first audio frame, p90",
            setup,
            p90,
            "ms",
        ));
    }
    Ok(rows)
}

/// The name of the random model's one voice.
pub const BENCH_VOICE: &str = "bench";

/// GPT-2's reversible map of bytes to printable characters (what byte-level BPE vocabularies
/// are written in).
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut by_byte = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(&chars) {
        by_byte[*b as usize] = char::from_u32(*c).expect("valid char");
    }
    by_byte
}

/// A byte-level tokenizer for a model without its tokenizer files: one token per UTF-8
/// byte (ids 0..255), and the chat template's special tokens at the ids `config` gives
/// (`<|im_end|>` at the Thinker's EOS id, `<|im_start|>` just before it, `<|endoftext|>` at
/// the pad id, the media markers at theirs).
pub fn byte_level_tokenizer(config: &Config) -> Result<tokenizers::Tokenizer> {
    let t = &config.thinker_config;
    let eos = *t
        .eos_token_ids()
        .first()
        .context("the config has no eos_token_id")?;
    let im_start = eos.checked_sub(1).context("eos_token_id is 0")?;
    let mut special = vec![
        (im_start, "<|im_start|>".to_string()),
        (eos, "<|im_end|>".to_string()),
        (t.audio_token_index, "<|AUDIO|>".into()),
        (t.audio_start_token_id, "<|audio_bos|>".into()),
        (t.audio_end_token_id, "<|audio_eos|>".into()),
        (t.image_token_index, "<|IMAGE|>".into()),
        (t.video_token_index, "<|VIDEO|>".into()),
        (t.vision_start_token_id, "<|vision_bos|>".into()),
        (t.vision_end_token_id, "<|vision_eos|>".into()),
    ];
    if let Some(pad) = t.pad_token_id {
        special.push((pad, "<|endoftext|>".into()));
    }
    let mut ids: Vec<u32> = special.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != special.len() || ids[0] < 256 {
        bail!("the config's special token ids collide with each other or with the 256 bytes");
    }
    // The special tokens are in the model's vocabulary too, at their ids (as in Qwen's).
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), serde_json::Value::from(id)))
        .chain(
            special
                .iter()
                .map(|(id, content)| (content.clone(), serde_json::Value::from(*id))),
        )
        .collect();
    let added: Vec<serde_json::Value> = special
        .iter()
        .map(|(id, content)| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    json.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(anyhow::Error::msg)
        .context("building the byte-level tokenizer")
}

/// Random weights whose Thinker LM head is the embedding matrix (the same matmul, 1.2 GB
/// less at 3B shapes in f32).
#[derive(Debug, Clone, Copy)]
struct TiedHead;

impl SimpleBackend for TiedHead {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        hint: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        RandomWeights.get(shape, name, hint, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        RandomWeights.get_unchecked(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        name != "thinker.lm_head.weight"
    }
}

/// A whole model of `config`'s shapes with random weights: Thinker (its LM head tied to the
/// embedding), audio encoder, Talker and token2wav (f32) at full size, one random voice; the
/// vision encoder without its blocks (the benchmark's turns never call it; its blocks would
/// take 2.6 GB at 3B shapes).
pub fn random_model(config: &Config, dtype: DType, device: &Device) -> Result<OmniModel> {
    random_model_with(config, dtype, device, false)
}

/// [`random_model`] with the vision encoder's blocks when `vision_blocks` (a camera costs what
/// it costs: `omnicall serve --random-weights`); without them, the engine bench's audio-only
/// turns do not hold the tower's memory.
pub fn random_model_with(
    config: &Config,
    dtype: DType,
    device: &Device,
    vision_blocks: bool,
) -> Result<OmniModel> {
    let vb = VarBuilder::from_backend(Box::new(TiedHead), dtype, device.clone());
    let t = &config.thinker_config;
    let tokenizer = ChatTokenizer::new(byte_level_tokenizer(config)?, t)?;
    let thinker = Thinker::new(t, vb.pp("thinker"))?;
    let audio_encoder = AudioEncoder::new(&t.audio_config, vb.pp("thinker.audio_tower"))?;
    let mut vision = t.vision_config.clone();
    if !vision_blocks {
        vision.depth = 0;
        vision.fullatt_block_indexes.clear();
    }
    let vision_encoder = VisionEncoder::new(&vision, vb.pp("thinker.visual"))?;
    let talker = Talker::new(&config.talker_config, vb.pp("talker"))?;
    let f32_vb = RandomWeights::var_builder(DType::F32, device);
    let token2wav = Token2Wav::new(&config.token2wav_config, f32_vb.pp("token2wav"))?;
    let dit = &config.token2wav_config.dit_config;
    let rows = |n: usize, width: usize, phase: f64| -> Result<Tensor> {
        let v: Vec<f32> = (0..n * width)
            .map(|i| ((i as f64 * 0.618 + phase).sin() * 0.5) as f32)
            .collect();
        Ok(Tensor::from_vec(v, (n, width), device)?)
    };
    let voice = Voice {
        name: BENCH_VOICE.into(),
        bos_token: t.audio_start_token_id,
        cond: rows(1, dit.enc_emb_dim, 5.0)?,
        // log-mel-like values around -5, as long as the published voices' 400 frames
        ref_mel: rows(400, dit.mel_dim, 6.0)?
            .affine(4.0, -5.0)?
            .unsqueeze(0)?,
    };
    Ok(OmniModel {
        config: config.clone(),
        processor: ProcessorConfig::default(),
        generation: GenerationConfig::default(),
        tokenizer,
        thinker,
        audio_encoder,
        vision_encoder,
        speech: Some(Speech {
            talker,
            token2wav,
            voices: Voices::from_voices([voice])?,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str) -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
        Config::from_json(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn the_byte_level_tokenizer_has_the_templates_tokens_at_the_configs_ids() {
        for name in ["models/3b/config.json", "models/tiny/config.json"] {
            let cfg = config(name);
            let chat = ChatTokenizer::new(byte_level_tokenizer(&cfg).unwrap(), &cfg.thinker_config)
                .unwrap();
            let s = chat.special();
            assert_eq!(s.im_end.id, cfg.thinker_config.eos_token_ids()[0]);
            assert_eq!(s.audio.id, cfg.thinker_config.audio_token_index);
            let ids = chat
                .encode(&format!("{}user\nhé", s.im_start.text))
                .unwrap();
            assert_eq!(
                ids,
                [s.im_start.id, 117, 115, 101, 114, 10, 104, 0xC3, 0xA9]
            );
            assert_eq!(chat.decode(&ids[1..]).unwrap(), "user\nhé");
        }
    }

    #[test]
    fn the_engine_bench_runs_a_call_and_times_a_turn_on_the_tiny_shapes() {
        let cfg = config("models/tiny/config.json");
        let sizes = EngineBenchSizes {
            overhead_call: Some(Duration::from_secs(20)),
            max_speech: Duration::from_millis(1500),
            ..EngineBenchSizes::for_config(&cfg)
        };
        let rows = bench_engine_with(&cfg, DType::F32, &Device::Cpu, sizes).unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.stage.as_str()).collect();
        assert_eq!(names[0], "engine: overhead");
        assert!(rows[0].setup.contains("2 turns"), "{}", rows[0].setup);
        assert!(names.contains(&"engine: end of turn -> first audio frame"));
        assert!(rows.iter().all(|r| r.value.is_finite() && r.value >= 0.0));
        assert!(rows[0].value > 0.0);
    }

    #[test]
    fn the_cost_run_takes_turns_and_reports_each_stage() {
        let blocks = BlockConfig {
            sample_rate: 16_000,
            block_len: Duration::from_secs(2),
            video_fps: 2.0,
            temporal_patch_size: 2,
        };
        let rows = input_stage_cost(&blocks, 10).unwrap();
        let stages: Vec<&str> = rows.iter().map(|r| r.stage.as_str()).collect();
        assert_eq!(
            stages,
            [
                "input: resample",
                "input: Opus decode at 48 kHz + resample",
                "input: Opus decode at the model's rate",
                "input: VAD",
                "input: whole stage"
            ]
        );
        assert!(rows.iter().all(|r| r.value > 0.0));
        // two bursts of the voice-like signal: two turns
        assert!(rows[4].setup.contains("2 turns"), "{}", rows[4].setup);
    }
}
