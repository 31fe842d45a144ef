//! One call: its peer connection, its engine session, and the tasks between them.
//!
//! [`start_call`] answers an offer (non-trickle: the answer carries every local candidate) and
//! spawns the call task, which owns everything the call holds. The call ends on hang-up
//! (`DELETE`, a `hangup` message, the data channel closing), when the connection fails or
//! closes (or never comes up), when the session goes away, or when the server shuts down; it
//! then closes the session, the peer connection and its tasks, and frees its slot.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::interceptor::Registry;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::{OwnedSemaphorePermit, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelState};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState, RTCSessionDescription,
    SettingEngineBuilder,
};

use crate::engine::session::{Control, ReplyMode, SessionEvent, SessionHandle};
use crate::media::opus::{OPUS_INPUT_RATES, OPUS_RATE};
use crate::media::video_decode::VideoCodec;
use crate::rtc::media_in::{AudioReceiver, DecodeProblem, VideoDecodeWorker, VideoReceiver};
use crate::rtc::media_out::{AudioTrackOut, OutAudio, OutStats, run_audio_out};
use crate::rtc::metrics::{ServerMetrics, SessionQueueReport};
use crate::rtc::protocol::{ClientMessage, ClientRequest, Envelope, ServerMessage};
use crate::rtc::signaling::{self, OfferSummary};

/// A STUN or TURN server handed to ICE.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

/// Network settings of the peer connections.
#[derive(Debug, Clone, PartialEq)]
pub struct RtcConfig {
    /// Local UDP addresses to gather host candidates on. A wildcard (`0.0.0.0:0`) stands for
    /// every non-loopback interface (the LAN); loopback must be named.
    pub udp_addrs: Vec<String>,
    pub ice_servers: Vec<IceServer>,
    /// Accept a browser's `.local` (mDNS) candidates. Off by default: a page that holds the
    /// microphone gets plain host addresses, and the mDNS socket fails on hosts without a
    /// multicast route.
    pub mdns: bool,
    /// How long to wait for candidate gathering before answering with what there is.
    pub gather_timeout: Duration,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            udp_addrs: vec!["0.0.0.0:0".into(), "127.0.0.1:0".into()],
            ice_servers: vec![],
            mdns: false,
            gather_timeout: Duration::from_secs(5),
        }
    }
}

/// Builds a peer connection with the call codecs, the default interceptors (NACK, RTCP
/// reports, TWCC feedback) and these network settings.
pub(crate) async fn build_peer(
    rtc: &RtcConfig,
    video: &[VideoCodec],
    handler: Arc<dyn PeerConnectionEventHandler>,
) -> anyhow::Result<Arc<dyn PeerConnection>> {
    let mut engine = signaling::media_engine(video)?;
    let registry = register_default_interceptors(Registry::new(), &mut engine)?;
    let mode = if rtc.mdns {
        rtc::ice::mdns::MulticastDnsMode::QueryOnly
    } else {
        rtc::ice::mdns::MulticastDnsMode::Disabled
    };
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(mode)
        .build();
    let config = RTCConfigurationBuilder::default()
        .with_ice_servers(
            rtc.ice_servers
                .iter()
                .map(|s| RTCIceServer {
                    urls: s.urls.clone(),
                    username: s.username.clone(),
                    credential: s.credential.clone(),
                })
                .collect(),
        )
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(config)
        .with_media_engine(engine)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(rtc.udp_addrs.clone())
        .build()
        .await?;
    Ok(Arc::new(pc))
}

/// An Opus track of one 48 kHz stream with a random SSRC.
pub(crate) fn opus_track(id: &str) -> anyhow::Result<(Arc<TrackLocalStaticSample>, u32)> {
    let ssrc = rand::random::<u32>();
    let track = TrackLocalStaticSample::new(
        Instant::now(),
        MediaStreamTrack::new(
            format!("{id}-stream"),
            format!("{id}-audio"),
            "voice".into(),
            RtpCodecKind::Audio,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_OPUS.into(),
                    clock_rate: 48_000,
                    channels: 2,
                    sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
                    rtcp_feedback: vec![],
                },
                ..Default::default()
            }],
        ),
    )?;
    Ok((Arc::new(track), ssrc))
}

