//! `omnicall local`: a call with the model from this machine's microphone, speaker and camera,
//! or from WAV files for tests and headless machines.
//!
//! The transport drives a session only through its [`SessionHandle`]: it pushes the user's
//! audio (mono, any rate, dated on the session clock) and camera frames, and takes the events:
//! the model's voice in 20 ms frames (to a [`sink::AudioSink`]), text and state (to the
//! [`transcript::Transcript`]). A microphone and a WAV file are the same
//! [`source::AudioSource`]; a speaker and a WAV file the same [`sink::AudioSink`], so files
//! exercise the device path. A loudspeaker's echo is kept from barging in by the echo canceller
//! or the half-duplex gate ([`echo`]), which read what the sink plays through [`far_end`]; a
//! file input can be given a simulated echo of it.
//!
//! Threads: the caller's thread runs the event loop (and owns the sink), a feeder thread moves
//! audio from the source through the echo handling into the session, the camera has its own, and an
//! optional keyboard thread reads typed messages. A file input ends the run once the file is
//! over and the session is idle again (every turn answered or cut, nothing left to play).

pub mod camera;
pub mod cli;
pub mod device;
pub mod echo;
pub mod far_end;
pub mod runner;
pub mod sink;
pub mod source;
pub mod transcript;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::engine::clock::{Clock, SystemClock};
use crate::engine::session::{SessionConfig, SessionHandle, TurnTimings};
pub use crate::media::echo::{CancellerConfig, CancellerStats, EchoPathConfig};

pub use camera::{CameraChoice, CameraInfo, CameraSettings};
pub use device::{DeviceChoice, SoundDevices};
pub use echo::{EchoMode, EchoStageConfig, EchoStageStats, GateConfig, GateStats};
pub use runner::{AnswerOutcome, AnswerRecord, LocalSummary, StopCause, UserTurnRecord};
pub use sink::SinkStats;
pub use source::SourceStats;
pub use transcript::TranscriptWriter;

/// Creates the session a run talks to: the engine with its model, on the given clock.
pub type SessionFactory =
    Arc<dyn Fn(SessionConfig, Arc<dyn Clock>) -> anyhow::Result<SessionHandle> + Send + Sync>;

/// Where the user's audio comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioIn {
    Microphone(DeviceChoice),
    /// A WAV file played in at the session clock's pace, then silence until the answers end.
    File(PathBuf),
}

/// Where the model's voice goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioOut {
    Speaker(DeviceChoice),
    /// A mono 16-bit WAV file at `sample_rate`, aligned in time with the input.
    File {
        path: PathBuf,
        sample_rate: u32,
    },
    /// Nowhere (a transcript-only run).
    Discard,
}

/// Whether the microphone hears what the output plays: a microphone and a speaker (devices),
/// or a simulated echo. `EchoMode::Auto` cancels the echo then.
pub fn microphone_hears_speaker(input: &AudioIn, output: &AudioOut, simulated_echo: bool) -> bool {
    simulated_echo
        || matches!(
            (input, output),
            (AudioIn::Microphone(_), AudioOut::Speaker(_))
        )
}

/// The rate of output files unless told otherwise: Qwen2.5-Omni speaks at 24 kHz; voice at
/// another rate is resampled to the file's.
pub const DEFAULT_OUTPUT_FILE_RATE: u32 = 24_000;

/// Asks a running call to stop (Ctrl-C, a test); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Stops `stop` on the first Ctrl-C; a second one exits the process at once (status 130).
pub fn stop_on_ctrl_c(stop: StopHandle) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            runtime.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    stop.stop();
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                }
            })
        })?;
    Ok(())
}

