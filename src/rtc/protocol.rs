//! The data channel protocol: JSON text messages, one object each, tagged by `"type"`.
//!
//! Server to client ([`ServerMessage`], wrapped in an [`Envelope`] that adds `t_ms`, the
//! session time in milliseconds when the server sent it):
//!
//! ```json
//! {"type":"hello","t_ms":3.1,"call_id":"9f..","voices":["Chelsie","Ethan"],"voice":"Chelsie","reply_mode":"voice"}
//! {"type":"state","t_ms":812.0,"state":"user_speaking"}
//! {"type":"user_turn","t_ms":2410.5,"turn":1,"audio_ms":1800.0,"video_frames":4,"text":null}
//! {"type":"assistant_text","t_ms":2601.2,"turn":1,"delta":"Hello"}
//! {"type":"interrupted","t_ms":4000.0,"turn":1,"heard_ms":960.0,"kept_text":"Hello there"}
//! {"type":"answer_done","t_ms":5000.0,"turn":1}
//! {"type":"timings","t_ms":5000.0,"turn":1,"speech_end_ms":2400.0,"end_of_turn_ms":2410.0, ...}
//! {"type":"error","t_ms":10.0,"message":"video: VP8 frame of 16000x16000 exceeds ..."}
//! {"type":"error","t_ms":61000.0,"message":"the session is behind its input: shed 12 camera frames (camera frames go first, then audio)"}
//! ```
//!
//! Client to server ([`ClientMessage`]):
//!
//! ```json
//! {"type":"interrupt"}
//! {"type":"text","text":"What do you see?"}
//! {"type":"voice","voice":"Ethan"}
//! {"type":"reply_mode","mode":"text"}
//! {"type":"hangup"}
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::session::{Control, ReplyMode, SessionEvent, TurnTimings};
use crate::engine::turn::TurnState;

/// The label of the data channel the client opens.
pub const DATA_CHANNEL_LABEL: &str = "omnicall";
/// Longest typed message accepted, in characters.
pub const MAX_TEXT_CHARS: usize = 4_000;

/// The conversation state shown to the client (the engine's [`TurnState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    Listening,
    UserSpeaking,
    Thinking,
    Speaking,
}

impl From<TurnState> for CallState {
    fn from(s: TurnState) -> Self {
        match s {
            TurnState::Listening => CallState::Listening,
            TurnState::UserSpeaking => CallState::UserSpeaking,
            TurnState::Thinking => CallState::Thinking,
            TurnState::Speaking => CallState::Speaking,
        }
    }
}

