//! What the headless client sends: microphone PCM from a WAV file, camera frames from a Y4M
//! clip, and the encoders that turn those frames into what a browser would send (H.264 through
//! OpenH264, VP8 through libvpx), plus VP8 frames already encoded in an IVF file.

use std::path::Path;
use std::ptr;

use anyhow::{Context, bail};
use vpx_sys as vpx;

use crate::media::video_decode::{RgbFrame, VideoCodec, Y4mReader};

/// A raw 4:2:0 picture: Y, then U, then V planes, packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I420Frame {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// OpenH264 encoder of I420 frames to Annex-B access units (Constrained Baseline, a key frame
/// every second so that a receiver that lost one recovers quickly).
pub struct H264Encoder {
    encoder: openh264::encoder::Encoder,
    width: usize,
    height: usize,
}

impl H264Encoder {
    pub fn new(width: usize, height: usize, fps: f64) -> anyhow::Result<Self> {
        if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            bail!("H.264 frames need even, non-zero dimensions, got {width}x{height}");
        }
        use openh264::encoder::{BitRate, EncoderConfig, FrameRate, IntraFramePeriod};
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(600_000))
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            .intra_frame_period(IntraFramePeriod::from_num_frames(
                fps.round().max(1.0) as u32
            ));
        let encoder = openh264::encoder::Encoder::with_api_config(
            openh264::OpenH264API::from_source(),
            config,
        )
        .map_err(|e| anyhow::anyhow!("H.264 encoder: {e}"))?;
        Ok(Self {
            encoder,
            width,
            height,
        })
    }

    /// One access unit; empty when the encoder skipped the frame.
    pub fn encode(&mut self, frame: &I420Frame) -> anyhow::Result<Vec<u8>> {
        check_encoder_frame(frame, self.width, self.height)?;
        let yuv =
            openh264::formats::YUVBuffer::from_vec(frame.data.clone(), self.width, self.height);
        let stream = self
            .encoder
            .encode(&yuv)
            .map_err(|e| anyhow::anyhow!("H.264 encode: {e}"))?;
        Ok(stream.to_vec())
    }
}

/// Reads a WAV file as mono samples (channels averaged) and its rate.
pub fn read_wav_mono(path: impl AsRef<Path>) -> anyhow::Result<(Vec<f32>, u32)> {
    let path = path.as_ref();
    let mut reader =
        hound::WavReader::open(path).with_context(|| format!("opening {}", path.display()))?;
    let spec = reader.spec();
    let channels = spec.channels.max(1) as usize;
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>()?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()?
        }
    };
    let mono = samples
        .chunks(channels)
        .map(|c| c.iter().sum::<f32>() / channels as f32)
        .collect();
    Ok((mono, spec.sample_rate))
}

/// Reads every frame of a Y4M clip (at most `max_frames`) and its frame rate.
pub fn read_y4m(
    path: impl AsRef<Path>,
    max_frames: usize,
) -> anyhow::Result<(Vec<I420Frame>, f64)> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = Y4mReader::new(std::io::BufReader::new(file))?;
    let fps = reader.frame_rate.0 as f64 / reader.frame_rate.1 as f64;
    let mut frames = vec![];
    while frames.len() < max_frames {
        let Some(data) = reader.next_i420()? else {
            break;
        };
        frames.push(I420Frame {
            width: reader.width,
            height: reader.height,
            data,
        });
    }
    Ok((frames, fps))
}

/// Reads the frames of an IVF file (VP8 from ffmpeg, say).
pub fn read_ivf(path: impl AsRef<Path>) -> anyhow::Result<Vec<Vec<u8>>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < 32 || &bytes[..4] != b"DKIF" {
        bail!("{} is not an IVF file", path.display());
    }
    let mut at = u16::from_le_bytes([bytes[6], bytes[7]]) as usize;
    let mut frames = vec![];
    while at + 12 <= bytes.len() {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let body = bytes
            .get(at + 12..at + 12 + len)
            .with_context(|| format!("{}: frame cut short", path.display()))?;
        frames.push(body.to_vec());
        at += 12 + len;
    }
    Ok(frames)
}

/// Converts an RGB frame to I420 (for encoding).
pub fn rgb_to_i420(frame: &RgbFrame) -> anyhow::Result<I420Frame> {
    if !frame.width.is_multiple_of(2) || !frame.height.is_multiple_of(2) {
        bail!(
            "I420 needs even dimensions, got {}x{}",
            frame.width,
            frame.height
        );
    }
    let rgb = openh264::formats::RgbSliceU8::new(&frame.data, (frame.width, frame.height));
    let yuv = openh264::formats::YUVBuffer::from_rgb8_source(rgb);
    use openh264::formats::YUVSource;
    let mut data = Vec::with_capacity(frame.width * frame.height * 3 / 2);
    data.extend_from_slice(yuv.y());
    data.extend_from_slice(yuv.u());
    data.extend_from_slice(yuv.v());
    Ok(I420Frame {
        width: frame.width,
        height: frame.height,
        data,
    })
}

/// Either camera encoder behind one interface.
pub enum FrameEncoder {
    H264(Box<H264Encoder>),
    Vp8(Vp8Encoder),
}