/// Waits until the gathering flag is set or the timeout passes.
pub(crate) async fn wait_gathered(gathered: &mut watch::Receiver<bool>, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, gathered.wait_for(|done| *done)).await;
}

/// The payload type the remote end negotiated for a sender's first codec.
pub(crate) async fn sender_payload_type(
    pc: &Arc<dyn PeerConnection>,
    kind_mime: &str,
) -> Option<u8> {
    for sender in pc.get_senders().await {
        if let Ok(params) = sender.get_parameters().await
            && let Some(codec) = params
                .rtp_parameters
                .codecs
                .iter()
                .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(kind_mime))
        {
            return Some(codec.payload_type);
        }
    }
    None
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// `DELETE /v1/calls/{id}`.
    Deleted,
    /// The client sent `hangup`.
    ClientHangup,
    /// The client closed the data channel.
    DataChannelClosed,
    ConnectionFailed,
    ConnectionClosed,
    /// No connection within the connect timeout.
    NeverConnected,
    /// The session stopped producing events (its threads ended).
    SessionEnded,
    ServerShutdown,
}

/// What the call task reacts to.
pub(crate) enum CallEvent {
    Connection(RTCPeerConnectionState),
    DataChannel(Arc<dyn DataChannel>),
    Track(Arc<dyn TrackRemote>),
    DataChannelOpen,
    DataChannelMessage(String),
    DataChannelClosed,
    Session(SessionEvent),
    SessionGone,
    /// Media that could not be used (a bad packet or frame): told to the client, logged.
    MediaProblem(String),
    End(EndReason),
}

/// Forwards peer connection callbacks to the call task.
pub(crate) struct CallHandler {
    pub(crate) events: UnboundedSender<CallEvent>,
    pub(crate) gathered: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for CallHandler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.events.send(CallEvent::Connection(state));
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let _ = self.events.send(CallEvent::DataChannel(dc));
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.events.send(CallEvent::Track(track));
    }
}

/// What the server keeps about a running call.
#[derive(Clone)]
pub(crate) struct CallEntry {
    pub started: Instant,
    pub(crate) events: UnboundedSender<CallEvent>,
    pub(crate) done: watch::Receiver<bool>,
}

impl CallEntry {
    /// Asks the call to end and waits (at most `timeout`) until it has freed everything.
    pub(crate) async fn end(&self, reason: EndReason, timeout: Duration) {
        let _ = self.events.send(CallEvent::End(reason));
        let mut done = self.done.clone();
        let _ = tokio::time::timeout(timeout, done.wait_for(|d| *d)).await;
    }
}

/// The calls a server runs, by id.
#[derive(Clone, Default)]
pub(crate) struct CallRegistry(Arc<std::sync::Mutex<HashMap<String, CallEntry>>>);

impl CallRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CallEntry>> {
        // the map stays consistent whatever a panicking holder was doing
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, id: String, entry: CallEntry) {
        self.lock().insert(id, entry);
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    pub(crate) fn get(&self, id: &str) -> Option<CallEntry> {
        self.lock().get(id).cloned()
    }

    pub(crate) fn entries(&self) -> Vec<(String, CallEntry)> {
        self.lock()
            .iter()
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect()
    }
}

/// Settings every call of a server shares.
#[derive(Debug, Clone)]
pub(crate) struct CallSettings {
    pub rtc: RtcConfig,
    pub voices: Vec<String>,
    pub max_video_pixels: usize,
    pub max_video_fps: f64,
    pub connect_timeout: Duration,
    /// The server's `/metrics` counters.
    pub metrics: Arc<ServerMetrics>,
}

/// Why an offer could not be answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallSetupError {
    /// The WebRTC stack refused the offer (a client error).
    #[error("the offer was refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// A call to set up: the offer and what the server prepared for it.
