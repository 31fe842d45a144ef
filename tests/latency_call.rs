//! The latency client against a server on loopback: every turn's CSV row holds every stage, in
//! the order they happen; a barge-in run measures how fast the answer stops; `/metrics` shows
//! the turns' stage histograms and the call's counters afterwards.
//!
//! Most tests use the transport's test harness (a tone for an answer, timing marks as the
//! engine sends them) behind the session factory, to control what the server does; one runs
//! the real engine on the tiny model at the same seam.

mod rtc_support;

use std::path::Path;
use std::time::Duration;

use omnicall::bench::call::{CallBenchOptions, STAGES, csv_header, run_call_bench};
use omnicall::media::video_decode::VideoCodec;
use omnicall::rtc::{RtcConfig, RunningServer, ServeConfig, Server, SessionFactory};
use rtc_support::*;

fn loopback() -> RtcConfig {
    RtcConfig {
        udp_addrs: vec!["127.0.0.1:0".into()],
        ..Default::default()
    }
}

async fn start(factory: SessionFactory) -> RunningServer {
    Server::start(
        ServeConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            rtc: loopback(),
            max_video_fps: 30.0,
            ..Default::default()
        },
        factory,
    )
    .await
    .unwrap()
}

fn options(server: &RunningServer, dir: &Path) -> CallBenchOptions {
    CallBenchOptions {
        rtc: loopback(),
        gap: Duration::from_millis(600),
        answer_timeout: Duration::from_secs(20),
        csv: Some(dir.join("latency.csv")),
        markdown: Some(dir.join("latency.md")),
        ..CallBenchOptions::new(server.url(), vec![media("hello16k.wav")])
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("omnicall-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The CSV as rows of named cells.
fn read_csv(path: &Path) -> Vec<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    assert_eq!(header.join(","), csv_header());
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            assert_eq!(cells.len(), header.len(), "{l}");
            header
                .iter()
                .cloned()
                .zip(cells.into_iter().map(String::from))
                .collect()
        })
        .collect()
}

fn number(row: &[(String, String)], column: &str) -> Option<f64> {
    let (_, v) = row.iter().find(|(c, _)| c == column).unwrap();
    (!v.is_empty()).then(|| v.parse().unwrap())
}

/// Every stage's time in a CSV row, checked present and non-decreasing (the last step crosses
/// from the server's clock to the client's, within the row's clock uncertainty). An answer
/// started speculatively (`--turn-detection smart`) does its work before the turn is
/// confirmed, so the stages from `prefill_done` to `first_waveform_chunk` only have to follow the
/// end of speech; nothing is heard before the confirmation (`first_audio_frame` ≥
/// `end_of_turn`).
fn stages_in_order(row: &[(String, String)]) -> Vec<f64> {
    let uncertainty = number(row, "clock_uncertainty_ms").unwrap();
    let times: Vec<f64> = STAGES
        .iter()
        .map(|s| number(row, &format!("{s}_ms")).unwrap_or_else(|| panic!("no {s}: {row:?}")))
        .collect();
    let at = |stage: &str| times[STAGES.iter().position(|s| *s == stage).unwrap()];
    assert!(
        at("first_audio_frame") >= at("end_of_turn"),
        "audio before the turn was confirmed: {row:?}"
    );
    for (pair, w) in STAGES.windows(2).zip(times.windows(2)) {
        // A speculative answer's prefill comes before the confirmation: compare it with the
        // end of speech instead.
        let w = if pair == ["end_of_turn", "prefill_done"] {
            [at("speech_end"), w[1]]
        } else {
            [w[0], w[1]]
        };
        let slack = if pair[1] == "voice_to_voice" {
            uncertainty
        } else {
            0.0
        };
        assert!(
            w[1] >= w[0] - slack,
            "{} at {} ms before {} at {} ms: {row:?}",
            pair[1],
            w[1],
            pair[0],
            w[0]
        );
    }
    times
}

async fn metrics_page(server: &RunningServer) -> String {
    let url = format!("{}/metrics", server.url());
    tokio::task::spawn_blocking(move || {
        let response = ureq::get(&url).call().unwrap();
        assert!(
            response.content_type().starts_with("text/plain"),
            "{}",
            response.content_type()
        );
        response.into_string().unwrap()
    })
    .await
    .unwrap()
}

fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_turn_has_every_stage_in_order_and_metrics_show_them() {
    init_tracing();
    let (factory, _logs) = harness_factory();
    let server = start(factory).await;
    let dir = temp_dir("latency-call");
    let before = metrics_page(&server).await;
    assert_eq!(sample(&before, "omnicall_calls_started_total"), 0.0);

    let mut opts = options(&server, &dir);
    opts.turns = 3;
    opts.warmup = 1;
    let report = run_call_bench(opts).await.unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    // on loopback the two clocks are tied within a few ms
    assert!(
        report.clock.uncertainty_ms >= 0.0 && report.clock.uncertainty_ms < 50.0,
        "{:?}",
        report.clock
    );

    let rows = read_csv(&dir.join("latency.csv"));
    assert_eq!(rows.len(), 3, "one row per measured turn");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(number(row, "turn"), Some(i as f64 + 1.0));
        // the warm-up was the server's turn 1
        assert_eq!(number(row, "server_turn"), Some(i as f64 + 2.0));
        assert!(number(row, "barge_in_ms").is_none());
        let uncertainty = number(row, "clock_uncertainty_ms").unwrap();
        let times = stages_in_order(row);
        // the server cannot see the end of speech before the client spoke it
        assert!(times[0] >= -uncertainty, "{row:?}");
        // the stand-in answers once 500 ms of silence ended the turn
        assert!(times[1] >= 450.0, "{row:?}");
    }
    let markdown = std::fs::read_to_string(dir.join("latency.md")).unwrap();
    assert!(markdown.contains("| voice_to_voice | 3 |"), "{markdown}");

    // the server's view of the same call
    eventually(Duration::from_secs(10), "the call to end", || {
        server.calls().is_empty()
    })
    .await;
    let page = metrics_page(&server).await;
    assert_eq!(sample(&page, "omnicall_calls_started_total"), 1.0);
    assert_eq!(sample(&page, "omnicall_calls_active"), 0.0);
    assert_eq!(sample(&page, "omnicall_turns_total"), 4.0);
    for stage in omnicall::rtc::metrics::TURN_STAGES {
        let count = sample(
            &page,
            &format!("omnicall_turn_stage_seconds_count{{stage=\"{stage}\"}}"),
        );
        assert_eq!(count, 4.0, "{stage}");
    }
    // 4 prompts of about 1.6 s with gaps: well over 100 microphone packets
    assert!(sample(&page, "omnicall_audio_packets_received_total") > 200.0);
    // 4 answers of 1.2 s: 60 voice packets each
    assert!(sample(&page, r#"omnicall_audio_packets_sent_total{kind="voice"}"#) >= 4.0 * 59.0);
    assert!(
        sample(
            &page,
            r#"omnicall_audio_packets_sent_total{kind="silence"}"#
        ) > 0.0
    );
    assert_eq!(sample(&page, "omnicall_barge_ins_total"), 0.0);
    // a refused offer is counted by its reason
    let url = format!("{}/v1/offer", server.url());
    let status = tokio::task::spawn_blocking(move || {
        match ureq::post(&url)
            .set("Content-Type", "text/plain")
            .send_string("v=0")
        {
            Err(ureq::Error::Status(code, _)) => code,
            other => panic!("a text/plain offer was not refused: {other:?}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 415);
    let page = metrics_page(&server).await;
    assert_eq!(
        sample(
            &page,
            r#"omnicall_calls_rejected_total{reason="unsupported_media_type"}"#
        ),
        1.0
    );
    server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barge_in_run_measures_how_fast_the_answer_stops() {
    init_tracing();
    let (factory, _logs) = harness_factory_with(HarnessOptions { barge_in: true });
    let server = start(factory).await;
    let dir = temp_dir("latency-barge-in");
    let mut opts = options(&server, &dir);
    opts.turns = 2;
    opts.warmup = 0;
    opts.barge_in_at = Some(Duration::from_millis(300));
    let report = run_call_bench(opts).await.unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);

    let rows = read_csv(&dir.join("latency.csv"));
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let barge_in = number(row, "barge_in_ms").expect("a barge-in latency");
        // the stand-in's answer lasts 1.2 s; cut 0.3 s in, its voice must end well before the
        // 0.9 s it had left
        assert!((0.0..900.0).contains(&barge_in), "{row:?}");
        assert!(number(row, "voice_to_voice_ms").is_some(), "{row:?}");
        assert!(number(row, "first_audio_frame_ms").is_some(), "{row:?}");
    }
    let markdown = std::fs::read_to_string(dir.join("latency.md")).unwrap();
    assert!(markdown.contains("| barge_in | 2 |"), "{markdown}");
    // both answers cut, and the closing prompt's answer played out
    let page = metrics_page(&server).await;
    assert_eq!(sample(&page, "omnicall_barge_ins_total"), 2.0);
    assert_eq!(sample(&page, "omnicall_turns_total"), 3.0);
    server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_camera_streams_a_video_file_during_the_call() {
    init_tracing();
    let (factory, logs) = harness_factory();
    let server = start(factory).await;
    let dir = temp_dir("latency-video");
    let mut opts = options(&server, &dir);
    opts.turns = 1;
    opts.warmup = 0;
    opts.video = Some(omnicall::bench::call::VideoOptions {
        path: media("speech.mp4"),
        codec: VideoCodec::H264,
        fps: Some(10.0),
    });
    let report = run_call_bench(opts).await.unwrap();
    assert_eq!(report.rows.len(), 1);
    assert!(report.rows[0].voice_to_voice().is_some());
    let frames = logs.lock().unwrap()[0].lock().unwrap().frames.clone();
    // the MP4's H.264 frames, decoded, encoded again and decoded by the server at their size
    assert!(frames.len() >= 10, "{} frames", frames.len());
    assert!(frames.iter().all(|f| (f.width, f.height) == (64, 48)));
    server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_drops_ends_the_run_with_the_reason() {
    init_tracing();
    let (factory, _logs) = harness_factory();
    let server = start(factory).await;
    let dir = temp_dir("latency-drop");
    let mut opts = options(&server, &dir);
    opts.turns = 20;
    let bench = tokio::spawn(run_call_bench(opts));
    eventually(Duration::from_secs(20), "the call to start", || {
        !server.calls().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.shutdown().await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), bench)
        .await
        .expect("the run to end once the call is gone")
        .unwrap()
        .unwrap_err();
    assert!(format!("{err:#}").contains("the call dropped"), "{err:#}");
    assert!(!dir.join("latency.csv").exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// The real engine on the tiny model: every stage of every turn marked, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_marks_every_stage_of_every_turn() {
    init_tracing();
    let server = start(engine_factory()).await;
    let dir = temp_dir("latency-engine");
    let mut opts = options(&server, &dir);
    opts.turns = 2;
    opts.warmup = 1;
    opts.answer_timeout = Duration::from_secs(120);
    let report = run_call_bench(opts).await.unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let rows = read_csv(&dir.join("latency.csv"));
    assert_eq!(rows.len(), 2);
    for row in &rows {
        stages_in_order(row);
    }
    server.shutdown().await.unwrap();
    std::fs::remove_dir_all(dir).ok();
}