impl FrameEncoder {
    pub fn new(codec: VideoCodec, width: usize, height: usize, fps: f64) -> anyhow::Result<Self> {
        Ok(match codec {
            VideoCodec::H264 => FrameEncoder::H264(Box::new(H264Encoder::new(width, height, fps)?)),
            VideoCodec::Vp8 => FrameEncoder::Vp8(Vp8Encoder::new(width, height, fps)?),
        })
    }

    /// One encoded frame (an H.264 access unit or a VP8 frame); empty when skipped.
    pub fn encode(&mut self, frame: &I420Frame) -> anyhow::Result<Vec<u8>> {
        match self {
            FrameEncoder::H264(e) => e.encode(frame),
            FrameEncoder::Vp8(e) => e.encode(frame),
        }
    }
}

/// libvpx VP8 encoder of I420 frames, tuned as a browser's camera stream is (real time, no
/// look-ahead, a key frame every second).
pub struct Vp8Encoder {
    ctx: Box<vpx::vpx_codec_ctx_t>,
    width: usize,
    height: usize,
    pts: i64,
    force_keyframe: bool,
}

// The codec context is owned by this value alone and libvpx keeps no thread affinity.
unsafe impl Send for Vp8Encoder {}

impl Vp8Encoder {
    pub fn new(width: usize, height: usize, fps: f64) -> anyhow::Result<Self> {
        if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            bail!("VP8 frames need even, non-zero dimensions, got {width}x{height}");
        }
        let fps = fps.round().clamp(1.0, 120.0) as u32;
        let mut cfg = std::mem::MaybeUninit::<vpx::vpx_codec_enc_cfg_t>::uninit();
        // SAFETY: the interface is a static of libvpx; cfg is valid for writing.
        let err = unsafe {
            vpx::vpx_codec_enc_config_default(vpx::vpx_codec_vp8_cx(), cfg.as_mut_ptr(), 0)
        };
        if err != vpx::vpx_codec_err_t::VPX_CODEC_OK {
            bail!("VP8 encoder defaults: {err:?}");
        }
        // SAFETY: filled in by vpx_codec_enc_config_default, which succeeded.
        let mut cfg = unsafe { cfg.assume_init() };
        cfg.g_w = width as u32;
        cfg.g_h = height as u32;
        cfg.g_timebase = vpx::vpx_rational {
            num: 1,
            den: fps as i32,
        };
        cfg.g_lag_in_frames = 0;
        cfg.g_threads = 1;
        cfg.rc_end_usage = vpx::vpx_rc_mode::VPX_CBR;
        cfg.rc_target_bitrate = 600;
        cfg.kf_max_dist = fps;
        // SAFETY: zeroed context to be initialised; cfg outlives the call.
        let mut ctx: Box<vpx::vpx_codec_ctx_t> = Box::new(unsafe { std::mem::zeroed() });
        let err = unsafe {
            vpx::vpx_codec_enc_init_ver(
                ctx.as_mut(),
                vpx::vpx_codec_vp8_cx(),
                &cfg,
                0,
                vpx::VPX_ENCODER_ABI_VERSION as i32,
            )
        };
        if err != vpx::vpx_codec_err_t::VPX_CODEC_OK {
            bail!("VP8 encoder init: {err:?}");
        }
        Ok(Self {
            ctx,
            width,
            height,
            pts: 0,
            force_keyframe: false,
        })
    }

    /// Makes the next frame a key frame (as a sender does on a picture loss indication).
    pub fn force_keyframe(&mut self) {
        self.force_keyframe = true;
    }

    /// One encoded frame; empty when the encoder dropped the frame (rate control).
    pub fn encode(&mut self, frame: &I420Frame) -> anyhow::Result<Vec<u8>> {
        check_encoder_frame(frame, self.width, self.height)?;
        // SAFETY: the image is filled in by vpx_img_wrap; it points into `frame.data`, which
        // outlives the encode call, and libvpx only reads from it.
        let mut img = std::mem::MaybeUninit::<vpx::vpx_image_t>::uninit();
        let wrapped = unsafe {
            vpx::vpx_img_wrap(
                img.as_mut_ptr(),
                vpx::vpx_img_fmt::VPX_IMG_FMT_I420,
                self.width as u32,
                self.height as u32,
                1,
                frame.data.as_ptr() as *mut u8,
            )
        };
        if wrapped.is_null() {
            bail!("VP8: cannot wrap a {}x{} frame", self.width, self.height);
        }
        // SAFETY: filled in by vpx_img_wrap, which succeeded.
        let img = unsafe { img.assume_init() };
        let flags = if std::mem::take(&mut self.force_keyframe) {
            vpx::VPX_EFLAG_FORCE_KF as i64
        } else {
            0
        };
        // SAFETY: context initialised in `new`; img valid for the call.
        let err = unsafe {
            vpx::vpx_codec_encode(
                self.ctx.as_mut(),
                &img,
                self.pts,
                1,
                flags,
                vpx::VPX_DL_REALTIME as _,
            )
        };
        self.pts += 1;
        if err != vpx::vpx_codec_err_t::VPX_CODEC_OK {
            bail!("VP8 encode: {err:?}");
        }
        let mut out = vec![];
        let mut iter: vpx::vpx_codec_iter_t = ptr::null();
        loop {
            // SAFETY: packets belong to the context and stay valid until the next encode call;
            // their bytes are copied out here.
            let pkt = unsafe { vpx::vpx_codec_get_cx_data(self.ctx.as_mut(), &mut iter) };
            if pkt.is_null() {
                break;
            }
            let pkt = unsafe { &*pkt };
            if pkt.kind == vpx::vpx_codec_cx_pkt_kind::VPX_CODEC_CX_FRAME_PKT {
                let f = unsafe { pkt.data.frame };
                if !f.buf.is_null() {
                    out.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(f.buf as *const u8, f.sz as usize)
                    });
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Vp8Encoder {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, destroyed once.
        unsafe {
            vpx::vpx_codec_destroy(self.ctx.as_mut());
        }
    }
}

/// A frame an encoder of `width`x`height` can take: its size, and I420's byte count.
fn check_encoder_frame(frame: &I420Frame, width: usize, height: usize) -> anyhow::Result<()> {
    if (frame.width, frame.height) != (width, height) {
        bail!(
            "frame of {}x{} for an encoder of {width}x{height}",
            frame.width,
            frame.height
        );
    }
    let want = width * height * 3 / 2;
    if frame.data.len() != want {
        bail!("I420 frame of {} bytes, expected {want}", frame.data.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::video_decode::{H264Decoder, Vp8Decoder};

    fn media(name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/media")
            .join(name)
    }

    #[test]
    fn test_media_reads() {
        let (pcm, rate) = read_wav_mono(media("hello16k.wav")).unwrap();
        assert_eq!(rate, 16_000);
        assert!(pcm.len() > 16_000 * 2);
        assert!(pcm.iter().any(|s| s.abs() > 0.1));
        let (frames, fps) = read_y4m(media("testsrc_96x64.y4m"), 100).unwrap();
        assert_eq!((frames.len(), fps), (6, 10.0));
        assert_eq!(frames[0].data.len(), 96 * 64 * 3 / 2);
        let ivf = read_ivf(media("testsrc_96x64.ivf")).unwrap();
        assert_eq!(ivf.len(), 6);
        assert!(read_ivf(media("hello16k.wav")).is_err());
        assert!(read_wav_mono(media("no-such.wav")).is_err());
    }

    #[test]
    fn h264_encoder_output_decodes() {
        let (frames, fps) = read_y4m(media("testsrc_96x64.y4m"), 100).unwrap();
        let mut enc = H264Encoder::new(96, 64, fps).unwrap();
        let mut dec = H264Decoder::new(96 * 64).unwrap();
        let mut decoded = 0;
        for f in &frames {
            let au = enc.encode(f).unwrap();
            if au.is_empty() {
                continue;
            }
            if dec.decode(&au).unwrap().is_some() {
                decoded += 1;
            }
        }
        assert_eq!(decoded, frames.len());
        assert!(H264Encoder::new(95, 64, 10.0).is_err());
        let bad = I420Frame {
            width: 96,
            height: 64,
            data: vec![0; 10],
        };
        assert!(enc.encode(&bad).is_err());
    }

    #[test]
    fn vp8_encoder_output_decodes_to_the_source() {
        let (frames, fps) = read_y4m(media("testsrc_96x64.y4m"), 100).unwrap();
        let mut enc = Vp8Encoder::new(96, 64, fps).unwrap();
        let mut dec = Vp8Decoder::new(96 * 64).unwrap();
        let mut keyframes = 0;
        for (i, f) in frames.iter().enumerate() {
            if i == 3 {
                enc.force_keyframe();
            }
            let encoded = enc.encode(f).unwrap();
            assert!(!encoded.is_empty(), "frame {i} dropped");
            if Vp8Decoder::key_frame_size(&encoded).unwrap().is_some() {
                keyframes += 1;
            }
            let rgb = dec.decode(&encoded).unwrap().expect("a picture");
            assert_eq!((rgb.width, rgb.height), (96, 64));
            // the picture resembles the source (mean over the frame within a few levels)
            let mean = |d: &[u8]| d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64;
            let src = mean(&f.data[..96 * 64]);
            let got = rgb.data.iter().step_by(3).map(|&v| v as f64).sum::<f64>() / (96.0 * 64.0);
            assert!(src > 20.0 && got > 20.0, "luma {src}, red {got}");
        }
        assert_eq!(keyframes, 2);
        assert!(Vp8Encoder::new(96, 63, 10.0).is_err());
    }

    #[test]
    fn rgb_frames_convert_to_i420() {
        let frame = RgbFrame {
            width: 4,
            height: 2,
            data: vec![255; 24],
        };
        let i420 = rgb_to_i420(&frame).unwrap();
        assert_eq!(i420.data.len(), 12);
        assert!(i420.data[0] > 200);
        let odd = RgbFrame {
            width: 3,
            height: 2,
            data: vec![0; 18],
        };
        assert!(rgb_to_i420(&odd).is_err());
    }
}
