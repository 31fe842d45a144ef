//! Bad input at every door: offers the server must refuse with a clear 4xx, and garbage on
//! the media and data channels of a running call, which is dropped and reported (log line and
//! an `error` message to that client) while a healthy call beside it carries on unaffected.

mod rtc_support;

use std::sync::Arc;
use std::time::Duration;

use omnicall::media::opus::OpusEncoder;
use omnicall::media::video_decode::VideoCodec;
use omnicall::rtc::client::{CallClient, ClientConfig, read_ivf, read_wav_mono, read_y4m};
use omnicall::rtc::protocol::ServerMessage;
use omnicall::rtc::{RtcConfig, ServeConfig, Server};
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_PCMU, MIME_TYPE_VP9,
};
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind};
use rtc_support::*;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
};

const T: Duration = Duration::from_secs(20);

fn loopback() -> RtcConfig {
    RtcConfig {
        udp_addrs: vec!["127.0.0.1:0".into()],
        ..Default::default()
    }
}

fn serve_config() -> ServeConfig {
    ServeConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        rtc: loopback(),
        max_video_fps: 30.0,
        ..Default::default()
    }
}

fn client(url: &str) -> ClientConfig {
    ClientConfig {
        rtc: loopback(),
        ..ClientConfig::new(url)
    }
}

struct Quiet;
impl PeerConnectionEventHandler for Quiet {}

fn codec(mime: &str, clock_rate: u32, channels: u16, pt: u8) -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: mime.into(),
            clock_rate,
            channels,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        },
        payload_type: pt,
    }
}

/// A real offer from a peer connection with these codecs and sections.
async fn offer_with(
    audio: Option<RTCRtpCodecParameters>,
    video: Option<RTCRtpCodecParameters>,
) -> String {
    let mut engine = MediaEngine::default();
    if let Some(a) = &audio {
        engine
            .register_codec(a.clone(), RtpCodecKind::Audio)
            .unwrap();
    }
    if let Some(v) = &video {
        engine
            .register_codec(v.clone(), RtpCodecKind::Video)
            .unwrap();
    }
    let pc = PeerConnectionBuilder::new()
        .with_media_engine(engine)
        .with_handler(Arc::new(Quiet))
        .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
        .build()
        .await
        .unwrap();
    if audio.is_some() {
        pc.add_transceiver_from_kind(RtpCodecKind::Audio, None)
            .await
            .unwrap();
    }
    if video.is_some() {
        pc.add_transceiver_from_kind(RtpCodecKind::Video, None)
            .await
            .unwrap();
    }
    pc.create_data_channel("omnicall", None).await.unwrap();
    let offer = pc.create_offer(None).await.unwrap();
    let sdp = offer.sdp.clone();
    pc.close().await.unwrap();
    sdp
}

