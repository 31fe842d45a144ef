//! WAV files in place of the microphone and the speaker: the file source's pieces and their
//! times on the session clock, WAV reading, the file sink's placement of the model's voice, and
//! a whole call whose output lines up sample for sample with its input; echo handling asked of
//! a call that cannot have an echo is refused.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use omnicall::engine::clock::{Clock, SimulatedClock};
use omnicall::engine::session::{SessionEvent, SessionHandle, SessionInput};
use omnicall::local::echo::SpeakerActivity;
use omnicall::local::sink::{AudioSink, VoiceFrame, WavSink};
use omnicall::local::source::{AudioSource, FileSource, MonoClip, SourceEvent, read_wav_mono};
use omnicall::local::{
    AnswerOutcome, AudioIn, AudioOut, CancellerConfig, DeviceChoice, EchoMode, EchoPathConfig,
    LocalOptions, SessionFactory, StopCause, run_with_clock,
};

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("omnicall-files-{}-{name}", std::process::id()))
}

fn read_i16(path: &Path) -> (u32, Vec<f32>) {
    let mut r = hound::WavReader::open(path).unwrap();
    let spec = r.spec();
    assert_eq!((spec.channels, spec.bits_per_sample), (1, 16));
    let samples = r
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32767.0)
        .collect();
    (spec.sample_rate, samples)
}

fn next(source: &mut FileSource) -> SourceEvent {
    source.next(ms(50)).unwrap()
}

