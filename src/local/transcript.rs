//! The live transcript in the terminal: the user's turns, the model's text as it streams,
//! interruptions, state changes and errors, each line stamped with the time since the input
//! started; and the per-turn timing marks.

use std::io::Write;
use std::time::Duration;

use crate::engine::session::{SessionEvent, TurnTimings};
use crate::engine::turn::TurnState;

/// Where the transcript goes.
pub type TranscriptWriter = Box<dyn Write + Send>;

fn seconds(t: Duration) -> String {
    format!("{:8.2}", t.as_secs_f64())
}

fn state_name(state: TurnState) -> &'static str {
    match state {
        TurnState::Listening => "listening",
        TurnState::UserSpeaking => "you are speaking",
        TurnState::Thinking => "thinking",
        TurnState::Speaking => "speaking",
    }
}

/// Prints session events as they come.
pub struct Transcript {
    out: TranscriptWriter,
    verbose: bool,
    origin: Duration,
    /// The turn whose answer line is open (text is being appended to it).
    open_answer: Option<u64>,
    state: Option<TurnState>,
}

impl Transcript {
    pub fn new(out: TranscriptWriter, verbose: bool) -> Self {
        Self {
            out,
            verbose,
            origin: Duration::ZERO,
            open_answer: None,
            state: None,
        }
    }

    /// Times are shown from `origin` (the start of the input) on.
    pub fn set_origin(&mut self, origin: Duration) {
        self.origin = origin;
    }

    fn stamp(&self, now: Duration) -> String {
        format!("[{}]", seconds(now.saturating_sub(self.origin)))
    }

    fn close_answer(&mut self) {
        if self.open_answer.take().is_some() {
            let _ = writeln!(self.out);
        }
    }

    fn line(&mut self, now: Duration, text: &str) {
        self.close_answer();
        let stamp = self.stamp(now);
        let _ = writeln!(self.out, "{stamp} {text}");
        let _ = self.out.flush();
    }

    /// A note of the transport itself (devices opened, input ended, stopping).
    pub fn note(&mut self, now: Duration, text: &str) {
        self.line(now, &format!("-- {text}"));
    }

    pub fn event(&mut self, now: Duration, event: &SessionEvent) {
        match event {
            SessionEvent::State(state) => {
                let changed = self.state != Some(*state);
                self.state = Some(*state);
                // a state change would cut the streaming answer line: it shows there anyway
                if changed && (self.open_answer.is_none() || self.verbose) {
                    self.line(now, &format!("({})", state_name(*state)));
                }
            }
            SessionEvent::UserTurn {
                turn,
                audio,
                video_frames,
                text,
            } => {
                let what = match text {
                    Some(text) => format!("you (turn {turn}, typed): {text}"),
                    None if *video_frames > 0 => format!(
                        "you (turn {turn}): {:.2} s of speech, {video_frames} camera frames",
                        audio.as_secs_f64()
                    ),
                    None => format!("you (turn {turn}): {:.2} s of speech", audio.as_secs_f64()),
                };
                self.line(now, &what);
            }
            SessionEvent::AssistantText { turn, delta } => {
                if self.open_answer != Some(*turn) {
                    self.close_answer();
                    let stamp = self.stamp(now);
                    let _ = write!(self.out, "{stamp} model (turn {turn}): ");
                    self.open_answer = Some(*turn);
                }
                let _ = write!(self.out, "{delta}");
                let _ = self.out.flush();
            }
            SessionEvent::Audio { .. } => {}
            SessionEvent::Interrupted {
                turn,
                heard,
                kept_text,
            } => {
                let kept = if kept_text.is_empty() {
                    String::new()
                } else {
                    format!(", the model keeps \"{kept_text}\"")
                };
                self.line(
                    now,
                    &format!(
                        "[interrupted] answer to turn {turn} cut after {:.2} s heard{kept}",
                        heard.as_secs_f64()
                    ),
                );
            }
            SessionEvent::Paused { turn } => {
                self.line(
                    now,
                    &format!("[paused] answer to turn {turn}: speech over it"),
                );
            }
            SessionEvent::Resumed { turn } => {
                self.line(
                    now,
                    &format!("[resumed] answer to turn {turn} (not an interruption)"),
                );
            }
            SessionEvent::AnswerDone { turn } => {
                if self.open_answer == Some(*turn) {
                    self.close_answer();
                }
                if self.verbose {
                    self.line(now, &format!("(answer to turn {turn} done)"));
                }
            }
            SessionEvent::Timings(timings) => {
                if self.verbose {
                    let text = format!("timings: {}", timing_line(timings));
                    self.line(now, &text);
                }
            }
            SessionEvent::Error(message) => self.line(now, &format!("! session error: {message}")),
        }
    }

