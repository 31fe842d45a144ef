//! `omnicall bench call`: the latency of a running server, measured from a caller's seat.
//!
//! A headless WebRTC client ([`CallClient`]) calls the server and speaks a prompt (a WAV
//! file, its speech only) into the call at real time, waits for the answer, and repeats:
//! warm-up turns first (left out of the figures), then the measured turns. Its microphone never
//! stops: around the prompts it sends silence (`--gap` before each), as a real one does, so the
//! RTP clock and the wall clock stay in step.
//!
//! What one turn records (every time in ms, relative to the end of the user's speech):
//!
//! - **End of speech**: the prompt's last sample above `speech_threshold`, at the time the
//!   client's microphone captured it. The microphone model: the packet sent at tick `k` of the
//!   20 ms clock carries the samples captured during the 20 ms before that tick, so the
//!   packetisation delay counts in the latency, as it does for a browser.
//! - **Voice to voice**: the first received sample of the answer above `audible_threshold`
//!   (arrival of its packet plus its place in the packet). The playout (jitter buffer) delay of
//!   a browser, typically 20 to 80 ms, is not in it.
//! - **Server stages**: the session's timing marks from the data channel (`timings`: end of
//!   speech as the server's VAD saw it, end of turn, prefill done, first text token, first
//!   codec token, first waveform chunk, first audio frame sent), moved to the client's clock.
//! - **Barge-in** (with `--barge-in-at S`): the next prompt starts S seconds into the answer;
//!   the latency runs from its onset (first sample above the threshold, as captured) to the
//!   last audible sample of the cut answer received. Each prompt then cuts the answer before
//!   it; one more prompt after the last turn cuts the last answer.
//!
//! Clock offset: the server stamps its marks and messages on its session clock, which starts
//! when it takes the offer. So in the client's clock the server's zero lies after the offer was
//! posted, and no later than any message's arrival minus its stamp (`t_ms`). The middle of that
//! window is the offset used; half its width, reported, bounds the error (on loopback: a
//! fraction of a millisecond to a few).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;
use webrtc::peer_connection::RTCPeerConnectionState;

use crate::engine::session::ReplyMode;
use crate::media::opus::{FRAME_SAMPLES_48K, OPUS_RATE, OpusEncoder};
use crate::media::resample::resample;
use crate::media::video_decode::{H264Decoder, VideoCodec};
use crate::rtc::RtcConfig;
use crate::rtc::client::{
    CallClient, ClientConfig, I420Frame, MediaSender, ReceivedAudio, ReceivedMessage,
    read_wav_mono, read_y4m,
};
use crate::rtc::protocol::{ServerMessage, TimingMarks};

/// One microphone packet.
const FRAME: Duration = Duration::from_millis(20);
const FRAME_MS: f64 = 20.0;
/// Most frames of a video file kept in memory (the clip loops).
pub const MAX_VIDEO_FRAMES: usize = 300;
/// Model audio this close before the end of speech means an answer was still playing then.
const OVERLAP_MS: f64 = 100.0;
/// An answer is over once no audible packet came for this long.
const TAIL_QUIET_MS: f64 = 300.0;
/// How long to wait for a turn's timing marks after its answer finished.
const TIMINGS_GRACE_MS: f64 = 3_000.0;

/// The time columns of the CSV, in the order the stages happen: the server's marks, then the
/// first audible sample received.
pub const STAGES: [&str; 8] = [
    "speech_end",
    "end_of_turn",
    "prefill_done",
    "first_text_token",
    "first_codec_token",
    "first_waveform_chunk",
    "first_audio_frame",
    "voice_to_voice",
];

/// The latency of a running server, measured by a headless caller: voice to voice, the
/// server's stages, barge-in.
#[derive(Debug, Clone, clap::Args)]
pub struct CallArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Spoken prompt (WAV, any rate); repeat the flag for several, used in turn.
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<PathBuf>,
    /// Also stream this video as the camera: Y4M, or MP4 with H.264 (decoded, then encoded
    /// again in --video-codec).
    #[arg(long)]
    pub video: Option<PathBuf>,
    /// Codec of the camera stream: vp8 or h264.
    #[arg(long, default_value = "vp8", value_parser = parse_codec)]
    pub video_codec: VideoCodec,
    /// Camera frames per second (default: the file's own rate; 2 is the model's).
    #[arg(long)]
    pub video_fps: Option<f64>,
    /// Measured turns.
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
    /// Turns before them, left out of the figures.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Start the next prompt this many seconds into each answer, and measure how fast the
    /// answer stops.
    #[arg(long)]
    pub barge_in_at: Option<f64>,
    /// With --barge-in-at: speak this (WAV; repeat the flag for several, used in turn) over
    /// each answer instead of the next prompt: a backchannel the answer should survive
    /// (`resumed`) or an interruption that should cut it (`cut`).
    #[arg(long = "over", requires = "barge_in_at")]
    pub over: Vec<PathBuf>,
    /// Bearer token of the server.
    #[arg(long)]
    pub token: Option<String>,
    /// Voice of the answers (default: the server's).
    #[arg(long)]
    pub voice: Option<String>,
    /// Silence before each prompt, in seconds.
    #[arg(long, default_value_t = 1.5)]
    pub gap: f64,
    /// Longest wait for an answer, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub answer_timeout: f64,
    /// Sample level (0..1) above which the prompt counts as speech.
    #[arg(long, default_value_t = 0.01)]
    pub speech_threshold: f32,
    /// Sample level (0..1) above which the model's voice counts as audible.
    #[arg(long, default_value_t = 0.01)]
    pub audible_threshold: f32,
    /// Local UDP address for ICE (repeatable; default: every interface and loopback).
    #[arg(long = "udp")]
    pub udp_addrs: Vec<String>,
    /// Write one row per measured turn here.
    #[arg(long)]
    pub csv: PathBuf,
    /// Write the summary table here (it is printed either way).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

fn parse_codec(s: &str) -> Result<VideoCodec, String> {
    match s.to_ascii_lowercase().as_str() {
        "vp8" => Ok(VideoCodec::Vp8),
        "h264" | "h.264" => Ok(VideoCodec::H264),
        other => Err(format!("unknown video codec {other:?} (vp8 or h264)")),
    }
}

/// A video file streamed as the camera.
#[derive(Debug, Clone)]
pub struct VideoOptions {
    pub path: PathBuf,
    pub codec: VideoCodec,
    /// `None`: the file's own rate.
    pub fps: Option<f64>,
}

/// What [`run_call_bench`] does.
#[derive(Debug, Clone)]
pub struct CallBenchOptions {
    pub url: String,
    pub token: Option<String>,
    pub voice: Option<String>,
    pub prompts: Vec<PathBuf>,
    pub video: Option<VideoOptions>,
    pub turns: usize,
    pub warmup: usize,
    pub barge_in_at: Option<Duration>,
    /// Spoken over the answers (with `barge_in_at`) in place of the next prompt.
    pub over: Vec<PathBuf>,
    pub gap: Duration,
    pub answer_timeout: Duration,
    pub speech_threshold: f32,
    pub audible_threshold: f32,
    pub rtc: RtcConfig,
    pub csv: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
}

