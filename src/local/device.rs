//! Sound devices through cpal (ALSA on Linux): listing, a microphone source and a loudspeaker
//! sink. Any device rate, channel count and sample format: the microphone is mixed down to
//! mono f32 at its own rate (the session resamples), the model's voice is resampled to the
//! speaker's rate and copied to every channel.
//!
//! The audio callbacks never block and do not allocate in the steady state: buffers go round
//! between a callback and its feeder through two bounded channels (filled ones one way, empty
//! ones back), and what does not fit is dropped and counted. The speaker side keeps a small
//! jitter buffer: an answer starts playing once `prebuffer` of it is queued (or all of it, for
//! a shorter one), and after an underrun it waits for the buffer to refill.
//!
//! Devices need the wall clock: the callbacks date audio with `Instant`s, mapped onto the
//! session clock once when the device is opened.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{FromSample, SampleFormat, SizedSample};
use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded};

use super::echo::SpeakerActivity;
use super::far_end::{FarEndReader, FarEndWriter, far_end_tap};
use super::sink::{AudioSink, SinkStats, VoiceFrame};
use super::source::{AudioPiece, AudioSource, SourceEvent, SourceStats, samples_to_duration};
use crate::engine::clock::Clock;
use crate::media::resample::StreamResampler;

/// Which sound device to open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The host's default device.
    #[default]
    Default,
    /// A device by id (`alsa:hw:0,0`, `hw:0,0`) or name, or a unique part of its name.
    Named(String),
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::Named(name) => write!(f, "\"{name}\""),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Input,
    Output,
}

impl Direction {
    fn noun(self) -> &'static str {
        match self {
            Self::Input => "input (microphone)",
            Self::Output => "output (speaker)",
        }
    }
}

/// One sound device as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoundDevice {
    /// cpal's id, `host:device` (what `--mic` / `--speaker` take).
    pub id: String,
    pub name: String,
    pub is_default: bool,
    /// The default stream settings, e.g. `48000 Hz, 2 ch, f32`, or why there are none.
    pub default_config: String,
}

/// What [`list_sound_devices`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SoundDevices {
    pub host: String,
    pub inputs: Vec<SoundDevice>,
    pub outputs: Vec<SoundDevice>,
    /// What went wrong while looking (no sound card, a host error), for the user.
    pub problems: Vec<String>,
}

/// Captures what ALSA would print on stderr while it is alive (listing and opening devices on
/// a machine without a sound card prints a screenful), to put it in our own messages instead.
struct AlsaMessages {
    #[cfg(target_os = "linux")]
    output: Option<std::rc::Rc<std::cell::RefCell<alsa::Output>>>,
}

impl AlsaMessages {
    fn capture() -> Self {
        Self {
            #[cfg(target_os = "linux")]
            output: alsa::Output::local_error_handler().ok(),
        }
    }

    /// ` (ALSA: ...)` when ALSA said something, else nothing.
    fn suffix(&self) -> String {
        self.take()
            .map(|m| format!(" (ALSA: {m})"))
            .unwrap_or_default()
    }

    /// The messages so far, on one line.
    fn take(&self) -> Option<String> {
        #[cfg(target_os = "linux")]
        if let Some(output) = &self.output {
            let text = output.borrow().to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            // the first line says what failed, the last what gave up (the middle is ALSA's
            // configuration evaluator retracing its steps)
            match lines.as_slice() {
                [] => {}
                [only] => return Some(only.to_string()),
                [first, .., last] => return Some(format!("{first}; {last}")),
            }
        }
        None
    }
}

fn describe_config(config: &cpal::SupportedStreamConfig) -> String {
    format!(
        "{} Hz, {} ch, {}",
        config.sample_rate(),
        config.channels(),
        config.sample_format()
    )
}

fn device_id(device: &cpal::Device) -> String {
    device
        .id()
        .map(|id| id.to_string())
        .unwrap_or_else(|e| format!("(no id: {e})"))
}

fn device_name(device: &cpal::Device) -> String {
    device
        .description()
        .map(|d| d.name().to_string())
        .unwrap_or_else(|_| device_id(device))
}

