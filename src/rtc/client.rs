//! A headless call client (what a browser does, in Rust): it offers Opus audio (and optionally
//! H.264 or VP8 video) plus the data channel, posts the offer to a server, sends media paced
//! in real time, and hands back the model's voice (decoded, with arrival times) and the data
//! channel messages. Tests and the latency benchmark build on it.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use omnicall::rtc::client::{CallClient, ClientConfig, read_wav_mono};
//! let mut call = CallClient::connect(ClientConfig::new("http://127.0.0.1:8080")).await?;
//! let (pcm, rate) = read_wav_mono("hello.wav")?;
//! call.media().send_pcm(&pcm, rate).await?;
//! while let Some(audio) = call.next_audio(std::time::Duration::from_secs(5)).await {
//!     println!("{} samples at {:?}", audio.samples.len(), audio.at);
//! }
//! call.hang_up().await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8,
};
use rtc::rtp;
use rtc::rtp::packetizer::Packetizer;
use rtc::rtp::sequence::Sequencer;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::Mutex;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::watch;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceGatheringState, RTCPeerConnectionState,
    RTCSessionDescription,
};

use crate::engine::session::ReplyMode;
use crate::media::opus::{OPUS_RATE, OpusDecoder, OpusEncoder};
use crate::media::resample::resample;
use crate::media::video_decode::VideoCodec;
use crate::rtc::media_in::{SeqUnwrapper, VIDEO_CLOCK};
use crate::rtc::peer::{RtcConfig, build_peer, opus_track, sender_payload_type, wait_gathered};
use crate::rtc::protocol::{ClientMessage, DATA_CHANNEL_LABEL, Envelope, ServerMessage};
use crate::rtc::sources::FrameEncoder;
pub use crate::rtc::sources::{I420Frame, read_ivf, read_wav_mono, read_y4m, rgb_to_i420};

/// One Opus frame.
const FRAME: Duration = Duration::from_millis(20);
/// RTP payload budget per packet (leaves room for SRTP and header extensions).
const RTP_MTU: usize = 1200;

/// Where and how to call.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's base URL, e.g. `http://127.0.0.1:8080`.
    pub server: String,
    pub token: Option<String>,
    /// Send video in this codec (`None`: audio only).
    pub video: Option<VideoCodec>,
    pub voice: Option<String>,
    pub reply_mode: Option<ReplyMode>,
    pub rtc: RtcConfig,
    /// Time allowed for signaling, connecting and opening the data channel.
    pub connect_timeout: Duration,
}

impl ClientConfig {
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            token: None,
            video: None,
            voice: None,
            reply_mode: None,
            rtc: RtcConfig::default(),
            connect_timeout: Duration::from_secs(15),
        }
    }

    pub fn with_video(mut self, codec: VideoCodec) -> Self {
        self.video = Some(codec);
        self
    }

    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
}

/// A data channel message from the server, with its arrival time (since the call started).
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedMessage {
    pub at: Duration,
    /// Server session time when it was sent.
    pub t_ms: f64,
    pub message: ServerMessage,
}

/// Decoded audio of one RTP packet of the model's voice (48 kHz mono).
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedAudio {
    /// Arrival time since the call started.
    pub at: Duration,
    pub sequence: u64,
    pub rtp_timestamp: u32,
    pub samples: Vec<f32>,
}

/// When the offer went out and the answer came back, since the call started. The server's
/// session clock starts between the two (when it takes the offer), which bounds the offset
/// between the two clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalingTimes {
    pub offer_sent: Duration,
    pub answer_received: Duration,
}

/// Counters of a call.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub audio_packets_sent: AtomicU64,
    pub video_frames_sent: AtomicU64,
    pub audio_packets_received: AtomicU64,
    pub audio_decode_errors: AtomicU64,
    pub messages_received: AtomicU64,
}