/// Posts a body; returns the status and the body of the answer.
async fn post(url: String, content_type: &'static str, body: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        match ureq::post(&url)
            .set("Content-Type", content_type)
            .send_string(&body)
        {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_offers_are_refused_with_the_reason() {
    init_tracing();
    let (factory, logs) = harness_factory();
    let server = Server::start(
        ServeConfig {
            max_calls: 1,
            ..serve_config()
        },
        factory,
    )
    .await
    .unwrap();
    let offer_url = format!("{}/v1/offer", server.url());
    let sdp = "application/sdp";

    let (status, body) = post(offer_url.clone(), sdp, "hello, I am not SDP".into()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.starts_with("malformed SDP offer"), "{body}");

    let (status, body) = post(offer_url.clone(), sdp, "v=0\r\no=x\r\nm=audio\r\n".into()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.starts_with("malformed SDP offer"), "{body}");

    let good = offer_with(Some(codec(MIME_TYPE_OPUS, 48_000, 2, 111)), None).await;
    let (status, body) = post(offer_url.clone(), "text/plain", good).await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("application/sdp"), "{body}");

    let data_only = offer_with(None, None).await;
    let (status, body) = post(offer_url.clone(), sdp, data_only).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("no audio section"), "{body}");

    let pcmu_only = offer_with(Some(codec(MIME_TYPE_PCMU, 8_000, 0, 0)), None).await;
    let (status, body) = post(offer_url.clone(), sdp, pcmu_only).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("no supported audio codec") && body.contains("PCMU/8000"),
        "{body}"
    );

    let vp9_only = offer_with(
        Some(codec(MIME_TYPE_OPUS, 48_000, 2, 111)),
        Some(codec(MIME_TYPE_VP9, 90_000, 0, 98)),
    )
    .await;
    let (status, body) = post(offer_url.clone(), sdp, vp9_only).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("no supported video codec") && body.contains("VP9/90000"),
        "{body}"
    );

    let huge = format!("v=0\r\n{}", "a=x\r\n".repeat(30_000));
    let (status, _) = post(offer_url.clone(), sdp, huge).await;
    assert_eq!(status, 413);

    let good = offer_with(Some(codec(MIME_TYPE_OPUS, 48_000, 2, 111)), None).await;
    let (status, body) = post(format!("{offer_url}?voice=Nobody"), sdp, good).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown voice \"Nobody\""), "{body}");

    let (status, _) = tokio::task::spawn_blocking({
        let url = format!("{}/v1/calls/0123", server.url());
        move || match ureq::delete(&url).call() {
            Err(ureq::Error::Status(code, _)) => (code, ()),
            other => panic!("{other:?}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 404);

    // nothing was started or leaked: no session, and the one slot is free
    assert!(logs.lock().unwrap().is_empty());
    assert!(server.calls().is_empty());
    let call = CallClient::connect(client(&server.url())).await.unwrap();
    call.hang_up().await.unwrap();
    server.shutdown().await.unwrap();
}

/// Waits for an `error` message containing `needle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_media_is_dropped_while_a_healthy_call_goes_on() {
    init_tracing();
    let (factory, logs) = harness_factory();
    let server = Server::start(serve_config(), factory).await.unwrap();

    // the healthy call: speech and H.264 camera, answered as usual
    let mut healthy = CallClient::connect(client(&server.url()).with_video(VideoCodec::H264))
        .await
        .unwrap();
    let (frames, fps) = read_y4m(media("testsrc_96x64.y4m"), 100).unwrap();
    let (speech, rate) = read_wav_mono(media("hello16k.wav")).unwrap();
    let m = healthy.media();
    let camera = tokio::spawn(async move {
        m.send_i420_frames(&frames, fps, Duration::from_secs(8))
            .await
    });
    let m = healthy.media();
    let talk = tokio::spawn(async move {
        // wait while the bad calls start misbehaving, then speak
        m.send_silence(Duration::from_secs(2)).await.unwrap();
        m.send_pcm(&speech, rate).await.unwrap();
        m.send_silence(Duration::from_millis(600)).await.unwrap();
    });

    // a VP8 call sending garbage
    let mut vp8 = CallClient::connect(client(&server.url()).with_video(VideoCodec::Vp8))
        .await
        .unwrap();
    let errors = send_vp8_garbage(T, &mut vp8).await;
    let media_vp8 = vp8.media();
    assert!(errors.opus.starts_with("audio: "), "{}", errors.opus);
    assert!(
        errors.huge_frame.contains("exceeds the limit"),
        "{}",
        errors.huge_frame
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // garbage on the data channel
    vp8.send_text("{not json").await.unwrap();
    expect_error(T, &mut vp8, "bad control message").await;
    // after all that, real media on the same call still goes through
    let ivf = read_ivf(media("testsrc_96x64.ivf")).unwrap();
    let mut enc = OpusEncoder::new(48_000).unwrap();
    for frame in &ivf {
        media_vp8
            .send_video_frame(frame, Duration::from_millis(100))
            .await
            .unwrap();
        for _ in 0..5 {
            let packet = enc.encode(&[0.1; 960]).unwrap();
            media_vp8
                .send_opus(&packet, Duration::from_millis(20))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // an H.264 call whose stream declares 8192x8192 pixels, then sends a broken STAP-A
    let mut h264 = CallClient::connect(client(&server.url()).with_video(VideoCodec::H264))
        .await
        .unwrap();
    let mut au = vec![0, 0, 0, 1];
    au.extend(h264_sps(8192, 8192));
    au.extend([
        0, 0, 0, 1, 0x68, 0xce, 0x3c, 0x80, 0, 0, 0, 1, 0x65, 0x88, 0x84, 0x21,
    ]);
    h264.media()
        .send_video_frame(&au, Duration::from_millis(33))
        .await
        .unwrap();
    let e = expect_error(T, &mut h264, "exceeds the limit").await;
    assert!(e.contains("H.264 frame of 8192x8192"), "{e}");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    h264.media()
        .send_raw_video_payload(&[0x78, 0x00, 0x09, 0x41], true, 3_000)
        .await
        .unwrap();
    expect_error(T, &mut h264, "STAP-A").await;

    // the healthy call never noticed
    talk.await.unwrap();
    let mut loud = 0;
    while let Some(a) = healthy.next_audio(Duration::from_secs(3)).await {
        if rms(&a.samples) > 0.05 {
            loud += 1;
        }
        if loud >= 50 {
            break;
        }
    }
    assert!(loud >= 50, "the healthy call got {loud} loud voice packets");
    camera.await.unwrap().unwrap();
    while let Some(m) = healthy.next_message(Duration::from_millis(200)).await {
        assert!(
            !matches!(m.message, ServerMessage::Error { .. }),
            "the healthy call was told {m:?}"
        );
    }
    assert_eq!(server.calls().len(), 3, "a misbehaving call was dropped");
    eventually(T, "the healthy call's answer to finish", || {
        logs.lock().unwrap()[0].lock().unwrap().turns_answered == 1
    })
    .await;
    {
        let logs = logs.lock().unwrap();
        let (h, v, b) = (
            logs[0].lock().unwrap(),
            logs[1].lock().unwrap(),
            logs[2].lock().unwrap(),
        );
        assert!(
            h.frames.len() >= 30,
            "healthy call: {} frames",
            h.frames.len()
        );
        // the garbage call's real media after the garbage got through
        assert!(v.frames.len() >= 4, "VP8 call: {} frames", v.frames.len());
        assert!(
            v.audio_seconds() > 0.5,
            "VP8 call: {} s of audio",
            v.audio_seconds()
        );
        assert!(
            b.frames.is_empty(),
            "the oversized stream reached the session"
        );
    }
    for c in [healthy, vp8, h264] {
        c.hang_up().await.unwrap();
    }
    assert!(server.calls().is_empty());
    server.shutdown().await.unwrap();
    eventually(T, "every session to close", || {
        logs.lock()
            .unwrap()
            .iter()
            .all(|l| l.lock().unwrap().closed)
    })
    .await;
}
