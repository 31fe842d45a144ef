//! Opus encoding and decoding of 20 ms frames, as WebRTC carries voice.
//!
//! - [`OpusDecoder`]: packets from the network to mono at any rate libopus decodes to (48 kHz,
//!   or the model's 16 kHz directly: libopus then skips the upper band instead of a resampler
//!   undoing it; it downmixes a stereo stream itself when the decoder is mono), with
//!   packet-loss concealment and in-band FEC.
//! - [`OpusEncoder`]: mono VoIP encoder of 20 ms frames.
//! - [`VoiceEncoder`]: the model's voice at its own rate to 20 ms Opus packets. Rates that
//!   libopus takes as input (24 kHz, the vocoder's) are encoded as they are: the 48 kHz RTP clock
//!   does not change and no resampler delay is added; any other rate is first resampled to 48 kHz
//!   with [`StreamResampler`].
//!
//! Every malformed packet is an [`OpusError`], never a panic.

use crate::media::resample::{ResampleError, StreamResampler};

/// The Opus RTP clock and the rate the decoder outputs.
pub const OPUS_RATE: u32 = 48_000;
/// Samples of one 20 ms frame at 48 kHz.
pub const FRAME_SAMPLES_48K: usize = 960;
/// The longest Opus packet: 120 ms at 48 kHz.
pub const MAX_PACKET_SAMPLES: usize = 5_760;
/// Granularity of concealment: libopus conceals in multiples of 2.5 ms.
const PLC_STEP: usize = 120;
/// Largest encoded packet we produce; 20 ms of VoIP speech is far below it.
const MAX_ENCODED_BYTES: usize = 1_500;
/// Rates libopus encodes from and decodes to.
pub const OPUS_INPUT_RATES: [u32; 5] = [8_000, 12_000, 16_000, 24_000, 48_000];

#[derive(Debug, thiserror::Error)]
pub enum OpusError {
    #[error("opus {context}: {source}")]
    Codec {
        context: &'static str,
        #[source]
        source: opus::Error,
    },
    #[error("invalid opus packet: {0}")]
    InvalidPacket(String),
    #[error("opus frame of {got} samples, expected {want}")]
    FrameSize { got: usize, want: usize },
    #[error("opus cannot run at {0} Hz (expected one of 8000, 12000, 16000, 24000, 48000)")]
    Rate(u32),
    #[error(transparent)]
    Resample(#[from] ResampleError),
}

fn codec(context: &'static str) -> impl FnOnce(opus::Error) -> OpusError {
    move |source| OpusError::Codec { context, source }
}

/// Decodes an Opus stream to mono at one of [`OPUS_INPUT_RATES`].
pub struct OpusDecoder {
    decoder: opus::Decoder,
    rate: u32,
    buf: Vec<f32>,
}

impl OpusDecoder {
    /// A decoder to 48 kHz.
    pub fn new() -> Result<Self, OpusError> {
        Self::with_rate(OPUS_RATE)
    }

    /// A decoder to `rate` (8, 12, 16, 24 or 48 kHz).
    pub fn with_rate(rate: u32) -> Result<Self, OpusError> {
        if !OPUS_INPUT_RATES.contains(&rate) {
            return Err(OpusError::Rate(rate));
        }
        Ok(Self {
            decoder: opus::Decoder::new(rate, opus::Channels::Mono)
                .map_err(codec("decoder init"))?,
            rate,
            buf: vec![0.0; MAX_PACKET_SAMPLES],
        })
    }

    /// The rate of the decoded audio.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// RTP clock ticks (48 kHz) per decoded sample.
    pub fn ticks_per_sample(&self) -> usize {
        (OPUS_RATE / self.rate) as usize
    }

    /// Samples at 48 kHz (the RTP clock's ticks) that `packet` decodes to; checks the
    /// packet's framing.
    pub fn packet_samples(packet: &[u8]) -> Result<usize, OpusError> {
        if packet.is_empty() {
            return Err(OpusError::InvalidPacket("empty payload".into()));
        }
        let n = opus::packet::get_nb_samples(packet, OPUS_RATE)
            .map_err(|e| OpusError::InvalidPacket(e.to_string()))?;
        if n == 0 || n > MAX_PACKET_SAMPLES {
            return Err(OpusError::InvalidPacket(format!(
                "declares {n} samples (1..={MAX_PACKET_SAMPLES} allowed)"
            )));
        }
        Ok(n)
    }

