//! End to end over loopback: the headless Rust client calls the server; Opus audio and H.264
//! or VP8 video go up, the answer's Opus audio comes back, events and controls travel on the
//! data channel; calls run side by side, each with its own session, up to the limit.

mod rtc_support;

use std::time::Duration;

use omnicall::engine::session::{Control, ReplyMode};
use omnicall::media::video_decode::VideoCodec;
use omnicall::rtc::client::{
    CallClient, ClientConfig, ReceivedAudio, read_ivf, read_wav_mono, read_y4m,
};
use omnicall::rtc::protocol::{CallState, ClientMessage, ServerMessage};
use omnicall::rtc::{IceServer, RtcConfig, ServeConfig, Server};
use rtc_support::*;

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

/// Collects the voice until `quiet` passes without a loud packet, after at least one.
async fn collect_answer(call: &mut CallClient) -> Vec<ReceivedAudio> {
    let mut voice = vec![];
    let deadline = tokio::time::Instant::now() + T;
    while tokio::time::Instant::now() < deadline {
        match call.next_audio(Duration::from_millis(400)).await {
            Some(a) if rms(&a.samples) > 0.05 => voice.push(a),
            Some(_) if !voice.is_empty() && voice.len() >= 40 => break,
            Some(_) => {}
            None => break,
        }
    }
    voice
}

