//! The `omnicall local` command line: its flags ([`LocalArgs`], a clap `Args` to flatten into
//! the CLI's subcommand) and what the command does ([`main`]).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{
    AnswerOutcome, AudioIn, AudioOut, CameraChoice, CameraSettings, CancellerConfig,
    DEFAULT_OUTPUT_FILE_RATE, DeviceChoice, EchoMode, EchoPathConfig, GateConfig, LocalOptions,
    LocalSummary, SessionFactory, StopCause, StopHandle, list_devices, microphone_hears_speaker,
    run, stop_on_ctrl_c,
};
use crate::engine::session::{ReplyMode, SessionConfig};
use crate::engine::turn::TurnTakingArgs;

/// How the microphone is kept from hearing the model's own voice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EchoArg {
    /// The echo canceller when the microphone hears the speaker (both are devices, or
    /// --simulate-echo); nothing for files.
    Auto,
    /// WebRTC's echo canceller (AEC3): talk over the model at a normal voice.
    Aec,
    /// The half-duplex gate: the microphone is muted while the model speaks, unless loud.
    Gate,
    /// Nothing (headphones).
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    fn on(self) -> bool {
        self == Self::On
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// List the microphones, speakers and cameras, and exit.
    #[arg(long)]
    pub list_devices: bool,
    /// Microphone: a device id or (part of a) name from --list-devices [default: the system's]
    #[arg(long, value_name = "DEVICE", conflicts_with = "input_file")]
    pub mic: Option<String>,
    /// Speaker: a device id or (part of a) name from --list-devices [default: the system's]
    #[arg(long, value_name = "DEVICE", conflicts_with_all = ["output_file", "no_speaker"])]
    pub speaker: Option<String>,
    /// Play this WAV file in place of the microphone (at real time), then silence until the
    /// model has finished answering.
    #[arg(long, value_name = "WAV")]
    pub input_file: Option<PathBuf>,
    /// Write the model's voice to this WAV file in place of the speaker, each frame at its time,
    /// so that the file lines up with the input.
    #[arg(long, value_name = "WAV", conflicts_with = "no_speaker")]
    pub output_file: Option<PathBuf>,
    /// Sample rate of --output-file.
    #[arg(long, value_name = "HZ", default_value_t = DEFAULT_OUTPUT_FILE_RATE)]
    pub output_rate: u32,
    /// Play the voice nowhere (transcript only).
    #[arg(long)]
    pub no_speaker: bool,
    /// Camera: an index (0 for /dev/video0), a V4L2 device path, or none.
    #[arg(long, value_name = "INDEX|PATH|none", default_value = "none")]
    pub camera: CameraChoice,
    /// Picture size asked of the camera (it picks the nearest it has).
    #[arg(long, value_name = "WxH", default_value = "640x480")]
    pub camera_size: String,
    /// Camera frames sent to the model per second (it samples 2).
    #[arg(long, value_name = "FPS", default_value_t = 4.0)]
    pub camera_fps: f64,
    /// Echo handling for a loudspeaker.
    #[arg(long, value_enum, default_value_t = EchoArg::Auto)]
    pub echo: EchoArg,
    /// With the echo canceller: WebRTC's noise suppressor on the microphone.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub noise_suppression: Switch,
    /// With the echo canceller: WebRTC's high-pass filter on the microphone.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub high_pass: Switch,
    /// With --input-file: feed the model's voice, as played, back into the input as a
    /// loudspeaker would, DELAY_MS late and GAIN_DB louder (0: as loud as played, -20: a tenth
    /// of the amplitude), through a short room response.
    #[arg(
        long,
        value_name = "DELAY_MS,GAIN_DB",
        requires = "input_file",
        allow_hyphen_values = true
    )]
    pub simulate_echo: Option<EchoPathConfig>,
    /// With the echo gate: the level (dBFS, RMS over 10 ms) from which speech over the model's
    /// voice passes and can barge in.
    #[arg(
        long,
        value_name = "DBFS",
        default_value_t = -30.0,
        allow_negative_numbers = true
    )]
    pub barge_in_level: f32,
    /// With the echo gate: how long after the model's voice stops the microphone stays gated
    /// (the room's reverberation; longer covers pauses in the voice too).
    #[arg(long, value_name = "MS", default_value_t = GateConfig::DEFAULT_TAIL.as_millis() as u64)]
    pub gate_tail_ms: u64,
    /// The speaker's jitter buffer.
    #[arg(long, value_name = "MS", default_value_t = 60)]
    pub playback_buffer_ms: u64,
    /// The model's voice.
    #[arg(long, default_value = "Chelsie")]
    pub voice: String,
    /// Replace the system prompt (the default one is what the model needs to speak).
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Answer with text only.
    #[arg(long)]
    pub text_only: bool,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_answer_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// End the call after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub max_duration: Option<f64>,
    /// With --input-file: the longest wait for the answers once the file is over.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    pub answer_timeout: f64,
    /// Print every state change and each turn's timing marks as they come.
    #[arg(long)]
    pub verbose: bool,
    /// Do not read typed messages from stdin (read by default when it is a terminal).
    #[arg(long)]
    pub no_keyboard: bool,
    #[command(flatten)]
    pub turn_taking: TurnTakingArgs,
}

