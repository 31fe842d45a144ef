//! The HTTP side: the call page and WHIP-style signaling.
//!
//! - `GET /` (and `/app.js`, `/style.css`): the call page, embedded in the binary (or served
//!   from [`ServeConfig::web_root`] when set, for development).
//! - `GET /v1/info`: voices, defaults and whether a token is needed (JSON, no token needed).
//! - `POST /v1/offer` (`Content-Type: application/sdp`, optional `?voice=..&reply_mode=..`):
//!   `201 Created`, the SDP answer, `Location: /v1/calls/{id}`. A malformed offer is `400`, an
//!   offer without audio or with only unsupported codecs `422`, a wrong content type `415`,
//!   a missing or wrong token `401`; no free call slot, or no room for one more call in the
//!   measured capacity ([`admission`](crate::rtc::admission)): `503` with `Retry-After`. The
//!   body says why.
//! - `DELETE /v1/calls/{id}`: hang up (`204`, `404` for an unknown call).
//! - `GET /v1/calls`: the calls running (JSON).
//! - `GET /v1/health` (also `/healthz`, no token needed): `200` `{"status":"ready",..}` while
//!   one more call would be admitted, `503` `{"status":"full","reason":..}` with `Retry-After`
//!   otherwise: what a load balancer's health check reads.
//! - `GET /metrics`: Prometheus counters and per-stage turn timings ([`metrics`](crate::rtc::metrics);
//!   needs the token when one is set).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::engine::scheduler::Scheduler;
use crate::engine::session::{ReplyMode, SessionConfig, SessionHandle};
use crate::media::video_decode::DEFAULT_MAX_PIXELS;
use crate::rtc::admission::{self, Capacity, LoadMeter, ProcessUsage, Refusal, RefusalReason};
use crate::rtc::metrics::{self, ServerMetrics};
use crate::rtc::peer::{self, CallRegistry, CallSettings, CallSetupError, EndReason, RtcConfig};
use crate::rtc::signaling::{self, MAX_SDP_BYTES, OfferError};

/// Creates the engine session of a new call.
pub type SessionFactory =
    Arc<dyn Fn(SessionConfig) -> anyhow::Result<SessionHandle> + Send + Sync + 'static>;

/// Settings of `omnicall serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address of the HTTP server (port 0: any free port).
    pub bind: SocketAddr,
    /// When set, `POST /v1/offer`, `DELETE` and `GET /v1/calls` need
    /// `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Calls at once; the next caller gets `503`.
    pub max_calls: usize,
    /// Admit a call only while it fits in this measured capacity (`None`: only `max_calls`).
    pub capacity: Option<Capacity>,
    /// The model scheduler the calls' sessions share, if they do: its thread's load is
    /// admitted against too, and shown on `/metrics`.
    pub model_scheduler: Option<Arc<Scheduler>>,
    /// Serve the page from this folder instead of the copy built into the binary.
    pub web_root: Option<PathBuf>,
    /// The template of every call's session (a caller may pick the voice and reply mode).
    pub session: SessionConfig,
    /// Voices a caller may pick; the first is the default when the template's is not listed.
    pub voices: Vec<String>,
    /// Largest camera picture decoded, in pixels.
    pub max_video_pixels: usize,
    /// Camera frames handed to the session per second (every frame is still decoded).
    pub max_video_fps: f64,
    /// A call whose connection is not up by then is dropped.
    pub connect_timeout: Duration,
    pub rtc: RtcConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            max_calls: 4,
            capacity: None,
            model_scheduler: None,
            web_root: None,
            session: SessionConfig::default(),
            voices: vec!["Chelsie".into(), "Ethan".into()],
            max_video_pixels: DEFAULT_MAX_PIXELS,
            max_video_fps: 8.0,
            connect_timeout: Duration::from_secs(30),
            rtc: RtcConfig::default(),
        }
    }
}

struct ServerState {
    config: ServeConfig,
    settings: Arc<CallSettings>,
    factory: SessionFactory,
    slots: Arc<Semaphore>,
    calls: CallRegistry,
    metrics: Arc<ServerMetrics>,
    load: LoadMeter,
    /// Held from an offer's admission to its call's registration, so that offers at the same
    /// moment are admitted one after the other.
    admitting: Mutex<()>,
}

/// A server running in the background.
pub struct RunningServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    sampler: tokio::task::JoinHandle<()>,
}