/// Every sound device of the default host, with its default settings. Never fails: what went
/// wrong (no sound card, no host) is in `problems`, and the lists are then short or empty.
pub fn list_sound_devices() -> SoundDevices {
    let alsa = AlsaMessages::capture();
    let host = cpal::default_host();
    let mut found = SoundDevices {
        host: host.id().name().to_string(),
        ..Default::default()
    };
    let default_in = host.default_input_device().map(|d| device_id(&d));
    let default_out = host.default_output_device().map(|d| device_id(&d));
    match host.devices() {
        Ok(devices) => {
            for device in devices {
                let id = device_id(&device);
                let name = device_name(&device);
                if device.supports_input()
                    && let Ok(config) = device.default_input_config()
                {
                    found.inputs.push(SoundDevice {
                        is_default: default_in.as_deref() == Some(id.as_str()),
                        id: id.clone(),
                        name: name.clone(),
                        default_config: describe_config(&config),
                    });
                }
                if device.supports_output()
                    && let Ok(config) = device.default_output_config()
                {
                    found.outputs.push(SoundDevice {
                        is_default: default_out.as_deref() == Some(id.as_str()),
                        id,
                        name,
                        default_config: describe_config(&config),
                    });
                }
            }
        }
        Err(e) => found
            .problems
            .push(format!("cannot list {} devices: {e}", found.host)),
    }
    for (default, list, what) in [
        (&default_in, &found.inputs, "microphone"),
        (&default_out, &found.outputs, "speaker"),
    ] {
        match default {
            None => found.problems.push(format!("there is no default {what}")),
            Some(id) if !list.iter().any(|d| &d.id == id) => found
                .problems
                .push(format!("the default {what} ({id}) cannot be used")),
            Some(_) => {}
        }
    }
    if let Some(messages) = alsa.take() {
        found.problems.push(format!("ALSA: {messages}"));
    }
    found
}

/// Opens the device `choice` of the default host for `direction`.
pub fn find_device(choice: &DeviceChoice, direction: Direction) -> anyhow::Result<cpal::Device> {
    find(choice, direction, &AlsaMessages::capture())
}

fn find(
    choice: &DeviceChoice,
    direction: Direction,
    alsa: &AlsaMessages,
) -> anyhow::Result<cpal::Device> {
    let host = cpal::default_host();
    let hint = |alsa: &AlsaMessages| alsa.suffix();
    let usable = |d: &cpal::Device| match direction {
        Direction::Input => d.supports_input(),
        Direction::Output => d.supports_output(),
    };
    match choice {
        DeviceChoice::Default => {
            let device = match direction {
                Direction::Input => host.default_input_device(),
                Direction::Output => host.default_output_device(),
            };
            device.with_context(|| {
                format!(
                    "no default {} device on the {} host{}: list them with --list-devices, or \
                     use {}",
                    direction.noun(),
                    host.id().name(),
                    hint(alsa),
                    match direction {
                        Direction::Input => "--input-file WAV",
                        Direction::Output => "--output-file WAV",
                    }
                )
            })
        }
        DeviceChoice::Named(wanted) => {
            let devices: Vec<cpal::Device> = host
                .devices()
                .map(|d| d.filter(usable).collect())
                .unwrap_or_default();
            let ids: Vec<(String, String)> = devices
                .iter()
                .map(|d| (device_id(d), device_name(d)))
                .collect();
            let lower = wanted.to_lowercase();
            let exact = ids.iter().position(|(id, name)| {
                id == wanted
                    || id.split_once(':').is_some_and(|(_, i)| i == wanted)
                    || name == wanted
            });
            let partial: Vec<usize> = ids
                .iter()
                .enumerate()
                .filter(|(_, (id, name))| {
                    id.to_lowercase().contains(&lower) || name.to_lowercase().contains(&lower)
                })
                .map(|(k, _)| k)
                .collect();
            if let Some(k) = exact.or_else(|| (partial.len() == 1).then(|| partial[0])) {
                return Ok(devices
                    .into_iter()
                    .nth(k)
                    .expect("index of a listed device"));
            }
            if partial.len() > 1 {
                let names: Vec<String> = partial
                    .iter()
                    .map(|&k| format!("{} ({})", ids[k].0, ids[k].1))
                    .collect();
                bail!(
                    "{} device \"{wanted}\" is ambiguous: it matches {}",
                    direction.noun(),
                    names.join(", ")
                );
            }
            // ALSA also opens PCM names it does not list (`hw:1,0`, `plughw:...`)
            let id = if wanted.contains(':') && wanted.split(':').count() > 2 {
                wanted.clone()
            } else {
                format!("{}:{wanted}", host.id().name().to_lowercase())
            };
            if let Ok(id) = id.parse::<cpal::DeviceId>()
                && let Some(device) = host.device_by_id(&id)
                && usable(&device)
            {
                return Ok(device);
            }
            let known: Vec<String> = ids
                .iter()
                .map(|(id, name)| format!("{id} ({name})"))
                .collect();
            bail!(
                "no {} device named \"{wanted}\"{}; {}",
                direction.noun(),
                hint(alsa),
                if known.is_empty() {
                    "there is none on this machine".to_string()
                } else {
                    format!("there are: {}", known.join(", "))
                }
            )
        }
    }
}

/// Maps `Instant`s of the audio callbacks onto the session clock.
#[derive(Debug, Clone, Copy)]
pub struct InstantMap {
    instant: Instant,
    session: Duration,
}

impl InstantMap {
    pub fn now(clock: &dyn Clock) -> Self {
        Self {
            instant: Instant::now(),
            session: clock.now(),
        }
    }