/// The sending side of a call; cheap to clone into tasks.
#[derive(Clone)]
pub struct MediaSender {
    started: Instant,
    audio: Arc<TrackLocalStaticSample>,
    audio_ssrc: u32,
    audio_pt: u8,
    video: Option<Arc<VideoOut>>,
    stats: Arc<ClientStats>,
}

struct VideoOut {
    codec: VideoCodec,
    track: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
    payload_type: u8,
    sequencer: Box<dyn Sequencer>,
    packetizer: Mutex<Box<dyn Packetizer>>,
    raw_timestamp: AtomicU64,
}

impl MediaSender {
    /// Sends one Opus packet covering `duration` (no pacing).
    pub async fn send_opus(&self, packet: &[u8], duration: Duration) -> anyhow::Result<()> {
        let sample = Sample {
            data: Bytes::copy_from_slice(packet),
            duration,
            ..Sample::new(Instant::now())
        };
        self.audio
            .sample_writer(self.audio_ssrc, self.audio_pt)
            .write_sample(&sample)
            .await
            .context("sending audio")?;
        self.stats
            .audio_packets_sent
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends `pcm` (mono, any rate) as 20 ms Opus packets paced in real time; returns the
    /// time (since the call started) the last packet went out. The last frame is padded with
    /// silence.
    pub async fn send_pcm(&self, pcm: &[f32], sample_rate: u32) -> anyhow::Result<Duration> {
        let pcm = resample(pcm, sample_rate, OPUS_RATE)?;
        let mut encoder = OpusEncoder::new(OPUS_RATE)?;
        let frame = encoder.frame_samples();
        let mut ticker = tokio::time::interval(FRAME);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for chunk in pcm.chunks(frame) {
            let mut f = chunk.to_vec();
            f.resize(frame, 0.0);
            let packet = encoder.encode(&f)?;
            ticker.tick().await;
            self.send_opus(&packet, FRAME).await?;
        }
        Ok(self.started.elapsed())
    }

    /// Sends `duration` of silence, paced in real time.
    pub async fn send_silence(&self, duration: Duration) -> anyhow::Result<Duration> {
        let samples = (duration.as_secs_f64() * OPUS_RATE as f64) as usize;
        self.send_pcm(&vec![0.0; samples], OPUS_RATE).await
    }

    pub fn video_codec(&self) -> Option<VideoCodec> {
        self.video.as_ref().map(|v| v.codec)
    }

    fn video(&self) -> anyhow::Result<&VideoOut> {
        self.video
            .as_deref()
            .context("this call was not set up with video")
    }

    /// Sends one encoded frame (a VP8 frame, or an H.264 access unit in Annex-B form) lasting
    /// `duration`, packetized for RTP (no pacing).
    pub async fn send_video_frame(&self, frame: &[u8], duration: Duration) -> anyhow::Result<()> {
        let video = self.video()?;
        let ticks = (duration.as_secs_f64() * VIDEO_CLOCK as f64) as u32;
        let packets = {
            let mut packetizer = video.packetizer.lock().await;
            packetizer
                .packetize(Instant::now(), &Bytes::copy_from_slice(frame), ticks)
                .context("packetizing video")?
        };
        for mut packet in packets {
            packet.header.payload_type = video.payload_type;
            video
                .track
                .write_rtp(packet)
                .await
                .context("sending video")?;
        }
        self.stats.video_frames_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends one RTP packet with this payload as it is on the video stream (to test what a
    /// receiver makes of malformed payloads). Each call advances the timestamp by `ticks`.
    pub async fn send_raw_video_payload(
        &self,
        payload: &[u8],
        marker: bool,
        ticks: u32,
    ) -> anyhow::Result<()> {
        let video = self.video()?;
        let ts = video
            .raw_timestamp
            .fetch_add(ticks as u64, Ordering::Relaxed) as u32;
        let packet = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                marker,
                payload_type: video.payload_type,
                sequence_number: video.sequencer.next_sequence_number(),
                timestamp: ts,
                ssrc: video.ssrc,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload),
        };
        video
            .track
            .write_rtp(packet)
            .await
            .context("sending video")?;
        Ok(())
    }

    /// Encodes (in the call's codec) and sends I420 frames (from a Y4M clip, say) at `fps`
    /// for `duration`, looping over them, paced in real time.
    pub async fn send_i420_frames(
        &self,
        frames: &[I420Frame],
        fps: f64,
        duration: Duration,
    ) -> anyhow::Result<()> {
        let video = self.video()?;
        let Some(first) = frames.first() else {
            bail!("no frames to send");
        };
        let mut encoder = FrameEncoder::new(video.codec, first.width, first.height, fps)?;
        let interval = Duration::from_secs_f64(1.0 / fps.max(1.0));
        let mut ticker = tokio::time::interval(interval);
        let end = Instant::now() + duration;
        for frame in frames.iter().cycle() {
            ticker.tick().await;
            if Instant::now() >= end {
                break;
            }
            let encoded = encoder.encode(frame)?;
            if !encoded.is_empty() {
                self.send_video_frame(&encoded, interval).await?;
            }
        }
        Ok(())
    }
}

struct ClientHandler {
    gathered: watch::Sender<bool>,
    state: watch::Sender<RTCPeerConnectionState>,
    audio: UnboundedSender<Arc<dyn TrackRemote>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ClientHandler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.state.send(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.audio.send(track);
    }
}

/// A call in progress.
pub struct CallClient {
    pc: Arc<dyn PeerConnection>,
    call_url: String,
    token: Option<String>,
    media: MediaSender,
    dc: Arc<dyn DataChannel>,
    messages: UnboundedReceiver<ReceivedMessage>,
    audio: UnboundedReceiver<ReceivedAudio>,
    state: watch::Receiver<RTCPeerConnectionState>,
    started: Instant,
    signaling: SignalingTimes,
    stats: Arc<ClientStats>,
}

fn http_agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(15))
        .build()
}