    /// Decodes one packet.
    pub fn decode(&mut self, packet: &[u8]) -> Result<Vec<f32>, OpusError> {
        let want = Self::packet_samples(packet)? / self.ticks_per_sample();
        let n = self
            .decoder
            .decode_float(packet, &mut self.buf[..want], false)
            .map_err(|e| OpusError::InvalidPacket(e.to_string()))?;
        Ok(self.buf[..n].to_vec())
    }

    /// Output samples to ask libopus for in place of `samples` lost ones: whole 2.5 ms steps,
    /// at most 120 ms.
    fn concealment_len(&self, samples: usize) -> usize {
        let step = PLC_STEP / self.ticks_per_sample();
        let max = MAX_PACKET_SAMPLES / self.ticks_per_sample();
        samples.div_ceil(step).clamp(1, max / step) * step
    }

    /// Conceals `samples` (at the output rate) of lost audio (rounded up to 2.5 ms, at most
    /// 120 ms).
    pub fn conceal(&mut self, samples: usize) -> Result<Vec<f32>, OpusError> {
        let want = self.concealment_len(samples);
        let n = self
            .decoder
            .decode_float(&[], &mut self.buf[..want], false)
            .map_err(codec("concealment"))?;
        Ok(self.buf[..n].to_vec())
    }

    /// Recovers the `samples` (at the output rate) lost just before `next` from the forward
    /// error correction data `next` carries (libopus conceals instead when it carries none).
    /// `next` itself must then be decoded normally.
    pub fn recover(&mut self, next: &[u8], samples: usize) -> Result<Vec<f32>, OpusError> {
        Self::packet_samples(next)?;
        let want = self.concealment_len(samples);
        let n = self
            .decoder
            .decode_float(next, &mut self.buf[..want], true)
            .map_err(|e| OpusError::InvalidPacket(e.to_string()))?;
        Ok(self.buf[..n].to_vec())
    }
}

/// A mono Opus encoder of 20 ms frames tuned for speech (VoIP application, in-band FEC on).
pub struct OpusEncoder {
    encoder: opus::Encoder,
    frame_samples: usize,
}

impl OpusEncoder {
    /// An encoder taking `sample_rate` input (8, 12, 16, 24 or 48 kHz).
    pub fn new(sample_rate: u32) -> Result<Self, OpusError> {
        if !OPUS_INPUT_RATES.contains(&sample_rate) {
            return Err(OpusError::Rate(sample_rate));
        }
        let mut encoder =
            opus::Encoder::new(sample_rate, opus::Channels::Mono, opus::Application::Voip)
                .map_err(codec("encoder init"))?;
        encoder.set_inband_fec(true).map_err(codec("enable FEC"))?;
        // FEC only spends bits when the encoder expects loss.
        encoder
            .set_packet_loss_perc(5)
            .map_err(codec("set expected loss"))?;
        Ok(Self {
            encoder,
            frame_samples: sample_rate as usize / 50,
        })
    }

    /// Samples of one 20 ms frame at the input rate.
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// Encodes exactly one 20 ms frame.
    pub fn encode(&mut self, frame: &[f32]) -> Result<Vec<u8>, OpusError> {
        if frame.len() != self.frame_samples {
            return Err(OpusError::FrameSize {
                got: frame.len(),
                want: self.frame_samples,
            });
        }
        self.encoder
            .encode_vec_float(frame, MAX_ENCODED_BYTES)
            .map_err(codec("encode"))
    }
}

/// The model's voice, pushed in pieces of any length at its own rate, out as 20 ms Opus
/// packets for a 48 kHz RTP stream.
pub struct VoiceEncoder {
    resampler: Option<StreamResampler>,
    encoder: OpusEncoder,
    pending: Vec<f32>,
}

impl VoiceEncoder {
    pub fn new(input_rate: u32) -> Result<Self, OpusError> {
        let (resampler, encode_rate) = if OPUS_INPUT_RATES.contains(&input_rate) {
            (None, input_rate)
        } else {
            (
                Some(StreamResampler::new(input_rate, OPUS_RATE)?),
                OPUS_RATE,
            )
        };
        Ok(Self {
            resampler,
            encoder: OpusEncoder::new(encode_rate)?,
            pending: Vec::new(),
        })
    }

    /// The rate `push` expects.
    pub fn input_rate(&self) -> u32 {
        match &self.resampler {
            Some(r) => r.input_rate(),
            None => self.encoder.frame_samples as u32 * 50,
        }
    }

    /// Feeds voice; returns the packets of every 20 ms frame now complete.
    pub fn push(&mut self, pcm: &[f32]) -> Result<Vec<Vec<u8>>, OpusError> {
        match self.resampler.as_mut() {
            Some(r) => {
                let out = r.push(pcm)?;
                self.pending.extend_from_slice(&out);
            }
            None => self.pending.extend_from_slice(pcm),
        }
        self.drain_frames()
    }