    pub fn session_time(&self, instant: Instant) -> Duration {
        if instant >= self.instant {
            self.session + (instant - self.instant)
        } else {
            self.session.saturating_sub(self.instant - instant)
        }
    }
}

/// Dates microphone pieces (and what the speaker plays) on the session clock: by the device's
/// sample count (so that the pieces are back to back, as the session's input stage expects), slowly slewed toward the
/// capture times the callbacks report (the device clock drifts from the system clock), and
/// reset when the two part by more than `JUMP` (the device stalled or lost audio).
#[derive(Debug, Clone)]
pub struct CaptureClock {
    rate: u32,
    /// Session time of sample 0, in nanoseconds.
    anchor: Option<i128>,
    resyncs: u64,
}

impl CaptureClock {
    /// Differences below this are callback jitter.
    const DEADBAND: i128 = 3_000_000;
    /// Largest correction per piece: below the session's tolerance for contiguous pieces.
    const SLEW: i128 = 250_000;
    const JUMP: i128 = 100_000_000;

    pub fn new(rate: u32) -> Self {
        Self {
            rate: rate.max(1),
            anchor: None,
            resyncs: 0,
        }
    }

    pub fn resyncs(&self) -> u64 {
        self.resyncs
    }

    /// Media time of the piece starting at device sample `first_sample`, which the callback
    /// estimates was captured at `estimated`.
    pub fn stamp(&mut self, first_sample: u64, estimated: Duration) -> Duration {
        let offset = first_sample as i128 * 1_000_000_000 / self.rate as i128;
        let wanted = estimated.as_nanos() as i128 - offset;
        let anchor = match self.anchor {
            None => wanted,
            Some(anchor) => {
                let error = wanted - anchor;
                if error.abs() > Self::JUMP {
                    self.resyncs += 1;
                    wanted
                } else if error.abs() > Self::DEADBAND {
                    anchor + error.clamp(-Self::SLEW, Self::SLEW)
                } else {
                    anchor
                }
            }
        };
        self.anchor = Some(anchor);
        Duration::from_nanos((anchor + offset).max(0) as u64)
    }
}

/// A buffer of microphone audio handed over by the callback.
struct Capture {
    samples: Vec<f32>,
    /// Device sample index of its first sample (dropped buffers included).
    first_sample: u64,
    callback: Instant,
    /// How long before the callback the first sample was captured.
    capture_delay: Duration,
}

const POOL_BUFFERS: usize = 32;
const POOL_CAPACITY: usize = 8192;

/// A stream error that ends the session (a lost device), as opposed to a glitch.
fn is_fatal(kind: cpal::ErrorKind) -> bool {
    matches!(
        kind,
        cpal::ErrorKind::DeviceNotAvailable
            | cpal::ErrorKind::StreamInvalidated
            | cpal::ErrorKind::DeviceChanged
            | cpal::ErrorKind::PermissionDenied
    )
}

/// A microphone: the device's audio mixed down to mono f32 at its own rate.
pub struct MicSource {
    name: String,
    rate: u32,
    stream: cpal::Stream,
    captures: Receiver<Capture>,
    pool: Sender<Vec<f32>>,
    errors: Receiver<cpal::Error>,
    dropped: Arc<AtomicU64>,
    map: InstantMap,
    stamp: CaptureClock,
    stats: SourceStats,
    glitches: u64,
}