impl CallBenchOptions {
    /// The defaults of the command line, calling `url` with these prompts.
    pub fn new(url: impl Into<String>, prompts: Vec<PathBuf>) -> Self {
        Self {
            url: url.into(),
            token: None,
            voice: None,
            prompts,
            video: None,
            turns: 5,
            warmup: 1,
            barge_in_at: None,
            over: Vec::new(),
            gap: Duration::from_millis(1_500),
            answer_timeout: Duration::from_secs(60),
            speech_threshold: 0.01,
            audible_threshold: 0.01,
            rtc: RtcConfig::default(),
            csv: None,
            markdown: None,
        }
    }
}

fn seconds(what: &str, s: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        s.is_finite() && s >= 0.0,
        "{what} must be a number of seconds >= 0, got {s}"
    );
    Ok(Duration::from_secs_f64(s))
}

impl CallArgs {
    pub fn into_options(self) -> anyhow::Result<CallBenchOptions> {
        let mut rtc = RtcConfig::default();
        if !self.udp_addrs.is_empty() {
            rtc.udp_addrs = self.udp_addrs;
        }
        Ok(CallBenchOptions {
            url: self.url,
            token: self.token,
            voice: self.voice,
            prompts: self.prompts,
            video: self.video.map(|path| VideoOptions {
                path,
                codec: self.video_codec,
                fps: self.video_fps,
            }),
            turns: self.turns,
            warmup: self.warmup,
            barge_in_at: self
                .barge_in_at
                .map(|s| seconds("--barge-in-at", s))
                .transpose()?,
            over: self.over,
            gap: seconds("--gap", self.gap)?,
            answer_timeout: seconds("--answer-timeout", self.answer_timeout)?,
            speech_threshold: self.speech_threshold,
            audible_threshold: self.audible_threshold,
            rtc,
            csv: Some(self.csv),
            markdown: self.markdown,
        })
    }
}

/// `omnicall bench call`: runs the benchmark, writes the CSV (and the markdown), prints the
/// summary.
pub fn main(args: CallArgs) -> anyhow::Result<()> {
    let options = args.into_options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(run_call_bench(options))?;
    print!("{}", report.to_markdown());
    Ok(())
}

/// One measured turn; times in ms relative to the end of the user's speech.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnRow {
    /// 1, 2, .. over the measured turns.
    pub turn: usize,
    /// The server's number of the turn (from its `user_turn` message).
    pub server_turn: Option<u64>,
    pub prompt: String,
    /// In [`STAGES`] order.
    pub stages: [Option<f64>; 8],
    pub barge_in: Option<f64>,
    /// From the onset of the next prompt to the server's pause of this answer (`paused`).
    pub pause: Option<f64>,
    /// How speech over this answer ended it: resumed or cut.
    pub interruption: Option<InterruptionOutcome>,
    /// The server took a turn while this prompt was still being spoken: it answered inside a
    /// pause (the client knows where its prompt ends).
    pub false_cutoff: bool,
}

/// What speech over an answer did to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptionOutcome {
    /// Paused, then played on (a backchannel or a noise).
    Resumed,
    /// Stopped (a barge-in).
    Cut,
}

impl InterruptionOutcome {
    fn name(self) -> &'static str {
        match self {
            Self::Resumed => "resumed",
            Self::Cut => "cut",
        }
    }
}

impl TurnRow {
    pub fn voice_to_voice(&self) -> Option<f64> {
        self.stages[7]
    }
}

/// The offset of the server's session clock in the client's: client time = server time +
/// `estimate_ms`, within `± uncertainty_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockOffset {
    pub estimate_ms: f64,
    pub uncertainty_ms: f64,
}

/// min / median / p90 / max of one column over the measured turns that have it.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSummary {
    pub stage: String,
    pub count: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct CallBenchReport {
    pub url: String,
    pub rows: Vec<TurnRow>,
    pub clock: ClockOffset,
    /// Turns or figures that could not be measured, and why.
    pub warnings: Vec<String>,
    /// Audio packets received, and how many of them were audible.
    pub packets_received: u64,
    pub audible_packets: u64,
    /// Microphone packets sent more than a frame late (the client's own scheduling).
    pub late_packets: u64,
    pub barge_in_at: Option<Duration>,
    pub warmup: usize,
}

/// The CSV header.
pub fn csv_header() -> String {
    let mut cols = vec!["turn".to_string(), "server_turn".into(), "prompt".into()];
    cols.extend(STAGES.iter().map(|s| format!("{s}_ms")));
    cols.push("barge_in_ms".into());
    cols.push("pause_ms".into());
    cols.push("clock_uncertainty_ms".into());
    cols.push("interruption".into());
    cols.push("false_cutoff".into());
    cols.join(",")
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn cell(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_default()
}

impl CallBenchReport {
    /// One row per measured turn, empty cells where a stage did not happen or was not reported.
    pub fn to_csv(&self) -> String {
        let mut out = csv_header();
        out.push('\n');
        for r in &self.rows {
            let mut cols = vec![
                r.turn.to_string(),
                r.server_turn.map(|t| t.to_string()).unwrap_or_default(),
                csv_field(&r.prompt),
            ];
            cols.extend(r.stages.iter().map(|v| cell(*v)));
            cols.push(cell(r.barge_in));
            cols.push(cell(r.pause));
            cols.push(format!("{:.2}", self.clock.uncertainty_ms));
            cols.push(r.interruption.map(|o| o.name()).unwrap_or_default().into());
            cols.push(u8::from(r.false_cutoff).to_string());
            out.push_str(&cols.join(","));
            out.push('\n');
        }
        out
    }

    /// min / median / p90 / max of every column.
    pub fn summary(&self) -> Vec<StageSummary> {
        let mut columns: Vec<(String, Vec<f64>)> = STAGES
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let values = self.rows.iter().filter_map(|r| r.stages[i]).collect();
                (s.to_string(), values)
            })
            .collect();
        if self.barge_in_at.is_some() {
            let values = self.rows.iter().filter_map(|r| r.barge_in).collect();
            columns.push(("barge_in".into(), values));
            let values = self.rows.iter().filter_map(|r| r.pause).collect();
            columns.push(("pause".into(), values));
        }
        columns
            .into_iter()
            .filter_map(|(stage, values)| summarize(&stage, values))
            .collect()
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## Call latency: {}\n", self.url);
        let _ = writeln!(
            out,
            "{} measured turns after {} warm-up; ms from the end of the user's speech (as the \
             client's microphone captured it); server marks moved to the client's clock \
             (offset {:.1} ms ± {:.1} ms).{}\n",
            self.rows.len(),
            self.warmup,
            self.clock.estimate_ms,
            self.clock.uncertainty_ms,
            match self.barge_in_at {
                Some(s) => format!(
                    " Barge-in: the next prompt starts {:.1} s into each answer; ms from its \
                     onset to the last audible sample of the answer.",
                    s.as_secs_f64()
                ),
                None => String::new(),
            }
        );
        out.push_str("| stage | n | min | median | p90 | max |\n| --- | ---: | ---: | ---: | ---: | ---: |\n");
        for s in self.summary() {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                s.stage, s.count, s.min, s.median, s.p90, s.max
            );
        }
        let false_cutoffs = self.rows.iter().filter(|r| r.false_cutoff).count();
        let _ = writeln!(
            out,
            "\nFalse cut-offs (a turn taken while the prompt was still spoken): {false_cutoffs} \
             of {} turns.",
            self.rows.len()
        );
        if self.barge_in_at.is_some() {
            let count = |o| {
                self.rows
                    .iter()
                    .filter(|r| r.interruption == Some(o))
                    .count()
            };
            let _ = writeln!(
                out,
                "Speech over the answers: {} resumed, {} cut.",
                count(InterruptionOutcome::Resumed),
                count(InterruptionOutcome::Cut)
            );
        }
        let _ = writeln!(
            out,
            "\n{} voice packets received ({} audible); {} microphone packets sent late.",
            self.packets_received, self.audible_packets, self.late_packets
        );
        if !self.warnings.is_empty() {
            out.push_str("\nNot measured:\n");
            for w in &self.warnings {
                let _ = writeln!(out, "- {w}");
            }
        }
        out
    }
}