#[test]
fn a_file_is_handed_over_in_20_ms_pieces_once_the_clock_has_passed_them() {
    let clock = Arc::new(SimulatedClock::new());
    clock.set(ms(1000));
    // 110 ms at 16 kHz: five whole pieces and a short last one
    let samples: Vec<f32> = (0..1760).map(|i| (i % 100) as f32 / 100.0).collect();
    let clip = MonoClip {
        sample_rate: 16_000,
        samples: samples.clone(),
    };
    let mut source = FileSource::from_clip(Path::new("test.wav"), clip, clock.clone());
    source.start(ms(1000)).unwrap();
    let (tx, rx) = unbounded();
    let reader = std::thread::spawn(move || {
        for _ in 0..9 {
            tx.send(next(&mut source)).unwrap();
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert!(rx.try_recv().is_err(), "the first piece waits for its end");
    let mut pieces = Vec::new();
    for step in 1..=8u64 {
        clock.set(ms(1000 + 20 * step));
        let event = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        if let SourceEvent::Ended { at } = event {
            assert_eq!(at, ms(1110), "the file's exact end");
            pieces.push(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap());
        } else {
            pieces.push(event);
        }
    }
    reader.join().unwrap();
    for (k, event) in pieces.iter().enumerate() {
        let SourceEvent::Audio(piece) = event else {
            panic!("piece {k}: {event:?}");
        };
        assert_eq!(piece.at, ms(1000 + 20 * k as u64), "piece {k}");
        assert_eq!(piece.sample_rate, 16_000);
        assert_eq!(piece.samples.len(), 320);
        let from = k * 320;
        for (i, &x) in piece.samples.iter().enumerate() {
            let want = samples.get(from + i).copied().unwrap_or(0.0);
            assert_eq!(x, want, "piece {k} sample {i}");
        }
    }
}

#[test]
fn wav_files_of_any_layout_are_read_as_mono() {
    let path = temp_path("stereo24.wav");
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 44_100,
        bits_per_sample: 24,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for (l, r) in [
        (4_194_304, 0),
        (-4_194_304, -4_194_304),
        (8_388_607, 8_388_607),
    ] {
        w.write_sample(l).unwrap();
        w.write_sample(r).unwrap();
    }
    w.finalize().unwrap();
    let clip = read_wav_mono(&path).unwrap();
    assert_eq!(clip.sample_rate, 44_100);
    assert_eq!(clip.samples.len(), 3);
    assert!((clip.samples[0] - 0.25).abs() < 1e-6);
    assert!((clip.samples[1] + 0.5).abs() < 1e-6);
    assert!((clip.samples[2] - 1.0).abs() < 1e-6);

    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8_000,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    w.write_sample(0.125f32).unwrap();
    w.finalize().unwrap();
    let clip = read_wav_mono(&path).unwrap();
    assert_eq!(
        (clip.sample_rate, clip.samples.clone()),
        (8_000, vec![0.125])
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_file_that_is_not_usable_audio_is_a_clear_error() {
    let clock: Arc<dyn Clock> = Arc::new(SimulatedClock::new());
    let path = temp_path("not-a-wav.wav");
    std::fs::write(&path, b"this is text, not RIFF").unwrap();
    let err = FileSource::open(&path, clock.clone()).err().unwrap();
    assert!(format!("{err:#}").contains("not-a-wav.wav"), "{err:#}");

    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    hound::WavWriter::create(&path, spec)
        .unwrap()
        .finalize()
        .unwrap();
    let err = FileSource::open(&path, clock.clone()).err().unwrap();
    assert!(format!("{err:#}").contains("holds no audio"), "{err:#}");

    let spec = hound::WavSpec {
        sample_rate: 500,
        ..spec
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    w.write_sample(1i16).unwrap();
    w.finalize().unwrap();
    let err = FileSource::open(&path, clock).err().unwrap();
    assert!(format!("{err:#}").contains("500 Hz"), "{err:#}");
    let _ = std::fs::remove_file(&path);
}

fn frame(turn: u64, index: u64, at: Duration, rate: u32, pcm: &[f32]) -> VoiceFrame<'_> {
    VoiceFrame {
        turn,
        index,
        at,
        sample_rate: rate,
        pcm,
    }
}

#[test]
fn the_file_sink_writes_each_frame_at_its_time_and_silence_between() {
    let path = temp_path("sink.wav");
    let activity = Arc::new(SpeakerActivity::new());
    let mut sink = WavSink::create(&path, 24_000, activity.clone()).unwrap();
    sink.start(ms(2000)).unwrap();
    let a: Vec<f32> = (0..480).map(|i| (i as f32 / 480.0) - 0.5).collect();
    // answer 1: three frames back to back from 2.5 s, then cut
    for k in 0..3u64 {
        let at = ms(2500) + ms(20) * k as u32;
        sink.play(frame(1, k, at, 24_000, &a)).unwrap();
    }
    sink.interrupt(1).unwrap();
    // answer 2: two frames from 3.0 s
    for k in 0..2u64 {
        let at = ms(3000) + ms(20) * k as u32;
        sink.play(frame(2, k, at, 24_000, &[0.25; 480])).unwrap();
    }
    sink.answer_done(2).unwrap();
    sink.finish(ms(4000)).unwrap();
    assert_eq!(sink.stats().voice, ms(100));
    assert!(activity.overlaps(ms(2510), ms(2520)));
    assert!(!activity.overlaps(ms(2600), ms(2900)));
    drop(sink);

    let (rate, out) = read_i16(&path);
    assert_eq!(rate, 24_000);
    assert_eq!(out.len(), 48_000, "origin 2 s to the end at 4 s");
    let close = |x: f32, y: f32| (x - y).abs() <= 1.0 / 32767.0;
    assert!(out[..12_000].iter().all(|&x| x == 0.0));
    for k in 0..3 {
        for i in 0..480 {
            assert!(
                close(out[12_000 + k * 480 + i], a[i]),
                "frame {k} sample {i}"
            );
        }
    }
    assert!(out[13_440..24_000].iter().all(|&x| x == 0.0));
    assert!(out[24_000..24_960].iter().all(|&x| close(x, 0.25)));
    assert!(out[24_960..].iter().all(|&x| x == 0.0));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn voice_at_another_rate_is_resampled_into_place() {
    let path = temp_path("resampled.wav");
    let mut sink = WavSink::create(&path, 48_000, Arc::new(SpeakerActivity::new())).unwrap();
    sink.start(Duration::ZERO).unwrap();
    // 0.5 s of 500 Hz at 16 kHz, from 1.0 s, in 20 ms frames
    let tone: Vec<f32> = (0..8000)
        .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 500.0 * i as f32 / 16_000.0).sin())
        .collect();
    for (k, pcm) in tone.chunks(320).enumerate() {
        let at = ms(1000) + ms(20) * k as u32;
        sink.play(frame(1, k as u64, at, 16_000, pcm)).unwrap();
    }
    sink.answer_done(1).unwrap();
    sink.finish(ms(2000)).unwrap();
    drop(sink);
    let (rate, out) = read_i16(&path);
    assert_eq!((rate, out.len()), (48_000, 96_000));
    let loud: Vec<usize> = (0..out.len()).filter(|&i| out[i].abs() > 0.05).collect();
    let (first, last) = (loud[0], *loud.last().unwrap());
    assert!((48_000..48_010).contains(&first), "onset at {first}");
    assert!((71_980..72_020).contains(&last), "end at {last}");
    // the tone itself, not noise: compare with 500 Hz at 48 kHz away from the edges
    for i in (48_500..71_500).step_by(97) {
        let want =
            0.5 * (2.0 * std::f32::consts::PI * 500.0 * (i - 48_000) as f32 / 48_000.0).sin();
        assert!(
            (out[i] - want).abs() < 0.02,
            "sample {i}: {} vs {want}",
            out[i]
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// A session that sends every piece of audio straight back as the model's voice (one long
/// answer), so that the output file must be the input, shifted by when each piece arrived.
fn loopback(received: Arc<Mutex<u64>>) -> SessionHandle {
    let (input, input_rx) = unbounded::<SessionInput>();
    let (events_tx, events) = unbounded::<SessionEvent>();
    std::thread::spawn(move || {
        let mut index = 0;
        while let Ok(message) = input_rx.recv() {
            match message {
                SessionInput::Audio(a) => {
                    *received.lock().unwrap() += 1;
                    let _ = events_tx.send(SessionEvent::Audio {
                        turn: 1,
                        index,
                        at: a.at,
                        sample_rate: a.sample_rate,
                        pcm: a.samples,
                    });
                    index += 1;
                }
                SessionInput::Close => return,
                _ => {}
            }
        }
    });
    SessionHandle::new(input, events)
}

#[test]
fn a_call_from_file_to_file_lines_up_with_its_input() {
    let input_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/media/utterance_short.wav");
    let output_path = temp_path("loopback-out.wav");
    let input = read_wav_mono(&input_path).unwrap();
    let clock = Arc::new(SimulatedClock::new());
    let received = Arc::new(Mutex::new(0u64));
    let handle_slot: Arc<Mutex<Option<SessionHandle>>> = Arc::default();
    let factory: SessionFactory = {
        let (received, slot) = (received.clone(), handle_slot.clone());
        Arc::new(move |_, _| {
            let handle = loopback(received.clone());
            *slot.lock().unwrap() = Some(handle.clone());
            Ok(handle)
        })
    };
    let options = LocalOptions {
        input: AudioIn::File(input_path.clone()),
        output: AudioOut::File {
            path: output_path.clone(),
            sample_rate: input.sample_rate,
        },
        transcript: None,
        ..Default::default()
    };
    let worker = {
        let clock: Arc<dyn Clock> = clock.clone();
        std::thread::spawn(move || run_with_clock(options, clock, factory))
    };
    // time moves in 20 ms steps, each once the previous piece went round
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let mut step = 0u64;
    while !worker.is_finished() {
        assert!(Instant::now() < deadline, "the call did not end");
        let handle = handle_slot.lock().unwrap().clone();
        if let Some(handle) = handle {
            // generous: a loaded machine must not let time run ahead of the pieces
            let wait = Instant::now() + std::time::Duration::from_secs(5);
            while (*received.lock().unwrap() < step || !handle.events.is_empty())
                && !worker.is_finished()
                && Instant::now() < wait
            {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            step += 1;
            clock.advance(ms(20));
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
    let summary = worker.join().unwrap().unwrap();
    assert_eq!(summary.stopped, StopCause::InputEnded);
    assert_eq!(summary.answers.len(), 1);
    assert_eq!(summary.answers[0].outcome, AnswerOutcome::Unfinished);

    let (rate, out) = read_i16(&output_path);
    assert_eq!(rate, input.sample_rate);
    // as long as the call, or as the last frame released before its end
    let length = (summary.ended_at - summary.origin).as_secs_f64();
    let written = out.len() as f64 / rate as f64;
    assert!(
        written >= length - 1e-3 && written <= length + 0.021,
        "{written} s for {length} s"
    );
    // the first piece of the input came back once it had been captured: 20 ms after the origin
    // at the earliest, as placed by the call
    let first = summary.answers[0].first_frame_at.unwrap() - summary.origin;
    let lag = (first.as_nanos() * rate as u128 / 1_000_000_000) as usize;
    assert!((320..=3 * 320).contains(&lag), "lag {lag}");
    for (i, &x) in input.samples.iter().enumerate() {
        assert!(
            (out[lag + i] - x).abs() <= 2.0 / 32767.0,
            "input sample {i} is not at output sample {}",
            lag + i
        );
    }
    assert!(out[..lag].iter().all(|&x| x == 0.0));
    let _ = std::fs::remove_file(&output_path);
}

#[test]
fn a_call_on_the_wall_clock_plays_the_file_in_real_time_and_lines_up() {
    let input_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/media/utterance_short.wav");
    let output_path = temp_path("wall-clock-out.wav");
    let input = read_wav_mono(&input_path).unwrap();
    let received = Arc::new(Mutex::new(0u64));
    let factory: SessionFactory = {
        let received = received.clone();
        Arc::new(move |_, _| Ok(loopback(received.clone())))
    };
    let options = LocalOptions {
        input: AudioIn::File(input_path),
        output: AudioOut::File {
            path: output_path.clone(),
            sample_rate: input.sample_rate,
        },
        transcript: None,
        ..Default::default()
    };
    let started = Instant::now();
    let summary = omnicall::local::run(options, factory).unwrap();
    let wall = started.elapsed().as_secs_f64();
    let file = input.samples.len() as f64 / input.sample_rate as f64;
    let settle = omnicall::engine::session::SessionConfig::default()
        .turn
        .end_of_turn_silence
        .as_secs_f64()
        + 1.0;
    eprintln!(
        "{file:.2} s file: call of {wall:.2} s wall, voice placed {:?} after the origin",
        summary.answers[0].first_frame_at.unwrap() - summary.origin
    );
    assert_eq!(summary.stopped, StopCause::InputEnded);
    // real time: the file took its own length to play in, then the settling time
    assert!(wall >= file + settle - 0.05, "{wall} s");
    let input_end = (summary.input_ended_at.unwrap() - summary.origin).as_secs_f64();
    assert!((input_end - file).abs() < 1e-3, "{input_end}");
    // the voice is the input, one 20 ms piece (plus the delivery delay) later, sample exact
    let (_, out) = read_i16(&output_path);
    let first = summary.answers[0].first_frame_at.unwrap() - summary.origin;
    // (the sink puts a frame at the sample its time falls in)
    let lag = (first.as_nanos() * input.sample_rate as u128 / 1_000_000_000) as usize;
    assert!((320..320 + 1600).contains(&lag), "lag {lag}");
    for (i, &x) in input.samples.iter().enumerate() {
        assert!(
            (out[lag + i] - x).abs() <= 2.0 / 32767.0,
            "input sample {i}"
        );
    }
    let _ = std::fs::remove_file(&output_path);
}

#[test]
fn echo_handling_without_a_played_output_or_a_simulated_echo_on_a_microphone_is_refused() {
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/media/utterance_short.wav");
    let factory: SessionFactory =
        Arc::new(|_, _| panic!("the call must fail before the session starts"));
    let refused = |options: LocalOptions| {
        let clock: Arc<dyn Clock> = Arc::new(SimulatedClock::new());
        let err = run_with_clock(options, clock, factory.clone()).unwrap_err();
        format!("{err:#}")
    };
    let path = "40,-12".parse::<EchoPathConfig>().unwrap();
    let err = refused(LocalOptions {
        input: AudioIn::File(input.clone()),
        output: AudioOut::Discard,
        simulate_echo: Some(path),
        transcript: None,
        ..Default::default()
    });
    assert!(
        err.contains("needs an output that plays the model's voice"),
        "{err}"
    );
    let err = refused(LocalOptions {
        input: AudioIn::File(input),
        output: AudioOut::Discard,
        echo: EchoMode::Cancel(CancellerConfig::default()),
        transcript: None,
        ..Default::default()
    });
    assert!(err.contains("the echo canceller needs an output"), "{err}");
    let err = refused(LocalOptions {
        input: AudioIn::Microphone(DeviceChoice::Named("no such microphone".into())),
        output: AudioOut::Discard,
        simulate_echo: Some(path),
        transcript: None,
        ..Default::default()
    });
    assert!(
        err.contains("a simulated echo needs an input file"),
        "{err}"
    );
}
