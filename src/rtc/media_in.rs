//! Media in: RTP packets of the client's microphone and camera to the session's timestamped
//! inputs. Everything here is plain logic on packets (no sockets), so it is tested directly.
//!
//! - Sequence numbers and timestamps are unwrapped to 64 bits (wrap-around is invisible).
//! - A small reorder buffer puts packets back in order and declares a packet lost once enough
//!   later ones have arrived; late and duplicate packets are dropped.
//! - Audio: Opus is decoded; a loss is recovered from the next packet's FEC and concealed.
//! - Video: packets are reassembled into frames (VP8 descriptors, H.264 single NAL / STAP-A /
//!   FU-A into Annex-B access units); a frame with a hole is dropped and a key frame is asked
//!   for, and nothing is decoded again until one arrives.
//! - Media time: the session clock starts when the call is created; a stream's first packet is
//!   placed at its arrival time, every later one at that plus its RTP timestamp distance (a
//!   timestamp that strays more than [`MAX_CLOCK_SKEW`] from the arrival re-anchors the stream).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::codec::vp8::Vp8Packet;
use rtc::rtp::packetizer::Depacketizer;

use crate::engine::session::{AudioInput, SessionHandle, VideoInput};
use crate::media::opus::{MAX_PACKET_SAMPLES, OPUS_RATE, OpusDecoder, OpusError};
use crate::media::video_decode::{VideoCodec, VideoDecodeError, VideoDecoder};

/// RTP clock of video.
pub const VIDEO_CLOCK: u32 = 90_000;
/// Packets held back waiting for a missing audio packet (3 x 20 ms).
pub const AUDIO_REORDER_DEPTH: usize = 3;
/// Packets held back waiting for a missing video packet.
pub const VIDEO_REORDER_DEPTH: usize = 24;
/// Largest encoded video frame accepted.
pub const MAX_ENCODED_FRAME_BYTES: usize = 4 << 20;
/// A sequence number this far behind the expected one means the sender restarted.
const RESTART_DISTANCE: u64 = 3_000;

/// Unwraps 16-bit sequence numbers to a monotonic 64-bit count.
#[derive(Debug, Default, Clone)]
pub struct SeqUnwrapper {
    highest: Option<u64>,
}

impl SeqUnwrapper {
    pub fn unwrap(&mut self, seq: u16) -> u64 {
        let value = match self.highest {
            // start one cycle up so that packets older than the first stay positive
            None => (1 << 16) + seq as u64,
            Some(h) => closest(h, seq as u64, 1 << 16),
        };
        self.highest = Some(self.highest.map_or(value, |h| h.max(value)));
        value
    }
}

/// Unwraps 32-bit RTP timestamps to a monotonic 64-bit clock.
#[derive(Debug, Default, Clone)]
pub struct TimestampUnwrapper {
    highest: Option<u64>,
}

impl TimestampUnwrapper {
    pub fn unwrap(&mut self, ts: u32) -> u64 {
        let value = match self.highest {
            None => (1 << 32) + ts as u64,
            Some(h) => closest(h, ts as u64, 1 << 32),
        };
        self.highest = Some(self.highest.map_or(value, |h| h.max(value)));
        value
    }
}

/// The value congruent to `low` modulo `cycle` that is closest to `reference`.
fn closest(reference: u64, low: u64, cycle: u64) -> u64 {
    let base = reference - reference % cycle + low;
    [base.saturating_sub(cycle), base, base + cycle]
        .into_iter()
        .min_by_key(|&c| c.abs_diff(reference))
        .unwrap_or(base)
}

/// What the reorder buffer lets through, in sequence order.
#[derive(Debug, Clone, PartialEq)]
pub enum Release<T> {
    Packet(u64, T),
    /// `count` packets from `first` on will not come.
    Lost {
        first: u64,
        count: u64,
    },
}

/// Puts packets back in sequence order.
#[derive(Debug)]
pub struct ReorderBuffer<T> {
    next: Option<u64>,
    pending: BTreeMap<u64, T>,
    depth: usize,
    pub late: u64,
    pub duplicates: u64,
}

impl<T> ReorderBuffer<T> {
    /// `depth`: how many later packets may wait for a missing one before it counts as lost.
    pub fn new(depth: usize) -> Self {
        Self {
            next: None,
            pending: BTreeMap::new(),
            depth,
            late: 0,
            duplicates: 0,
        }
    }