/// The summary of one column; `None` when no turn has it.
pub fn summarize(stage: &str, mut values: Vec<f64>) -> Option<StageSummary> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    // nearest rank
    let p90 = values[((0.9 * n as f64).ceil() as usize).clamp(1, n) - 1];
    Some(StageSummary {
        stage: stage.to_string(),
        count: n,
        min: values[0],
        median,
        p90,
        max: values[n - 1],
    })
}

/// A prompt's speech at the Opus rate.
#[derive(Debug, Clone)]
struct Prompt {
    name: String,
    pcm: Arc<Vec<f32>>,
    /// First and last sample above the speech threshold.
    onset: usize,
    end: usize,
}

/// The first and last sample whose level exceeds `threshold`.
fn speech_extent(pcm: &[f32], threshold: f32) -> Option<(usize, usize)> {
    let first = pcm.iter().position(|s| s.abs() > threshold)?;
    let last = pcm.iter().rposition(|s| s.abs() > threshold)?;
    Some((first, last))
}

fn load_prompt(path: &Path, threshold: f32) -> anyhow::Result<Prompt> {
    let (pcm, rate) =
        read_wav_mono(path).with_context(|| format!("reading the prompt {}", path.display()))?;
    let pcm = resample(&pcm, rate, OPUS_RATE)
        .with_context(|| format!("resampling the prompt {}", path.display()))?;
    let Some((onset, end)) = speech_extent(&pcm, threshold) else {
        bail!(
            "the prompt {} has no sample above the speech threshold {threshold}",
            path.display()
        );
    };
    // only the speech: the microphone sends silence around it anyway, and a prompt that ends
    // with its speech lets the next one start on time (a barge-in S seconds into an answer)
    let speech = pcm[onset..=end].to_vec();
    Ok(Prompt {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string()),
        end: speech.len() - 1,
        onset: 0,
        pcm: Arc::new(speech),
    })
}

/// When a prompt's speech was captured, in ms on the client's clock.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Played {
    onset: f64,
    end: f64,
}

