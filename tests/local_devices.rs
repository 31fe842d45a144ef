//! Devices on a machine that may have none: listing never panics, a missing microphone,
//! speaker or camera is a clear error naming it, a call with a missing device fails before the
//! session (the model) is started, and, where ALSA's `null` device exists (it does on a
//! headless Debian box), the real device path runs a call: cpal capture and playback
//! callbacks, the jitter buffer, the echo canceller on them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use omnicall::engine::clock::SystemClock;
use omnicall::engine::session::{Control, SessionEvent, SessionHandle, SessionInput};
use omnicall::local::device::{DeviceChoice, MicSource, SpeakerSink};
use omnicall::local::echo::SpeakerActivity;
use omnicall::local::{
    AnswerOutcome, AudioIn, AudioOut, CameraChoice, EchoMode, LocalOptions, SessionFactory,
    StopCause, StopHandle, list_devices, run,
};

fn counting_factory(started: Arc<Mutex<usize>>) -> SessionFactory {
    Arc::new(move |_, _| {
        *started.lock().unwrap() += 1;
        anyhow::bail!("the session must not be started")
    })
}

#[test]
fn listing_devices_never_panics_and_prints_every_section() {
    let report = list_devices();
    let text = report.to_string();
    for section in [
        "microphones (--mic)",
        "speakers (--speaker)",
        "cameras (--camera)",
    ] {
        assert!(text.contains(section), "{text}");
    }
    if report.sound.inputs.is_empty() || report.cameras.is_empty() {
        assert!(text.contains("(none)"), "{text}");
    }
    for device in report.sound.inputs.iter().chain(&report.sound.outputs) {
        assert!(text.contains(&device.id), "{text}");
        assert!(device.default_config.contains(" Hz, "), "{device:?}");
    }
}

#[test]
fn a_device_that_is_not_there_is_named_in_the_error() {
    let clock = SystemClock::new();
    let wanted = DeviceChoice::Named("omnicall-no-such-device".into());
    let err = MicSource::open(&wanted, &clock)
        .err()
        .expect("no such microphone");
    let text = format!("{err:#}");
    assert!(
        text.contains("no input (microphone) device named \"omnicall-no-such-device\""),
        "{text}"
    );
    let err = SpeakerSink::open(
        &wanted,
        &clock,
        Arc::new(SpeakerActivity::new()),
        Duration::from_millis(60),
    )
    .err()
    .expect("no such speaker");
    assert!(
        format!("{err:#}").contains("no output (speaker) device named"),
        "{err:#}"
    );
}

#[test]
fn the_default_devices_open_or_say_why_not() {
    let clock = SystemClock::new();
    // on a machine without a sound card there is no usable default: the message says what to
    // do instead; with one, the devices open
    if let Err(e) = MicSource::open(&DeviceChoice::Default, &clock) {
        let text = format!("{e:#}");
        assert!(
            text.contains("microphone") && text.contains("--input-file"),
            "{text}"
        );
    }
    if let Err(e) = SpeakerSink::open(
        &DeviceChoice::Default,
        &clock,
        Arc::new(SpeakerActivity::new()),
        Duration::from_millis(60),
    ) {
        let text = format!("{e:#}");
        assert!(
            text.contains("speaker") && text.contains("--output-file"),
            "{text}"
        );
    }
}

#[test]
fn a_missing_camera_fails_the_call_before_the_session_starts() {
    let started = Arc::new(Mutex::new(0));
    let options = LocalOptions {
        input: AudioIn::File("tests/media/w_yes.wav".into()),
        output: AudioOut::Discard,
        camera: CameraChoice::Path("/dev/omnicall-no-such-video".into()),
        transcript: None,
        ..Default::default()
    };
    let err = run(options, counting_factory(started.clone())).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("camera /dev/omnicall-no-such-video not found"),
        "{text}"
    );
    assert_eq!(*started.lock().unwrap(), 0);

    let err = omnicall::local::camera::CameraCapture::start(
        &CameraChoice::Index(987),
        &Default::default(),
        Arc::new(SystemClock::new()),
        SessionHandle::new(unbounded().0, unbounded().1),
    )
    .err()
    .expect("no /dev/video987");
    assert!(format!("{err:#}").contains("/dev/video987"), "{err:#}");
}

#[test]
fn a_missing_microphone_fails_the_call_before_the_session_starts() {
    let started = Arc::new(Mutex::new(0));
    let options = LocalOptions {
        input: AudioIn::Microphone(DeviceChoice::Named("omnicall-no-such-mic".into())),
        output: AudioOut::Discard,
        transcript: None,
        ..Default::default()
    };
    let err = run(options, counting_factory(started.clone())).unwrap_err();
    assert!(
        format!("{err:#}").contains("omnicall-no-such-mic"),
        "{err:#}"
    );
    assert_eq!(*started.lock().unwrap(), 0);
}