pub(crate) struct NewCall<'a> {
    pub offer: &'a str,
    pub summary: &'a OfferSummary,
    /// The call's session, already started.
    pub session: SessionHandle,
    pub voice: String,
    pub reply_mode: ReplyMode,
    /// When the call was created: media time 0 of the session.
    pub started: Instant,
    /// The call's slot, freed when it ends.
    pub permit: OwnedSemaphorePermit,
}

/// Answers the offer of a new call; returns the call id and the answer SDP. The call runs on
/// its own task until it ends.
pub(crate) async fn start_call(
    new: NewCall<'_>,
    settings: Arc<CallSettings>,
    registry: CallRegistry,
) -> Result<(String, String), CallSetupError> {
    let NewCall {
        offer,
        summary,
        session,
        voice,
        reply_mode,
        started,
        permit,
    } = new;
    let id = format!("{:032x}", rand::random::<u128>());
    let (events_tx, events_rx) = unbounded_channel();
    let (gathered_tx, mut gathered_rx) = watch::channel(false);
    let handler = Arc::new(CallHandler {
        events: events_tx.clone(),
        gathered: gathered_tx,
    });
    let pc = build_peer(&settings.rtc, &summary.video_codecs, handler).await?;
    let answer = async {
        pc.set_remote_description(
            RTCSessionDescription::offer(signaling::prefer_vp8(offer))
                .map_err(|e| CallSetupError::Refused(e.to_string()))?,
        )
        .await
        .map_err(|e| CallSetupError::Refused(e.to_string()))?;
        let (track, ssrc) = opus_track(&id[..8])?;
        pc.add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
            .await
            .map_err(anyhow::Error::from)?;
        let answer = pc.create_answer(None).await.map_err(anyhow::Error::from)?;
        pc.set_local_description(answer)
            .await
            .map_err(anyhow::Error::from)?;
        wait_gathered(&mut gathered_rx, settings.rtc.gather_timeout).await;
        let sdp = pc
            .local_description()
            .await
            .ok_or_else(|| anyhow::anyhow!("no local description after answering"))?
            .sdp;
        let payload_type = sender_payload_type(&pc, MIME_TYPE_OPUS)
            .await
            .ok_or_else(|| anyhow::anyhow!("the answer sends no Opus"))?;
        Ok::<_, CallSetupError>((
            sdp,
            AudioTrackOut {
                track,
                ssrc,
                payload_type,
            },
        ))
    }
    .await;
    let answer = match answer {
        Ok(a) => bridge_session_events(&id, session.events.clone(), events_tx.clone())
            .map(|()| a)
            .map_err(CallSetupError::from),
        Err(e) => Err(e),
    };
    let (sdp, audio_out) = match answer {
        Ok(a) => a,
        Err(e) => {
            let _ = pc.close().await;
            return Err(e);
        }
    };
    let (done_tx, done_rx) = watch::channel(false);
    registry.insert(
        id.clone(),
        CallEntry {
            started,
            events: events_tx.clone(),
            done: done_rx,
        },
    );
    let out_stats = Arc::new(OutStats::with_server(settings.metrics.packets_out()));
    let call = Call {
        id: id.clone(),
        started,
        settings,
        session,
        voice,
        reply_mode,
        pc,
        events_tx,
        audio_out: Some(audio_out),
        audio_tx: None,
        out_stats,
        dc: None,
        dc_open: false,
        pending: VecDeque::new(),
        connected: false,
        disconnected_since: None,
        throttle: ProblemThrottle::default(),
    };
    tokio::spawn(async move {
        let reason = call.run(events_rx).await;
        registry.remove(&reason.0);
        drop(permit);
        let _ = done_tx.send(true);
    });
    Ok((id, sdp))
}

/// Moves the session's events (a blocking channel) into the call task.
fn bridge_session_events(
    id: &str,
    events: crossbeam_channel::Receiver<SessionEvent>,
    tx: UnboundedSender<CallEvent>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name(format!("oc-ev-{}", &id[..8]))
        .spawn(move || {
            loop {
                match events.recv_timeout(Duration::from_millis(200)) {
                    Ok(event) => {
                        if tx.send(CallEvent::Session(event)).is_err() {
                            break;
                        }
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        if tx.is_closed() {
                            break;
                        }
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        let _ = tx.send(CallEvent::SessionGone);
                        break;
                    }
                }
            }
        })?;
    Ok(())
}