struct Utterance {
    prompt: Prompt,
    played: oneshot::Sender<Played>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The client's microphone: one Opus packet every 20 ms, the prompts queued to it or silence.
/// Returns how many packets went out more than a frame late.
async fn run_microphone(
    media: MediaSender,
    started: Instant,
    mut queue: UnboundedReceiver<Utterance>,
) -> anyhow::Result<u64> {
    let mut encoder = OpusEncoder::new(OPUS_RATE)?;
    let silence = vec![0.0f32; FRAME_SAMPLES_48K];
    let mut ticker = tokio::time::interval(FRAME);
    // a late tick is made up at once, so that the RTP clock stays in step with the wall clock
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut current: Option<(Utterance, usize, Option<f64>, Option<f64>)> = None;
    let mut late = 0u64;
    let mut open = true;
    loop {
        let tick = ticker.tick().await;
        if Instant::now().saturating_duration_since(tick.into_std()) > FRAME {
            late += 1;
        }
        if current.is_none() && open {
            match queue.try_recv() {
                Ok(u) => current = Some((u, 0, None, None)),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if current.is_none() && !open {
            return Ok(late);
        }
        // this packet carries what the microphone captured during the frame before the tick
        let captured_from = ms(tick.into_std().saturating_duration_since(started)) - FRAME_MS;
        let packet = match current.as_mut() {
            Some((u, pos, onset, end)) => {
                let pcm = &u.prompt.pcm;
                let mut frame: Vec<f32> =
                    pcm[*pos..(*pos + FRAME_SAMPLES_48K).min(pcm.len())].to_vec();
                frame.resize(FRAME_SAMPLES_48K, 0.0);
                let at = |i: usize| captured_from + (i - *pos) as f64 * 1e3 / OPUS_RATE as f64;
                let span = *pos..*pos + FRAME_SAMPLES_48K;
                if span.contains(&u.prompt.onset) {
                    *onset = Some(at(u.prompt.onset));
                }
                if span.contains(&u.prompt.end) {
                    *end = Some(at(u.prompt.end));
                }
                *pos += FRAME_SAMPLES_48K;
                encoder.encode(&frame)?
            }
            None => encoder.encode(&silence)?,
        };
        media.send_opus(&packet, FRAME).await?;
        let done = current
            .as_ref()
            .is_some_and(|(u, pos, _, _)| *pos >= u.prompt.pcm.len());
        if done && let Some((u, _, Some(onset), Some(end))) = current.take() {
            let _ = u.played.send(Played { onset, end });
        }
    }
}

/// An audible packet of the model's voice: its arrival and its first and last audible sample,
/// in ms on the client's clock.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LoudPacket {
    at: f64,
    first: f64,
    last: f64,
}

fn loud_packet(audio: &ReceivedAudio, threshold: f32) -> Option<LoudPacket> {
    let (first, last) = speech_extent(&audio.samples, threshold)?;
    let at = ms(audio.at);
    let offset = |i: usize| i as f64 * 1e3 / OPUS_RATE as f64;
    Some(LoudPacket {
        at,
        first: at + offset(first),
        last: at + offset(last),
    })
}

/// A data channel message: arrival (client ms), the server's stamp, the message.
#[derive(Debug, Clone, PartialEq)]
struct Message {
    at: f64,
    t_ms: f64,
    message: ServerMessage,
}

/// Everything a run saw, on the client's clock.
#[derive(Debug, Default)]
struct CallLog {
    offer_sent: f64,
    prompts: Vec<String>,
    played: Vec<Played>,
    /// What was spoken over the answer to each prompt (`--over`), by prompt.
    over: Vec<Option<Played>>,
    loud: Vec<LoudPacket>,
    messages: Vec<Message>,
    packets: u64,
}

impl CallLog {
    fn take_message(&mut self, m: ReceivedMessage) {
        self.messages.push(Message {
            at: ms(m.at),
            t_ms: m.t_ms,
            message: m.message,
        });
    }

    /// The server's number of the turn taken after speech ending at `end` (and before the
    /// end of the next prompt's speech, `next_end`).
    fn user_turn_after(&self, end: f64, next_end: Option<f64>) -> Option<u64> {
        self.messages.iter().find_map(|m| match m.message {
            ServerMessage::UserTurn {
                turn, text: None, ..
            } if m.at >= end && next_end.is_none_or(|n| m.at < n) => Some(turn),
            _ => None,
        })
    }

    /// When the answer of server turn `turn` finished (done or cut).
    fn answer_finished(&self, turn: u64) -> Option<f64> {
        self.messages.iter().find_map(|m| match m.message {
            ServerMessage::AnswerDone { turn: t } | ServerMessage::Interrupted { turn: t, .. }
                if t == turn =>
            {
                Some(m.at)
            }
            _ => None,
        })
    }

    /// Whether the server took a spoken turn while the prompt was being spoken.
    fn turn_taken_during(&self, played: Played) -> bool {
        self.messages.iter().any(|m| {
            matches!(m.message, ServerMessage::UserTurn { text: None, .. })
                && m.at > played.onset
                && m.at < played.end
        })
    }

    /// When the answer of `turn` was first paused after `after` (server stamp, ms), and how
    /// the pause ended.
    fn pause_after(&self, turn: u64, after: f64) -> Option<(f64, Option<InterruptionOutcome>)> {
        let paused = self.messages.iter().position(|m| {
            matches!(m.message, ServerMessage::Paused { turn: t } if t == turn) && m.at >= after
        })?;
        let outcome = self.messages[paused..]
            .iter()
            .find_map(|m| match m.message {
                ServerMessage::Resumed { turn: t } if t == turn => {
                    Some(InterruptionOutcome::Resumed)
                }
                ServerMessage::Interrupted { turn: t, .. } if t == turn => {
                    Some(InterruptionOutcome::Cut)
                }
                _ => None,
            });
        Some((self.messages[paused].t_ms, outcome))
    }

    fn interrupted(&self, turn: u64) -> bool {
        self.messages
            .iter()
            .any(|m| matches!(m.message, ServerMessage::Interrupted { turn: t, .. } if t == turn))
    }

    /// The last timing marks of server turn `turn`.
    fn timings(&self, turn: u64) -> Option<&TimingMarks> {
        self.messages.iter().rev().find_map(|m| match &m.message {
            ServerMessage::Timings(t) if t.turn == turn => Some(t),
            _ => None,
        })
    }

    fn first_loud_after(&self, t: f64) -> Option<LoudPacket> {
        self.loud.iter().copied().find(|p| p.at >= t)
    }

    fn last_loud_end(&self) -> Option<f64> {
        self.loud.last().map(|p| p.last)
    }

    /// The window the server's clock zero lies in, as offsets; see the module docs.
    fn clock_offset(&self) -> anyhow::Result<ClockOffset> {
        // stamps are rounded to 0.1 ms
        let upper = self
            .messages
            .iter()
            .map(|m| m.at - m.t_ms + 0.05)
            .min_by(f64::total_cmp)
            .context("no message from the server: the clock offset is unknown")?;
        let lower = self.offer_sent;
        if upper < lower {
            bail!(
                "the server's clock is inconsistent with the call: a message arrived {:.1} ms \
                 before it could have been sent",
                lower - upper
            );
        }
        Ok(ClockOffset {
            estimate_ms: (lower + upper) / 2.0,
            uncertainty_ms: (upper - lower) / 2.0,
        })
    }
}

/// The measured turns out of a run's log: prompts `warmup..warmup + turns` (with barge-in, the
/// prompt after each cuts its answer).
fn analyse(
    log: &CallLog,
    warmup: usize,
    turns: usize,
    barge_in: bool,
    warnings: &mut Vec<String>,
) -> anyhow::Result<(Vec<TurnRow>, ClockOffset)> {
    let clock = log.clock_offset()?;
    let mut rows = Vec::new();
    for k in warmup..(warmup + turns).min(log.played.len()) {
        let label = k + 1 - warmup;
        let played = log.played[k];
        let next = log.played.get(k + 1);
        // what was spoken over this answer: an `--over` utterance, or the next prompt
        let cutter = log.over.get(k).copied().flatten().or(next.copied());
        let server_turn = log.user_turn_after(played.end, next.map(|n| n.end));
        let mut stages = [None; 8];
        match server_turn.and_then(|n| log.timings(n)) {
            Some(t) => {
                let marks = [
                    t.speech_end_ms,
                    t.end_of_turn_ms,
                    t.prefill_done_ms,
                    t.first_text_token_ms,
                    t.first_codec_token_ms,
                    t.first_waveform_chunk_ms,
                    t.first_audio_frame_ms,
                ];
                for (stage, mark) in stages.iter_mut().zip(marks) {
                    *stage = mark.map(|m| m + clock.estimate_ms - played.end);
                }
            }
            None => warnings.push(match server_turn {
                Some(n) => format!("turn {label}: no timing marks for server turn {n}"),
                None => format!("turn {label}: the server took no turn after the prompt"),
            }),
        }
        // the answer's first audible sample, unless the model was still talking at the end of
        // speech (then the answer cannot be told from what came before)
        let before = log.loud.iter().rev().find(|p| p.at < played.end);
        let overlapped = before.is_some_and(|p| p.last > played.end - OVERLAP_MS);
        let first = log
            .first_loud_after(played.end)
            .filter(|p| next.is_none_or(|n| p.at < n.end));
        stages[7] = match (overlapped, first) {
            (false, Some(p)) => Some(p.first - played.end),
            (true, _) => {
                warnings.push(format!(
                    "turn {label}: model audio was still arriving at the end of speech"
                ));
                None
            }
            (false, None) => {
                warnings.push(format!("turn {label}: no audible answer"));
                None
            }
        };
        let pause = match (barge_in, server_turn, cutter) {
            (true, Some(turn), Some(cutter)) => log.pause_after(turn, cutter.onset),
            _ => None,
        };
        let interruption = pause.and_then(|(_, outcome)| outcome);
        let barge_in = if barge_in && interruption != Some(InterruptionOutcome::Resumed) {
            barge_in_latency(log, label, server_turn, first, cutter.as_ref(), warnings)
        } else {
            None
        };
        rows.push(TurnRow {
            turn: label,
            server_turn,
            prompt: log.prompts.get(k).cloned().unwrap_or_default(),
            stages,
            barge_in,
            pause: pause.map(|(at, _)| at + clock.estimate_ms - cutter.map_or(0.0, |c| c.onset)),
            interruption,
            false_cutoff: log.turn_taken_during(played),
        });
    }
    Ok((rows, clock))
}

/// From the onset of the next prompt to the last audible sample of this answer.
fn barge_in_latency(
    log: &CallLog,
    label: usize,
    server_turn: Option<u64>,
    answer_start: Option<LoudPacket>,
    next: Option<&Played>,
    warnings: &mut Vec<String>,
) -> Option<f64> {
    let (Some(turn), Some(start), Some(next)) = (server_turn, answer_start, next) else {
        warnings.push(format!("turn {label}: no answer to cut"));
        return None;
    };
    if !log.interrupted(turn) {
        warnings.push(format!(
            "turn {label}: the answer was not cut (it ended before the barge-in, or the server \
             did not stop it)"
        ));
        return None;
    }
    let last = log
        .loud
        .iter()
        .filter(|p| p.at >= start.at && p.at < next.end)
        .map(|p| p.last)
        .max_by(f64::total_cmp)?;
    // no audible sample after the onset: the answer stopped at once
    Some((last - next.onset).max(0.0))
}

/// The call as the benchmark drives it.
struct Recorder {
    call: CallClient,
    mic: UnboundedSender<Utterance>,
    log: CallLog,
    audible_threshold: f32,
}

impl Recorder {
    fn now(&self) -> f64 {
        ms(self.call.started().elapsed())
    }

    /// Takes what arrived, waiting up to `wait` for a message.
    async fn pump(&mut self, wait: Duration) -> anyhow::Result<()> {
        let asked = Instant::now();
        match self.call.next_message(wait).await {
            Some(m) => self.log.take_message(m),
            // the channel is gone: no busy loop while the connection state catches up
            None if asked.elapsed() < wait / 2 => tokio::time::sleep(wait).await,
            None => {}
        }
        for audio in self.call.take_audio() {
            self.log.packets += 1;
            if let Some(p) = loud_packet(&audio, self.audible_threshold) {
                self.log.loud.push(p);
            }
        }
        match self.call.connection_state() {
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                bail!("the call dropped ({})", self.call.connection_state())
            }
            _ if self.call.data_channel_closed() => {
                bail!("the call dropped (the server closed the data channel)")
            }
            _ => Ok(()),
        }
    }

    /// Pumps until `done` holds (true) or the client clock passes `until` (false).
    async fn wait_until(
        &mut self,
        until: f64,
        mut done: impl FnMut(&CallLog, f64) -> bool,
    ) -> anyhow::Result<bool> {
        loop {
            let now = self.now();
            if done(&self.log, now) {
                return Ok(true);
            }
            if now >= until {
                return Ok(false);
            }
            let wait = ((until - now) / 1e3).clamp(0.001, 0.02);
            self.pump(Duration::from_secs_f64(wait)).await?;
        }
    }

    /// Speaks a prompt into the call; returns when all of it was sent.
    async fn play(&mut self, prompt: &Prompt) -> anyhow::Result<Played> {
        let played = self.speak(prompt).await?;
        self.log.prompts.push(prompt.name.clone());
        self.log.played.push(played);
        self.log.over.push(None);
        Ok(played)
    }

    /// Speaks `prompt` over the answer to the last prompt.
    async fn play_over(&mut self, prompt: &Prompt) -> anyhow::Result<Played> {
        let played = self.speak(prompt).await?;
        if let Some(last) = self.log.over.last_mut() {
            *last = Some(played);
        }
        Ok(played)
    }

    async fn speak(&mut self, prompt: &Prompt) -> anyhow::Result<Played> {
        let (tx, mut rx) = oneshot::channel();
        self.mic
            .send(Utterance {
                prompt: prompt.clone(),
                played: tx,
            })
            .map_err(|_| anyhow::anyhow!("the microphone stopped"))?;
        loop {
            match rx.try_recv() {
                Ok(played) => return Ok(played),
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.pump(Duration::from_millis(20)).await?
                }
                Err(oneshot::error::TryRecvError::Closed) => bail!("the microphone stopped"),
            }
        }
    }

