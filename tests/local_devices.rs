//! Sound devices on a machine that may have none: listing never panics, a missing microphone
//! or speaker is a clear error naming it.

use std::sync::Arc;
use std::time::Duration;

use omnicall::engine::clock::SystemClock;
use omnicall::local::device::{DeviceChoice, MicSource, SpeakerSink, list_sound_devices};
use omnicall::local::echo::SpeakerActivity;

#[test]
fn listing_devices_never_panics_and_prints_every_section() {
    let sound = list_sound_devices();
    assert!(!sound.host.is_empty());
    for device in sound.inputs.iter().chain(&sound.outputs) {
        assert!(!device.id.is_empty(), "{device:?}");
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
