//! The transport's guarantees with the real engine (tiny model) behind every call, where
//! rtc_call.rs and rtc_bad_input.rs use the stand-in session: the token on every guarded
//! route, the call limit, garbage media and undecodable video dropped while a healthy call is
//! answered with the camera reaching the Thinker, and a vanished client whose engine threads
//! end. One test, so that the engine threads are this test's alone.

mod rtc_support;

use std::time::Duration;

use omnicall::media::video_decode::VideoCodec;
use omnicall::rtc::client::{CallClient, ClientConfig, read_wav_mono, read_y4m};
use omnicall::rtc::protocol::ServerMessage;
use omnicall::rtc::{RtcConfig, ServeConfig, Server};
use rtc_support::*;

const T: Duration = Duration::from_secs(20);
const TOKEN: &str = "s3cret";

fn client(url: &str) -> ClientConfig {
    ClientConfig {
        rtc: RtcConfig {
            udp_addrs: vec!["127.0.0.1:0".into()],
            ..Default::default()
        },
        ..ClientConfig::new(url)
    }
    .with_token(TOKEN)
}

/// The status of an HTTP request, with or without the token.
async fn status(method: &'static str, url: String, token: Option<&'static str>) -> u16 {
    tokio::task::spawn_blocking(move || {
        let mut request = ureq::request(method, &url);
        if let Some(token) = token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        match request.call() {
            Ok(response) => response.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{method} {url}: {e}"),
        }
    })
    .await
    .unwrap()
}