    /// Waits for the answer to speech ending at `end` to finish: its turn's answer done or cut,
    /// its timing marks (or a grace period after the answer), and no audible packet for a
    /// moment. Returns whether it all came before `timeout`.
    async fn wait_answer(&mut self, end: f64, timeout: Duration) -> anyhow::Result<bool> {
        let until = end + ms(timeout);
        let finished = self
            .wait_until(until, |log, now| {
                let Some(turn) = log.user_turn_after(end, None) else {
                    return false;
                };
                let Some(done) = log.answer_finished(turn) else {
                    return false;
                };
                log.timings(turn).is_some() || now - done >= TIMINGS_GRACE_MS
            })
            .await?;
        let quiet_by = self.now() + ms(timeout).min(10_000.0);
        self.wait_until(quiet_by, |log, now| {
            log.last_loud_end()
                .is_none_or(|last| now - last >= TAIL_QUIET_MS)
        })
        .await?;
        Ok(finished)
    }
}

/// Reads a video file into I420 frames (at most [`MAX_VIDEO_FRAMES`]) and its frame rate.
pub fn read_video(path: &Path) -> anyhow::Result<(Vec<I420Frame>, f64)> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let (frames, fps) = match ext.as_str() {
        "y4m" => read_y4m(path, MAX_VIDEO_FRAMES)?,
        "mp4" | "m4v" | "mov" => read_mp4_h264(path, MAX_VIDEO_FRAMES)?,
        _ => bail!(
            "{}: unsupported video file (Y4M, or MP4 with H.264)",
            path.display()
        ),
    };
    anyhow::ensure!(!frames.is_empty(), "{} has no frames", path.display());
    anyhow::ensure!(
        fps.is_finite() && fps > 0.0,
        "{} has no usable frame rate ({fps})",
        path.display()
    );
    Ok((frames, fps))
}