impl MicSource {
    pub fn open(choice: &DeviceChoice, clock: &dyn Clock) -> anyhow::Result<Self> {
        let alsa = AlsaMessages::capture();
        let device = find(choice, Direction::Input, &alsa)?;
        let name = format!("{} [{}]", device_name(&device), device_id(&device));
        let config = device.default_input_config().with_context(|| {
            format!(
                "the microphone {name} cannot be used{}; list the devices with --list-devices, or \
                 use --input-file WAV",
                alsa.suffix()
            )
        })?;
        let rate = config.sample_rate();
        let channels = config.channels() as usize;
        if channels == 0 {
            bail!("microphone {name} reports 0 channels");
        }
        let (capture_tx, captures) = bounded(POOL_BUFFERS);
        let (pool, pool_rx) = bounded(POOL_BUFFERS);
        for _ in 0..POOL_BUFFERS {
            let _ = pool.try_send(Vec::with_capacity(POOL_CAPACITY));
        }
        let (error_tx, errors) = bounded(64);
        let dropped = Arc::new(AtomicU64::new(0));
        let feed = CaptureFeed {
            channels,
            captures: capture_tx,
            pool: pool_rx,
            recycle: pool.clone(),
            dropped: dropped.clone(),
            next_sample: 0,
        };
        let error_callback = move |e: cpal::Error| {
            let _ = error_tx.try_send(e);
        };
        let stream_config = config.config();
        let stream = match config.sample_format() {
            SampleFormat::I8 => build_input::<i8, _>(&device, stream_config, feed, error_callback),
            SampleFormat::I16 => {
                build_input::<i16, _>(&device, stream_config, feed, error_callback)
            }
            SampleFormat::I24 => {
                build_input::<cpal::I24, _>(&device, stream_config, feed, error_callback)
            }
            SampleFormat::I32 => {
                build_input::<i32, _>(&device, stream_config, feed, error_callback)
            }
            SampleFormat::I64 => {
                build_input::<i64, _>(&device, stream_config, feed, error_callback)
            }
            SampleFormat::U8 => build_input::<u8, _>(&device, stream_config, feed, error_callback),
            SampleFormat::U16 => {
                build_input::<u16, _>(&device, stream_config, feed, error_callback)
            }
            SampleFormat::U24 => {
                build_input::<cpal::U24, _>(&device, stream_config, feed, error_callback)
            }
            SampleFormat::U32 => {
                build_input::<u32, _>(&device, stream_config, feed, error_callback)
            }
            SampleFormat::U64 => {
                build_input::<u64, _>(&device, stream_config, feed, error_callback)
            }
            SampleFormat::F32 => {
                build_input::<f32, _>(&device, stream_config, feed, error_callback)
            }
            SampleFormat::F64 => {
                build_input::<f64, _>(&device, stream_config, feed, error_callback)
            }
            other => bail!("microphone {name}: sample format {other} is not supported"),
        }
        .with_context(|| {
            format!(
                "cannot open the microphone {name} ({}){}",
                describe_config(&config),
                alsa.take()
                    .map(|m| format!(" (ALSA: {m})"))
                    .unwrap_or_default()
            )
        })?;
        Ok(Self {
            name: format!("{name}, {}", describe_config(&config)),
            rate,
            stream,
            captures,
            pool,
            errors,
            dropped,
            map: InstantMap::now(clock),
            stamp: CaptureClock::new(rate),
            stats: SourceStats::default(),
            glitches: 0,
        })
    }

    pub fn sample_rate(&self) -> u32 {
        self.rate
    }
}

/// What the input callback owns.
struct CaptureFeed {
    channels: usize,
    captures: Sender<Capture>,
    pool: Receiver<Vec<f32>>,
    recycle: Sender<Vec<f32>>,
    dropped: Arc<AtomicU64>,
    next_sample: u64,
}

impl CaptureFeed {
    fn take<T>(&mut self, data: &[T], info: &cpal::InputCallbackInfo)
    where
        T: SizedSample,
        f32: FromSample<T>,
    {
        let frames = data.len() / self.channels;
        let first_sample = self.next_sample;
        self.next_sample += frames as u64;
        let Ok(mut buffer) = self.pool.try_recv() else {
            // the feeder fell behind: this audio is lost, and the timestamps show the gap
            self.dropped.fetch_add(frames as u64, Ordering::Relaxed);
            return;
        };
        buffer.clear();
        let scale = 1.0 / self.channels as f32;
        buffer.extend(data.chunks_exact(self.channels).map(|frame| {
            frame
                .iter()
                .map(|&s| <f32 as FromSample<T>>::from_sample_(s))
                .sum::<f32>()
                * scale
        }));
        let timestamp = info.timestamp();
        let capture = Capture {
            samples: buffer,
            first_sample,
            callback: Instant::now(),
            capture_delay: timestamp.callback.duration_since(timestamp.capture),
        };
        if let Err(e) = self.captures.try_send(capture) {
            self.dropped.fetch_add(frames as u64, Ordering::Relaxed);
            // back into circulation rather than freed here
            let _ = self.recycle.try_send(e.into_inner().samples);
        }
    }
}

fn build_input<T, E>(
    device: &cpal::Device,
    config: cpal::StreamConfig,
    mut feed: CaptureFeed,
    error_callback: E,
) -> Result<cpal::Stream, cpal::Error>
where
    T: SizedSample,
    f32: FromSample<T>,
    E: FnMut(cpal::Error) + Send + 'static,
{
    device.build_input_stream::<T, _, _>(
        config,
        move |data: &[T], info: &cpal::InputCallbackInfo| feed.take(data, info),
        error_callback,
        None,
    )
}

impl AudioSource for MicSource {
    fn describe(&self) -> String {
        format!("microphone {}", self.name)
    }

    fn start(&mut self, _origin: Duration) -> anyhow::Result<()> {
        self.stream
            .play()
            .with_context(|| format!("cannot start the microphone {}", self.name))
    }