/// Everything a local call needs besides the session.
pub struct LocalOptions {
    pub input: AudioIn,
    pub output: AudioOut,
    pub camera: CameraChoice,
    pub camera_settings: CameraSettings,
    pub echo: EchoMode,
    /// With a file input: the model's voice, as played, fed back into the input through a
    /// simulated loudspeaker-to-microphone path.
    pub simulate_echo: Option<EchoPathConfig>,
    pub session: SessionConfig,
    /// The speaker's jitter buffer: an answer starts playing once this much of it is queued.
    pub playback_buffer: Duration,
    /// Print every state change and each turn's timing marks as they come.
    pub verbose: bool,
    /// Read typed messages and commands (`/stop`, `/quit`, `/voice NAME`) from stdin.
    pub keyboard: bool,
    /// Where the transcript goes (`None`: nowhere).
    pub transcript: Option<TranscriptWriter>,
    /// End the call after this long.
    pub max_duration: Option<Duration>,
    /// After a file input ends, the longest wait for the session to finish answering.
    pub answer_timeout: Duration,
    pub stop: StopHandle,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            input: AudioIn::Microphone(DeviceChoice::Default),
            output: AudioOut::Speaker(DeviceChoice::Default),
            camera: CameraChoice::None,
            camera_settings: CameraSettings::default(),
            echo: EchoMode::Auto,
            simulate_echo: None,
            session: SessionConfig::default(),
            playback_buffer: Duration::from_millis(60),
            verbose: false,
            keyboard: false,
            transcript: Some(Box::new(std::io::stdout())),
            max_duration: None,
            answer_timeout: Duration::from_secs(120),
            stop: StopHandle::new(),
        }
    }
}

impl fmt::Debug for LocalOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalOptions")
            .field("input", &self.input)
            .field("output", &self.output)
            .field("camera", &self.camera)
            .field("camera_settings", &self.camera_settings)
            .field("echo", &self.echo)
            .field("simulate_echo", &self.simulate_echo)
            .field("session", &self.session)
            .field("playback_buffer", &self.playback_buffer)
            .field("verbose", &self.verbose)
            .field("keyboard", &self.keyboard)
            .field("transcript", &self.transcript.is_some())
            .field("max_duration", &self.max_duration)
            .field("answer_timeout", &self.answer_timeout)
            .finish()
    }
}

/// Runs a call on the wall clock until it ends (see [`runner::run_with_clock`]).
pub fn run(options: LocalOptions, factory: SessionFactory) -> anyhow::Result<LocalSummary> {
    runner::run_with_clock(options, Arc::new(SystemClock::new()), factory)
}

pub use runner::run_with_clock;

/// Sound devices and cameras of this machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceReport {
    pub sound: SoundDevices,
    pub cameras: Vec<CameraInfo>,
    pub camera_problems: Vec<String>,
}

/// Lists every microphone, speaker and camera; never fails (what went wrong is in the report).
pub fn list_devices() -> DeviceReport {
    let (cameras, camera_problems) = camera::list_cameras();
    DeviceReport {
        sound: device::list_sound_devices(),
        cameras,
        camera_problems,
    }
}

impl fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sound = |f: &mut fmt::Formatter<'_>, title: &str, list: &[device::SoundDevice]| {
            writeln!(f, "{title}:")?;
            if list.is_empty() {
                writeln!(f, "  (none)")?;
            }
            for d in list {
                writeln!(
                    f,
                    "  {}{} - {} ({})",
                    if d.is_default { "* " } else { "  " },
                    d.id,
                    d.name,
                    d.default_config
                )?;
            }
            fmt::Result::Ok(())
        };
        writeln!(f, "sound host: {}", self.sound.host)?;
        sound(f, "microphones (--mic)", &self.sound.inputs)?;
        sound(f, "speakers (--speaker)", &self.sound.outputs)?;
        writeln!(f, "cameras (--camera):")?;
        if self.cameras.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for c in &self.cameras {
            writeln!(
                f,
                "    {} - {} (formats: {})",
                c.path.display(),
                c.name,
                c.formats.join(" ")
            )?;
        }
        for problem in self.sound.problems.iter().chain(&self.camera_problems) {
            writeln!(f, "note: {problem}")?;
        }
        writeln!(
            f,
            "(* = default; formats marked * are the ones omnicall converts)"
        )
    }
}

/// The per-turn timing marks of a summary as a markdown table (speech ends in seconds after
/// `origin`, the other marks in milliseconds after the speech end).
pub fn timing_table(timings: &[TurnTimings], origin: Duration) -> String {
    transcript::timing_table(timings, origin)
}