    /// Ends an answer: everything still buffered goes out, the last frame padded with silence.
    pub fn finish(&mut self) -> Result<Vec<Vec<u8>>, OpusError> {
        if let Some(r) = self.resampler.as_mut() {
            let tail = r.flush()?;
            self.pending.extend_from_slice(&tail);
        }
        let frame = self.encoder.frame_samples;
        if !self.pending.len().is_multiple_of(frame) {
            let padded = self.pending.len().next_multiple_of(frame);
            self.pending.resize(padded, 0.0);
        }
        self.drain_frames()
    }

    /// Drops everything buffered (a cut answer must not leak into the next one).
    pub fn discard(&mut self) {
        self.pending.clear();
        if let Some(r) = self.resampler.as_mut() {
            r.reset();
        }
    }

    /// One 20 ms packet of silence, to keep the RTP stream continuous between answers.
    pub fn silence(&mut self) -> Result<Vec<u8>, OpusError> {
        let zeros = vec![0.0; self.encoder.frame_samples];
        self.encoder.encode(&zeros)
    }

    fn drain_frames(&mut self) -> Result<Vec<Vec<u8>>, OpusError> {
        let frame = self.encoder.frame_samples;
        let whole = self.pending.len() / frame * frame;
        let packets = self.pending[..whole]
            .chunks_exact(frame)
            .map(|f| self.encoder.encode(f))
            .collect::<Result<Vec<_>, _>>()?;
        self.pending.drain(..whole);
        Ok(packets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f32, rate: u32, len: usize, amp: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * amp)
            .collect()
    }

    fn rms(x: &[f32]) -> f32 {
        (x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32).sqrt()
    }

    /// Frequency estimated from upward zero crossings.
    fn frequency(x: &[f32], rate: u32) -> f32 {
        let ups = x.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count();
        ups as f32 * rate as f32 / x.len() as f32
    }

    #[test]
    fn round_trip_keeps_a_tone_at_48k() {
        let mut enc = OpusEncoder::new(48_000).unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let x = sine(440.0, 48_000, 48_000, 0.5);
        let mut y = Vec::new();
        for f in x.chunks(960) {
            let p = enc.encode(f).unwrap();
            assert_eq!(OpusDecoder::packet_samples(&p).unwrap(), 960);
            y.extend(dec.decode(&p).unwrap());
        }
        assert_eq!(y.len(), 48_000);
        let tail = &y[4_800..];
        assert!((rms(tail) - rms(&x)).abs() < 0.05, "rms {}", rms(tail));
        assert!((frequency(tail, 48_000) - 440.0).abs() < 5.0);
    }

    #[test]
    fn a_48k_stream_decodes_straight_to_16k_with_concealment_at_that_rate() {
        let mut enc = OpusEncoder::new(48_000).unwrap();
        let mut dec = OpusDecoder::with_rate(16_000).unwrap();
        assert_eq!((dec.rate(), dec.ticks_per_sample()), (16_000, 3));
        let x = sine(440.0, 48_000, 48_000, 0.5);
        let mut y = Vec::new();
        for f in x.chunks(960) {
            let p = enc.encode(f).unwrap();
            let out = dec.decode(&p).unwrap();
            assert_eq!(out.len(), 320, "20 ms at 16 kHz");
            y.extend(out);
        }
        let tail = &y[1_600..];
        assert!((rms(tail) - rms(&x)).abs() < 0.05, "rms {}", rms(tail));
        assert!((frequency(tail, 16_000) - 440.0).abs() < 5.0);
        // 20 ms lost: concealed in 2.5 ms steps of the output rate
        assert_eq!(dec.conceal(320).unwrap().len(), 320);
        assert_eq!(dec.conceal(1).unwrap().len(), 40);
        assert!(matches!(
            OpusDecoder::with_rate(44_100),
            Err(OpusError::Rate(44_100))
        ));
    }

    #[test]
    fn stereo_streams_are_downmixed_to_mono() {
        let mut enc =
            opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio).unwrap();
        let left = sine(330.0, 48_000, 960 * 25, 0.6);
        let mut dec = OpusDecoder::new().unwrap();
        let mut y = Vec::new();
        for f in left.chunks(960) {
            // left carries the tone, right is silent: the mono mix is half the tone
            let inter: Vec<f32> = f.iter().flat_map(|&l| [l, 0.0]).collect();
            let p = enc.encode_vec_float(&inter, 4000).unwrap();
            let out = dec.decode(&p).unwrap();
            assert_eq!(out.len(), 960);
            y.extend(out);
        }
        let level = rms(&y[9_600..]);
        assert!(level > 0.15 && level < 0.3, "mono level {level}");
        assert!((frequency(&y[9_600..], 48_000) - 330.0).abs() < 5.0);
    }