/// One running call as `GET /v1/calls` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CallInfo {
    pub id: String,
    pub seconds: f64,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The calls running now.
    pub fn calls(&self) -> Vec<CallInfo> {
        list_calls(&self.state)
    }

    /// The counters `/metrics` shows.
    pub fn metrics(&self) -> &ServerMetrics {
        &self.state.metrics
    }

    /// Ends every call (freeing its session) and stops serving.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        end_all_calls(&self.state).await;
        self.sampler.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

fn list_calls(state: &ServerState) -> Vec<CallInfo> {
    let mut list: Vec<CallInfo> = state
        .calls
        .entries()
        .into_iter()
        .map(|(id, c)| CallInfo {
            id,
            seconds: c.started.elapsed().as_secs_f64(),
        })
        .collect();
    list.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    list
}

async fn end_all_calls(state: &ServerState) {
    for (_, call) in state.calls.entries() {
        call.end(EndReason::ServerShutdown, Duration::from_secs(5))
            .await;
    }
}

/// Builds and starts servers.
pub struct Server;

impl Server {
    /// Binds `config.bind` and serves in the background.
    pub async fn start(
        config: ServeConfig,
        factory: SessionFactory,
    ) -> anyhow::Result<RunningServer> {
        anyhow::ensure!(config.max_calls > 0, "max_calls must be at least 1");
        anyhow::ensure!(
            config.max_video_fps > 0.0,
            "max_video_fps must be positive, got {}",
            config.max_video_fps
        );
        if let Some(root) = &config.web_root {
            anyhow::ensure!(
                root.join("index.html").is_file(),
                "web root {} has no index.html",
                root.display()
            );
        }
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.bind))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && config.token.is_none() {
            tracing::warn!(
                "listening on {addr} without a token: anyone who reaches this address can start \
                 calls; set a token (Authorization: Bearer) when serving beyond this machine"
            );
        }
        let metrics = Arc::new(ServerMetrics::new().context("setting up the metrics")?);
        let settings = Arc::new(CallSettings {
            rtc: config.rtc.clone(),
            voices: config.voices.clone(),
            max_video_pixels: config.max_video_pixels,
            max_video_fps: config.max_video_fps,
            connect_timeout: config.connect_timeout,
            metrics: Arc::clone(&metrics),
        });
        let state = Arc::new(ServerState {
            slots: Arc::new(Semaphore::new(config.max_calls)),
            settings,
            factory,
            calls: Default::default(),
            config,
            metrics,
            load: LoadMeter::default(),
            admitting: Mutex::new(()),
        });
        let sampler = tokio::spawn(sample_load(Arc::downgrade(&state)));
        let app = router(Arc::clone(&state));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
        });
        tracing::info!("call page on http://{addr}/");
        Ok(RunningServer {
            addr,
            state,
            shutdown: Some(tx),
            task,
            sampler,
        })
    }
}

/// Samples the process's load every [`LoadMeter::PERIOD`] while the server lives.
async fn sample_load(state: Weak<ServerState>) {
    let mut tick = tokio::time::interval(LoadMeter::PERIOD);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        let calls = state.calls.entries().len();
        let scheduler = state.config.model_scheduler.as_ref().map(|s| s.headroom());
        state.load.sample(calls, scheduler.as_ref().map(|h| h.busy));
        let load = state.load.estimate(Instant::now(), calls);
        state
            .metrics
            .set_load(&load, state.config.capacity.as_ref());
        if let Some(headroom) = &scheduler {
            state.metrics.set_scheduler(headroom, &load);
        }
        if let Some(usage) = ProcessUsage::of_self() {
            state.metrics.set_process(&usage);
        }
    }
}

/// Whether one more call would be admitted now.
fn admission(state: &ServerState) -> Result<(), Refusal> {
    let calls = state.calls.entries().len();
    let load = state.load.estimate(Instant::now(), calls);
    admission::decide(
        &load,
        state.config.capacity.as_ref(),
        state.config.max_calls,
    )
}

/// A `503` with `Retry-After`, tagged with its reason for `/metrics`.
fn refused(refusal: &Refusal) -> Response {
    let mut response = problem(StatusCode::SERVICE_UNAVAILABLE, refusal.message.clone());
    retry_after(&mut response, refusal);
    response
}

fn retry_after(response: &mut Response, refusal: &Refusal) {
    let seconds = refusal.retry_after.as_secs().max(1);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response.extensions_mut().insert(refusal.reason);
}

/// `GET /v1/health`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// `ready` (one more call would be admitted) or `full`.
    pub status: String,
    /// Why not, when full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub calls: usize,
    pub max_calls: usize,
    pub load_cores: f64,
    /// Cores the calls may use (absent: no admission by capacity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_cores: Option<f64>,
    /// Fraction of the last seconds the shared model scheduler's thread was busy (absent: no
    /// shared scheduler, or not measured yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_busy: Option<f64>,
}