    pub fn push(&mut self, seq: u64, item: T) -> Vec<Release<T>> {
        let mut next = *self.next.get_or_insert(seq);
        if seq < next {
            if next - seq < RESTART_DISTANCE {
                self.late += 1;
                return vec![];
            }
            // far behind: the sender started over; what waits is from the old run
            self.pending.clear();
            next = seq;
        }
        if self.pending.contains_key(&seq) {
            self.duplicates += 1;
            return vec![];
        }
        self.pending.insert(seq, item);
        let mut out = vec![];
        loop {
            if let Some(item) = self.pending.remove(&next) {
                out.push(Release::Packet(next, item));
                next += 1;
            } else if self.pending.len() > self.depth {
                let Some(&first) = self.pending.keys().next() else {
                    break;
                };
                out.push(Release::Lost {
                    first: next,
                    count: first - next,
                });
                next = first;
            } else {
                break;
            }
        }
        self.next = Some(next);
        out
    }
}

/// How far a packet's timestamp may place it from its arrival before the stream is
/// re-anchored on the arrival (a sender that changed its timestamp base, or garbage).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Places a stream's RTP timestamps on the session clock: the anchor packet at its arrival,
/// every other one at the anchor plus its timestamp distance.
#[derive(Debug, Clone, Copy)]
struct MediaClock {
    anchor_arrival: Duration,
    anchor_ts: u64,
    rate: u32,
}

impl MediaClock {
    fn new(rate: u32) -> Self {
        Self {
            anchor_arrival: Duration::ZERO,
            anchor_ts: 0,
            rate,
        }
    }

    /// Media time of a packet with (unwrapped) timestamp `ts` that arrived at `arrival`.
    fn place(&mut self, first: bool, ts: u64, arrival: Duration) -> Duration {
        if !first {
            let ticks = ts as i128 - self.anchor_ts as i128;
            let at =
                self.anchor_arrival.as_nanos() as i128 + ticks * 1_000_000_000 / self.rate as i128;
            let skew = (at - arrival.as_nanos() as i128).unsigned_abs();
            if at >= 0 && skew <= MAX_CLOCK_SKEW.as_nanos() {
                return Duration::from_nanos(at as u64);
            }
        }
        self.anchor_arrival = arrival;
        self.anchor_ts = ts;
        arrival
    }
}