/// Lets one problem report through per second; counts the rest.
#[derive(Default)]
struct ProblemThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl ProblemThrottle {
    fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Most messages kept for a data channel that is not open yet.
const MAX_PENDING_MESSAGES: usize = 512;
/// A connection `disconnected` this long counts as failed.
const DISCONNECTED_GRACE: Duration = Duration::from_secs(10);
/// How often a call checks its connection deadlines and reports its session's queues.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Keyframe requests are sent at most this often.
const PLI_INTERVAL: Duration = Duration::from_millis(300);

struct Call {
    id: String,
    started: Instant,
    settings: Arc<CallSettings>,
    session: SessionHandle,
    voice: String,
    reply_mode: ReplyMode,
    pc: Arc<dyn PeerConnection>,
    events_tx: UnboundedSender<CallEvent>,
    audio_out: Option<AudioTrackOut>,
    audio_tx: Option<UnboundedSender<OutAudio>>,
    out_stats: Arc<OutStats>,
    dc: Option<Arc<dyn DataChannel>>,
    dc_open: bool,
    pending: VecDeque<String>,
    connected: bool,
    disconnected_since: Option<Instant>,
    throttle: ProblemThrottle,
}

impl Call {
    fn short_id(&self) -> &str {
        &self.id[..8]
    }