async fn health(State(state): State<Arc<ServerState>>) -> Response {
    let calls = state.calls.entries().len();
    let load = state.load.estimate(Instant::now(), calls);
    let verdict = admission(&state);
    let body = Health {
        status: if verdict.is_ok() { "ready" } else { "full" }.into(),
        reason: verdict.as_ref().err().map(|r| r.message.clone()),
        calls,
        max_calls: state.config.max_calls,
        load_cores: load.busy_cores,
        capacity_cores: state.config.capacity.as_ref().map(Capacity::budget),
        scheduler_busy: load.scheduler_busy,
    };
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Err(refusal) = verdict {
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        retry_after(&mut response, &refusal);
    }
    response
}

/// Serves calls until ctrl-c: `omnicall serve`.
pub async fn serve(config: ServeConfig, factory: SessionFactory) -> anyhow::Result<()> {
    // Listening before the server announces its page: whoever is told where it is may stop it
    // at once (`tokio::signal::ctrl_c` would only listen once awaited, after the announcement).
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let server = Server::start(config, factory).await?;
    interrupt.recv().await;
    tracing::info!("shutting down");
    server.shutdown().await
}

fn router(state: Arc<ServerState>) -> Router {
    let mut app = Router::new()
        .route("/v1/info", get(info))
        .route("/v1/health", get(health))
        .route("/healthz", get(health))
        .route("/v1/offer", post(counted_offer))
        .route("/v1/calls", get(calls))
        .route("/metrics", get(metrics_page))
        .route("/v1/calls/{id}", delete(hang_up))
        .layer(DefaultBodyLimit::max(MAX_SDP_BYTES));
    app = match &state.config.web_root {
        Some(root) => app.fallback_service(tower_http::services::ServeDir::new(root)),
        None => app
            .route(
                "/",
                get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
            )
            .route(
                "/index.html",
                get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
            )
            .route(
                "/app.js",
                get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
            )
            .route(
                "/style.css",
                get(|| async { page(STYLE_CSS, "text/css; charset=utf-8") }),
            ),
    };
    app.with_state(state)
}

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    let mut message = message.into();
    message.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