/// The H.264 track of an MP4 file, decoded: the samples' length-prefixed NAL units become
/// Annex-B access units (parameter sets before each key frame) for OpenH264.
fn read_mp4_h264(path: &Path, max_frames: usize) -> anyhow::Result<(Vec<I420Frame>, f64)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut mp4 = mp4::Mp4Reader::read_header(std::io::BufReader::new(file), size)
        .with_context(|| format!("{}: not a readable MP4 file", path.display()))?;
    let (track_id, fps, samples, length_size, parameter_sets) = {
        let track = mp4
            .tracks()
            .values()
            .find(|t| matches!(t.media_type(), Ok(mp4::MediaType::H264)))
            .with_context(|| format!("{}: no H.264 video track", path.display()))?;
        let avc = track
            .trak
            .mdia
            .minf
            .stbl
            .stsd
            .avc1
            .as_ref()
            .with_context(|| format!("{}: H.264 track without avcC", path.display()))?;
        let mut parameter_sets = Vec::new();
        for nal in avc
            .avcc
            .sequence_parameter_sets
            .iter()
            .chain(&avc.avcc.picture_parameter_sets)
        {
            parameter_sets.extend_from_slice(&[0, 0, 0, 1]);
            parameter_sets.extend_from_slice(&nal.bytes);
        }
        (
            track.track_id(),
            track.frame_rate(),
            track.sample_count(),
            avc.avcc.length_size_minus_one as usize + 1,
            parameter_sets,
        )
    };
    let mut decoder = H264Decoder::new(usize::MAX)?;
    let mut frames = Vec::new();
    for sample_id in 1..=samples {
        if frames.len() >= max_frames {
            break;
        }
        let Some(sample) = mp4
            .read_sample(track_id, sample_id)
            .with_context(|| format!("{}: reading video sample {sample_id}", path.display()))?
        else {
            continue;
        };
        let mut access_unit = Vec::with_capacity(sample.bytes.len() + parameter_sets.len());
        if sample.is_sync {
            access_unit.extend_from_slice(&parameter_sets);
        }
        let mut rest = &sample.bytes[..];
        while !rest.is_empty() {
            anyhow::ensure!(
                rest.len() >= length_size,
                "{}: video sample {sample_id} is cut short",
                path.display()
            );
            let len = rest[..length_size]
                .iter()
                .fold(0usize, |n, b| (n << 8) | *b as usize);
            let nal = rest.get(length_size..length_size + len).with_context(|| {
                format!("{}: video sample {sample_id} is cut short", path.display())
            })?;
            access_unit.extend_from_slice(&[0, 0, 0, 1]);
            access_unit.extend_from_slice(nal);
            rest = &rest[length_size + len..];
        }
        if let Some(picture) = decoder
            .decode_yuv(&access_unit)
            .with_context(|| format!("{}: decoding video sample {sample_id}", path.display()))?
        {
            let mut data = Vec::with_capacity(picture.width * picture.height * 3 / 2);
            data.extend_from_slice(picture.y);
            data.extend_from_slice(picture.u);
            data.extend_from_slice(picture.v);
            frames.push(I420Frame {
                width: picture.width,
                height: picture.height,
                data,
            });
        }
    }
    Ok((frames, fps))
}