/// Media-time marks of one turn in milliseconds on the session clock (see [`TurnTimings`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimingMarks {
    pub turn: u64,
    pub speech_end_ms: Option<f64>,
    pub end_of_turn_ms: Option<f64>,
    /// The answer was started before the end of turn was confirmed.
    #[serde(default)]
    pub speculated_at_ms: Option<f64>,
    pub prefill_done_ms: Option<f64>,
    pub first_text_token_ms: Option<f64>,
    pub first_codec_token_ms: Option<f64>,
    pub first_waveform_chunk_ms: Option<f64>,
    pub first_audio_frame_ms: Option<f64>,
    /// Camera frames the Thinker encoded into the turn's context.
    #[serde(default)]
    pub video_frames: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl From<&TurnTimings> for TimingMarks {
    fn from(t: &TurnTimings) -> Self {
        Self {
            turn: t.turn,
            speech_end_ms: t.speech_end.map(ms),
            end_of_turn_ms: t.end_of_turn.map(ms),
            speculated_at_ms: t.speculated_at.map(ms),
            prefill_done_ms: t.prefill_done.map(ms),
            first_text_token_ms: t.first_text_token.map(ms),
            first_codec_token_ms: t.first_codec_token.map(ms),
            first_waveform_chunk_ms: t.first_waveform_chunk.map(ms),
            first_audio_frame_ms: t.first_audio_frame.map(ms),
            video_frames: t.video_frames_prefilled,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// First message once the channel is open.
    Hello {
        call_id: String,
        voices: Vec<String>,
        voice: String,
        reply_mode: ReplyMode,
    },
    State {
        state: CallState,
    },
    UserTurn {
        turn: u64,
        audio_ms: f64,
        video_frames: usize,
        text: Option<String>,
    },
    AssistantText {
        turn: u64,
        delta: String,
    },
    Interrupted {
        turn: u64,
        heard_ms: f64,
        kept_text: String,
    },
    /// Speech over the answer: its voice is paused while the server decides.
    Paused {
        turn: u64,
    },
    /// It was a backchannel or a noise: the answer plays on.
    Resumed {
        turn: u64,
    },
    AnswerDone {
        turn: u64,
    },
    Timings(TimingMarks),
    Error {
        message: String,
    },
}

impl ServerMessage {
    /// The message for a session event; `None` for the voice frames, which go as RTP.
    pub fn from_event(event: &SessionEvent) -> Option<Self> {
        Some(match event {
            SessionEvent::State(s) => ServerMessage::State { state: (*s).into() },
            SessionEvent::UserTurn {
                turn,
                audio,
                video_frames,
                text,
            } => ServerMessage::UserTurn {
                turn: *turn,
                audio_ms: ms(*audio),
                video_frames: *video_frames,
                text: text.clone(),
            },
            SessionEvent::AssistantText { turn, delta } => ServerMessage::AssistantText {
                turn: *turn,
                delta: delta.clone(),
            },
            SessionEvent::Audio { .. } => return None,
            SessionEvent::Interrupted {
                turn,
                heard,
                kept_text,
            } => ServerMessage::Interrupted {
                turn: *turn,
                heard_ms: ms(*heard),
                kept_text: kept_text.clone(),
            },
            SessionEvent::Paused { turn } => ServerMessage::Paused { turn: *turn },
            SessionEvent::Resumed { turn } => ServerMessage::Resumed { turn: *turn },
            SessionEvent::AnswerDone { turn } => ServerMessage::AnswerDone { turn: *turn },
            SessionEvent::Timings(t) => ServerMessage::Timings(t.into()),
            SessionEvent::Error(message) => ServerMessage::Error {
                message: message.clone(),
            },
        })
    }
}

/// A server message with the session time it was sent at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub t_ms: f64,
    #[serde(flatten)]
    pub message: ServerMessage,
}

impl Envelope {
    pub fn new(at: Duration, message: ServerMessage) -> Self {
        Self {
            t_ms: (ms(at) * 10.0).round() / 10.0,
            message,
        }
    }

    pub fn to_json(&self) -> String {
        // Plain data (strings, numbers, options): serialising cannot fail.
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"type\":\"error\",\"message\":\"{e}\"}}"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Stop the model's answer now.
    Interrupt,
    /// A typed user turn.
    Text { text: String },
    /// Answer with this voice from now on.
    Voice { voice: String },
    /// Answer with voice or with text only.
    ReplyMode { mode: ReplyMode },
    /// End the call (as `DELETE /v1/calls/{id}` does).
    Hangup,
}

/// What a client message asks the call to do.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientRequest {
    Control(Control),
    Hangup,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad control message: {0}")]
    Malformed(String),
    #[error("text message of {0} characters (at most {MAX_TEXT_CHARS})")]
    TextTooLong(usize),
    #[error("empty text message")]
    EmptyText,
    #[error("unknown voice {voice:?} (available: {available})")]
    UnknownVoice { voice: String, available: String },
}

impl ClientMessage {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses and checks a client message; `voices` lists the voices a call may pick (any
    /// name is accepted when it is empty).
    pub fn parse(text: &str, voices: &[String]) -> Result<ClientRequest, ProtocolError> {
        let msg: ClientMessage =
            serde_json::from_str(text).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        Ok(match msg {
            ClientMessage::Interrupt => ClientRequest::Control(Control::Interrupt),
            ClientMessage::Text { text } => {
                let text = text.trim();
                let chars = text.chars().count();
                if chars == 0 {
                    return Err(ProtocolError::EmptyText);
                }
                if chars > MAX_TEXT_CHARS {
                    return Err(ProtocolError::TextTooLong(chars));
                }
                ClientRequest::Control(Control::Text(text.to_string()))
            }
            ClientMessage::Voice { voice } => {
                if !voices.is_empty() && !voices.contains(&voice) {
                    return Err(ProtocolError::UnknownVoice {
                        voice,
                        available: voices.join(", "),
                    });
                }
                ClientRequest::Control(Control::Voice(voice))
            }
            ClientMessage::ReplyMode { mode } => ClientRequest::Control(Control::ReplyMode(mode)),
            ClientMessage::Hangup => ClientRequest::Hangup,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_messages_round_trip_with_their_time() {
        let events = [
            SessionEvent::State(TurnState::UserSpeaking),
            SessionEvent::UserTurn {
                turn: 3,
                audio: Duration::from_millis(1500),
                video_frames: 4,
                text: None,
            },
            SessionEvent::AssistantText {
                turn: 3,
                delta: "Hi \"there\"".into(),
            },
            SessionEvent::Interrupted {
                turn: 3,
                heard: Duration::from_millis(960),
                kept_text: "Hi".into(),
            },
            SessionEvent::AnswerDone { turn: 3 },
            SessionEvent::Timings(TurnTimings {
                turn: 3,
                speech_end: Some(Duration::from_millis(2000)),
                speculated_at: Some(Duration::from_millis(2100)),
                first_audio_frame: Some(Duration::from_millis(2450)),
                ..Default::default()
            }),
            SessionEvent::Error("oops".into()),
            SessionEvent::Paused { turn: 3 },
            SessionEvent::Resumed { turn: 3 },
        ];
        for event in &events {
            let msg = ServerMessage::from_event(event).unwrap();
            let env = Envelope::new(Duration::from_micros(12_345), msg);
            let json = env.to_json();
            let back: Envelope = serde_json::from_str(&json).unwrap();
            assert_eq!(back, env, "{json}");
            assert_eq!(back.t_ms, 12.3);
        }
        let json = Envelope::new(
            Duration::ZERO,
            ServerMessage::State {
                state: CallState::UserSpeaking,
            },
        )
        .to_json();
        assert_eq!(
            json,
            r#"{"t_ms":0.0,"type":"state","state":"user_speaking"}"#
        );
        let timings = ServerMessage::from_event(&events[5]).unwrap();
        let json = serde_json::to_string(&timings).unwrap();
        assert!(json.contains(r#""type":"timings""#), "{json}");
        assert!(json.contains(r#""speech_end_ms":2000.0"#), "{json}");
        assert!(
            ServerMessage::from_event(&SessionEvent::Audio {
                turn: 1,
                index: 0,
                at: Duration::ZERO,
                sample_rate: 24_000,
                pcm: vec![0.0; 480],
            })
            .is_none()
        );
    }

    #[test]
    fn client_messages_become_controls() {
        let voices = vec!["Chelsie".to_string(), "Ethan".to_string()];
        assert_eq!(
            ClientMessage::parse(r#"{"type":"interrupt"}"#, &voices),
            Ok(ClientRequest::Control(Control::Interrupt))
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"text","text":"  hello "}"#, &voices),
            Ok(ClientRequest::Control(Control::Text("hello".into())))
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"voice","voice":"Ethan"}"#, &voices),
            Ok(ClientRequest::Control(Control::Voice("Ethan".into())))
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"reply_mode","mode":"text"}"#, &voices),
            Ok(ClientRequest::Control(Control::ReplyMode(ReplyMode::Text)))
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"hangup"}"#, &voices),
            Ok(ClientRequest::Hangup)
        );
        let msg = ClientMessage::ReplyMode {
            mode: ReplyMode::Voice,
        };
        assert_eq!(msg.to_json(), r#"{"type":"reply_mode","mode":"voice"}"#);
    }

    #[test]
    fn bad_client_messages_are_named() {
        let voices = vec!["Chelsie".to_string()];
        for bad in [
            "not json",
            r#"{"type":"dance"}"#,
            r#"{"text":"no type"}"#,
            r#"{"type":"reply_mode","mode":"shout"}"#,
            r#"{"type":"text"}"#,
        ] {
            let err = ClientMessage::parse(bad, &voices).unwrap_err();
            assert!(matches!(err, ProtocolError::Malformed(_)), "{bad}: {err}");
        }
        assert_eq!(
            ClientMessage::parse(r#"{"type":"text","text":"   "}"#, &voices),
            Err(ProtocolError::EmptyText)
        );
        let long = format!(
            r#"{{"type":"text","text":"{}"}}"#,
            "a".repeat(MAX_TEXT_CHARS + 1)
        );
        assert_eq!(
            ClientMessage::parse(&long, &voices),
            Err(ProtocolError::TextTooLong(MAX_TEXT_CHARS + 1))
        );
        let err = ClientMessage::parse(r#"{"type":"voice","voice":"Zed"}"#, &voices).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"unknown voice "Zed" (available: Chelsie)"#
        );
        // any voice when the server lists none
        assert!(ClientMessage::parse(r#"{"type":"voice","voice":"Zed"}"#, &[]).is_ok());
    }
}