    fn next(&mut self, wait: Duration) -> anyhow::Result<SourceEvent> {
        while let Ok(e) = self.errors.try_recv() {
            if is_fatal(e.kind()) {
                bail!("microphone {}: {e}", self.name);
            }
            self.glitches += 1;
        }
        let capture = match self.captures.recv_timeout(wait) {
            Ok(capture) => capture,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Ok(SourceEvent::Nothing),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                bail!("microphone {}: the audio stream stopped", self.name)
            }
        };
        let captured_at = self
            .map
            .session_time(capture.callback)
            .saturating_sub(capture.capture_delay);
        let at = self.stamp.stamp(capture.first_sample, captured_at);
        let _ = self.pool.try_send(Vec::with_capacity(POOL_CAPACITY));
        let piece = AudioPiece {
            at,
            sample_rate: self.rate,
            samples: capture.samples,
        };
        self.stats.captured += piece.duration();
        Ok(SourceEvent::Audio(piece))
    }

    fn stats(&self) -> SourceStats {
        SourceStats {
            overrun: samples_to_duration(self.dropped.load(Ordering::Relaxed), self.rate),
            resyncs: self.stamp.resyncs(),
            ..self.stats
        }
    }
}

/// A chunk of voice at the speaker's rate, tagged with the flush generation it belongs to.
struct Chunk {
    generation: u64,
    samples: Vec<f32>,
}

/// What the speaker's feeder and its callback share.
#[derive(Debug, Default)]
struct Playback {
    /// Samples queued and not yet played.
    queued: AtomicUsize,
    /// Bumped by an interruption: chunks of an older generation are dropped unplayed.
    generation: AtomicU64,
    /// The current answer is complete: play out what is queued even below the prebuffer.
    complete: AtomicBool,
    underruns: AtomicU64,
    flushed: AtomicU64,
}

const SPEAKER_CHUNKS: usize = 128;

/// The feeding end of the speaker's jitter buffer (mono, at the speaker's rate).
pub struct PlaybackQueue {
    chunks: Sender<Chunk>,
    pool: Receiver<Vec<f32>>,
    playback: Arc<Playback>,
    overflow: u64,
}

/// The playing end, owned by the output callback: never blocks, never allocates.
pub struct Playout {
    prebuffer: usize,
    chunks: Receiver<Chunk>,
    pool: Sender<Vec<f32>>,
    playback: Arc<Playback>,
    current: Option<(Vec<f32>, usize)>,
    generation: u64,
    playing: bool,
}

/// A jitter buffer of `prebuffer` samples: its two ends.
pub fn jitter_buffer(prebuffer: usize) -> (PlaybackQueue, Playout) {
    let (chunks, chunk_rx) = bounded(SPEAKER_CHUNKS);
    let (pool_tx, pool) = bounded(SPEAKER_CHUNKS);
    let playback = Arc::new(Playback::default());
    (
        PlaybackQueue {
            chunks,
            pool,
            playback: playback.clone(),
            overflow: 0,
        },
        Playout {
            prebuffer,
            chunks: chunk_rx,
            pool: pool_tx,
            playback,
            current: None,
            generation: 0,
            playing: false,
        },
    )
}

impl PlaybackQueue {
    /// Queues voice; returns false (and drops it) when the queue is full.
    pub fn push(&mut self, samples: &[f32]) -> bool {
        if samples.is_empty() {
            return true;
        }
        let mut buffer = self.pool.try_recv().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(samples);
        let n = buffer.len();
        self.playback.queued.fetch_add(n, Ordering::AcqRel);
        let chunk = Chunk {
            generation: self.playback.generation.load(Ordering::Acquire),
            samples: buffer,
        };
        if self.chunks.try_send(chunk).is_err() {
            self.playback.queued.fetch_sub(n, Ordering::AcqRel);
            self.overflow += n as u64;
            return false;
        }
        true
    }

    /// Drops everything queued: nothing of it is played from the next callback on.
    pub fn flush(&self) {
        self.playback.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the current answer is complete (its tail plays even below the prebuffer).
    pub fn set_complete(&self, complete: bool) {
        self.playback.complete.store(complete, Ordering::Release);
    }

    /// Samples queued and not yet played (or dropped).
    pub fn queued(&self) -> usize {
        self.playback.queued.load(Ordering::Acquire)
    }

    /// Times the output ran dry in the middle of an answer.
    pub fn underruns(&self) -> u64 {
        self.playback.underruns.load(Ordering::Relaxed)
    }

    /// Samples dropped unplayed by flushes.
    pub fn flushed(&self) -> u64 {
        self.playback.flushed.load(Ordering::Relaxed)
    }

    /// Samples dropped because the queue was full.
    pub fn overflow(&self) -> u64 {
        self.overflow
    }
}

impl Playout {
    fn recycle(&self, samples: Vec<f32>) {
        let _ = self.pool.try_send(samples);
    }

    /// Drops the chunk being played (an interruption).
    fn drop_current(&mut self) {
        if let Some((samples, position)) = self.current.take() {
            let left = samples.len() - position;
            self.playback.queued.fetch_sub(left, Ordering::AcqRel);
            self.playback
                .flushed
                .fetch_add(left as u64, Ordering::Relaxed);
            self.recycle(samples);
        }
    }