async fn metrics_page(url: &str) -> String {
    let url = format!("{url}/metrics");
    tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The value of the unlabelled sample `name` on a metrics page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} on the page"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_engine_behind_limits_token_garbage_and_a_vanished_client() {
    init_tracing();
    assert!(engine_threads().is_empty(), "{:?}", engine_threads());
    let (factory, scheduler) = engine_factory_and_scheduler();
    let server = Server::start(
        ServeConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            rtc: RtcConfig {
                udp_addrs: vec!["127.0.0.1:0".into()],
                ..Default::default()
            },
            max_video_fps: 30.0,
            max_calls: 2,
            token: Some(TOKEN.into()),
            model_scheduler: Some(scheduler),
            ..Default::default()
        },
        factory,
    )
    .await
    .unwrap();
    let url = server.url();

    // the token: the offer, the call list, hang-up and the metrics page all need it
    let err = CallClient::connect(ClientConfig {
        token: None,
        ..client(&url)
    })
    .await
    .err()
    .expect("an offer without the token");
    assert!(format!("{err:#}").contains("401"), "{err:#}");
    let err = CallClient::connect(client(&url).with_token("wrong"))
        .await
        .err()
        .expect("an offer with a wrong token");
    assert!(format!("{err:#}").contains("token is wrong"), "{err:#}");
    assert!(
        engine_threads().is_empty(),
        "a refused offer started a session"
    );

    // the healthy call: H.264 camera from the start, speech after 2 s
    let mut healthy = CallClient::connect(client(&url).with_video(VideoCodec::H264))
        .await
        .unwrap();
    let healthy_threads = engine_threads();
    assert!(!healthy_threads.is_empty(), "no engine session started");
    let call = format!("{url}/v1/calls/{}", healthy.call_id());
    assert_eq!(status("DELETE", call.clone(), None).await, 401);
    assert_eq!(status("DELETE", call.clone(), Some("wrong")).await, 401);
    assert_eq!(status("GET", format!("{url}/metrics"), None).await, 401);
    assert_eq!(
        status("GET", format!("{url}/metrics"), Some(TOKEN)).await,
        200
    );
    assert_eq!(status("GET", format!("{url}/v1/calls"), None).await, 401);
    assert_eq!(server.calls().len(), 1, "a refused DELETE hung up");
    let (frames, fps) = read_y4m(media("testsrc_96x64.y4m"), 100).unwrap();
    let (speech, rate) = read_wav_mono(media("hello16k.wav")).unwrap();
    let m = healthy.media();
    let camera = tokio::spawn(async move {
        m.send_i420_frames(&frames, fps, Duration::from_secs(6))
            .await
    });
    let m = healthy.media();
    let talk = tokio::spawn(async move {
        m.send_silence(Duration::from_secs(2)).await.unwrap();
        m.send_pcm(&speech, rate).await.unwrap();
        m.send_silence(Duration::from_millis(800)).await.unwrap();
    });

    // a second call sending garbage; a third caller is refused
    let mut garbage = CallClient::connect(client(&url).with_video(VideoCodec::Vp8))
        .await
        .unwrap();
    let all_threads = engine_threads();
    let garbage_threads: Vec<u64> = all_threads.difference(&healthy_threads).copied().collect();
    assert!(
        !garbage_threads.is_empty(),
        "no engine session for the second call"
    );
    let err = CallClient::connect(client(&url))
        .await
        .err()
        .expect("a third call beyond the limit");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("503") && msg.contains("all 2 call slots are busy"),
        "{msg}"
    );
    send_vp8_garbage(T, &mut garbage).await;

    // the healthy call is answered by the engine, the camera in the Thinker's context
    talk.await.unwrap();
    let turn = healthy
        .wait_for_message(Duration::from_secs(60), |m| {
            matches!(m, ServerMessage::UserTurn { .. })
        })
        .await
        .unwrap();
    let ServerMessage::UserTurn { video_frames, .. } = turn.message else {
        unreachable!()
    };
    assert!(video_frames > 0, "the user turn had no camera frame");
    let timings = healthy
        .wait_for_message(Duration::from_secs(60), |m| {
            matches!(m, ServerMessage::Timings(_))
        })
        .await
        .unwrap();
    let ServerMessage::Timings(marks) = timings.message else {
        unreachable!()
    };
    assert!(
        marks.video_frames > 0,
        "no camera frame reached the Thinker"
    );
    assert!(
        marks.video_frames <= video_frames,
        "{marks:?} vs {video_frames}"
    );
    // the answer's voice (the server sends silence packets between answers; the tiny model's
    // answers are short), until the turn is done
    let (mut voiced, deadline) = (0, tokio::time::Instant::now() + T);
    let mut last_voiced = tokio::time::Instant::now();
    while tokio::time::Instant::now() < deadline
        && (voiced == 0 || last_voiced.elapsed() < Duration::from_millis(1_500))
    {
        match healthy.next_audio(Duration::from_secs(2)).await {
            Some(a) if rms(&a.samples) > 1e-3 => {
                voiced += 1;
                last_voiced = tokio::time::Instant::now();
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(voiced > 0, "the healthy call got no voice");
    eprintln!("the healthy call's answer: {voiced} voiced packets");
    // its passes ran on the shared scheduler, which /metrics shows (sampled every second)
    let page = metrics_page(&url).await;
    assert!(
        metric(&page, "omnicall_scheduler_passes_total") > 0.0,
        "{page}"
    );
    assert!(
        metric(&page, "omnicall_scheduler_busy_seconds_total") > 0.0,
        "{page}"
    );
    assert!(
        metric(&page, "omnicall_scheduler_sessions") >= 1.0,
        "{page}"
    );
    camera.await.unwrap().unwrap();
    while let Some(m) = healthy.next_message(Duration::from_millis(200)).await {
        assert!(
            !matches!(m.message, ServerMessage::Error { .. }),
            "the healthy call was told {m:?}"
        );
    }

    // the garbage client vanishes: its call and its engine session end, the slot frees
    garbage.drop_connection().await;
    eventually(Duration::from_secs(40), "the vanished call to end", || {
        server.calls().len() == 1
    })
    .await;
    let alive = |ids: &[u64]| -> Vec<u64> {
        let now = engine_threads();
        ids.iter().copied().filter(|id| now.contains(id)).collect()
    };
    eventually(T, "the vanished call's engine threads to end", || {
        alive(&garbage_threads).is_empty()
    })
    .await;
    assert_eq!(
        alive(&healthy_threads.iter().copied().collect::<Vec<_>>()).len(),
        healthy_threads.len(),
        "the healthy call lost engine threads"
    );
    // an H.264 stream declaring 8192x8192 pixels, then a broken STAP-A
    let before = engine_threads();
    let mut h264 = CallClient::connect(client(&url).with_video(VideoCodec::H264))
        .await
        .unwrap();
    let h264_threads: std::collections::BTreeSet<u64> =
        engine_threads().difference(&before).copied().collect();
    assert!(
        !h264_threads.is_empty(),
        "no engine session for the third call"
    );
    let mut au = vec![0, 0, 0, 1];
    au.extend(h264_sps(8192, 8192));
    au.extend([
        0, 0, 0, 1, 0x68, 0xce, 0x3c, 0x80, 0, 0, 0, 1, 0x65, 0x88, 0x84, 0x21,
    ]);
    h264.media()
        .send_video_frame(&au, Duration::from_millis(33))
        .await
        .unwrap();
    expect_error(T, &mut h264, "H.264 frame of 8192x8192").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    h264.media()
        .send_raw_video_payload(&[0x78, 0x00, 0x09, 0x41], true, 3_000)
        .await
        .unwrap();
    expect_error(T, &mut h264, "STAP-A").await;
    assert_eq!(server.calls().len(), 2, "a misbehaving call was dropped");

    // hang-up by DELETE with the token, and by the client
    let ids = [healthy.call_id().to_string(), h264.call_id().to_string()];
    assert_eq!(status("DELETE", call, Some(TOKEN)).await, 204);
    h264.hang_up().await.unwrap();
    drop(healthy);
    eventually(T, "both calls to end", || server.calls().is_empty()).await;
    server.shutdown().await.unwrap();
    let every: Vec<u64> = healthy_threads.union(&h264_threads).copied().collect();
    let ended = tokio::time::timeout(T, async {
        while !alive(&every).is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let left: Vec<(u64, String)> = threads()
        .into_iter()
        .filter(|(id, _)| every.contains(id))
        .collect();
    assert!(
        ended.is_ok(),
        "engine session threads still running: {left:?}"
    );
    eventually(T, "the call threads to end", || {
        call_threads(&[&ids[0], &ids[1]]).is_empty()
    })
    .await;
}
