//! The session API every transport drives: timestamped audio and video in, a stream of events
//! out (the model's voice in 20 ms frames, text of both sides, state changes, timing marks).
//!
//! A transport talks to a running session only through a [`SessionHandle`]: a sender of
//! [`SessionInput`] and a receiver of [`SessionEvent`]. The session runs its compute on its own
//! threads; the handle is cheap to clone and safe to use from async code (sends never block; both
//! channels are bounded: [`super::queues`]).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;

use super::end_of_turn::EndOfTurnFactory;
pub use super::model_access::ModelPasses;
use super::queues::{InputKind, ModelQueues, NotQueued, QueueCounters, QueueStats};
use super::turn::{TurnConfig, TurnState};
use crate::media::vad::VadConfig;
use crate::media::video::{OFFICIAL_VIDEO_MAX_PIXELS, OFFICIAL_VIDEO_MIN_PIXELS};
use crate::model::chat::SPEECH_SYSTEM_PROMPT;

/// Whether the model answers with voice (and text) or with text only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyMode {
    Voice,
    Text,
}

/// A piece of microphone audio: mono samples at any rate, starting at media time `at`.
#[derive(Debug, Clone)]
pub struct AudioInput {
    pub at: Duration,
    pub sample_rate: u32,
    pub samples: Vec<f32>,
}

/// A camera frame: packed RGB (3 bytes a pixel, row-major), captured at media time `at`.
#[derive(Debug, Clone)]
pub struct VideoInput {
    pub at: Duration,
    pub width: usize,
    pub height: usize,
    pub rgb: Arc<Vec<u8>>,
}

/// A client's control.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// Stop the model's answer now (as a barge-in does, without starting a user turn).
    Interrupt,
    /// A typed user message: a whole user turn on its own.
    Text(String),
    /// Use this voice from the next answer on.
    Voice(String),
    /// Answer with voice or with text only.
    ReplyMode(ReplyMode),
}

#[derive(Debug, Clone)]
pub enum SessionInput {
    Audio(AudioInput),
    Video(VideoInput),
    Control(Control),
    /// End the session: its threads stop and its memory is freed.
    Close,
}

/// Media-time marks of one turn, from the end of the user's speech to the first sound out.
/// Every mark is on the session clock; `None` where the stage did not happen (text-only
/// answers have no codec marks).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TurnTimings {
    pub turn: u64,
    /// The user's speech stopped (first silent VAD frame of the end-of-turn run).
    pub speech_end: Option<Duration>,
    /// The end-of-turn rule decided the turn was over (for a speculative answer: when the end
    /// was confirmed).
    pub end_of_turn: Option<Duration>,
    /// The answer was started speculatively, before the end of turn was confirmed.
    pub speculated_at: Option<Duration>,
    /// The last partial block and the assistant header were prefilled.
    pub prefill_done: Option<Duration>,
    pub first_text_token: Option<Duration>,
    pub first_codec_token: Option<Duration>,
    pub first_waveform_chunk: Option<Duration>,
    /// The first 20 ms frame of the answer was released to the transport.
    pub first_audio_frame: Option<Duration>,
    /// Camera frames the Thinker encoded into the turn's context (frames that came after an
    /// audio-only first block are not shown to it).
    pub video_frames_prefilled: usize,
}

/// What a session tells its transport.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    State(TurnState),
    /// A user turn was taken: `audio` of speech, `video_frames` camera frames, or a typed text.
    UserTurn {
        turn: u64,
        audio: Duration,
        video_frames: usize,
        text: Option<String>,
    },
    /// New text of the model's answer.
    AssistantText {
        turn: u64,
        delta: String,
    },
    /// One 20 ms frame of the model's voice at `sample_rate`, the `index`-th of the answer,
    /// released at `at` on the session clock (frames of an answer are `at` 20 ms apart unless
    /// the voice ran late).
    Audio {
        turn: u64,
        index: u64,
        at: Duration,
        sample_rate: u32,
        pcm: Vec<f32>,
    },
    /// The answer of `turn` was cut: the user heard `heard` of it and the context keeps
    /// `kept_text`.
    Interrupted {
        turn: u64,
        heard: Duration,
        kept_text: String,
    },
    /// Speech over the answer of `turn`: its voice is paused until the engine has told a
    /// barge-in (then `Interrupted`) from a backchannel or a noise (then `Resumed`).
    Paused {
        turn: u64,
    },
    /// The paused answer of `turn` plays on from where it paused.
    Resumed {
        turn: u64,
    },
    /// The answer of `turn` is complete.
    AnswerDone {
        turn: u64,
    },
    Timings(TurnTimings),
    /// Something went wrong with this session's input or compute; the session goes on.
    Error(String),
}