fn check_tone(voice: &[ReceivedAudio]) {
    assert!(voice.len() >= 40, "only {} loud voice packets", voice.len());
    let pcm: Vec<f32> = voice
        .iter()
        .flat_map(|a| a.samples.iter().copied())
        .collect();
    let f = frequency(&pcm[4_800..], 48_000);
    assert!((f - TONE_HZ).abs() < 15.0, "tone at {f} Hz");
    assert!(rms(&pcm) > 0.2, "tone level {}", rms(&pcm));
    // one answer, one run of packets: nothing cut in, 20 ms of RTP time each
    for w in voice.windows(2) {
        assert_eq!(w[1].sequence, w[0].sequence + 1, "a gap in the answer");
        assert_eq!(w[1].rtp_timestamp.wrapping_sub(w[0].rtp_timestamp), 960);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_with_h264_video_carries_media_both_ways() {
    init_tracing();
    let (factory, logs) = harness_factory();
    let server = Server::start(serve_config(), factory).await.unwrap();
    let mut call = CallClient::connect(client(&server.url()).with_video(VideoCodec::H264))
        .await
        .unwrap();
    assert_eq!(server.calls().len(), 1);
    assert_eq!(server.calls()[0].id, call.call_id());

    let hello = call.next_message(T).await.expect("hello");
    match hello.message {
        ServerMessage::Hello {
            call_id,
            voices,
            voice,
            reply_mode,
        } => {
            assert_eq!(call_id, call.call_id());
            assert_eq!(voices, vec!["Chelsie", "Ethan"]);
            assert_eq!(voice, "Chelsie");
            assert_eq!(reply_mode, ReplyMode::Voice);
        }
        other => panic!("first message {other:?}"),
    }

    let (frames, fps) = read_y4m(media("testsrc_96x64.y4m"), 100).unwrap();
    let media_out = call.media();
    let video = tokio::spawn(async move {
        media_out
            .send_i420_frames(&frames, fps, Duration::from_secs(4))
            .await
    });
    let (speech, rate) = read_wav_mono(media("hello16k.wav")).unwrap();
    let media_out = call.media();
    media_out.send_pcm(&speech, rate).await.unwrap();
    media_out
        .send_silence(Duration::from_millis(400))
        .await
        .unwrap();

    // the turn is answered: state, user turn, text, voice, done, timings
    let turn = call
        .wait_for_message(T, |m| matches!(m, ServerMessage::UserTurn { .. }))
        .await
        .unwrap();
    let ServerMessage::UserTurn {
        turn: n,
        audio_ms,
        video_frames,
        text,
    } = turn.message
    else {
        unreachable!()
    };
    assert_eq!((n, text), (1, None));
    assert!(audio_ms > 1_000.0, "speech of {audio_ms} ms");
    assert!(video_frames > 0, "no camera frames by the end of the turn");
    let voice = collect_answer(&mut call).await;
    check_tone(&voice);
    let done = call
        .wait_for_message(T, |m| matches!(m, ServerMessage::Timings(_)))
        .await
        .unwrap();
    let ServerMessage::Timings(marks) = done.message else {
        unreachable!()
    };
    assert_eq!(marks.turn, 1);
    assert!(marks.first_audio_frame_ms.unwrap() > marks.speech_end_ms.unwrap());
    video.await.unwrap().unwrap();

    {
        let logs = logs.lock().unwrap();
        assert_eq!(logs.len(), 1);
        let log = logs[0].lock().unwrap();
        assert_eq!(log.audio_rates, vec![48_000]);
        // all of the speech and the silence after it
        assert!(
            log.audio_seconds() > 3.0,
            "{} s of audio",
            log.audio_seconds()
        );
        assert!(
            log.rms() > 0.03 && log.peak > 0.3,
            "rms {} peak {}",
            log.rms(),
            log.peak
        );
        assert!(
            log.audio_times.windows(2).all(|w| w[1] > w[0]),
            "audio out of order"
        );
        // H.264 decoded at the source size and colours (testsrc is bright and colourful)
        assert!(log.frames.len() >= 20, "{} frames", log.frames.len());
        let f = &log.frames[log.frames.len() / 2];
        assert_eq!((f.width, f.height), (96, 64));
        assert!(f.mean_rgb.iter().all(|&c| c > 40.0 && c < 230.0), "{f:?}");
        assert!(log.frames.windows(2).all(|w| w[1].at > w[0].at));
    }

    call.hang_up().await.unwrap();
    assert!(server.calls().is_empty());
    eventually(T, "the session to close", || {
        logs.lock().unwrap()[0].lock().unwrap().closed
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_with_vp8_video_and_controls() {
    init_tracing();
    let (factory, logs) = harness_factory();
    let server = Server::start(serve_config(), factory).await.unwrap();
    let mut config = client(&server.url()).with_video(VideoCodec::Vp8);
    config.voice = Some("Ethan".into());
    let mut call = CallClient::connect(config).await.unwrap();
    let hello = call.next_message(T).await.unwrap();
    assert!(
        matches!(&hello.message, ServerMessage::Hello { voice, .. } if voice == "Ethan"),
        "{hello:?}"
    );
    assert_eq!(
        logs.lock().unwrap()[0]
            .lock()
            .unwrap()
            .config
            .as_ref()
            .unwrap()
            .voice,
        "Ethan"
    );

    // VP8 frames as a browser's encoder makes them, looped for a while
    let ivf = read_ivf(media("testsrc_96x64.ivf")).unwrap();
    let media_out = call.media();
    let video = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        for _ in 0..3 {
            for frame in &ivf {
                ticker.tick().await;
                media_out
                    .send_video_frame(frame, Duration::from_millis(100))
                    .await
                    .unwrap();
            }
        }
    });

    // a typed message is a turn of its own
    call.send(&ClientMessage::Text {
        text: "what do you see?".into(),
    })
    .await
    .unwrap();
    let turn = call
        .wait_for_message(T, |m| matches!(m, ServerMessage::UserTurn { .. }))
        .await
        .unwrap();
    assert!(
        matches!(&turn.message, ServerMessage::UserTurn { text: Some(t), .. } if t == "what do you see?")
    );
    let mut text = String::new();
    while !text.contains("see?") {
        let message = call.next_message(T).await.expect("assistant text").message;
        if let ServerMessage::AssistantText { delta, .. } = message {
            text.push_str(&delta);
        }
    }
    assert_eq!(text, "You wrote: what do you see?");
    // interrupt while the model speaks
    call.wait_for_message(T, |m| {
        matches!(
            m,
            ServerMessage::State {
                state: CallState::Speaking
            }
        )
    })
    .await
    .unwrap();
    call.next_audio(T)
        .await
        .expect("voice before the interrupt");
    call.send(&ClientMessage::Interrupt).await.unwrap();
    let cut = call
        .wait_for_message(T, |m| matches!(m, ServerMessage::Interrupted { .. }))
        .await
        .unwrap();
    assert!(matches!(
        cut.message,
        ServerMessage::Interrupted { turn: 1, .. }
    ));

    // voice and reply mode changes reach the session; text-only answers carry no voice
    call.send(&ClientMessage::Voice {
        voice: "Chelsie".into(),
    })
    .await
    .unwrap();
    call.send(&ClientMessage::ReplyMode {
        mode: ReplyMode::Text,
    })
    .await
    .unwrap();
    call.send(&ClientMessage::Text { text: "hi".into() })
        .await
        .unwrap();
    call.wait_for_message(T, |m| matches!(m, ServerMessage::AnswerDone { turn: 2 }))
        .await
        .unwrap();
    video.await.unwrap();
    let loud_after = call
        .take_audio()
        .into_iter()
        .filter(|a| a.at > cut.at + Duration::from_millis(300) && rms(&a.samples) > 0.05)
        .count();
    assert_eq!(
        loud_after, 0,
        "voice after the interrupt or in a text answer"
    );
    {
        let logs = logs.lock().unwrap();
        let log = logs[0].lock().unwrap();
        assert_eq!(
            log.controls,
            vec![
                Control::Text("what do you see?".into()),
                Control::Interrupt,
                Control::Voice("Chelsie".into()),
                Control::ReplyMode(ReplyMode::Text),
                Control::Text("hi".into()),
            ]
        );
        assert!(log.frames.len() >= 10, "{} VP8 frames", log.frames.len());
        assert!(log.frames.iter().all(|f| (f.width, f.height) == (96, 64)));
    }

    // a hang-up message ends the call like DELETE
    call.send(&ClientMessage::Hangup).await.unwrap();
    eventually(T, "the call to end", || server.calls().is_empty()).await;
    eventually(T, "the session to close", || {
        logs.lock().unwrap()[0].lock().unwrap().closed
    })
    .await;
    call.drop_connection().await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_run_side_by_side_up_to_the_limit() {
    init_tracing();
    let (factory, logs) = harness_factory();
    let server = Server::start(
        ServeConfig {
            max_calls: 2,
            ..serve_config()
        },
        factory,
    )
    .await
    .unwrap();
    let mut a = CallClient::connect(client(&server.url())).await.unwrap();
    let mut b = CallClient::connect(client(&server.url()).with_video(VideoCodec::Vp8))
        .await
        .unwrap();
    assert_ne!(a.call_id(), b.call_id());
    assert_eq!(server.calls().len(), 2);

    // the third caller is told why
    let err = CallClient::connect(client(&server.url()))
        .await
        .err()
        .expect("a third call beyond the limit");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("503") && msg.contains("all 2 call slots are busy"),
        "{msg}"
    );

    // each call talks to its own session
    let (speech, rate) = read_wav_mono(media("hello16k.wav")).unwrap();
    let (ma, mb) = (a.media(), b.media());
    let sa = speech;
    let ta = tokio::spawn(async move {
        ma.send_pcm(&sa, rate).await.unwrap();
        ma.send_silence(Duration::from_millis(400)).await.unwrap();
    });
    let (frames, fps) = read_y4m(media("testsrc_96x64.y4m"), 100).unwrap();
    let tb = tokio::spawn(async move {
        // call b stays quiet, camera on (encoded live with libvpx)
        let camera = mb.send_i420_frames(&frames, fps, Duration::from_millis(1_500));
        let quiet = mb.send_silence(Duration::from_millis(1_500));
        let (camera, quiet) = tokio::join!(camera, quiet);
        camera.unwrap();
        quiet.unwrap();
    });
    ta.await.unwrap();
    tb.await.unwrap();
    // each call has its event bridge, the video call its decoder
    let threads = call_threads(&[a.call_id(), b.call_id()]);
    assert_eq!(threads.len(), 3, "{threads:?}");
    assert!(threads.contains(&format!("oc-vd-{}", &b.call_id()[..8])));
    {
        let logs = logs.lock().unwrap();
        let frames = &logs[1].lock().unwrap().frames;
        assert!(frames.len() >= 8, "{} VP8 frames", frames.len());
        assert!(frames.iter().all(|f| (f.width, f.height) == (96, 64)));
    }
    let voice = collect_answer(&mut a).await;
    check_tone(&voice);
    assert!(
        b.take_audio().iter().all(|p| rms(&p.samples) < 0.01),
        "the quiet call got an answer"
    );
    eventually(T, "a's answer to finish", || {
        logs.lock().unwrap()[0].lock().unwrap().turns_answered == 1
    })
    .await;
    {
        let logs = logs.lock().unwrap();
        assert_eq!(logs.len(), 2);
        let (la, lb) = (logs[0].lock().unwrap(), logs[1].lock().unwrap());
        assert_eq!(lb.turns_answered, 0);
        assert!(la.rms() > 0.03, "a's audio rms {}", la.rms());
        assert!(lb.rms() < 0.01, "b's audio rms {}", lb.rms());
    }

    // a hang-up frees the slot
    let mut ids = (
        a.call_id().to_string(),
        b.call_id().to_string(),
        String::new(),
    );
    a.hang_up().await.unwrap();
    let c = CallClient::connect(client(&server.url())).await.unwrap();
    ids.2 = c.call_id().to_string();
    assert_eq!(server.calls().len(), 2);
    // a client that vanishes without hanging up is noticed and its session freed
    b.drop_connection().await;
    eventually(Duration::from_secs(40), "the vanished call to end", || {
        server.calls().len() == 1
    })
    .await;
    eventually(T, "b's session to close", || {
        logs.lock().unwrap()[1].lock().unwrap().closed
    })
    .await;
    c.hang_up().await.unwrap();
    assert!(server.calls().is_empty());
    server.shutdown().await.unwrap();
    eventually(T, "every session to close", || {
        logs.lock()
            .unwrap()
            .iter()
            .all(|l| l.lock().unwrap().closed)
    })
    .await;
    // every thread of these calls (event bridges, decoders) is gone
    eventually(T, "the call threads to end", || {
        call_threads(&[&ids.0, &ids.1, &ids.2]).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_the_call_endpoints() {
    init_tracing();
    let (factory, _logs) = harness_factory();
    let mut config = ServeConfig {
        token: Some("s3cret".into()),
        ..serve_config()
    };
    config.rtc.ice_servers = vec![IceServer {
        urls: vec!["turn:turn.example.org:3478".into()],
        username: "user".into(),
        credential: "pass".into(),
    }];
    let server = Server::start(config, factory).await.unwrap();
    let err = CallClient::connect(client(&server.url()))
        .await
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("401"), "{err:#}");
    let err = CallClient::connect(client(&server.url()).with_token("wrong"))
        .await
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("token is wrong"), "{err:#}");
    let call = CallClient::connect(client(&server.url()).with_token("s3cret"))
        .await
        .unwrap();
    // the page and its info need no token
    let info: serde_json::Value = ureq::get(&format!("{}/v1/info", server.url()))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(info["token_required"], true);
    // TURN credentials only to whoever has the token
    assert_eq!(
        info["ice_servers"],
        serde_json::json!([{"urls": ["turn:turn.example.org:3478"]}])
    );
    let info: serde_json::Value = ureq::get(&format!("{}/v1/info", server.url()))
        .set("Authorization", "Bearer s3cret")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(info["ice_servers"][0]["credential"], "pass");
    let page = ureq::get(&server.url())
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(page.contains("omnicall"));
    match ureq::get(&format!("{}/v1/calls", server.url())).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("calls list without a token: {other:?}"),
    }
    call.hang_up().await.unwrap();
    server.shutdown().await.unwrap();
}

struct Quiet;
impl webrtc::peer_connection::PeerConnectionEventHandler for Quiet {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_never_followed_by_a_connection_is_dropped() {
    use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind};
    use webrtc::peer_connection::{MediaEngine, PeerConnection, PeerConnectionBuilder};
    init_tracing();
    let (factory, logs) = harness_factory();
    let server = Server::start(
        ServeConfig {
            max_calls: 1,
            connect_timeout: Duration::from_secs(2),
            ..serve_config()
        },
        factory,
    )
    .await
    .unwrap();
    // a valid offer whose sender goes away before connecting
    let mut engine = MediaEngine::default();
    let opus = RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: "audio/opus".into(),
            clock_rate: 48_000,
            channels: 2,
            ..Default::default()
        },
        payload_type: 111,
    };
    engine.register_codec(opus, RtpCodecKind::Audio).unwrap();
    let pc = PeerConnectionBuilder::new()
        .with_media_engine(engine)
        .with_handler(std::sync::Arc::new(Quiet))
        .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
        .build()
        .await
        .unwrap();
    pc.add_transceiver_from_kind(RtpCodecKind::Audio, None)
        .await
        .unwrap();
    let offer = pc.create_offer(None).await.unwrap().sdp;
    pc.close().await.unwrap();
    let url = format!("{}/v1/offer", server.url());
    let status = tokio::task::spawn_blocking(move || {
        ureq::post(&url)
            .set("Content-Type", "application/sdp")
            .send_string(&offer)
            .unwrap()
            .status()
    })
    .await
    .unwrap();
    assert_eq!(status, 201);
    assert_eq!(server.calls().len(), 1);
    eventually(
        Duration::from_secs(10),
        "the unconnected call to be dropped",
        || server.calls().is_empty(),
    )
    .await;
    eventually(T, "its session to close", || {
        logs.lock().unwrap()[0].lock().unwrap().closed
    })
    .await;
    // its slot is free again
    let call = CallClient::connect(client(&server.url())).await.unwrap();
    call.hang_up().await.unwrap();
    server.shutdown().await.unwrap();
}