/// The server answered an offer with an error status (`503` with `Retry-After`: full).
#[derive(Debug, Clone, thiserror::Error)]
#[error("offer refused: {status}: {message}")]
pub struct OfferRefused {
    pub status: u16,
    /// The server's `Retry-After`, in seconds.
    pub retry_after: Option<Duration>,
    pub message: String,
}

/// `POST`s an offer; returns the call URL and the answer.
async fn post_offer(config: &ClientConfig, offer: String) -> anyhow::Result<(String, String)> {
    let base = config.server.trim_end_matches('/').to_string();
    let mut url = format!("{base}/v1/offer");
    let mut query = vec![];
    if let Some(v) = &config.voice {
        query.push(format!("voice={}", urlencode(v)));
    }
    if let Some(m) = config.reply_mode {
        query.push(format!(
            "reply_mode={}",
            if m == ReplyMode::Text {
                "text"
            } else {
                "voice"
            }
        ));
    }
    if !query.is_empty() {
        url = format!("{url}?{}", query.join("&"));
    }
    let token = config.token.clone();
    tokio::task::spawn_blocking(move || {
        let mut request = http_agent()
            .post(&url)
            .set("Content-Type", "application/sdp");
        if let Some(t) = &token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        }
        match request.send_string(&offer) {
            Ok(response) if response.status() == 201 => {
                let location = response
                    .header("Location")
                    .context("201 without a Location header")?
                    .to_string();
                let call_url = if location.starts_with("http") {
                    location
                } else {
                    format!("{base}{location}")
                };
                Ok((call_url, response.into_string()?))
            }
            Ok(response) => bail!(
                "offer answered {} {}",
                response.status(),
                response.into_string().unwrap_or_default().trim()
            ),
            Err(ureq::Error::Status(status, response)) => {
                let retry_after = response
                    .header("Retry-After")
                    .and_then(|v| v.trim().parse().ok())
                    .map(Duration::from_secs);
                Err(OfferRefused {
                    status,
                    retry_after,
                    message: response
                        .into_string()
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                }
                .into())
            }
            Err(e) => bail!("posting the offer to {url}: {e}"),
        }
    })
    .await?
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl CallClient {
    /// Offers a call and waits until it is connected and the data channel is open.
    pub async fn connect(config: ClientConfig) -> anyhow::Result<Self> {
        tokio::time::timeout(config.connect_timeout, Self::connect_inner(config.clone()))
            .await
            .with_context(|| {
                format!(
                    "calling {} took longer than {:?}",
                    config.server, config.connect_timeout
                )
            })?
    }

    async fn connect_inner(config: ClientConfig) -> anyhow::Result<Self> {
        let started = Instant::now();
        let stats = Arc::new(ClientStats::default());
        let (gathered_tx, mut gathered_rx) = watch::channel(false);
        let (state_tx, mut state_rx) = watch::channel(RTCPeerConnectionState::New);
        let (track_tx, mut track_rx) = unbounded_channel();
        let handler = Arc::new(ClientHandler {
            gathered: gathered_tx,
            state: state_tx,
            audio: track_tx,
        });
        let video_codecs: Vec<VideoCodec> = config.video.into_iter().collect();
        let pc = build_peer(&config.rtc, &video_codecs, handler).await?;
        let mut guard = SetupGuard {
            pc: Arc::clone(&pc),
            call_url: None,
            token: config.token.clone(),
            armed: true,
        };

        let (audio, audio_ssrc) = opus_track("client")?;
        pc.add_track(Arc::clone(&audio) as Arc<dyn TrackLocal>)
            .await?;
        let video_track = match config.video {
            Some(codec) => {
                let ssrc = rand::random::<u32>();
                let (mime, fmtp) = match codec {
                    VideoCodec::Vp8 => (MIME_TYPE_VP8, ""),
                    VideoCodec::H264 => (
                        MIME_TYPE_H264,
                        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
                    ),
                };
                let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                    "client-stream".into(),
                    "client-video".into(),
                    "camera".into(),
                    RtpCodecKind::Video,
                    vec![RTCRtpEncodingParameters {
                        rtp_coding_parameters: RTCRtpCodingParameters {
                            ssrc: Some(ssrc),
                            ..Default::default()
                        },
                        codec: RTCRtpCodec {
                            mime_type: mime.into(),
                            clock_rate: VIDEO_CLOCK,
                            channels: 0,
                            sdp_fmtp_line: fmtp.into(),
                            rtcp_feedback: vec![],
                        },
                        ..Default::default()
                    }],
                )));
                pc.add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
                    .await?;
                Some((codec, track, ssrc, mime))
            }
            None => None,
        };
        let dc = pc.create_data_channel(DATA_CHANNEL_LABEL, None).await?;

        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer).await?;
        wait_gathered(&mut gathered_rx, config.rtc.gather_timeout).await;
        let offer = pc
            .local_description()
            .await
            .context("no local description after the offer")?
            .sdp;
        let offer_sent = started.elapsed();
        let (call_url, answer) = post_offer(&config, offer).await?;
        let signaling = SignalingTimes {
            offer_sent,
            answer_received: started.elapsed(),
        };
        guard.call_url = Some(call_url.clone());
        pc.set_remote_description(RTCSessionDescription::answer(answer)?)
            .await
            .context("applying the server's answer")?;

        let audio_pt = sender_payload_type(&pc, MIME_TYPE_OPUS)
            .await
            .context("the answer has no Opus")?;
        let video = match video_track {
            Some((codec, track, ssrc, mime)) => {
                let payload_type = sender_payload_type(&pc, mime)
                    .await
                    .with_context(|| format!("the answer has no {}", codec.name()))?;
                let sequencer: Box<dyn Sequencer> = Box::new(rtp::sequence::new_random_sequencer());
                let payloader = RTCRtpCodec {
                    mime_type: mime.into(),
                    clock_rate: VIDEO_CLOCK,
                    ..Default::default()
                }
                .payloader()?;
                let packetizer: Box<dyn Packetizer> = Box::new(rtp::packetizer::new_packetizer(
                    Instant::now(),
                    RTP_MTU,
                    payload_type,
                    ssrc,
                    payloader,
                    sequencer.clone(),
                    VIDEO_CLOCK,
                ));
                Some(Arc::new(VideoOut {
                    codec,
                    track,
                    ssrc,
                    payload_type,
                    sequencer,
                    packetizer: Mutex::new(packetizer),
                    raw_timestamp: AtomicU64::new(rand::random::<u32>() as u64),
                }))
            }
            None => None,
        };

        // the model's voice
        let (audio_tx, audio_rx) = unbounded_channel();
        {
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                while let Some(track) = track_rx.recv().await {
                    if track.kind().await == RtpCodecKind::Audio {
                        let stats = Arc::clone(&stats);
                        let tx = audio_tx.clone();
                        tokio::spawn(receive_voice(track, tx, started, stats));
                    }
                }
            });
        }

        // the data channel
        let (open_tx, mut open_rx) = watch::channel(false);
        let (msg_tx, msg_rx) = unbounded_channel();
        {
            let dc = Arc::clone(&dc);
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                while let Some(event) = dc.poll().await {
                    match event {
                        DataChannelEvent::OnOpen => {
                            let _ = open_tx.send(true);
                        }
                        DataChannelEvent::OnMessage(msg) => {
                            let at = started.elapsed();
                            stats.messages_received.fetch_add(1, Ordering::Relaxed);
                            let text = String::from_utf8_lossy(&msg.data);
                            match serde_json::from_str::<Envelope>(&text) {
                                Ok(env) => {
                                    let received = ReceivedMessage {
                                        at,
                                        t_ms: env.t_ms,
                                        message: env.message,
                                    };
                                    if msg_tx.send(received).is_err() {
                                        break;
                                    }
                                }
                                Err(e) => tracing::warn!("unreadable server message {text:?}: {e}"),
                            }
                        }
                        DataChannelEvent::OnClose => break,
                        _ => {}
                    }
                }
            });
        }

        let connected = state_rx
            .wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Connected
                        | RTCPeerConnectionState::Failed
                        | RTCPeerConnectionState::Closed
                )
            })
            .await
            .map(|s| *s)
            .ok();
        if connected != Some(RTCPeerConnectionState::Connected) {
            bail!("the connection did not come up ({connected:?})");
        }
        if open_rx.wait_for(|o| *o).await.is_err() {
            bail!("the data channel never opened");
        }
        let media = MediaSender {
            started,
            audio,
            audio_ssrc,
            audio_pt,
            video,
            stats: Arc::clone(&stats),
        };
        guard.armed = false;
        Ok(Self {
            pc,
            call_url,
            token: config.token,
            media,
            dc,
            messages: msg_rx,
            audio: audio_rx,
            state: state_rx,
            started,
            signaling,
            stats,
        })
    }

    /// `http://server/v1/calls/{id}`.
    pub fn call_url(&self) -> &str {
        &self.call_url
    }

    pub fn call_id(&self) -> &str {
        self.call_url.rsplit('/').next().unwrap_or("")
    }

    /// When the call was started (the origin of every arrival time).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When the offer was posted and answered.
    pub fn signaling(&self) -> SignalingTimes {
        self.signaling
    }

    pub fn media(&self) -> MediaSender {
        self.media.clone()
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    pub fn connection_state(&self) -> RTCPeerConnectionState {
        *self.state.borrow()
    }

    /// The data channel closed (the server ended the call) and every message was taken.
    pub fn data_channel_closed(&self) -> bool {
        self.messages.is_closed() && self.messages.is_empty()
    }

    /// Sends a control message on the data channel.
    pub async fn send(&self, message: &ClientMessage) -> anyhow::Result<()> {
        self.send_text(&message.to_json()).await
    }

    /// Sends any text on the data channel (to test what the server makes of it).
    pub async fn send_text(&self, text: &str) -> anyhow::Result<()> {
        self.dc.send_text(text).await.context("data channel send")?;
        Ok(())
    }

    /// The next server message, `None` after `timeout` or once the channel is gone.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<ReceivedMessage> {
        tokio::time::timeout(timeout, self.messages.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for the first message matching `pred` (earlier ones are dropped).
    pub async fn wait_for_message(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&ServerMessage) -> bool,
    ) -> anyhow::Result<ReceivedMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_message(left).await {
                Some(m) if pred(&m.message) => return Ok(m),
                Some(_) => {}
                None => bail!("no such server message within {timeout:?}"),
            }
        }
    }

    /// The next packet of the model's voice.
    pub async fn next_audio(&mut self, timeout: Duration) -> Option<ReceivedAudio> {
        tokio::time::timeout(timeout, self.audio.recv())
            .await
            .ok()
            .flatten()
    }

    /// Every voice packet received so far and not yet taken.
    pub fn take_audio(&mut self) -> Vec<ReceivedAudio> {
        let mut out = vec![];
        while let Ok(a) = self.audio.try_recv() {
            out.push(a);
        }
        out
    }

    /// Hangs up: `DELETE` on the call URL, then closes the connection.
    pub async fn hang_up(self) -> anyhow::Result<()> {
        let (url, token) = (self.call_url.clone(), self.token.clone());
        let deleted =
            tokio::task::spawn_blocking(move || delete_call(&url, token.as_deref())).await?;
        let _ = self.pc.close().await;
        deleted
    }

    /// Closes the connection without telling the server (as a crashed client would).
    pub async fn drop_connection(self) {
        let _ = self.pc.close().await;
    }
}

