//! Media out: the engine's 20 ms voice frames to Opus RTP on the call's audio track.
//!
//! Frames go out the moment they arrive (the engine already paces them in real time), so this
//! adds no buffering delay. Between answers the stream carries Opus silence, one frame per
//! 20 ms, so that RTP timestamps stay continuous and in step with the wall clock: a silence
//! frame goes out whenever the stream has fallen [`SILENCE_AFTER`] behind real time. During an
//! answer the allowance is [`VOICE_SLACK`], so that a voice frame arriving a little late (the
//! engine's thread was not scheduled at once) is not cut by silence; only a real stall is.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::media::Sample;
use tokio::sync::mpsc::UnboundedReceiver;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;

use crate::media::opus::{OpusError, VoiceEncoder};
use crate::rtc::metrics::PacketsOut;

/// One Opus frame.
pub const FRAME: Duration = Duration::from_millis(20);
/// How far behind real time the stream may fall between answers before silence is sent.
pub const SILENCE_AFTER: Duration = Duration::from_millis(60);
/// How far behind real time the stream may fall during an answer before silence is sent.
pub const VOICE_SLACK: Duration = Duration::from_millis(250);

/// What the call hands the audio sender.
#[derive(Debug, Clone, PartialEq)]
pub enum OutAudio {
    /// One frame of the model's voice.
    Voice { sample_rate: u32, pcm: Vec<f32> },
    /// The answer is complete: send what is buffered.
    AnswerEnd,
    /// The answer was cut: drop what is buffered.
    Cut,
}

/// Counters of what was sent.
#[derive(Debug, Default)]
pub struct OutStats {
    pub voice_packets: AtomicU64,
    pub silence_packets: AtomicU64,
    pub write_errors: AtomicU64,
    /// The server's counters (`/metrics`), bumped alongside.
    pub server: Option<PacketsOut>,
}

impl OutStats {
    /// Counts into the server's counters too.
    pub fn with_server(server: PacketsOut) -> Self {
        Self {
            server: Some(server),
            ..Default::default()
        }
    }

    fn sent_voice(&self) {
        self.voice_packets.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = &self.server {
            s.voice.inc();
        }
    }

    fn sent_silence(&self) {
        self.silence_packets.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = &self.server {
            s.silence.inc();
        }
    }
}

/// Where the packets go: the local track and the SSRC and payload type it was negotiated with.
pub struct AudioTrackOut {
    pub track: Arc<TrackLocalStaticSample>,
    pub ssrc: u32,
    pub payload_type: u8,
}

impl AudioTrackOut {
    async fn send(&self, packet: Vec<u8>, stats: &OutStats) {
        let sample = Sample {
            data: Bytes::from(packet),
            duration: FRAME,
            ..Sample::new(Instant::now())
        };
        let written = self
            .track
            .sample_writer(self.ssrc, self.payload_type)
            .write_sample(&sample)
            .await;
        if let Err(e) = written {
            // a write fails only while the transport is (re)connecting or closing
            if stats.write_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::debug!("audio out: {e}");
            }
        }
    }
}

/// Sends until the sender of `rx` is dropped. `default_rate` is the rate of the silence sent
/// before the first voice frame.
pub async fn run_audio_out(
    out: AudioTrackOut,
    mut rx: UnboundedReceiver<OutAudio>,
    default_rate: u32,
    stats: Arc<OutStats>,
) -> Result<(), OpusError> {
    let mut encoder = VoiceEncoder::new(default_rate)?;
    let start = tokio::time::Instant::now();
    let mut sent: u32 = 0;
    let mut answering = false;
    loop {
        let slack = if answering {
            VOICE_SLACK
        } else {
            SILENCE_AFTER
        };
        let behind = start + FRAME * sent + slack;
        tokio::select! {
            msg = rx.recv() => {
                let packets = match msg {
                    None => break,
                    Some(OutAudio::Voice { sample_rate, pcm }) => {
                        answering = true;
                        if sample_rate != encoder.input_rate() {
                            encoder = VoiceEncoder::new(sample_rate)?;
                        }
                        encoder.push(&pcm)?
                    }
                    Some(OutAudio::AnswerEnd) => {
                        answering = false;
                        encoder.finish()?
                    }
                    Some(OutAudio::Cut) => {
                        answering = false;
                        encoder.discard();
                        vec![]
                    }
                };
                for packet in packets {
                    out.send(packet, &stats).await;
                    stats.sent_voice();
                    sent += 1;
                }
            }
            _ = tokio::time::sleep_until(behind) => {
                // nothing to say (or the answer stalled): keep the clock going with silence, one
                // frame per frame time, staying `slack` behind real time
                let now = tokio::time::Instant::now();
                while start + FRAME * sent + slack <= now {
                    let packet = encoder.silence()?;
                    out.send(packet, &stats).await;
                    stats.sent_silence();
                    sent += 1;
                }
            }
        }
    }
    Ok(())
}
