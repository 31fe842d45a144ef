//! Admission by capacity and the freeing of hung-up calls, against the real engine on the tiny
//! model: a server whose measured load leaves no room for one more call refuses the offer with
//! `503` and `Retry-After` (and says so on `/v1/health` and `/metrics`); after calls end, their
//! sessions and threads are gone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use omnicall::bench::call::{CallBenchOptions, run_call_bench};
use omnicall::bench::load::metric_sum;
use omnicall::engine::clock::{Clock, SystemClock};
use omnicall::engine::runtime::SESSION_THREADS;
use omnicall::engine::session::SessionConfig;
use omnicall::model::loading::ModelFiles;
use omnicall::model::omni::OmniModel;
use omnicall::rtc::admission::Capacity;
use omnicall::rtc::client::{CallClient, ClientConfig, OfferRefused};
use omnicall::rtc::{RtcConfig, RunningServer, ServeConfig, Server, SessionFactory};

/// The tests count the process's session threads: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn engine_factory() -> SessionFactory {
    let model_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    let files = ModelFiles::locate(model_dir.to_str().unwrap()).unwrap();
    let model = OmniModel::load(&files, DType::F32, &Device::Cpu).unwrap();
    Arc::new(move |config: SessionConfig| {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        omnicall::engine::runtime::spawn(&model, config, clock)
    })
}

fn loopback() -> RtcConfig {
    RtcConfig {
        udp_addrs: vec!["127.0.0.1:0".into()],
        ..Default::default()
    }
}

async fn start(capacity: Option<Capacity>, max_calls: usize) -> RunningServer {
    Server::start(
        ServeConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            rtc: loopback(),
            max_calls,
            capacity,
            ..Default::default()
        },
        engine_factory(),
    )
    .await
    .unwrap()
}

fn prompt() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/media/hello16k.wav")
}

fn get(url: String) -> (u16, Option<String>, String) {
    let response = match ureq::get(&url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let retry_after = response.header("Retry-After").map(String::from);
    (
        response.status(),
        retry_after,
        response.into_string().unwrap(),
    )
}

async fn get_async(url: String) -> (u16, Option<String>, String) {
    tokio::task::spawn_blocking(move || get(url)).await.unwrap()
}

async fn metric(server: &RunningServer, name: &'static str) -> Option<f64> {
    let (_, _, page) = get_async(format!("{}/metrics", server.url())).await;
    metric_sum(&page, name)
}

fn client(server: &RunningServer) -> ClientConfig {
    let mut config = ClientConfig::new(server.url());
    config.rtc = loopback();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_room_for_one_more_call_refuses_with_retry_after() {
    let _serial = SERIAL.lock().await;
    // room for any number of calls by count, but for less than what any call costs
    let capacity = Capacity {
        cores: 1e-6,
        max_load: 1.0,
    };
    let server = start(Some(capacity), 8).await;
    let (status, _, body) = get_async(format!("{}/v1/health", server.url())).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""status":"ready""#), "{body}");

    // the first call is admitted (no cost known yet) and speaks a turn to the real engine
    let options = CallBenchOptions {
        rtc: loopback(),
        turns: 1,
        warmup: 0,
        gap: Duration::from_millis(600),
        answer_timeout: Duration::from_secs(120),
        ..CallBenchOptions::new(server.url(), vec![prompt()])
    };
    let first = tokio::spawn(run_call_bench(options));
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server, "omnicall_call_cost_cores")
        .await
        .unwrap_or(0.0)
        <= 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the cost of a call was never measured"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let (status, retry, body) = get_async(format!("{}/v1/health", server.url())).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""status":"full""#), "{body}");
    assert!(retry.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)));

    let err = CallClient::connect(client(&server)).await.err().unwrap();
    let refused = err
        .chain()
        .find_map(|c| c.downcast_ref::<OfferRefused>())
        .unwrap_or_else(|| panic!("not a refusal: {err:#}"));
    assert_eq!(refused.status, 503, "{}", refused.message);
    assert!(
        refused
            .retry_after
            .is_some_and(|d| d >= Duration::from_secs(1))
    );
    assert!(
        refused.message.contains("at capacity"),
        "{}",
        refused.message
    );
    assert_eq!(
        metric(
            &server,
            r#"omnicall_calls_rejected_total{reason="capacity"}"#
        )
        .await,
        Some(1.0)
    );
    assert!(metric(&server, "omnicall_headroom_cores").await.unwrap() < 0.0);

    let report = first.await.unwrap().unwrap();
    assert_eq!(report.rows.len(), 1, "{:?}", report.warnings);
    assert!(
        report.rows[0].voice_to_voice().is_some(),
        "the admitted call was answered: {:?}",
        report.warnings
    );
    server.shutdown().await.unwrap();
}

/// Names of the session threads of this process now.
fn session_thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .filter(|name| SESSION_THREADS.iter().any(|p| name.starts_with(p)))
        .collect()
}

fn session_threads() -> usize {
    session_thread_names().len()
}

// The sessions' threads are counted by name: candle's compute pool, shared and never ended,
// is started by the engine under its own names (`compute-N`), not under the name of the first
// session thread that computes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_up_calls_leave_no_session_and_no_thread_behind() {
    let _serial = SERIAL.lock().await;
    let server = start(None, 4).await;
    let before = session_threads();
    for _ in 0..3 {
        let mut calls = Vec::new();
        for _ in 0..2 {
            calls.push(CallClient::connect(client(&server)).await.unwrap());
        }
        assert_eq!(server.calls().len(), 2);
        assert!(session_threads() > before, "the sessions run their threads");
        for call in calls {
            call.hang_up().await.unwrap();
        }
    }
    // a session's thread ends once its model call under way (the system prompt's prefill,
    // in a debug build on busy cores) returns
    let hung_up = Instant::now();
    let deadline = hung_up + Duration::from_secs(90);
    while !server.calls().is_empty() || session_threads() > before {
        assert!(
            Instant::now() < deadline,
            "after the hang-ups: {} calls, session threads {:?} (before: {before})",
            server.calls().len(),
            session_thread_names()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "session threads gone {:?} after the last hang-up",
        hung_up.elapsed()
    );
    assert_eq!(metric(&server, "omnicall_calls_active").await, Some(0.0));
    server.shutdown().await.unwrap();
}