/// `DELETE` on a call URL.
fn delete_call(url: &str, token: Option<&str>) -> anyhow::Result<()> {
    let mut request = http_agent().delete(url);
    if let Some(t) = token {
        request = request.set("Authorization", &format!("Bearer {t}"));
    }
    match request.call() {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, r)) => bail!(
            "hang-up answered {code}: {}",
            r.into_string().unwrap_or_default().trim()
        ),
        Err(e) => bail!("hang-up: {e}"),
    }
}

/// Undoes a half-made call when connecting fails or is abandoned (an error, or the connect
/// timeout dropping the future): closes the connection and hangs up on the server.
struct SetupGuard {
    pc: Arc<dyn PeerConnection>,
    call_url: Option<String>,
    token: Option<String>,
    armed: bool,
}

impl Drop for SetupGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (pc, url, token) = (
            Arc::clone(&self.pc),
            self.call_url.take(),
            self.token.take(),
        );
        runtime.spawn(async move {
            let _ = pc.close().await;
            if let Some(url) = url {
                let _ =
                    tokio::task::spawn_blocking(move || delete_call(&url, token.as_deref())).await;
            }
        });
    }
}

async fn receive_voice(
    track: Arc<dyn TrackRemote>,
    tx: UnboundedSender<ReceivedAudio>,
    started: Instant,
    stats: Arc<ClientStats>,
) {
    let Ok(mut decoder) = OpusDecoder::new() else {
        return;
    };
    let mut seq = SeqUnwrapper::default();
    while let Some(event) = track.poll().await {
        let packet = match event {
            TrackRemoteEvent::OnRtpPacket(p) => p,
            TrackRemoteEvent::OnEnded => break,
            _ => continue,
        };
        if packet.payload.is_empty() {
            continue;
        }
        let at = started.elapsed();
        stats.audio_packets_received.fetch_add(1, Ordering::Relaxed);
        match decoder.decode(&packet.payload) {
            Ok(samples) => {
                let audio = ReceivedAudio {
                    at,
                    sequence: seq.unwrap(packet.header.sequence_number),
                    rtp_timestamp: packet.header.timestamp,
                    samples,
                };
                if tx.send(audio).is_err() {
                    break;
                }
            }
            Err(_) => {
                stats.audio_decode_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(urlencode("Chelsie"), "Chelsie");
        assert_eq!(urlencode("a b&c"), "a%20b%26c");
    }
}