/// Calls the server and measures every turn; writes the CSV and the markdown when asked to.
pub async fn run_call_bench(options: CallBenchOptions) -> anyhow::Result<CallBenchReport> {
    anyhow::ensure!(options.turns > 0, "--turns must be at least 1");
    anyhow::ensure!(!options.prompts.is_empty(), "no --prompt given");
    for (what, t) in [
        ("--speech-threshold", options.speech_threshold),
        ("--audible-threshold", options.audible_threshold),
    ] {
        anyhow::ensure!(
            t > 0.0 && t < 1.0,
            "{what} must lie between 0 and 1 (a sample level), got {t}"
        );
    }
    let prompts = options
        .prompts
        .iter()
        .map(|p| load_prompt(p, options.speech_threshold))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let over = options
        .over
        .iter()
        .map(|p| load_prompt(p, options.speech_threshold))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let video = match &options.video {
        Some(v) => {
            let (frames, file_fps) = read_video(&v.path)?;
            let fps = v.fps.unwrap_or(file_fps);
            anyhow::ensure!(
                fps.is_finite() && fps > 0.0,
                "--video-fps must be positive, got {fps}"
            );
            Some((v.codec, frames, fps))
        }
        None => None,
    };

    let mut config = ClientConfig::new(options.url.clone());
    config.token = options.token.clone();
    config.voice = options.voice.clone();
    config.reply_mode = Some(ReplyMode::Voice);
    config.rtc = options.rtc.clone();
    config.video = video.as_ref().map(|(codec, _, _)| *codec);
    let call = CallClient::connect(config)
        .await
        .with_context(|| format!("calling {}", options.url))?;
    tracing::info!(call = call.call_id(), "connected");

    let (mic_tx, mic_rx) = unbounded_channel();
    let mic = tokio::spawn(run_microphone(call.media(), call.started(), mic_rx));
    let camera = video.map(|(_, frames, fps)| {
        let media = call.media();
        tokio::spawn(async move {
            // runs until the call ends (the task is stopped then)
            let forever = Duration::from_secs(24 * 3600);
            if let Err(e) = media.send_i420_frames(&frames, fps, forever).await {
                tracing::warn!("camera stream stopped: {e:#}");
            }
        })
    });
    let mut recorder = Recorder {
        log: CallLog {
            offer_sent: ms(call.signaling().offer_sent),
            ..Default::default()
        },
        call,
        mic: mic_tx,
        audible_threshold: options.audible_threshold,
    };
    let run = drive(&mut recorder, &options, &prompts, &over).await;

    // stop the microphone and the camera, hang up, then judge
    if let Some(camera) = camera {
        camera.abort();
    }
    let Recorder {
        call,
        mic: mic_tx,
        log,
        ..
    } = recorder;
    drop(mic_tx);
    if run.is_err() {
        mic.abort();
    }
    let mic = mic.await;
    if let Err(e) = call.hang_up().await {
        tracing::warn!("hanging up: {e:#}");
    }
    run?;
    let late_packets = match mic {
        Ok(Ok(late)) => late,
        Ok(Err(e)) => return Err(e.context("the microphone stream failed")),
        Err(e) => bail!("the microphone task failed: {e}"),
    };

    let mut warnings = Vec::new();
    let (rows, clock) = analyse(
        &log,
        options.warmup,
        options.turns,
        options.barge_in_at.is_some(),
        &mut warnings,
    )?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let report = CallBenchReport {
        url: options.url.clone(),
        rows,
        clock,
        warnings,
        packets_received: log.packets,
        audible_packets: log.loud.len() as u64,
        late_packets,
        barge_in_at: options.barge_in_at,
        warmup: options.warmup,
    };
    if let Some(path) = &options.csv {
        std::fs::write(path, report.to_csv())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &options.markdown {
        std::fs::write(path, report.to_markdown())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Plays the prompts and waits for the answers.
async fn drive(
    rec: &mut Recorder,
    options: &CallBenchOptions,
    prompts: &[Prompt],
    over: &[Prompt],
) -> anyhow::Result<()> {
    let total = options.warmup + options.turns;
    let mut queue: VecDeque<&Prompt> = prompts.iter().cycle().take(total + 1).collect();
    let mut next_prompt = || queue.pop_front().context("no prompt left");
    let gap = ms(options.gap);
    let turn_name = |k: usize| {
        if k < options.warmup {
            format!("warm-up turn {}", k + 1)
        } else {
            format!("turn {}", k + 1 - options.warmup)
        }
    };
    rec.wait_until(rec.now() + gap, |_, _| false).await?;
    match options.barge_in_at {
        None => {
            for k in 0..total {
                let played = rec.play(next_prompt()?).await?;
                if !rec.wait_answer(played.end, options.answer_timeout).await? {
                    tracing::warn!("{}: no complete answer in time", turn_name(k));
                }
                tracing::info!("{} done", turn_name(k));
                rec.wait_until(rec.now() + gap, |_, _| false).await?;
            }
        }
        Some(barge_in_at) if !over.is_empty() => {
            let mut over = over.iter().cycle();
            for k in 0..total {
                let played = rec.play(next_prompt()?).await?;
                let end = played.end;
                let until = end + ms(options.answer_timeout);
                rec.wait_until(until, |log, _| log.first_loud_after(end).is_some())
                    .await?;
                let Some(first) = rec.log.first_loud_after(end) else {
                    tracing::warn!("{}: no answer to speak over", turn_name(k));
                    continue;
                };
                rec.wait_until(first.first + ms(barge_in_at), |_, _| false)
                    .await?;
                tracing::info!("{}: speaking over the answer", turn_name(k));
                let spoken = rec
                    .play_over(over.next().context("no --over prompt")?)
                    .await?;
                // the answer plays on (or is cut, and what was said over it is answered)
                rec.wait_answer(end, options.answer_timeout).await?;
                if rec.log.user_turn_after(spoken.onset, None).is_some() {
                    rec.wait_answer(spoken.end, options.answer_timeout).await?;
                }
                rec.wait_until(rec.now() + gap, |_, _| false).await?;
            }
        }
        Some(barge_in_at) => {
            let mut played = rec.play(next_prompt()?).await?;
            for k in 0..total {
                let end = played.end;
                let until = end + ms(options.answer_timeout);
                rec.wait_until(until, |log, _| log.first_loud_after(end).is_some())
                    .await?;
                match rec.log.first_loud_after(end) {
                    Some(first) => {
                        let at = first.first + ms(barge_in_at);
                        rec.wait_until(at, |_, _| false).await?;
                    }
                    None => tracing::warn!("{}: no answer to cut", turn_name(k)),
                }
                tracing::info!("{}: cutting in", turn_name(k));
                played = rec.play(next_prompt()?).await?;
            }
            // the last prompt only cut the last answer: let its own answer finish
            rec.wait_answer(played.end, options.answer_timeout).await?;
        }
    }
    // marks of the last turns may still be on their way
    let until = rec.now() + TIMINGS_GRACE_MS;
    let measured: Vec<f64> = rec.log.played.iter().map(|p| p.end).collect();
    rec.wait_until(until, |log, _| {
        measured.iter().all(|&end| {
            log.user_turn_after(end, None)
                .is_none_or(|t| log.timings(t).is_some())
        })
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(at: f64, t_ms: f64, message: ServerMessage) -> Message {
        Message { at, t_ms, message }
    }

    fn user_turn(turn: u64) -> ServerMessage {
        ServerMessage::UserTurn {
            turn,
            audio_ms: 1000.0,
            video_frames: 0,
            text: None,
        }
    }

    fn marks(turn: u64, speech_end: f64) -> ServerMessage {
        ServerMessage::Timings(TimingMarks {
            turn,
            speech_end_ms: Some(speech_end),
            end_of_turn_ms: Some(speech_end + 500.0),
            speculated_at_ms: None,
            prefill_done_ms: Some(speech_end + 600.0),
            first_text_token_ms: Some(speech_end + 650.0),
            first_codec_token_ms: Some(speech_end + 700.0),
            first_waveform_chunk_ms: Some(speech_end + 750.0),
            first_audio_frame_ms: Some(speech_end + 800.0),
            video_frames: 0,
        })
    }

    fn loud(at: f64) -> LoudPacket {
        LoudPacket {
            at,
            first: at + 2.0,
            last: at + 19.0,
        }
    }

    /// Two prompts, the server's clock 100 ms behind the client's (its zero 100 ms after the
    /// client's), messages taking 1 ms.
    fn two_turns(barge_in: bool) -> CallLog {
        let offset = 100.0;
        let mut log = CallLog {
            offer_sent: 99.0,
            prompts: vec!["a.wav".into(), "b.wav".into()],
            played: vec![
                Played {
                    onset: 1_000.0,
                    end: 2_000.0,
                },
                Played {
                    onset: 3_200.0,
                    end: 4_500.0,
                },
            ],
            ..Default::default()
        };
        let server = |client: f64| client - offset;
        let m = |at: f64, message| msg(at + 1.0, server(at), message);
        // turn 1: speech end seen 30 ms late, audible 850 ms after the end
        log.messages.push(m(500.0, user_turn(99)));
        log.messages.push(m(2_500.0, user_turn(1)));
        for i in 0..60 {
            log.loud.push(loud(2_850.0 + 20.0 * i as f64));
        }
        if barge_in {
            // cut: the last packet arrives at 3_370
            log.loud.retain(|p| p.at <= 3_380.0);
            log.messages.push(m(
                3_390.0,
                ServerMessage::Interrupted {
                    turn: 1,
                    heard_ms: 500.0,
                    kept_text: String::new(),
                },
            ));
        } else {
            log.messages
                .push(m(4_000.0, ServerMessage::AnswerDone { turn: 1 }));
        }
        log.messages.push(m(4_001.0, marks(1, server(2_030.0))));
        // turn 2
        log.messages.push(m(5_000.0, user_turn(2)));
        log.loud.push(loud(5_400.0));
        log.messages
            .push(m(6_000.0, ServerMessage::AnswerDone { turn: 2 }));
        log.messages.push(m(6_001.0, marks(2, server(4_520.0))));
        log
    }

    #[test]
    fn turns_are_measured_from_the_end_of_speech() {
        let log = two_turns(false);
        let mut warnings = vec![];
        let (rows, clock) = analyse(&log, 0, 2, false, &mut warnings).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        // offset within [99, 101]: the middle, ± 1
        assert!((clock.estimate_ms - 100.025).abs() < 1e-9, "{clock:?}");
        assert!((clock.uncertainty_ms - 1.025).abs() < 1e-9, "{clock:?}");
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!((r.turn, r.server_turn), (1, Some(1)));
        assert_eq!(r.prompt, "a.wav");
        let expected = [30.0, 530.0, 630.0, 680.0, 730.0, 780.0, 830.0];
        for (got, want) in r.stages.iter().zip(expected) {
            assert!((got.unwrap() - want).abs() < 0.1, "{:?}", r.stages);
        }
        assert_eq!(r.voice_to_voice(), Some(852.0));
        assert_eq!(r.barge_in, None);
        assert_eq!(rows[1].voice_to_voice(), Some(902.0));
        assert!((rows[1].stages[0].unwrap() - 20.0).abs() < 0.1);
    }

    #[test]
    fn warm_up_turns_are_left_out() {
        let log = two_turns(false);
        let mut warnings = vec![];
        let (rows, _) = analyse(&log, 1, 1, false, &mut warnings).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].turn, rows[0].server_turn), (1, Some(2)));
        assert_eq!(rows[0].prompt, "b.wav");
    }

    #[test]
    fn barge_in_runs_from_the_onset_to_the_last_audible_sample() {
        let log = two_turns(true);
        let mut warnings = vec![];
        let (rows, _) = analyse(&log, 0, 1, true, &mut warnings).unwrap();
        // the last packet (3_370) ends audibly at 3_389, the onset was 3_200
        assert_eq!(rows[0].barge_in, Some(189.0));
        assert!(warnings.is_empty(), "{warnings:?}");
        // an answer that ran to its end was not cut
        let log = two_turns(false);
        let mut warnings = vec![];
        let (rows, _) = analyse(&log, 0, 1, true, &mut warnings).unwrap();
        assert_eq!(rows[0].barge_in, None);
        assert!(warnings[0].contains("not cut"), "{warnings:?}");
    }

    #[test]
    fn an_answer_still_playing_at_the_end_of_speech_is_not_taken_for_the_next() {
        let mut log = two_turns(false);
        // turn 1's answer runs on over the second prompt's end
        for i in 0..200 {
            log.loud.push(loud(4_000.0 + 20.0 * i as f64));
        }
        log.loud.sort_by(|a, b| a.at.total_cmp(&b.at));
        let mut warnings = vec![];
        let (rows, _) = analyse(&log, 0, 2, false, &mut warnings).unwrap();
        assert_eq!(rows[1].voice_to_voice(), None);
        assert!(warnings.iter().any(|w| w.contains("still arriving")));
    }

    #[test]
    fn missing_turns_and_marks_are_named() {
        let mut log = two_turns(false);
        log.messages.retain(|m| {
            !matches!(
                m.message,
                ServerMessage::Timings(TimingMarks { turn: 2, .. })
            )
        });
        let mut warnings = vec![];
        let (rows, _) = analyse(&log, 0, 2, false, &mut warnings).unwrap();
        assert!(rows[1].stages[..7].iter().all(Option::is_none));
        assert_eq!(warnings, vec!["turn 2: no timing marks for server turn 2"]);
        // a server clock that cannot be: a message before the offer went out
        log.offer_sent = 10_000.0;
        let err = analyse(&log, 0, 2, false, &mut vec![]).unwrap_err();
        assert!(err.to_string().contains("inconsistent"), "{err}");
    }

    #[test]
    fn csv_and_summary() {
        let log = two_turns(false);
        let (rows, clock) = analyse(&log, 0, 2, false, &mut vec![]).unwrap();
        let report = CallBenchReport {
            url: "http://x".into(),
            rows,
            clock,
            warnings: vec![],
            packets_received: 100,
            audible_packets: 61,
            late_packets: 0,
            barge_in_at: None,
            warmup: 0,
        };
        let csv = report.to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], csv_header());
        assert_eq!(
            lines[0],
            "turn,server_turn,prompt,speech_end_ms,end_of_turn_ms,prefill_done_ms,\
             first_text_token_ms,first_codec_token_ms,first_waveform_chunk_ms,\
             first_audio_frame_ms,voice_to_voice_ms,barge_in_ms,pause_ms,clock_uncertainty_ms,\
             interruption,false_cutoff"
        );
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].starts_with("1,1,a.wav,30.0,530.0,"),
            "{}",
            lines[1]
        );
        assert!(lines[1].ends_with(",852.0,,,1.02,,0") || lines[1].ends_with(",852.0,,,1.03,,0"));
        let summary = report.summary();
        assert_eq!(summary.len(), 8);
        let v2v = &summary[7];
        assert_eq!(v2v.stage, "voice_to_voice");
        assert_eq!((v2v.count, v2v.min, v2v.max), (2, 852.0, 902.0));
        assert_eq!(v2v.median, 877.0);
        let md = report.to_markdown();
        assert!(
            md.contains("| voice_to_voice | 2 | 852.0 | 877.0 | 902.0 | 902.0 |"),
            "{md}"
        );
        assert_eq!(csv_field("a,b\"c"), "\"a,b\"\"c\"");
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let s = summarize("x", (1..=10).map(f64::from).rev().collect()).unwrap();
        assert_eq!((s.min, s.median, s.p90, s.max), (1.0, 5.5, 9.0, 10.0));
        let s = summarize("x", vec![4.0]).unwrap();
        assert_eq!((s.median, s.p90), (4.0, 4.0));
        assert!(summarize("x", vec![]).is_none());
    }

    #[test]
    fn speech_is_found_by_level() {
        let mut pcm = vec![0.0f32; 100];
        pcm[10] = 0.5;
        pcm[70] = -0.2;
        pcm[80] = 0.006;
        assert_eq!(speech_extent(&pcm, 0.01), Some((10, 70)));
        assert_eq!(speech_extent(&[0.0; 5], 0.01), None);
        let audio = ReceivedAudio {
            at: Duration::from_millis(1_000),
            sequence: 0,
            rtp_timestamp: 0,
            samples: pcm.iter().map(|s| s * 2.0).collect(),
        };
        let p = loud_packet(&audio, 0.01).unwrap();
        assert!((p.first - (1_000.0 + 10.0 / 48.0)).abs() < 1e-9);
        assert!((p.last - (1_000.0 + 80.0 / 48.0)).abs() < 1e-9);
    }

    #[test]
    fn bad_arguments_are_named() {
        let args = CallArgs {
            url: "http://127.0.0.1:1".into(),
            prompts: vec![],
            video: None,
            video_codec: VideoCodec::Vp8,
            video_fps: None,
            turns: 1,
            warmup: 0,
            barge_in_at: Some(-1.0),
            over: vec![],
            token: None,
            voice: None,
            gap: 1.0,
            answer_timeout: 5.0,
            speech_threshold: 0.01,
            audible_threshold: 0.01,
            udp_addrs: vec![],
            csv: "x.csv".into(),
            markdown: None,
        };
        let err = args.clone().into_options().unwrap_err();
        assert!(err.to_string().contains("--barge-in-at"), "{err}");
        assert_eq!(parse_codec("H264"), Ok(VideoCodec::H264));
        assert!(parse_codec("av1").unwrap_err().contains("av1"));
        let err = read_video(Path::new("clip.avi")).unwrap_err();
        assert!(err.to_string().contains("unsupported video file"), "{err}");
        let err = load_prompt(Path::new("/nonexistent.wav"), 0.01).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent.wav"), "{err:#}");
    }

    #[test]
    fn prompts_are_trimmed_to_their_speech() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/media/hello16k.wav");
        let prompt = load_prompt(&path, 0.01).unwrap();
        assert_eq!(prompt.name, "hello16k.wav");
        assert_eq!(prompt.onset, 0);
        assert_eq!(prompt.end, prompt.pcm.len() - 1);
        assert!(prompt.pcm[0].abs() > 0.01 && prompt.pcm[prompt.end].abs() > 0.01);
        // about 1.6 s of its 3 s are speech
        let seconds = prompt.pcm.len() as f64 / OPUS_RATE as f64;
        assert!((1.5..1.8).contains(&seconds), "{seconds} s");
        let err = load_prompt(&path, 0.99).unwrap_err();
        assert!(err.to_string().contains("no sample above"), "{err}");
    }

    #[test]
    fn mp4_h264_frames_are_decoded() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/media/speech.mp4");
        let (frames, fps) = read_video(&path).unwrap();
        assert_eq!(fps, 2.0);
        assert!(frames.len() >= 4, "{} frames", frames.len());
        let f = &frames[0];
        assert_eq!((f.width, f.height), (64, 48));
        assert_eq!(f.data.len(), 64 * 48 * 3 / 2);
    }
}