fn seconds(value: f64, what: &str) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{what} must be a number of seconds > 0, not {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

fn parse_size(size: &str) -> anyhow::Result<(u32, u32)> {
    let parse = || -> Option<(u32, u32)> {
        let (w, h) = size.trim().split_once(['x', 'X'])?;
        Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
    };
    match parse() {
        Some((w, h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => bail!("camera size \"{size}\" is not WIDTHxHEIGHT (like 640x480)"),
    }
}

impl LocalArgs {
    /// The options of the call these flags ask for (the transcript goes to stdout).
    pub fn options(&self) -> anyhow::Result<LocalOptions> {
        let input = match &self.input_file {
            Some(path) => AudioIn::File(path.clone()),
            None => AudioIn::Microphone(
                self.mic
                    .clone()
                    .map_or(DeviceChoice::Default, DeviceChoice::Named),
            ),
        };
        let output = match (&self.output_file, self.no_speaker) {
            (Some(path), _) => AudioOut::File {
                path: path.clone(),
                sample_rate: self.output_rate,
            },
            (None, true) => AudioOut::Discard,
            (None, false) => AudioOut::Speaker(
                self.speaker
                    .clone()
                    .map_or(DeviceChoice::Default, DeviceChoice::Named),
            ),
        };
        let gate = GateConfig {
            barge_in_level_dbfs: self.barge_in_level,
            tail: Duration::from_millis(self.gate_tail_ms),
            ..GateConfig::default()
        };
        gate.validate()
            .context("--barge-in-level / --gate-tail-ms")?;
        let canceller = CancellerConfig {
            noise_suppression: self.noise_suppression.on(),
            high_pass: self.high_pass.on(),
        };
        let hears_speaker = microphone_hears_speaker(&input, &output, self.simulate_echo.is_some());
        let echo = match self.echo {
            EchoArg::Off => EchoMode::Off,
            EchoArg::Gate => EchoMode::HalfDuplex(gate),
            EchoArg::Aec => EchoMode::Cancel(canceller),
            EchoArg::Auto if hears_speaker => EchoMode::Cancel(canceller),
            EchoArg::Auto => EchoMode::Off,
        };
        let (width, height) = parse_size(&self.camera_size)?;
        if !(self.camera_fps.is_finite() && self.camera_fps > 0.0 && self.camera_fps <= 60.0) {
            bail!("--camera-fps {} must be in (0, 60]", self.camera_fps);
        }
        if self.max_answer_tokens == 0 {
            bail!("--max-answer-tokens must be > 0");
        }
        let defaults = SessionConfig::default();
        let mut session = SessionConfig {
            voice: self.voice.clone(),
            system_prompt: self
                .system_prompt
                .clone()
                .unwrap_or(defaults.system_prompt.clone()),
            reply_mode: if self.text_only {
                ReplyMode::Text
            } else {
                ReplyMode::Voice
            },
            max_answer_tokens: self.max_answer_tokens,
            seed: self.seed,
            ..defaults
        };
        self.turn_taking.apply(&mut session.turn, &mut session.vad);
        Ok(LocalOptions {
            input,
            output,
            camera: self.camera.clone(),
            camera_settings: CameraSettings {
                width,
                height,
                send_fps: self.camera_fps,
            },
            echo,
            simulate_echo: self.simulate_echo,
            session,
            playback_buffer: Duration::from_millis(self.playback_buffer_ms),
            verbose: self.verbose,
            keyboard: !self.no_keyboard && std::io::stdin().is_terminal(),
            transcript: Some(Box::new(std::io::stdout())),
            max_duration: self
                .max_duration
                .map(|s| seconds(s, "--max-duration"))
                .transpose()?,
            answer_timeout: seconds(self.answer_timeout, "--answer-timeout")?,
            stop: StopHandle::new(),
        })
    }
}

/// A few lines on how the call went.
pub fn describe_summary(summary: &LocalSummary) -> String {
    let length = summary
        .ended_at
        .saturating_sub(summary.origin)
        .as_secs_f64();
    let cut = summary
        .answers
        .iter()
        .filter(|a| matches!(a.outcome, AnswerOutcome::Interrupted { .. }))
        .count();
    let why = match summary.stopped {
        StopCause::InputEnded => "the input file was over and every answer done",
        StopCause::Requested => "stop requested",
        StopCause::MaxDuration => "maximum duration reached",
        StopCause::AnswerTimeout => "the answers were still running at --answer-timeout",
        StopCause::SessionEnded => "the session ended",
    };
    let mut text = format!(
        "call of {length:.1} s ended ({why}): {} user turns, {} answers ({cut} interrupted)\n",
        summary.user_turns.len(),
        summary.answers.len()
    );
    text.push_str(&format!(
        "input {}: {:.1} s captured, {:.2} s lost to overruns\n",
        summary.input,
        summary.source.captured.as_secs_f64(),
        summary.source.overrun.as_secs_f64()
    ));
    text.push_str(&format!(
        "output {}: {:.1} s of voice, {:.2} s dropped by interruptions, {} underruns\n",
        summary.output,
        summary.sink.voice.as_secs_f64(),
        summary.sink.flushed.as_secs_f64(),
        summary.sink.underruns
    ));
    if let Some(gate) = summary.gate {
        text.push_str(&format!(
            "echo gate: {:.1} s of microphone silenced, {:.1} s passed over the model\n",
            gate.gated.as_secs_f64(),
            gate.passed_over_speaker.as_secs_f64()
        ));
    }
    if let Some((config, stats)) = &summary.echo_stage {
        if let Some(path) = config.simulate {
            text.push_str(&format!("simulated echo: {path}\n"));
        }
        if let Some(canceller) = stats.canceller {
            text.push_str(&format!(
                "echo canceller (AEC3): {canceller} after {:.1} s of microphone\n",
                canceller.frames as f64 / 100.0
            ));
        }
    }
    if let Some(camera) = &summary.camera {
        text.push_str(&format!(
            "{camera}: {} frames sent\n",
            summary.video_frames_sent
        ));
    }
    for error in &summary.session_errors {
        text.push_str(&format!("session error: {error}\n"));
    }
    text
}

/// `omnicall local`: lists the devices, or runs a call with the session `factory` makes until
/// the input file is over, `--max-duration`, `/quit` or Ctrl-C, then prints how it went.
pub fn main(args: &LocalArgs, factory: SessionFactory) -> anyhow::Result<()> {
    if args.list_devices {
        print!("{}", list_devices());
        return Ok(());
    }
    let options = args.options()?;
    stop_on_ctrl_c(options.stop.clone())?;
    let summary = run(options, factory)?;
    eprint!("{}", describe_summary(&summary));
    if summary.stopped == StopCause::AnswerTimeout {
        bail!(
            "the session was still busy {} s after the input file ended",
            args.answer_timeout
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        local: LocalArgs,
    }

    fn parse(args: &[&str]) -> Result<LocalArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("omnicall-local").chain(args.iter().copied()))
            .map(|c| c.local)
    }

    #[test]
    fn files_in_and_out_need_no_echo_handling() {
        let args = parse(&["--input-file", "in.wav", "--output-file", "out.wav"]).unwrap();
        let options = args.options().unwrap();
        assert_eq!(options.input, AudioIn::File("in.wav".into()));
        assert_eq!(
            options.output,
            AudioOut::File {
                path: "out.wav".into(),
                sample_rate: DEFAULT_OUTPUT_FILE_RATE
            }
        );
        assert_eq!(options.echo, EchoMode::Off);
        assert_eq!(options.camera, CameraChoice::None);
    }

    #[test]
    fn devices_get_the_echo_canceller_and_the_gate_on_request() {
        let args = parse(&["--mic", "USB", "--camera", "0"]).unwrap();
        let options = args.options().unwrap();
        assert_eq!(
            options.input,
            AudioIn::Microphone(DeviceChoice::Named("USB".into()))
        );
        assert_eq!(options.output, AudioOut::Speaker(DeviceChoice::Default));
        assert_eq!(options.echo, EchoMode::Cancel(CancellerConfig::default()));
        assert_eq!(options.camera, CameraChoice::Index(0));
        let args = parse(&["--echo", "gate", "--barge-in-level", "-24"]).unwrap();
        let EchoMode::HalfDuplex(gate) = args.options().unwrap().echo else {
            panic!("no gate");
        };
        assert_eq!(gate.barge_in_level_dbfs, -24.0);
        let args = parse(&["--noise-suppression", "off", "--high-pass", "off"]).unwrap();
        assert_eq!(
            args.options().unwrap().echo,
            EchoMode::Cancel(CancellerConfig {
                noise_suppression: false,
                high_pass: false
            })
        );
    }

    #[test]
    fn a_simulated_echo_on_a_file_gets_the_echo_canceller_unless_told_otherwise() {
        let args = parse(&["--input-file", "in.wav", "--simulate-echo", "40,-12"]).unwrap();
        let options = args.options().unwrap();
        let path = options.simulate_echo.unwrap();
        assert_eq!(path.delay, Duration::from_millis(40));
        assert_eq!(path.gain_db, -12.0);
        assert_eq!(options.echo, EchoMode::Cancel(CancellerConfig::default()));
        let args = parse(&[
            "--input-file",
            "in.wav",
            "--simulate-echo",
            "40,-12",
            "--echo",
            "off",
        ])
        .unwrap();
        assert_eq!(args.options().unwrap().echo, EchoMode::Off);
        // a microphone hears the real speaker
        assert!(parse(&["--simulate-echo", "40,-12"]).is_err());
        let bad = |value: &str| {
            parse(&["--input-file", "in.wav", "--simulate-echo", value])
                .unwrap_err()
                .to_string()
        };
        assert!(bad("40").contains("DELAY_MS,GAIN_DB"), "{}", bad("40"));
        assert!(bad("2000,0").contains("over 500 ms"), "{}", bad("2000,0"));
        assert!(bad("40,20").contains("gain"), "{}", bad("40,20"));
    }

    #[test]
    fn contradictions_and_bad_values_are_refused() {
        assert!(parse(&["--mic", "a", "--input-file", "b.wav"]).is_err());
        assert!(parse(&["--output-file", "a.wav", "--no-speaker"]).is_err());
        let bad = |args: &[&str]| parse(args).unwrap().options().unwrap_err().to_string();
        assert!(bad(&["--camera-size", "640"]).contains("WIDTHxHEIGHT"));
        assert!(bad(&["--barge-in-level", "6"]).contains("barge-in-level"));
        assert!(bad(&["--answer-timeout", "0"]).contains("--answer-timeout"));
        assert!(bad(&["--gate-tail-ms", "5000"]).contains("tail"));
        assert!(bad(&["--camera-fps", "0"]).contains("--camera-fps"));
    }
}