/// `at` moved by the distance from RTP time `from` to `to` at 48 kHz.
fn shifted(at: Duration, from: u64, to: u64) -> Duration {
    let offset = |n: u64| Duration::from_nanos(n * 1_000_000_000 / OPUS_RATE as u64);
    if to >= from {
        at + offset(to - from)
    } else {
        at.saturating_sub(offset(from - to))
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AudioStats {
    pub packets: u64,
    /// Samples at the decoder's rate.
    pub decoded_samples: u64,
    pub concealed_samples: u64,
    pub recovered_samples: u64,
    pub lost_packets: u64,
    pub late_packets: u64,
    pub bad_packets: u64,
}

/// The client's microphone: Opus RTP to mono [`AudioInput`]s at the decoder's rate (the
/// session's own when Opus decodes to it). The bookkeeping is in RTP ticks (48 kHz).
pub struct AudioReceiver {
    seq: SeqUnwrapper,
    ts: TimestampUnwrapper,
    reorder: ReorderBuffer<(u64, Duration, Bytes)>,
    decoder: OpusDecoder,
    clock: MediaClock,
    /// RTP time right after the last audio produced.
    expected_ts: Option<u64>,
    loss_pending: bool,
    stats: AudioStats,
}

impl AudioReceiver {
    /// A receiver decoding to 48 kHz.
    pub fn new() -> Result<Self, OpusError> {
        Self::with_rate(OPUS_RATE)
    }

    /// A receiver decoding to `rate` (one of [`OPUS_INPUT_RATES`](crate::media::opus::OPUS_INPUT_RATES)).
    pub fn with_rate(rate: u32) -> Result<Self, OpusError> {
        Ok(Self {
            seq: SeqUnwrapper::default(),
            ts: TimestampUnwrapper::default(),
            reorder: ReorderBuffer::new(AUDIO_REORDER_DEPTH),
            decoder: OpusDecoder::with_rate(rate)?,
            clock: MediaClock::new(OPUS_RATE),
            expected_ts: None,
            loss_pending: false,
            stats: AudioStats::default(),
        })
    }

    pub fn stats(&self) -> AudioStats {
        AudioStats {
            late_packets: self.reorder.late + self.reorder.duplicates,
            ..self.stats
        }
    }

    /// Takes one RTP packet that arrived at `arrival` (session time); returns the audio it
    /// completes and the errors of packets that could not be decoded.
    pub fn push(
        &mut self,
        arrival: Duration,
        seq: u16,
        ts: u32,
        payload: Bytes,
    ) -> (Vec<AudioInput>, Vec<OpusError>) {
        self.stats.packets += 1;
        let ts = self.ts.unwrap(ts);
        let seq = self.seq.unwrap(seq);
        let at = self.clock.place(self.stats.packets == 1, ts, arrival);
        let mut inputs = vec![];
        let mut errors = vec![];
        for release in self.reorder.push(seq, (ts, at, payload)) {
            match release {
                Release::Lost { count, .. } => {
                    self.stats.lost_packets += count;
                    self.loss_pending = true;
                }
                Release::Packet(_, (ts, at, payload)) => {
                    if payload.is_empty() {
                        continue; // padding only
                    }
                    match self.decode(ts, at, &payload, &mut inputs) {
                        Ok(()) => {}
                        Err(e) => {
                            self.stats.bad_packets += 1;
                            errors.push(e);
                        }
                    }
                }
            }
        }
        (inputs, errors)
    }

    fn input(&self, at: Duration, samples: Vec<f32>) -> AudioInput {
        AudioInput {
            at,
            sample_rate: self.decoder.rate(),
            samples,
        }
    }

    fn decode(
        &mut self,
        ts: u64,
        at: Duration,
        payload: &[u8],
        out: &mut Vec<AudioInput>,
    ) -> Result<(), OpusError> {
        let frame = OpusDecoder::packet_samples(payload)?;
        let per_sample = self.decoder.ticks_per_sample() as u64;
        if std::mem::take(&mut self.loss_pending)
            && let Some(expected) = self.expected_ts
            && ts > expected
            && ts - expected <= MAX_PACKET_SAMPLES as u64
        {
            // in RTP ticks
            let gap = (ts - expected) as usize;
            let from_fec = gap.min(frame);
            if gap > from_fec {
                let concealed = self
                    .decoder
                    .conceal((gap - from_fec) / per_sample as usize)?;
                self.stats.concealed_samples += concealed.len() as u64;
                out.push(self.input(shifted(at, ts, expected), concealed));
            }
            let recovered = self
                .decoder
                .recover(payload, from_fec / per_sample as usize)?;
            self.stats.recovered_samples += recovered.len() as u64;
            let from = ts - recovered.len() as u64 * per_sample;
            out.push(self.input(shifted(at, ts, from), recovered));
        }
        let samples = self.decoder.decode(payload)?;
        self.stats.decoded_samples += samples.len() as u64;
        self.expected_ts = Some(ts + samples.len() as u64 * per_sample);
        out.push(self.input(at, samples));
        Ok(())
    }
}

/// A complete encoded video frame.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedFrame {
    pub at: Duration,
    pub data: Vec<u8>,
    pub keyframe: bool,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct VideoPush {
    pub frames: Vec<EncodedFrame>,
    /// The stream is broken until a key frame: ask the sender for one.
    pub need_keyframe: bool,
    /// Packets or frames that were dropped, and why.
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VideoStats {
    pub packets: u64,
    pub frames: u64,
    pub dropped_frames: u64,
    pub lost_packets: u64,
    pub late_packets: u64,
}

enum Depacketizers {
    Vp8(Vp8Packet),
    H264(H264Packet),
}

struct Assembly {
    ts: u64,
    at: Duration,
    data: Vec<u8>,
    broken: bool,
}

/// The client's camera: RTP packets to complete encoded frames.
pub struct VideoReceiver {
    codec: VideoCodec,
    seq: SeqUnwrapper,
    ts: TimestampUnwrapper,
    reorder: ReorderBuffer<(u64, Duration, bool, Bytes)>,
    depacketizer: Depacketizers,
    assembly: Option<Assembly>,
    waiting_keyframe: bool,
    clock: MediaClock,
    stats: VideoStats,
}

impl VideoReceiver {
    pub fn new(codec: VideoCodec) -> Self {
        Self {
            codec,
            seq: SeqUnwrapper::default(),
            ts: TimestampUnwrapper::default(),
            reorder: ReorderBuffer::new(VIDEO_REORDER_DEPTH),
            depacketizer: Self::depacketizer(codec),
            assembly: None,
            waiting_keyframe: true,
            clock: MediaClock::new(VIDEO_CLOCK),
            stats: VideoStats::default(),
        }
    }

    fn depacketizer(codec: VideoCodec) -> Depacketizers {
        match codec {
            VideoCodec::Vp8 => Depacketizers::Vp8(Vp8Packet::default()),
            VideoCodec::H264 => Depacketizers::H264(H264Packet::default()),
        }
    }

    pub fn codec(&self) -> VideoCodec {
        self.codec
    }

    /// Holds frames back until the next key frame (a frame after the last one handed out was
    /// lost downstream).
    pub fn wait_for_keyframe(&mut self) {
        self.waiting_keyframe = true;
    }

    pub fn stats(&self) -> VideoStats {
        VideoStats {
            late_packets: self.reorder.late + self.reorder.duplicates,
            ..self.stats
        }
    }

    pub fn push(
        &mut self,
        arrival: Duration,
        seq: u16,
        ts: u32,
        marker: bool,
        payload: Bytes,
    ) -> VideoPush {
        self.stats.packets += 1;
        let ts = self.ts.unwrap(ts);
        let seq = self.seq.unwrap(seq);
        let at = self.clock.place(self.stats.packets == 1, ts, arrival);
        let mut out = VideoPush::default();
        for release in self.reorder.push(seq, (ts, at, marker, payload)) {
            match release {
                Release::Lost { count, .. } => {
                    self.stats.lost_packets += count;
                    match self.assembly.as_mut() {
                        Some(a) => a.broken = true,
                        None => self.stream_broken(&mut out),
                    }
                }
                Release::Packet(_, (ts, at, marker, payload)) => {
                    self.packet(ts, at, marker, payload, &mut out)
                }
            }
        }
        out
    }

    fn stream_broken(&mut self, out: &mut VideoPush) {
        self.waiting_keyframe = true;
        out.need_keyframe = true;
        self.depacketizer = Self::depacketizer(self.codec);
    }

    fn drop_frame(&mut self, out: &mut VideoPush, why: Option<String>) {
        self.assembly = None;
        self.stats.dropped_frames += 1;
        out.errors.extend(why);
        self.stream_broken(out);
    }

    fn packet(&mut self, ts: u64, at: Duration, marker: bool, payload: Bytes, out: &mut VideoPush) {
        if payload.is_empty() {
            return; // padding only
        }
        if self.assembly.as_ref().is_some_and(|a| a.ts != ts) {
            // the previous frame never saw its last packet
            self.drop_frame(out, None);
        }
        let starting = self.assembly.is_none();
        let head = match &self.depacketizer {
            Depacketizers::Vp8(d) => d.is_partition_head(&payload) && payload[0] & 0x07 == 0,
            Depacketizers::H264(d) => d.is_partition_head(&payload),
        };
        let assembly = self.assembly.get_or_insert(Assembly {
            ts,
            at,
            data: vec![],
            broken: starting && !head,
        });
        let part = match &mut self.depacketizer {
            Depacketizers::Vp8(d) => d.depacketize(&payload).map_err(|e| e.to_string()),
            Depacketizers::H264(d) => match check_h264_payload(&payload) {
                Ok(()) => d.depacketize(&payload).map_err(|e| e.to_string()),
                Err(e) => Err(e),
            },
        };
        let mut error = None;
        match part {
            Ok(part) if assembly.data.len() + part.len() <= MAX_ENCODED_FRAME_BYTES => {
                assembly.data.extend_from_slice(&part)
            }
            Ok(_) => {
                assembly.broken = true;
                error = Some(format!(
                    "{} frame larger than {MAX_ENCODED_FRAME_BYTES} bytes",
                    self.codec.name()
                ));
            }
            Err(e) => {
                assembly.broken = true;
                error = Some(format!("bad {} RTP payload: {e}", self.codec.name()));
            }
        }
        if !marker {
            if let Some(e) = error {
                out.errors.push(e);
            }
            return;
        }
        let Some(frame) = self.assembly.take() else {
            return;
        };
        if frame.broken || frame.data.is_empty() {
            self.drop_frame(out, error);
            return;
        }
        let keyframe = is_keyframe(self.codec, &frame.data);
        if self.waiting_keyframe && !keyframe {
            self.stats.dropped_frames += 1;
            out.need_keyframe = true;
            return;
        }
        self.waiting_keyframe = false;
        self.stats.frames += 1;
        out.frames.push(EncodedFrame {
            at: frame.at,
            data: frame.data,
            keyframe,
        });
    }
}

const STAP_A: u8 = 24;

/// The checks the depacketizer itself skips: a STAP-A whose sizes run past the payload.
fn check_h264_payload(payload: &[u8]) -> Result<(), String> {
    if payload.first().map(|b| b & 0x1f) != Some(STAP_A) {
        return Ok(());
    }
    let mut at = 1;
    while at < payload.len() {
        if at + 2 > payload.len() {
            return Err("STAP-A ends inside a NAL unit size".into());
        }
        let size = u16::from_be_bytes([payload[at], payload[at + 1]]) as usize;
        at += 2;
        if size == 0 || at + size > payload.len() {
            return Err(format!(
                "STAP-A NAL unit of {size} bytes with {} left",
                payload.len() - at
            ));
        }
        at += size;
    }
    Ok(())
}

/// Whether an encoded frame can be decoded on its own.
pub fn is_keyframe(codec: VideoCodec, frame: &[u8]) -> bool {
    match codec {
        // frame tag bit 0: 0 = key frame
        VideoCodec::Vp8 => frame.first().is_some_and(|b| b & 1 == 0),
        VideoCodec::H264 => crate::media::video_decode::annex_b_nal_units(frame)
            .any(|nal| nal.first().is_some_and(|b| b & 0x1f == 5)),
    }
}

/// A decode error worth telling the client about, and whether a key frame may fix it.
#[derive(Debug, Clone)]
pub struct DecodeProblem {
    pub message: String,
    pub need_keyframe: bool,
}

/// Decodes a call's video on its own thread (decoding must see every frame; converting to RGB
/// and handing to the session happens only `max_fps` times a second).
pub struct VideoDecodeWorker {
    frames: crossbeam_channel::Sender<EncodedFrame>,
}

impl VideoDecodeWorker {
    /// `problems` receives every frame that failed to decode; the thread is named
    /// `oc-vd-{call}` (`call`: the first 8 characters of the call id).
    pub fn spawn(
        call: &str,
        codec: VideoCodec,
        max_pixels: usize,
        max_fps: f64,
        session: SessionHandle,
        problems: tokio::sync::mpsc::UnboundedSender<DecodeProblem>,
    ) -> Result<Self, VideoDecodeError> {
        let mut decoder = VideoDecoder::new(codec, max_pixels)?;
        // a short queue: a decoder that falls behind drops frames rather than lagging
        let (tx, rx) = crossbeam_channel::bounded::<EncodedFrame>(8);
        let min_interval = Duration::from_secs_f64(1.0 / max_fps.max(0.1));
        std::thread::Builder::new()
            .name(format!("oc-vd-{call}"))
            .spawn(move || {
                let mut last_sent: Option<Duration> = None;
                // after a failed frame, inter frames would decode against a broken reference
                let mut broken = false;
                while let Ok(frame) = rx.recv() {
                    if broken && !frame.keyframe {
                        continue;
                    }
                    match decoder.decode_yuv(&frame.data) {
                        Ok(Some(picture)) => {
                            broken = false;
                            let due =
                                last_sent.is_none_or(|t| frame.at >= t + min_interval.mul_f64(0.9));
                            if due {
                                last_sent = Some(frame.at);
                                let rgb = picture.to_rgb();
                                let sent = session.push_video(VideoInput {
                                    at: frame.at,
                                    width: rgb.width,
                                    height: rgb.height,
                                    rgb: Arc::new(rgb.data),
                                });
                                if !sent {
                                    break;
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            broken = true;
                            let need_keyframe = !matches!(e, VideoDecodeError::Decoder { .. });
                            let problem = DecodeProblem {
                                message: format!("video: {e}"),
                                need_keyframe,
                            };
                            if problems.send(problem).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .map_err(|e| VideoDecodeError::Decoder {
                codec: codec.name(),
                detail: format!("cannot start the decode thread: {e}"),
            })?;
        Ok(Self { frames: tx })
    }

    /// Queues a frame; false when the queue is full (the frame is dropped: the stream needs a
    /// key frame, see [`VideoReceiver::wait_for_keyframe`]) or the worker is gone.
    pub fn decode(&self, frame: EncodedFrame) -> bool {
        self.frames.try_send(frame).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::opus::OpusEncoder;

    #[test]
    fn sequence_numbers_and_timestamps_unwrap() {
        let mut s = SeqUnwrapper::default();
        let a = s.unwrap(65_534);
        assert_eq!(s.unwrap(65_535), a + 1);
        assert_eq!(s.unwrap(0), a + 2);
        assert_eq!(s.unwrap(1), a + 3);
        // a late packet from before the wrap
        assert_eq!(s.unwrap(65_535), a + 1);
        assert_eq!(s.unwrap(2), a + 4);
        let mut t = TimestampUnwrapper::default();
        let b = t.unwrap(u32::MAX - 479);
        assert_eq!(t.unwrap(480), b + 960);
        assert_eq!(t.unwrap(u32::MAX - 479), b);
        // before the very first packet
        let mut s = SeqUnwrapper::default();
        let first = s.unwrap(10);
        assert_eq!(s.unwrap(9), first - 1);
    }

    #[test]
    fn reorder_buffer_restores_order_and_declares_loss() {
        let mut r = ReorderBuffer::new(2);
        assert_eq!(r.push(10, 'a'), vec![Release::Packet(10, 'a')]);
        assert_eq!(r.push(12, 'c'), vec![]);
        assert_eq!(
            r.push(11, 'b'),
            vec![Release::Packet(11, 'b'), Release::Packet(12, 'c')]
        );
        // 13 is lost: 14, 15 wait, 16 makes it three waiting
        assert_eq!(r.push(14, 'e'), vec![]);
        assert_eq!(r.push(15, 'f'), vec![]);
        assert_eq!(
            r.push(16, 'g'),
            vec![
                Release::Lost {
                    first: 13,
                    count: 1
                },
                Release::Packet(14, 'e'),
                Release::Packet(15, 'f'),
                Release::Packet(16, 'g'),
            ]
        );
        // late and duplicate packets are dropped
        assert_eq!(r.push(13, 'd'), vec![]);
        assert_eq!(r.push(18, 'i'), vec![]);
        assert_eq!(r.push(18, 'i'), vec![]);
        assert_eq!((r.late, r.duplicates), (1, 1));
        // a sender that starts over far behind is followed
        let mut r = ReorderBuffer::new(2);
        r.push(10_000, 'a');
        r.push(10_002, 'c');
        assert_eq!(r.push(5, 'z'), vec![Release::Packet(5, 'z')]);
        assert_eq!(r.push(6, 'y'), vec![Release::Packet(6, 'y')]);
    }

    fn opus_packets(n: usize) -> Vec<Bytes> {
        let mut enc = OpusEncoder::new(48_000).unwrap();
        (0..n)
            .map(|i| {
                let f: Vec<f32> = (0..960)
                    .map(|j| ((i * 960 + j) as f32 * 0.05).sin() * 0.3)
                    .collect();
                Bytes::from(enc.encode(&f).unwrap())
            })
            .collect()
    }

    #[test]
    fn audio_is_timed_from_rtp_across_wrap_and_reordering() {
        let packets = opus_packets(8);
        let mut rx = AudioReceiver::new().unwrap();
        let ts0 = u32::MAX - 960 * 2 + 1;
        let seq0 = 65_533u16;
        let arrival = Duration::from_millis(500);
        let order = [0usize, 2, 1, 3, 4, 5, 6, 7];
        let mut inputs = vec![];
        for &i in &order {
            let (got, errors) = rx.push(
                arrival + Duration::from_millis(20 * i as u64),
                seq0.wrapping_add(i as u16),
                ts0.wrapping_add(960 * i as u32),
                packets[i].clone(),
            );
            assert!(errors.is_empty());
            inputs.extend(got);
        }
        assert_eq!(inputs.len(), 8);
        for (i, input) in inputs.iter().enumerate() {
            assert_eq!(input.at, arrival + Duration::from_millis(20 * i as u64));
            assert_eq!(input.sample_rate, 48_000);
            assert_eq!(input.samples.len(), 960);
        }
        assert_eq!(rx.stats().decoded_samples, 8 * 960);
    }

    #[test]
    fn lost_audio_is_recovered_in_place() {
        let packets = opus_packets(10);
        let mut rx = AudioReceiver::new().unwrap();
        let mut inputs = vec![];
        for (i, p) in packets.iter().enumerate() {
            if i == 4 {
                continue;
            }
            let (got, _) = rx.push(
                Duration::from_millis(20 * i as u64),
                100 + i as u16,
                9_000 + 960 * i as u32,
                p.clone(),
            );
            inputs.extend(got);
        }
        // everything but the lost packet, plus its recovery, in time order
        let starts: Vec<u64> = inputs.iter().map(|a| a.at.as_millis() as u64).collect();
        assert_eq!(starts, vec![0, 20, 40, 60, 80, 100, 120, 140, 160, 180]);
        assert_eq!(inputs[4].samples.len(), 960);
        let stats = rx.stats();
        assert_eq!(stats.lost_packets, 1);
        assert_eq!(stats.recovered_samples, 960);
        assert_eq!(stats.decoded_samples, 9 * 960);
    }

    #[test]
    fn audio_decoded_at_16k_keeps_the_same_times_and_recovers_losses_at_that_rate() {
        let packets = opus_packets(10);
        let mut rx = AudioReceiver::with_rate(16_000).unwrap();
        let mut inputs = vec![];
        // packets 4 and 5 lost: one from the next packet's FEC, one concealed
        for (i, p) in packets.iter().enumerate() {
            if i == 4 || i == 5 {
                continue;
            }
            let (got, errors) = rx.push(
                Duration::from_millis(20 * i as u64),
                100 + i as u16,
                9_000 + 960 * i as u32,
                p.clone(),
            );
            assert!(errors.is_empty());
            inputs.extend(got);
        }
        let starts: Vec<u64> = inputs.iter().map(|a| a.at.as_millis() as u64).collect();
        assert_eq!(starts, vec![0, 20, 40, 60, 80, 100, 120, 140, 160, 180]);
        assert!(inputs.iter().all(|a| a.sample_rate == 16_000));
        assert!(inputs.iter().all(|a| a.samples.len() == 320), "20 ms each");
        let stats = rx.stats();
        assert_eq!(stats.lost_packets, 2);
        assert_eq!(
            (stats.concealed_samples, stats.recovered_samples),
            (320, 320)
        );
        assert_eq!(stats.decoded_samples, 8 * 320);
        assert!(AudioReceiver::with_rate(44_100).is_err());
    }

    #[test]
    fn a_timestamp_jump_re_anchors_the_stream_on_arrival() {
        let packets = opus_packets(4);
        let mut rx = AudioReceiver::new().unwrap();
        let mut at = vec![];
        for (i, (arrival_ms, ts)) in [
            (100u64, 1_000u32),
            (120, 1_960),
            (140, 3_000_000_000),
            (160, 3_000_000_960),
        ]
        .into_iter()
        .enumerate()
        {
            let (got, _) = rx.push(
                Duration::from_millis(arrival_ms),
                i as u16,
                ts,
                packets[i].clone(),
            );
            at.extend(got.into_iter().map(|a| a.at.as_millis() as u64));
        }
        assert_eq!(at, vec![100, 120, 140, 160]);
    }

    #[test]
    fn garbage_audio_is_reported_and_skipped() {
        let packets = opus_packets(3);
        let mut rx = AudioReceiver::new().unwrap();
        let (ok, errs) = rx.push(Duration::ZERO, 1, 0, packets[0].clone());
        assert_eq!((ok.len(), errs.len()), (1, 0));
        let (ok, errs) = rx.push(Duration::ZERO, 2, 960, Bytes::from_static(&[0x0b, 0x3c, 1]));
        assert_eq!((ok.len(), errs.len()), (0, 1));
        assert!(
            errs[0].to_string().contains("invalid opus packet"),
            "{}",
            errs[0]
        );
        // padding-only packets are neither audio nor errors
        let (ok, errs) = rx.push(Duration::ZERO, 3, 1_920, Bytes::new());
        assert_eq!((ok.len(), errs.len()), (0, 0));
        let (ok, errs) = rx.push(Duration::ZERO, 4, 2_880, packets[1].clone());
        assert_eq!((ok.len(), errs.len()), (1, 0));
        assert_eq!(ok[0].at, Duration::from_millis(60));
        assert_eq!(rx.stats().bad_packets, 1);
    }

    /// VP8 payload descriptor: S bit on the first packet of a frame, partition 0.
    fn vp8_packet(start: bool, body: &[u8]) -> Bytes {
        let mut p = vec![if start { 0x10 } else { 0x00 }];
        p.extend_from_slice(body);
        Bytes::from(p)
    }

    #[test]
    fn vp8_frames_are_assembled_and_loss_asks_for_a_key_frame() {
        let mut rx = VideoReceiver::new(VideoCodec::Vp8);
        let t = Duration::from_secs(1);
        // an inter frame before any key frame is not decodable
        let out = rx.push(t, 1, 1_000, true, vp8_packet(true, &[0x01, 2, 3]));
        assert!(out.frames.is_empty() && out.need_keyframe);
        // a key frame in two packets
        assert!(
            rx.push(t, 2, 4_000, false, vp8_packet(true, &[0x00, 9, 9]))
                .frames
                .is_empty()
        );
        let out = rx.push(t, 3, 4_000, true, vp8_packet(false, &[7, 7, 7]));
        assert_eq!(out.frames.len(), 1);
        let frame = &out.frames[0];
        assert!(frame.keyframe);
        assert_eq!(frame.data, vec![0x00, 9, 9, 7, 7, 7]);
        assert_eq!(frame.at, t + Duration::from_nanos(33_333_333));
        // an inter frame
        let out = rx.push(t, 4, 7_000, true, vp8_packet(true, &[0x01, 5, 5]));
        assert_eq!(out.frames.len(), 1);
        assert!(!out.frames[0].keyframe);
        // the middle packet of the next frame is lost: after enough later packets the frame
        // is dropped, a key frame is asked for, inter frames are held back until it comes
        let mut pushes = vec![rx.push(t, 5, 10_000, false, vp8_packet(true, &[0x01, 1, 1]))];
        for k in 0..=VIDEO_REORDER_DEPTH as u16 {
            pushes.push(rx.push(
                t,
                7 + 2 * k,
                13_000 + 3_000 * k as u32,
                false,
                vp8_packet(true, &[0x01, 1, 1]),
            ));
            pushes.push(rx.push(
                t,
                8 + 2 * k,
                13_000 + 3_000 * k as u32,
                true,
                vp8_packet(false, &[2, 2, 2]),
            ));
        }
        assert!(pushes.iter().all(|p| p.frames.is_empty()));
        assert!(pushes.iter().any(|p| p.need_keyframe));
        assert_eq!(rx.stats().lost_packets, 1);
        let seq = 7 + 2 * (VIDEO_REORDER_DEPTH as u16 + 1);
        let ts = 13_000 + 3_000 * (VIDEO_REORDER_DEPTH as u32 + 1);
        let mut out = rx.push(t, seq, ts, true, vp8_packet(true, &[0x00, 4, 4]));
        // flush what the reorder buffer still holds
        for k in 1..=VIDEO_REORDER_DEPTH as u16 + 1 {
            let more = rx.push(
                t,
                seq + k,
                ts + 3_000 * k as u32,
                true,
                vp8_packet(true, &[0x01, 4, 4]),
            );
            out.frames.extend(more.frames);
        }
        assert!(out.frames[0].keyframe);
        assert!(out.frames.len() > 1);
    }

    #[test]
    fn h264_single_stap_a_and_fu_a_become_annex_b() {
        let mut rx = VideoReceiver::new(VideoCodec::H264);
        let t = Duration::ZERO;
        let sps = [0x67, 0x42, 0xc0, 0x1e];
        let pps = [0x68, 0xce, 0x3c, 0x80];
        let mut stap = vec![0x78];
        for nal in [&sps[..], &pps[..]] {
            stap.extend((nal.len() as u16).to_be_bytes());
            stap.extend_from_slice(nal);
        }
        assert!(rx.push(t, 1, 0, false, Bytes::from(stap)).frames.is_empty());
        // an IDR slice in two FU-A fragments
        let fu1 = Bytes::from(vec![0x7c, 0x85, 1, 2, 3]);
        let fu2 = Bytes::from(vec![0x7c, 0x45, 4, 5]);
        assert!(rx.push(t, 2, 0, false, fu1).frames.is_empty());
        let out = rx.push(t, 3, 0, true, fu2);
        assert_eq!(out.frames.len(), 1, "{out:?}");
        let f = &out.frames[0];
        assert!(f.keyframe);
        let nals: Vec<&[u8]> = crate::media::video_decode::annex_b_nal_units(&f.data).collect();
        assert_eq!(nals, vec![&sps[..], &pps[..], &[0x65, 1, 2, 3, 4, 5][..]]);
        // a non-IDR single NAL unit frame
        let out = rx.push(t, 4, 3_000, true, Bytes::from(vec![0x41, 9, 9]));
        assert_eq!(out.frames.len(), 1);
        assert!(!out.frames[0].keyframe);
    }

    #[test]
    fn garbage_h264_payloads_drop_the_frame_without_panicking() {
        let mut rx = VideoReceiver::new(VideoCodec::H264);
        let t = Duration::ZERO;
        let bad: [&[u8]; 6] = [
            &[0x78, 0x00, 0x01, 0x41, 0x00],    // STAP-A size byte cut short
            &[0x78, 0x00, 0x09, 0x41],          // STAP-A size past the end
            &[0x79, 1, 2, 3],                   // STAP-B: not handled
            &[0x7c],                            // FU-A header only
            &[0x1f, 0xff, 0xff, 0xff, 0xff, 0], // reserved NAL type
            &[0x41],                            // too short
        ];
        let mut errors = 0;
        for (i, p) in bad.iter().enumerate() {
            let out = rx.push(
                t,
                i as u16,
                3_000 * i as u32,
                true,
                Bytes::copy_from_slice(p),
            );
            assert!(out.frames.is_empty());
            errors += out.errors.len();
        }
        assert_eq!(errors, bad.len());
        let out = rx.push(t, 6, 90_000, true, Bytes::from(vec![0x65, 1, 2]));
        assert_eq!(out.frames.len(), 1);
    }

    #[test]
    fn garbage_vp8_payloads_are_errors() {
        let mut rx = VideoReceiver::new(VideoCodec::Vp8);
        // X and I bits set with a 16-bit picture id that runs off the end
        let out = rx.push(
            Duration::ZERO,
            1,
            0,
            true,
            Bytes::from_static(&[0x90, 0x80, 0x80]),
        );
        assert!(out.frames.is_empty());
        assert_eq!(out.errors.len(), 1, "{out:?}");
        assert!(
            out.errors[0].contains("bad VP8 RTP payload"),
            "{:?}",
            out.errors
        );
    }

    #[test]
    fn keyframes_are_recognised() {
        assert!(is_keyframe(VideoCodec::Vp8, &[0x50, 0x02]));
        assert!(!is_keyframe(VideoCodec::Vp8, &[0x51, 0x02]));
        assert!(is_keyframe(
            VideoCodec::H264,
            &[0, 0, 0, 1, 0x67, 1, 0, 0, 1, 0x65, 2]
        ));
        assert!(!is_keyframe(VideoCodec::H264, &[0, 0, 0, 1, 0x41, 1]));
    }
}