    /// Ends any open line and prints the timing table.
    pub fn finish(&mut self, timings: &[TurnTimings]) {
        self.close_answer();
        if !timings.is_empty() {
            let _ = write!(self.out, "{}", timing_table(timings, self.origin));
        }
        let _ = self.out.flush();
    }
}

fn after(mark: Option<Duration>, from: Option<Duration>) -> String {
    match (mark, from) {
        (Some(mark), Some(from)) => {
            let ms = mark.as_secs_f64() * 1000.0 - from.as_secs_f64() * 1000.0;
            format!("{ms:+.0} ms")
        }
        (Some(mark), None) => format!("@{:.3} s", mark.as_secs_f64()),
        (None, _) => "-".into(),
    }
}

/// One turn's marks, each after the end of the user's speech.
pub fn timing_line(t: &TurnTimings) -> String {
    let from = t.speech_end;
    format!(
        "turn {}: end of turn {}, prefill done {}, first text {}, first codec {}, first wave {}, \
         first audio {}",
        t.turn,
        after(t.end_of_turn, from),
        after(t.prefill_done, from),
        after(t.first_text_token, from),
        after(t.first_codec_token, from),
        after(t.first_waveform_chunk, from),
        after(t.first_audio_frame, from)
    )
}

/// The timing marks of every turn as a markdown table, in milliseconds after the end of the
/// user's speech (itself in seconds after `origin`).
pub fn timing_table(timings: &[TurnTimings], origin: Duration) -> String {
    let mut out = String::from(
        "\n| turn | speech end (s) | end of turn | prefill done | first text | first codec | \
         first wave | first audio |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for t in timings {
        let from = t.speech_end;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            t.turn,
            t.speech_end
                .map(|s| format!("{:.2}", s.saturating_sub(origin).as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            after(t.end_of_turn, from),
            after(t.prefill_done, from),
            after(t.first_text_token, from),
            after(t.first_codec_token, from),
            after(t.first_waveform_chunk, from),
            after(t.first_audio_frame, from)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn streaming_text_stays_on_one_line_and_interruptions_show() {
        let out = Shared::default();
        let mut t = Transcript::new(Box::new(out.clone()), false);
        t.set_origin(ms(1000));
        t.event(ms(1100), &SessionEvent::State(TurnState::UserSpeaking));
        t.event(
            ms(3000),
            &SessionEvent::UserTurn {
                turn: 1,
                audio: ms(1800),
                video_frames: 0,
                text: None,
            },
        );
        for word in ["Hel", "lo", " there"] {
            t.event(
                ms(3500),
                &SessionEvent::AssistantText {
                    turn: 1,
                    delta: word.into(),
                },
            );
        }
        t.event(ms(3600), &SessionEvent::State(TurnState::Speaking));
        t.event(
            ms(4000),
            &SessionEvent::Interrupted {
                turn: 1,
                heard: ms(400),
                kept_text: "Hello".into(),
            },
        );
        let timings = TurnTimings {
            turn: 1,
            speech_end: Some(ms(2400)),
            end_of_turn: Some(ms(3000)),
            first_audio_frame: Some(ms(3550)),
            ..Default::default()
        };
        t.finish(std::slice::from_ref(&timings));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "[    0.10] (you are speaking)");
        assert_eq!(lines[1], "[    2.00] you (turn 1): 1.80 s of speech");
        assert_eq!(lines[2], "[    2.50] model (turn 1): Hello there");
        assert!(lines[3].contains("[interrupted] answer to turn 1 cut after 0.40 s heard"));
        assert!(
            text.contains("| 1 | 1.40 | +600 ms | - | - | - | - | +1150 ms |"),
            "{text}"
        );
    }
}