/// Byte-wise comparison that takes as long for any mismatch position.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The refusal of a request without the right token, `None` when it may go on.
fn refuse_unauthorized(state: &ServerState, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &state.config.token else {
        return None;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_secret(g.trim().as_bytes(), token.as_bytes()) => None,
        Some(_) => Some(unauthorized("the bearer token is wrong")),
        None => Some(unauthorized(
            "this server needs a token: send Authorization: Bearer <token>",
        )),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut r = problem(StatusCode::UNAUTHORIZED, message);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// `GET /v1/info`: what the page needs before a call.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServerInfo {
    pub voices: Vec<String>,
    pub voice: String,
    pub reply_mode: ReplyMode,
    pub token_required: bool,
    pub max_calls: usize,
    /// STUN/TURN servers for the browser's peer connection (TURN credentials only to a
    /// request with the token, when one is configured).
    pub ice_servers: Vec<IceServerInfo>,
}

/// A browser's `RTCIceServer`.
#[derive(Debug, Serialize, Deserialize)]
pub struct IceServerInfo {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

async fn info(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Response {
    let trusted = refuse_unauthorized(&state, &headers).is_none();
    let secret = |s: &String| (trusted && !s.is_empty()).then(|| s.clone());
    let info = ServerInfo {
        voices: state.config.voices.clone(),
        voice: default_voice(&state.config),
        reply_mode: state.config.session.reply_mode,
        token_required: state.config.token.is_some(),
        max_calls: state.config.max_calls,
        ice_servers: state
            .config
            .rtc
            .ice_servers
            .iter()
            .map(|s| IceServerInfo {
                urls: s.urls.clone(),
                username: secret(&s.username),
                credential: secret(&s.credential),
            })
            .collect(),
    };
    axum::Json(info).into_response()
}

fn default_voice(config: &ServeConfig) -> String {
    if config.voices.is_empty() || config.voices.contains(&config.session.voice) {
        config.session.voice.clone()
    } else {
        config.voices[0].clone()
    }
}

async fn calls(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse_unauthorized(&state, &headers) {
        return refusal;
    }
    axum::Json(list_calls(&state)).into_response()
}

async fn metrics_page(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse_unauthorized(&state, &headers) {
        return refusal;
    }
    match state.metrics.render(state.calls.entries().len()) {
        Ok(page) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], page).into_response(),
        Err(e) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render the metrics: {e:#}"),
        ),
    }
}

/// `POST /v1/offer`, counted on `/metrics` as a call started or refused.
async fn counted_offer(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    params: Result<Query<OfferParams>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let metrics = Arc::clone(&state.metrics);
    let response = offer(State(state), headers, params, body).await;
    match response.extensions().get::<RefusalReason>() {
        Some(&reason) => metrics.offer_refused(reason),
        None => metrics.offer_answered(response.status().as_u16()),
    }
    response
}

#[derive(Debug, Deserialize)]
struct OfferParams {
    voice: Option<String>,
    reply_mode: Option<ReplyMode>,
}

async fn offer(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    params: Result<Query<OfferParams>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    if let Some(refusal) = refuse_unauthorized(&state, &headers) {
        return refusal;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/sdp"))
    {
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("the offer must be sent as application/sdp, not {content_type:?}"),
        );
    }
    let Ok(Query(params)) = params else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad query: voice=<name> and reply_mode=voice|text are accepted",
        );
    };
    let Ok(sdp) = std::str::from_utf8(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "malformed SDP offer: not UTF-8 text",
        );
    };
    let summary = match signaling::check_offer(sdp) {
        Ok(s) => s,
        Err(e @ OfferError::Malformed(_)) => {
            return problem(StatusCode::BAD_REQUEST, e.to_string());
        }
        Err(e) => return problem(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    };
    let mut session_config = state.config.session.clone();
    session_config.voice = default_voice(&state.config);
    if let Some(voice) = params.voice {
        if !state.config.voices.is_empty() && !state.config.voices.contains(&voice) {
            return problem(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown voice {voice:?} (available: {})",
                    state.config.voices.join(", ")
                ),
            );
        }
        session_config.voice = voice;
    }
    if let Some(mode) = params.reply_mode {
        session_config.reply_mode = mode;
    }
    let permit = {
        let _one_at_a_time = state.admitting.lock().expect("admission lock");
        if let Err(refusal) = admission(&state) {
            tracing::warn!("call refused: {}", refusal.message);
            return refused(&refusal);
        }
        let Ok(permit) = Arc::clone(&state.slots).try_acquire_owned() else {
            let refusal = Refusal {
                reason: RefusalReason::Slots,
                message: format!(
                    "all {} call slots are busy; try again when a call has ended",
                    state.config.max_calls
                ),
                retry_after: admission::RETRY_AFTER,
            };
            tracing::warn!("call refused: {}", refusal.message);
            return refused(&refusal);
        };
        state.load.admitted(Instant::now());
        permit
    };
    let started = Instant::now();
    let (voice, reply_mode) = (session_config.voice.clone(), session_config.reply_mode);
    let factory = Arc::clone(&state.factory);
    let session = match tokio::task::spawn_blocking(move || factory(session_config)).await {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            tracing::error!("cannot start a session: {e:#}");
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot start a session: {e:#}"),
            );
        }
        Err(e) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot start a session: {e}"),
            );
        }
    };
    let new_call = peer::NewCall {
        offer: sdp,
        summary: &summary,
        session: session.clone(),
        voice,
        reply_mode,
        started,
        permit,
    };
    let answer = peer::start_call(new_call, Arc::clone(&state.settings), state.calls.clone()).await;
    match answer {
        Ok((id, answer)) => {
            tracing::info!(
                call = &id[..8],
                video = ?summary.video_codecs,
                setup_ms = started.elapsed().as_millis() as u64,
                "call created"
            );
            let mut response = (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/sdp")],
                answer,
            )
                .into_response();
            if let Ok(location) = HeaderValue::from_str(&format!("/v1/calls/{id}")) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Err(e) => {
            session.close();
            match e {
                CallSetupError::Refused(_) => {
                    tracing::warn!("offer refused: {e}");
                    problem(StatusCode::BAD_REQUEST, e.to_string())
                }
                CallSetupError::Internal(e) => {
                    tracing::error!("cannot answer an offer: {e:#}");
                    problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot answer the offer: {e:#}"),
                    )
                }
            }
        }
    }
}

async fn hang_up(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(refusal) = refuse_unauthorized(&state, &headers) {
        return refusal;
    }
    let Some(call) = state.calls.get(&id) else {
        return problem(StatusCode::NOT_FOUND, format!("no call {id}"));
    };
    call.end(EndReason::Deleted, Duration::from_secs(5)).await;
    StatusCode::NO_CONTENT.into_response()
}