/// Settings of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub voice: String,
    pub system_prompt: String,
    pub reply_mode: ReplyMode,
    pub turn: TurnConfig,
    /// The end-of-turn model of `TurnDetection::Smart` (`None`: Smart Turn).
    pub end_of_turn: Option<EndOfTurnFactory>,
    /// Voice activity detection on the user's audio (WebRTC's VAD: aggressiveness, frame
    /// length, majority smoothing).
    pub vad: VadConfig,
    /// Most tokens the Thinker context may hold; beyond it the oldest video is dropped first.
    pub max_context: usize,
    /// Frames per second sampled from the camera (the model was trained at 2).
    pub video_fps: f64,
    /// Pixels of a camera frame after the processor's resize (each 28x28 pixels cost one
    /// Thinker token per temporal grid): the official live-video bounds by default.
    pub video_min_pixels: usize,
    pub video_max_pixels: usize,
    pub max_answer_tokens: usize,
    /// Longest spoken answer (the reference's Talker limit is 4096 codes, 81.92 s).
    pub max_speech: Duration,
    /// How far the Talker and the vocoder may run ahead of what has been played: work beyond
    /// it waits, so a barge-in wastes at most this much speech.
    pub speech_lead: Duration,
    /// Seeds the Thinker's and the Talker's sampling and the vocoder's noise.
    pub seed: u64,
    /// Where the Thinker's and the Talker's passes run: the session's own clone of the model,
    /// or the loaded model's shared scheduler.
    pub model_passes: ModelPasses,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            voice: "Chelsie".into(),
            system_prompt: SPEECH_SYSTEM_PROMPT.into(),
            reply_mode: ReplyMode::Voice,
            turn: TurnConfig::default(),
            end_of_turn: None,
            vad: VadConfig::default(),
            max_context: 32768,
            video_fps: 2.0,
            video_min_pixels: OFFICIAL_VIDEO_MIN_PIXELS,
            video_max_pixels: OFFICIAL_VIDEO_MAX_PIXELS,
            max_answer_tokens: 512,
            max_speech: Duration::from_millis(4096 * 20),
            speech_lead: Duration::from_secs(3),
            seed: 0,
            model_passes: ModelPasses::OwnClone,
        }
    }
}

/// A transport's end of a running session.
///
/// Both channels are bounded (see [`super::queues`] for the input policy): a session that
/// falls behind sheds camera frames first, and audio only once its queue is full.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub input: Sender<SessionInput>,
    pub events: Receiver<SessionEvent>,
    counters: Arc<QueueCounters>,
    /// The depths of the channels between its model threads.
    model_queues: ModelQueues,
    /// The rate the session hears audio at (the model's); other rates are resampled to it.
    audio_rate: Option<u32>,
}

impl SessionHandle {
    /// A handle on these channels (a transport's tests give it their own).
    pub fn new(input: Sender<SessionInput>, events: Receiver<SessionEvent>) -> Self {
        Self::with_counters(input, events, QueueCounters::new())
    }

    pub(crate) fn with_counters(
        input: Sender<SessionInput>,
        events: Receiver<SessionEvent>,
        counters: Arc<QueueCounters>,
    ) -> Self {
        Self {
            input,
            events,
            counters,
            model_queues: ModelQueues::default(),
            audio_rate: None,
        }
    }

    /// This handle, showing the depths of the session's model channels.
    pub(crate) fn with_model_queues(mut self, model_queues: ModelQueues) -> Self {
        self.model_queues = model_queues;
        self
    }

    /// This handle, saying that the session hears audio at `rate`.
    pub(crate) fn with_audio_rate(mut self, rate: u32) -> Self {
        self.audio_rate = Some(rate);
        self
    }

    /// The rate the session hears audio at, if known: a transport that can decode to it
    /// directly spares the session a resampler (`None`: any rate will do).
    pub fn audio_rate(&self) -> Option<u32> {
        self.audio_rate
    }

    /// Queues a piece of audio; false once the session has ended (a piece shed because the
    /// session is stuck is counted and reported, and the call goes on).
    pub fn push_audio(&self, input: AudioInput) -> bool {
        let length =
            Duration::from_secs_f64(input.samples.len() as f64 / input.sample_rate.max(1) as f64);
        self.offer(InputKind::Audio(length), SessionInput::Audio(input))
    }

    /// Queues a camera frame (shed while the session is behind); false once it has ended.
    pub fn push_video(&self, input: VideoInput) -> bool {
        self.offer(InputKind::Video, SessionInput::Video(input))
    }

    pub fn control(&self, control: Control) -> bool {
        self.offer(InputKind::Control, SessionInput::Control(control))
    }

    /// Ends the session, even one whose input queue is full.
    pub fn close(&self) {
        self.counters.close();
        let _ = self.input.try_send(SessionInput::Close);
    }

    /// The depth of the session's queues and what was shed and re-timed so far.
    pub fn queues(&self) -> QueueStats {
        self.counters
            .stats(&self.input, &self.events, &self.model_queues)
    }

    fn offer(&self, kind: InputKind, input: SessionInput) -> bool {
        self.counters.offer(&self.input, kind, input) != Err(NotQueued::SessionEnded)
    }
}