    /// The next sample of the current generation, if one is queued.
    fn next_sample(&mut self) -> Option<f32> {
        loop {
            if let Some((samples, position)) = self.current.as_mut() {
                if *position < samples.len() {
                    let x = samples[*position];
                    *position += 1;
                    return Some(x);
                }
                let (samples, _) = self.current.take().expect("a current chunk");
                self.recycle(samples);
            }
            match self.chunks.try_recv() {
                Ok(chunk) if chunk.generation == self.generation => {
                    self.current = Some((chunk.samples, 0));
                }
                Ok(stale) => {
                    let n = stale.samples.len();
                    self.playback.queued.fetch_sub(n, Ordering::AcqRel);
                    self.playback.flushed.fetch_add(n as u64, Ordering::Relaxed);
                    self.recycle(stale.samples);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return None,
            }
        }
    }

    /// Fills `out` with the next samples of voice, silence where there is none (waiting for
    /// the prebuffer, or run dry). Returns the span of `out` that holds voice.
    pub fn fill(&mut self, out: &mut [f32]) -> Option<(usize, usize)> {
        let generation = self.playback.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.drop_current();
            self.playing = false;
        }
        let queued = self.playback.queued.load(Ordering::Acquire);
        let complete = self.playback.complete.load(Ordering::Acquire);
        if !self.playing && (queued >= self.prebuffer.max(1) || (complete && queued > 0)) {
            self.playing = true;
        }
        let (mut played, mut span) = (0usize, None::<(usize, usize)>);
        for (k, x) in out.iter_mut().enumerate() {
            *x = 0.0;
            if !self.playing {
                continue;
            }
            match self.next_sample() {
                Some(v) => {
                    *x = v;
                    played += 1;
                    span = Some((span.map_or(k, |(first, _)| first), k + 1));
                }
                None => {
                    self.playing = false;
                    if !complete {
                        self.playback.underruns.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if played > 0 {
            self.playback.queued.fetch_sub(played, Ordering::AcqRel);
        }
        span
    }
}

/// What the output callback owns: the jitter buffer's playing end and a mono scratch buffer.
struct SpeakerCallback {
    playout: Playout,
    channels: usize,
    rate: u32,
    scratch: Vec<f32>,
    activity: Arc<SpeakerActivity>,
    map: InstantMap,
    /// Everything played (voice and silence), dated back to back by the device's sample count.
    far_end: FarEndWriter,
    stamp: CaptureClock,
    next_sample: u64,
}

impl SpeakerCallback {
    fn fill<T>(&mut self, data: &mut [T], info: &cpal::OutputCallbackInfo)
    where
        T: SizedSample + FromSample<f32>,
    {
        let frames = data.len() / self.channels;
        // sized once to the device's period; grows only if the device asks for more
        self.scratch.resize(frames, 0.0);
        let span = self.playout.fill(&mut self.scratch);
        for (frame, &x) in data.chunks_exact_mut(self.channels).zip(&self.scratch) {
            frame.fill(T::from_sample(x));
        }
        // the device's reported output latency dates what is played
        let timestamp = info.timestamp();
        let ahead = timestamp.playback.duration_since(timestamp.callback);
        let start = self.map.session_time(Instant::now()) + ahead;
        let played_at = self.stamp.stamp(self.next_sample, start);
        self.next_sample += frames as u64;
        self.far_end.write(played_at, &self.scratch[..frames]);
        if let Some((first, end)) = span {
            let at = |k: usize| start + samples_to_duration(k as u64, self.rate);
            self.activity.record(at(first), at(end));
        }
    }
}

fn build_output<T, E>(
    device: &cpal::Device,
    config: cpal::StreamConfig,
    mut callback: SpeakerCallback,
    error_callback: E,
) -> Result<cpal::Stream, cpal::Error>
where
    T: SizedSample + FromSample<f32>,
    E: FnMut(cpal::Error) + Send + 'static,
{
    device.build_output_stream::<T, _, _>(
        config,
        move |data: &mut [T], info: &cpal::OutputCallbackInfo| callback.fill(data, info),
        error_callback,
        None,
    )
}

/// A loudspeaker, with a jitter buffer of `prebuffer`.
pub struct SpeakerSink {
    name: String,
    rate: u32,
    stream: cpal::Stream,
    queue: PlaybackQueue,
    errors: Receiver<cpal::Error>,
    /// The current answer, and its resampler from the voice's rate.
    turn: Option<u64>,
    resampler: Option<StreamResampler>,
    far_end: Option<FarEndReader>,
    stats: SinkStats,
}

impl SpeakerSink {
    pub fn open(
        choice: &DeviceChoice,
        clock: &dyn Clock,
        activity: Arc<SpeakerActivity>,
        prebuffer: Duration,
    ) -> anyhow::Result<Self> {
        let alsa = AlsaMessages::capture();
        let device = find(choice, Direction::Output, &alsa)?;
        let name = format!("{} [{}]", device_name(&device), device_id(&device));
        let config = device.default_output_config().with_context(|| {
            format!(
                "the speaker {name} cannot be used{}; list the devices with --list-devices, or \
                 use --output-file WAV",
                alsa.suffix()
            )
        })?;
        let rate = config.sample_rate();
        let channels = config.channels() as usize;
        if channels == 0 {
            bail!("speaker {name} reports 0 channels");
        }
        let (queue, playout) =
            jitter_buffer((prebuffer.as_secs_f64() * rate as f64).round() as usize);
        let (error_tx, errors) = bounded(64);
        // the callback writes ahead of the time it plays at: nothing to wait for
        let (far_end_writer, far_end) = far_end_tap(rate, Duration::ZERO);
        let callback = SpeakerCallback {
            playout,
            channels,
            rate,
            scratch: Vec::with_capacity(POOL_CAPACITY),
            activity,
            map: InstantMap::now(clock),
            far_end: far_end_writer,
            stamp: CaptureClock::new(rate),
            next_sample: 0,
        };
        let error_callback = move |e: cpal::Error| {
            let _ = error_tx.try_send(e);
        };
        let stream_config = config.config();
        let stream = match config.sample_format() {
            SampleFormat::I8 => {
                build_output::<i8, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::I16 => {
                build_output::<i16, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::I24 => {
                build_output::<cpal::I24, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::I32 => {
                build_output::<i32, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::I64 => {
                build_output::<i64, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::U8 => {
                build_output::<u8, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::U16 => {
                build_output::<u16, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::U24 => {
                build_output::<cpal::U24, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::U32 => {
                build_output::<u32, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::U64 => {
                build_output::<u64, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::F32 => {
                build_output::<f32, _>(&device, stream_config, callback, error_callback)
            }
            SampleFormat::F64 => {
                build_output::<f64, _>(&device, stream_config, callback, error_callback)
            }
            other => bail!("speaker {name}: sample format {other} is not supported"),
        }
        .with_context(|| {
            format!(
                "cannot open the speaker {name} ({}){}",
                describe_config(&config),
                alsa.suffix()
            )
        })?;
        Ok(Self {
            name: format!("{name}, {}", describe_config(&config)),
            rate,
            stream,
            queue,
            errors,
            turn: None,
            resampler: None,
            far_end: Some(far_end),
            stats: SinkStats::default(),
        })
    }

    pub fn sample_rate(&self) -> u32 {
        self.rate
    }

    fn check_errors(&mut self) -> anyhow::Result<()> {
        while let Ok(e) = self.errors.try_recv() {
            if is_fatal(e.kind()) {
                bail!("speaker {}: {e}", self.name);
            }
        }
        Ok(())
    }

    fn flush_resampler(&mut self) -> anyhow::Result<()> {
        if let Some(resampler) = self.resampler.as_mut() {
            let tail = resampler.flush()?;
            self.queue.push(&tail);
        }
        Ok(())
    }
}

impl AudioSink for SpeakerSink {
    fn describe(&self) -> String {
        format!("speaker {}", self.name)
    }

    fn start(&mut self, _origin: Duration) -> anyhow::Result<()> {
        self.stream
            .play()
            .with_context(|| format!("cannot start the speaker {}", self.name))
    }

    fn play(&mut self, frame: VoiceFrame<'_>) -> anyhow::Result<()> {
        self.check_errors()?;
        self.stats.voice += samples_to_duration(frame.pcm.len() as u64, frame.sample_rate);
        let same_rate = self
            .resampler
            .as_ref()
            .is_some_and(|r| r.input_rate() == frame.sample_rate);
        if self.turn != Some(frame.turn) || !same_rate {
            self.flush_resampler()?;
            self.turn = Some(frame.turn);
            self.resampler = Some(StreamResampler::new(frame.sample_rate, self.rate)?);
            self.queue.set_complete(false);
        }
        let samples = self
            .resampler
            .as_mut()
            .expect("a resampler for the answer")
            .push(frame.pcm)?;
        self.queue.push(&samples);
        Ok(())
    }

    fn interrupt(&mut self, turn: u64) -> anyhow::Result<()> {
        if self.turn == Some(turn) {
            self.queue.flush();
            if let Some(resampler) = self.resampler.as_mut() {
                resampler.reset();
            }
            self.turn = None;
        }
        Ok(())
    }

    fn answer_done(&mut self, turn: u64) -> anyhow::Result<()> {
        if self.turn == Some(turn) {
            self.flush_resampler()?;
            self.queue.set_complete(true);
            self.turn = None;
        }
        Ok(())
    }

    fn pending(&self) -> Duration {
        samples_to_duration(self.queue.queued() as u64, self.rate)
    }

    fn finish(&mut self, _end: Duration) -> anyhow::Result<()> {
        // silence from now on; the stream itself stops when the sink is dropped (not every
        // device can pause: ALSA's null device cannot)
        self.queue.flush();
        let _ = self.stream.pause();
        Ok(())
    }

    fn stats(&self) -> SinkStats {
        SinkStats {
            underruns: self.queue.underruns(),
            flushed: samples_to_duration(self.queue.flushed(), self.rate),
            overflow: samples_to_duration(self.queue.overflow(), self.rate),
            ..self.stats
        }
    }

    fn take_far_end(&mut self) -> Option<FarEndReader> {
        self.far_end.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn capture_clock_keeps_pieces_back_to_back_through_jitter() {
        let mut c = CaptureClock::new(48_000);
        // 10 ms pieces, callbacks late by 0-2 ms
        let mut expected = ms(500);
        for k in 0..100u64 {
            let jitter = Duration::from_micros((k * 737) % 2000);
            let at = c.stamp(k * 480, ms(500) + ms(10) * k as u32 + jitter);
            assert_eq!(at, expected, "piece {k}");
            expected += ms(10);
        }
        assert_eq!(c.resyncs(), 0);
    }

    #[test]
    fn capture_clock_follows_drift_in_small_steps_and_jumps_after_a_stall() {
        let mut c = CaptureClock::new(48_000);
        let mut previous_end: Option<Duration> = None;
        // the device runs 0.1 % slow: its samples span more system time than counted
        for k in 0..2000u64 {
            let estimated = ms(10) * k as u32 + Duration::from_micros(10 * k);
            let at = c.stamp(k * 480, estimated);
            if let Some(end) = previous_end {
                let step = at.as_nanos() as i128 - end.as_nanos() as i128;
                assert!(step.abs() <= 250_000, "piece {k} moved {step} ns");
            }
            previous_end = Some(at + ms(10));
            if k > 1000 {
                let error = at.as_nanos() as i128 - estimated.as_nanos() as i128;
                assert!(error.abs() <= 3_300_000, "piece {k} is {error} ns off");
            }
        }
        // the device stalled for half a second
        let at = c.stamp(2000 * 480, ms(20_000) + ms(520));
        assert_eq!(at, ms(20_520));
        assert_eq!(c.resyncs(), 1);
    }

    #[test]
    fn jitter_buffer_waits_for_its_prebuffer_then_plays_in_order() {
        let (mut queue, mut playout) = jitter_buffer(100);
        let mut out = vec![1.0; 64];
        assert_eq!(playout.fill(&mut out), None);
        assert!(out.iter().all(|&x| x == 0.0), "silence before any voice");
        let voice: Vec<f32> = (1..=150).map(|i| i as f32).collect();
        queue.push(&voice[..60]);
        assert_eq!(playout.fill(&mut out), None, "60 queued < prebuffer of 100");
        queue.push(&voice[60..]);
        assert_eq!(playout.fill(&mut out), Some((0, 64)));
        assert_eq!(out[0], 1.0);
        assert_eq!(out[63], 64.0);
        assert_eq!(queue.queued(), 86);
        // the rest, then it runs dry in the middle of the answer
        assert_eq!(playout.fill(&mut out), Some((0, 64)));
        assert_eq!(playout.fill(&mut out), Some((0, 22)));
        assert_eq!(out[21], 150.0);
        assert!(out[22..].iter().all(|&x| x == 0.0));
        assert_eq!(queue.underruns(), 1);
        assert_eq!(queue.queued(), 0);
    }

    #[test]
    fn jitter_buffer_plays_out_a_complete_short_answer_and_drops_a_flushed_one() {
        let (mut queue, mut playout) = jitter_buffer(100);
        let mut out = vec![0.0; 64];
        queue.push(&[0.5; 30]);
        assert_eq!(playout.fill(&mut out), None);
        queue.set_complete(true);
        assert_eq!(playout.fill(&mut out), Some((0, 30)));
        assert_eq!(
            queue.underruns(),
            0,
            "the end of an answer is not an underrun"
        );
        // an interrupted answer: what is queued, and what is being played, is dropped
        queue.set_complete(false);
        queue.push(&[0.25; 200]);
        assert_eq!(playout.fill(&mut out), Some((0, 64)));
        queue.flush();
        queue.push(&[0.75; 120]);
        let span = playout.fill(&mut out);
        assert_eq!(span, Some((0, 64)), "the next answer plays at once");
        assert!(out.iter().all(|&x| x == 0.75));
        assert_eq!(queue.flushed(), 136);
        assert_eq!(queue.queued(), 56);
    }

    #[test]
    fn instant_map_is_monotonic_around_its_origin() {
        let clock = crate::engine::clock::SystemClock::new();
        let map = InstantMap::now(&clock);
        let later = Instant::now() + ms(5);
        assert!(map.session_time(later) >= clock.now());
    }
}