    async fn run(mut self, mut events: UnboundedReceiver<CallEvent>) -> (String, EndReason) {
        tracing::info!(call = self.short_id(), "call answered");
        let connect_deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        let mut queues = SessionQueueReport::default();
        // connection deadlines and the session's queues, checked on a steady beat whatever
        // the events
        let mut check = tokio::time::interval(CHECK_INTERVAL);
        let reason = loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = check.tick() => {
                    queues.update(&self.settings.metrics, self.session.queues());
                    if !self.connected && tokio::time::Instant::now() >= connect_deadline {
                        break EndReason::NeverConnected;
                    }
                    if self.disconnected_since.is_some_and(|t| t.elapsed() >= DISCONNECTED_GRACE) {
                        break EndReason::ConnectionFailed;
                    }
                    continue;
                }
            };
            let Some(event) = event else {
                break EndReason::ServerShutdown;
            };
            if let Some(reason) = self.handle(event).await {
                break reason;
            }
        };
        self.finish(reason).await;
        queues.finish(&self.settings.metrics, self.session.queues());
        (self.id.clone(), reason)
    }

    async fn handle(&mut self, event: CallEvent) -> Option<EndReason> {
        match event {
            CallEvent::Connection(state) => {
                tracing::debug!(call = self.short_id(), %state, "connection state");
                match state {
                    RTCPeerConnectionState::Connected => {
                        self.disconnected_since = None;
                        if !self.connected {
                            self.connected = true;
                            tracing::info!(
                                call = self.short_id(),
                                after_ms = self.started.elapsed().as_millis() as u64,
                                "connected"
                            );
                            self.start_audio_out();
                        }
                    }
                    RTCPeerConnectionState::Disconnected => {
                        self.disconnected_since.get_or_insert_with(Instant::now);
                    }
                    RTCPeerConnectionState::Failed => return Some(EndReason::ConnectionFailed),
                    RTCPeerConnectionState::Closed => return Some(EndReason::ConnectionClosed),
                    _ => {}
                }
            }
            CallEvent::DataChannel(dc) => self.attach_data_channel(dc).await,
            CallEvent::DataChannelOpen => {
                if !self.dc_open {
                    self.dc_open = true;
                    let hello = ServerMessage::Hello {
                        call_id: self.id.clone(),
                        voices: self.settings.voices.clone(),
                        voice: self.voice.clone(),
                        reply_mode: self.reply_mode,
                    };
                    self.pending.push_front(self.envelope(hello));
                    self.flush_messages().await;
                }
            }
            CallEvent::DataChannelMessage(text) => {
                match ClientMessage::parse(&text, &self.settings.voices) {
                    Ok(ClientRequest::Hangup) => return Some(EndReason::ClientHangup),
                    Ok(ClientRequest::Control(control)) => {
                        match &control {
                            Control::Voice(v) => self.voice = v.clone(),
                            Control::ReplyMode(m) => self.reply_mode = *m,
                            _ => {}
                        }
                        if !self.session.control(control) {
                            return Some(EndReason::SessionEnded);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(call = self.short_id(), "{e}");
                        let msg = ServerMessage::Error {
                            message: e.to_string(),
                        };
                        self.send(msg).await;
                    }
                }
            }
            CallEvent::DataChannelClosed => return Some(EndReason::DataChannelClosed),
            CallEvent::Track(track) => self.attach_track(track).await,
            CallEvent::Session(event) => self.session_event(event).await,
            CallEvent::SessionGone => return Some(EndReason::SessionEnded),
            CallEvent::MediaProblem(message) => {
                if let Some(suppressed) = self.throttle.admit() {
                    let more = if suppressed > 0 {
                        format!(" ({suppressed} more problems since the last report)")
                    } else {
                        String::new()
                    };
                    tracing::warn!(call = self.short_id(), "{message}{more}");
                    self.send(ServerMessage::Error {
                        message: format!("{message}{more}"),
                    })
                    .await;
                }
            }
            CallEvent::End(reason) => return Some(reason),
        }
        None
    }

    fn envelope(&self, message: ServerMessage) -> String {
        Envelope::new(self.started.elapsed(), message).to_json()
    }

    async fn send(&mut self, message: ServerMessage) {
        let json = self.envelope(message);
        if self.pending.len() >= MAX_PENDING_MESSAGES {
            self.pending.pop_front();
        }
        self.pending.push_back(json);
        self.flush_messages().await;
    }

    async fn flush_messages(&mut self) {
        let Some(dc) = self.dc.as_ref().filter(|_| self.dc_open) else {
            return;
        };
        while let Some(json) = self.pending.pop_front() {
            if let Err(e) = dc.send_text(&json).await {
                tracing::debug!(call = &self.id[..8], "data channel send: {e}");
                break;
            }
        }
    }

    async fn session_event(&mut self, event: SessionEvent) {
        self.settings.metrics.observe(&event);
        let out = match &event {
            SessionEvent::Audio {
                sample_rate, pcm, ..
            } => Some(OutAudio::Voice {
                sample_rate: *sample_rate,
                pcm: pcm.clone(),
            }),
            SessionEvent::AnswerDone { .. } => Some(OutAudio::AnswerEnd),
            SessionEvent::Interrupted { .. } => Some(OutAudio::Cut),
            _ => None,
        };
        if let (Some(out), Some(tx)) = (out, self.audio_tx.as_ref()) {
            let _ = tx.send(out);
        }
        if let Some(message) = ServerMessage::from_event(&event) {
            self.send(message).await;
        }
    }

    fn start_audio_out(&mut self) {
        let Some(out) = self.audio_out.take() else {
            return;
        };
        let (tx, rx) = unbounded_channel();
        self.audio_tx = Some(tx);
        let stats = Arc::clone(&self.out_stats);
        let id = self.short_id().to_string();
        tokio::spawn(async move {
            if let Err(e) = run_audio_out(out, rx, 24_000, stats).await {
                tracing::error!(call = id, "audio out stopped: {e}");
            }
        });
    }

    async fn attach_data_channel(&mut self, dc: Arc<dyn DataChannel>) {
        if self.dc.is_some() {
            tracing::debug!(call = self.short_id(), "ignoring a second data channel");
            return;
        }
        let open = matches!(dc.ready_state().await, Ok(RTCDataChannelState::Open));
        self.dc = Some(Arc::clone(&dc));
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            while let Some(event) = dc.poll().await {
                let forwarded = match event {
                    DataChannelEvent::OnOpen => tx.send(CallEvent::DataChannelOpen),
                    DataChannelEvent::OnMessage(msg) => {
                        let text = String::from_utf8_lossy(&msg.data).into_owned();
                        tx.send(CallEvent::DataChannelMessage(text))
                    }
                    DataChannelEvent::OnClose => {
                        let _ = tx.send(CallEvent::DataChannelClosed);
                        break;
                    }
                    _ => Ok(()),
                };
                if forwarded.is_err() {
                    break;
                }
            }
        });
        if open {
            let _ = self.events_tx.send(CallEvent::DataChannelOpen);
        }
    }

    async fn attach_track(&mut self, track: Arc<dyn TrackRemote>) {
        let kind = track.kind().await;
        let id = self.short_id().to_string();
        tracing::info!(call = id, ?kind, "remote track");
        match kind {
            RtpCodecKind::Audio => {
                let session = self.session.clone();
                let events = self.events_tx.clone();
                let started = self.started;
                let metrics = Arc::clone(&self.settings.metrics);
                tokio::spawn(async move {
                    receive_audio(track, session, events, started, metrics).await
                });
            }
            RtpCodecKind::Video => {
                let session = self.session.clone();
                let events = self.events_tx.clone();
                let started = self.started;
                let settings = Arc::clone(&self.settings);
                tokio::spawn(async move {
                    receive_video(id, track, session, events, started, settings).await
                });
            }
            _ => {}
        }
    }

    async fn finish(&mut self, reason: EndReason) {
        self.session.close();
        self.audio_tx = None;
        if let Some(dc) = self.dc.take() {
            let _ = dc.close().await;
        }
        if let Err(e) = self.pc.close().await {
            tracing::debug!(call = self.short_id(), "closing the peer connection: {e}");
        }
        let stats = &self.out_stats;
        tracing::info!(
            call = self.short_id(),
            ?reason,
            seconds = self.started.elapsed().as_secs_f32(),
            voice_packets = stats
                .voice_packets
                .load(std::sync::atomic::Ordering::Relaxed),
            silence_packets = stats
                .silence_packets
                .load(std::sync::atomic::Ordering::Relaxed),
            "call ended"
        );
    }
}