    #[test]
    fn loss_is_concealed_and_recovered_from_fec() {
        let mut enc = OpusEncoder::new(48_000).unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let x = sine(300.0, 48_000, 960 * 10, 0.5);
        let packets: Vec<_> = x.chunks(960).map(|f| enc.encode(f).unwrap()).collect();
        for p in &packets[..5] {
            dec.decode(p).unwrap();
        }
        // packet 5 lost: recover it from packet 6's FEC, then decode 6
        let recovered = dec.recover(&packets[6], 960).unwrap();
        assert_eq!(recovered.len(), 960);
        assert!(rms(&recovered) > 0.1, "recovered rms {}", rms(&recovered));
        assert_eq!(dec.decode(&packets[6]).unwrap().len(), 960);
        // a longer gap is concealed
        let concealed = dec.conceal(1_000).unwrap();
        assert_eq!(concealed.len(), 1_080);
    }

    #[test]
    fn garbage_packets_are_errors() {
        let mut dec = OpusDecoder::new().unwrap();
        assert!(matches!(dec.decode(&[]), Err(OpusError::InvalidPacket(_))));
        // code 3 (arbitrary frame count) declaring zero frames
        assert!(dec.decode(&[0x03, 0x00]).is_err());
        // code 3 with 60 frames of 20 ms: 1.2 s, beyond what a packet may hold
        assert!(dec.decode(&[0x0b, 0x3c, 1, 2, 3]).is_err());
        // code 1 (two equal frames) with an odd payload
        assert!(dec.decode(&[0x01, 1, 2, 3]).is_err());
        for seed in 0..200u32 {
            let junk: Vec<u8> = (0..(seed % 40 + 1))
                .map(|i| (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 40_503) >> 13) as u8)
                .collect();
            // whatever libopus makes of it, it is a value, not a crash
            let _ = dec.decode(&junk);
        }
    }

    #[test]
    fn encoder_checks_rate_and_frame_size() {
        assert!(matches!(
            OpusEncoder::new(44_100),
            Err(OpusError::Rate(44_100))
        ));
        let mut enc = OpusEncoder::new(24_000).unwrap();
        assert_eq!(enc.frame_samples(), 480);
        assert!(matches!(
            enc.encode(&[0.0; 100]),
            Err(OpusError::FrameSize {
                got: 100,
                want: 480
            })
        ));
    }

    #[test]
    fn voice_at_24k_is_framed_without_delay() {
        let mut voice = VoiceEncoder::new(24_000).unwrap();
        assert_eq!(voice.input_rate(), 24_000);
        let x = sine(220.0, 24_000, 480 * 50, 0.4);
        // one engine frame in, one packet out
        assert_eq!(voice.push(&x[..480]).unwrap().len(), 1);
        let mut packets = vec![];
        for f in x[480..].chunks(300) {
            packets.extend(voice.push(f).unwrap());
        }
        packets.extend(voice.finish().unwrap());
        assert_eq!(packets.len(), 49);
        let mut dec = OpusDecoder::new().unwrap();
        let y: Vec<f32> = packets
            .iter()
            .flat_map(|p| dec.decode(p).unwrap())
            .collect();
        assert_eq!(y.len(), 49 * 960);
        assert!((frequency(&y[9_600..], 48_000) - 220.0).abs() < 5.0);
    }

    #[test]
    fn voice_at_other_rates_is_resampled_to_48k() {
        let mut voice = VoiceEncoder::new(22_050).unwrap();
        let x = sine(250.0, 22_050, 22_050, 0.4);
        let mut packets = vec![];
        for f in x.chunks(441) {
            packets.extend(voice.push(f).unwrap());
        }
        packets.extend(voice.finish().unwrap());
        // 1 s of voice is 50 frames of 20 ms
        assert_eq!(packets.len(), 50);
        let mut dec = OpusDecoder::new().unwrap();
        let y: Vec<f32> = packets
            .iter()
            .flat_map(|p| dec.decode(p).unwrap())
            .collect();
        assert!((frequency(&y[9_600..], 48_000) - 250.0).abs() < 5.0);
        assert!(rms(&y[9_600..]) > 0.2);
        voice.push(&x[..100]).unwrap();
        voice.discard();
        assert!(voice.finish().unwrap().is_empty());
        assert!(!voice.silence().unwrap().is_empty());
    }
}