/// A session that answers a typed message with `voice` in 20 ms frames, paced by this thread,
/// and records the audio it receives.
fn typed_answer_session(
    voice: Vec<f32>,
    received: Arc<Mutex<Vec<(Duration, usize, u32)>>>,
) -> SessionHandle {
    let (input, input_rx) = unbounded::<SessionInput>();
    let (events_tx, events) = unbounded::<SessionEvent>();
    std::thread::spawn(move || {
        while let Ok(message) = input_rx.recv() {
            match message {
                SessionInput::Audio(a) => {
                    received
                        .lock()
                        .unwrap()
                        .push((a.at, a.samples.len(), a.sample_rate))
                }
                SessionInput::Control(Control::Text(text)) => {
                    let _ = events_tx.send(SessionEvent::UserTurn {
                        turn: 1,
                        audio: Duration::ZERO,
                        video_frames: 0,
                        text: Some(text),
                    });
                    let start = Instant::now();
                    for (index, frame) in voice.chunks(480).enumerate() {
                        let due = start + Duration::from_millis(20 * index as u64);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        let _ = events_tx.send(SessionEvent::Audio {
                            turn: 1,
                            index: index as u64,
                            at: start.elapsed(),
                            sample_rate: 24_000,
                            pcm: frame.to_vec(),
                        });
                    }
                    let _ = events_tx.send(SessionEvent::AnswerDone { turn: 1 });
                }
                SessionInput::Close => return,
                _ => {}
            }
        }
    });
    SessionHandle::new(input, events)
}

#[test]
fn a_call_runs_on_alsa_null_devices_through_the_device_path() {
    let report = list_devices();
    let has_null =
        |list: &[omnicall::local::device::SoundDevice]| list.iter().any(|d| d.id == "alsa:null");
    if !(has_null(&report.sound.inputs) && has_null(&report.sound.outputs)) {
        // no ALSA null device (not Linux, or a stripped ALSA configuration): the named device
        // must then be reported missing, as any other
        let err = MicSource::open(&DeviceChoice::Named("null".into()), &SystemClock::new())
            .err()
            .expect("no null device");
        assert!(format!("{err:#}").contains("\"null\""), "{err:#}");
        return;
    }
    let received = Arc::new(Mutex::new(Vec::new()));
    let handle_slot: Arc<Mutex<Option<SessionHandle>>> = Arc::default();
    let voice: Vec<f32> = (0..24_000).map(|i| 0.3 * (i as f32 * 0.05).sin()).collect();
    let factory: SessionFactory = {
        let (received, slot) = (received.clone(), handle_slot.clone());
        Arc::new(move |_, _| {
            let handle = typed_answer_session(voice.clone(), received.clone());
            *slot.lock().unwrap() = Some(handle.clone());
            Ok(handle)
        })
    };
    let stop = StopHandle::new();
    let options = LocalOptions {
        input: AudioIn::Microphone(DeviceChoice::Named("null".into())),
        output: AudioOut::Speaker(DeviceChoice::Named("null".into())),
        echo: EchoMode::Auto,
        transcript: None,
        max_duration: Some(Duration::from_secs(20)),
        stop: stop.clone(),
        ..Default::default()
    };
    let call = std::thread::spawn(move || run(options, factory));
    // once the call is up, type a message; stop when its answer has been played out
    let started = Instant::now();
    let handle = loop {
        if let Some(handle) = handle_slot.lock().unwrap().clone() {
            break handle;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no session");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(300));
    handle.control(Control::Text("hello".into()));
    std::thread::sleep(Duration::from_millis(1800));
    stop.stop();
    let summary = call.join().unwrap().unwrap();

    assert_eq!(summary.stopped, StopCause::Requested);
    assert!(summary.input.contains("alsa:null"), "{}", summary.input);
    assert_eq!(summary.answers.len(), 1);
    assert_eq!(summary.answers[0].outcome, AnswerOutcome::Done);
    assert_eq!(summary.answers[0].frames, 50);
    assert_eq!(summary.sink.voice, Duration::from_secs(1));
    // ALSA's null device has no clock of its own: it captures and plays as fast as it is
    // read and fed, so this checks the path, not real-time pacing (the capture clock and the
    // jitter buffer have their own tests)
    eprintln!(
        "null devices: source {:?}, sink {:?}",
        summary.source, summary.sink
    );
    let received = received.lock().unwrap();
    assert!(received.len() > 10, "{} pieces", received.len());
    assert!(summary.source.captured > Duration::from_millis(500));
    let device_rate = report
        .sound
        .inputs
        .iter()
        .find(|d| d.id == "alsa:null")
        .map(|d| d.default_config.clone())
        .unwrap();
    for &(at, n, rate) in received.iter() {
        assert!(
            device_rate.starts_with(&format!("{rate} Hz")),
            "{device_rate}"
        );
        assert!(n > 0);
        assert!(
            at <= summary.ended_at + Duration::from_millis(100),
            "{at:?} is ahead"
        );
    }
    // a microphone against a speaker gets the echo canceller, which took every 10 ms of it
    assert!(summary.gate.is_none());
    let (config, stats) = summary
        .echo_stage
        .expect("auto echo mode cancels the echo of a speaker in a microphone");
    assert!(config.cancel.is_some() && config.simulate.is_none());
    let canceller = stats.canceller.expect("canceller stats");
    // (the null device captures in bursts with gaps: the part frames before gaps are dropped)
    assert!(
        canceller.frames >= 50,
        "{canceller:?} for {:?} captured",
        summary.source.captured
    );
}