async fn receive_audio(
    track: Arc<dyn TrackRemote>,
    session: SessionHandle,
    events: UnboundedSender<CallEvent>,
    started: Instant,
    metrics: Arc<ServerMetrics>,
) {
    // Opus decodes straight to the session's rate when it is one of its own (the model's
    // 16 kHz): no 48 kHz upper band decoded only for a resampler to remove it.
    let rate = session
        .audio_rate()
        .filter(|r| OPUS_INPUT_RATES.contains(r))
        .unwrap_or(OPUS_RATE);
    let mut receiver = match AudioReceiver::with_rate(rate) {
        Ok(r) => r,
        Err(e) => {
            let _ = events.send(CallEvent::MediaProblem(format!("audio: {e}")));
            return;
        }
    };
    let mut dropped_before = 0;
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(packet) = event else {
            if matches!(event, TrackRemoteEvent::OnEnded) {
                break;
            }
            continue;
        };
        metrics.audio_packet_received();
        let (inputs, errors) = receiver.push(
            started.elapsed(),
            packet.header.sequence_number,
            packet.header.timestamp,
            packet.payload,
        );
        for input in inputs {
            if !session.push_audio(input) {
                return;
            }
        }
        let stats = receiver.stats();
        let dropped = stats.late_packets + stats.bad_packets;
        metrics.media_dropped("audio_packet", dropped - dropped_before);
        dropped_before = dropped;
        for e in errors {
            let _ = events.send(CallEvent::MediaProblem(format!("audio: {e}")));
        }
    }
    tracing::debug!(stats = ?receiver.stats(), "audio track ended");
}

/// Sends a picture loss indication, at most once per [`PLI_INTERVAL`].
struct KeyframeRequester {
    track: Arc<dyn TrackRemote>,
    last: std::sync::Mutex<Option<Instant>>,
}

impl KeyframeRequester {
    async fn request(&self, media_ssrc: u32) {
        {
            let Ok(mut last) = self.last.lock() else {
                return;
            };
            if last.is_some_and(|t| t.elapsed() < PLI_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc,
        };
        if let Err(e) = self.track.write_rtcp(vec![Box::new(pli)]).await {
            tracing::debug!("keyframe request: {e}");
        }
    }
}

async fn receive_video(
    call: String,
    track: Arc<dyn TrackRemote>,
    session: SessionHandle,
    events: UnboundedSender<CallEvent>,
    started: Instant,
    settings: Arc<CallSettings>,
) {
    let requester = Arc::new(KeyframeRequester {
        track: Arc::clone(&track),
        last: std::sync::Mutex::new(None),
    });
    let mut stream: Option<(u32, u8, VideoReceiver, VideoDecodeWorker)> = None;
    let mut ignored_payload_types = 0u64;
    let mut dropped_before = 0;
    while let Some(event) = track.poll().await {
        let packet = match event {
            TrackRemoteEvent::OnRtpPacket(packet) => packet,
            TrackRemoteEvent::OnEnded => break,
            _ => continue,
        };
        let ssrc = packet.header.ssrc;
        if stream.is_none() {
            let mime = track.codec(ssrc).await.map(|c| c.mime_type);
            let Some(codec) = mime.as_deref().and_then(signaling::video_codec_of_mime) else {
                let _ = events.send(CallEvent::MediaProblem(format!(
                    "video: no decoder for codec {}",
                    mime.as_deref().unwrap_or("(unknown)")
                )));
                return;
            };
            let (problems_tx, mut problems_rx) = unbounded_channel::<DecodeProblem>();
            let worker = match VideoDecodeWorker::spawn(
                &call,
                codec,
                settings.max_video_pixels,
                settings.max_video_fps,
                session.clone(),
                problems_tx,
            ) {
                Ok(w) => w,
                Err(e) => {
                    let _ = events.send(CallEvent::MediaProblem(format!("video: {e}")));
                    return;
                }
            };
            let (req, ev) = (Arc::clone(&requester), events.clone());
            tokio::spawn(async move {
                while let Some(problem) = problems_rx.recv().await {
                    if problem.need_keyframe {
                        req.request(ssrc).await;
                    }
                    if ev.send(CallEvent::MediaProblem(problem.message)).is_err() {
                        break;
                    }
                }
            });
            tracing::info!(codec = codec.name(), ssrc, "video stream");
            // on join: the first packets may miss the key frame that starts the stream
            requester.request(ssrc).await;
            stream = Some((
                ssrc,
                packet.header.payload_type,
                VideoReceiver::new(codec),
                worker,
            ));
        }
        let Some((media_ssrc, payload_type, receiver, worker)) = stream.as_mut() else {
            continue;
        };
        if packet.header.payload_type != *payload_type || ssrc != *media_ssrc {
            ignored_payload_types += 1;
            continue;
        }
        let pushed = receiver.push(
            started.elapsed(),
            packet.header.sequence_number,
            packet.header.timestamp,
            packet.header.marker,
            packet.payload,
        );
        let mut need_keyframe = pushed.need_keyframe;
        let dropped = receiver.stats().dropped_frames;
        settings
            .metrics
            .media_dropped("video_frame", dropped - dropped_before);
        dropped_before = dropped;
        for frame in pushed.frames {
            if !worker.decode(frame) {
                // the decoder is behind: this frame is shed, and the inter frames after it
                settings.metrics.media_dropped("video_frame", 1);
                receiver.wait_for_keyframe();
                need_keyframe = true;
            }
        }
        for e in pushed.errors {
            let _ = events.send(CallEvent::MediaProblem(format!("video: {e}")));
        }
        if need_keyframe {
            requester.request(*media_ssrc).await;
        }
    }
    if let Some((_, _, receiver, _)) = stream {
        tracing::debug!(stats = ?receiver.stats(), ignored_payload_types, "video track ended");
    }
}
