//! In-process video decoding: VP8 (libvpx) and H.264 (OpenH264) to RGB frames, plus a reader of
//! raw Y4M clips (test media, the headless client's camera).
//!
//! Both decoders take one complete encoded frame at a time (a VP8 frame; an H.264 access unit
//! in Annex-B form) and return the picture it completes, or `None` while the decoder needs more
//! data. A frame whose size exceeds the pixel limit is refused with
//! [`VideoDecodeError::TooLarge`] *before* the codec allocates anything for it: the VP8 key
//! frame header and the H.264 sequence parameter set are read first.

use std::ffi::CStr;
use std::io::BufRead;
use std::ptr;

use openh264::formats::YUVSource;
use vpx_sys as vpx;

/// 4K UHD: more than any camera a browser sends to a call.
pub const DEFAULT_MAX_PIXELS: usize = 3840 * 2160;

/// A decoded picture: packed RGB, 3 bytes a pixel, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbFrame {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum VideoDecodeError {
    #[error("{codec} frame of {width}x{height} exceeds the limit of {max_pixels} pixels")]
    TooLarge {
        codec: &'static str,
        width: usize,
        height: usize,
        max_pixels: usize,
    },
    #[error("corrupt {codec} data: {detail}")]
    Corrupt { codec: &'static str, detail: String },
    #[error("{codec} decoder: {detail}")]
    Decoder { codec: &'static str, detail: String },
    #[error("y4m: {0}")]
    Y4m(String),
    #[error("y4m: {0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, VideoDecodeError>;

fn check_size(codec: &'static str, width: usize, height: usize, max_pixels: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(VideoDecodeError::Corrupt {
            codec,
            detail: format!("frame size {width}x{height}"),
        });
    }
    if width.saturating_mul(height) > max_pixels {
        return Err(VideoDecodeError::TooLarge {
            codec,
            width,
            height,
            max_pixels,
        });
    }
    Ok(())
}

/// A borrowed 4:2:0 picture as a decoder outputs it (planes with strides).
#[derive(Debug, Clone, Copy)]
pub struct Yuv420<'a> {
    pub width: usize,
    pub height: usize,
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub y_stride: usize,
    pub uv_stride: usize,
    /// Full-range (JPEG) levels rather than the video range 16..235.
    pub full_range: bool,
}

impl Yuv420<'_> {
    /// Converts to packed RGB with the BT.601 matrix that WebRTC's VP8 and H.264 encoders use.
    /// Rows missing from a short plane repeat the last one present, so a malformed picture
    /// never reads out of bounds.
    pub fn to_rgb(&self) -> RgbFrame {
        let (w, h) = (self.width, self.height);
        let mut data = vec![0u8; w * h * 3];
        let y_rows = self.y.len() / self.y_stride.max(1);
        let uv_rows = self.u.len().min(self.v.len()) / self.uv_stride.max(1);
        if y_rows == 0 || uv_rows == 0 || self.y_stride < w || self.uv_stride < w.div_ceil(2) {
            return RgbFrame {
                width: w,
                height: h,
                data,
            };
        }
        // Fixed point (x256) coefficients of BT.601.
        let (ys, yo, cr_r, cb_g, cr_g, cb_b) = if self.full_range {
            (256, 0, 359, 88, 183, 454)
        } else {
            (298, 16, 409, 100, 208, 516)
        };
        for row in 0..h {
            let y_row = &self.y[row.min(y_rows - 1) * self.y_stride..][..w];
            let c = (row / 2).min(uv_rows - 1) * self.uv_stride;
            let u_row = &self.u[c..];
            let v_row = &self.v[c..];
            let out = &mut data[row * w * 3..(row + 1) * w * 3];
            for (col, px) in out.chunks_exact_mut(3).enumerate() {
                let luma = (y_row[col] as i32 - yo) * ys;
                let cb = u_row[col / 2] as i32 - 128;
                let cr = v_row[col / 2] as i32 - 128;
                px[0] = ((luma + cr_r * cr + 128) >> 8).clamp(0, 255) as u8;
                px[1] = ((luma - cb_g * cb - cr_g * cr + 128) >> 8).clamp(0, 255) as u8;
                px[2] = ((luma + cb_b * cb + 128) >> 8).clamp(0, 255) as u8;
            }
        }
        RgbFrame {
            width: w,
            height: h,
            data,
        }
    }
}

/// The codecs a call may carry video in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    Vp8,
    H264,
}

impl VideoCodec {
    pub fn name(self) -> &'static str {
        match self {
            VideoCodec::Vp8 => "VP8",
            VideoCodec::H264 => "H.264",
        }
    }
}

/// Either decoder behind one interface.
pub enum VideoDecoder {
    Vp8(Vp8Decoder),
    H264(H264Decoder),
}

impl VideoDecoder {
    pub fn new(codec: VideoCodec, max_pixels: usize) -> Result<Self> {
        Ok(match codec {
            VideoCodec::Vp8 => VideoDecoder::Vp8(Vp8Decoder::new(max_pixels)?),
            VideoCodec::H264 => VideoDecoder::H264(H264Decoder::new(max_pixels)?),
        })
    }

    pub fn codec(&self) -> VideoCodec {
        match self {
            VideoDecoder::Vp8(_) => VideoCodec::Vp8,
            VideoDecoder::H264(_) => VideoCodec::H264,
        }
    }

    /// Decodes one frame; the picture stays valid until the next call.
    pub fn decode_yuv(&mut self, frame: &[u8]) -> Result<Option<Yuv420<'_>>> {
        match self {
            VideoDecoder::Vp8(d) => d.decode_yuv(frame),
            VideoDecoder::H264(d) => d.decode_yuv(frame),
        }
    }

    pub fn decode(&mut self, frame: &[u8]) -> Result<Option<RgbFrame>> {
        Ok(self.decode_yuv(frame)?.map(|p| p.to_rgb()))
    }
}

/// VP8 through libvpx.
pub struct Vp8Decoder {
    ctx: Box<vpx::vpx_codec_ctx_t>,
    max_pixels: usize,
}

// The codec context is owned by this value alone and libvpx keeps no thread affinity.
unsafe impl Send for Vp8Decoder {}

const VP8: &str = "VP8";

impl Vp8Decoder {
    pub fn new(max_pixels: usize) -> Result<Self> {
        // SAFETY: a zeroed context is what vpx_codec_dec_init_ver expects to fill in.
        let mut ctx: Box<vpx::vpx_codec_ctx_t> = Box::new(unsafe { std::mem::zeroed() });
        let cfg = vpx::vpx_codec_dec_cfg_t {
            threads: 1,
            w: 0,
            h: 0,
        };
        // SAFETY: ctx and cfg are valid for the call; the interface is a static of libvpx.
        let err = unsafe {
            vpx::vpx_codec_dec_init_ver(
                ctx.as_mut(),
                vpx::vpx_codec_vp8_dx(),
                &cfg,
                0,
                vpx::VPX_DECODER_ABI_VERSION as i32,
            )
        };
        if err != vpx::vpx_codec_err_t::VPX_CODEC_OK {
            return Err(VideoDecodeError::Decoder {
                codec: VP8,
                detail: format!("init failed ({err:?})"),
            });
        }
        Ok(Self { ctx, max_pixels })
    }

    /// The size a key frame declares (RFC 6386 §9.1), `None` for an inter frame.
    pub fn key_frame_size(frame: &[u8]) -> Result<Option<(usize, usize)>> {
        let Some(&tag) = frame.first() else {
            return Err(VideoDecodeError::Corrupt {
                codec: VP8,
                detail: "empty frame".into(),
            });
        };
        if tag & 1 != 0 {
            return Ok(None);
        }
        if frame.len() < 10 {
            return Err(VideoDecodeError::Corrupt {
                codec: VP8,
                detail: format!("key frame of {} bytes", frame.len()),
            });
        }
        if frame[3..6] != [0x9d, 0x01, 0x2a] {
            return Err(VideoDecodeError::Corrupt {
                codec: VP8,
                detail: "key frame without the start code".into(),
            });
        }
        let width = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
        let height = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
        Ok(Some((width as usize, height as usize)))
    }

    fn error_detail(&mut self) -> String {
        // SAFETY: libvpx returns NUL-terminated static or context-owned strings (or null).
        unsafe {
            let msg = vpx::vpx_codec_error(self.ctx.as_mut());
            let detail = vpx::vpx_codec_error_detail(self.ctx.as_mut());
            let mut s = if msg.is_null() {
                String::from("unknown error")
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            };
            if !detail.is_null() {
                s.push_str(": ");
                s.push_str(&CStr::from_ptr(detail).to_string_lossy());
            }
            s
        }
    }

    pub fn decode_yuv(&mut self, frame: &[u8]) -> Result<Option<Yuv420<'_>>> {
        if let Some((w, h)) = Self::key_frame_size(frame)? {
            check_size(VP8, w, h, self.max_pixels)?;
        }
        let len = u32::try_from(frame.len()).map_err(|_| VideoDecodeError::TooLarge {
            codec: VP8,
            width: 0,
            height: 0,
            max_pixels: self.max_pixels,
        })?;
        // SAFETY: the data pointer and length describe `frame`, alive for the call.
        let err = unsafe {
            vpx::vpx_codec_decode(self.ctx.as_mut(), frame.as_ptr(), len, ptr::null_mut(), 0)
        };
        if err != vpx::vpx_codec_err_t::VPX_CODEC_OK {
            return Err(VideoDecodeError::Corrupt {
                codec: VP8,
                detail: self.error_detail(),
            });
        }
        let mut iter: vpx::vpx_codec_iter_t = ptr::null();
        // SAFETY: the iterator starts null; the image belongs to the context and stays valid
        // until the next decode call, which needs `&mut self` and so ends the borrow below.
        let img = unsafe { vpx::vpx_codec_get_frame(self.ctx.as_mut(), &mut iter) };
        if img.is_null() {
            return Ok(None);
        }
        // SAFETY: non-null image returned by libvpx.
        let img = unsafe { &*img };
        if img.fmt != vpx::vpx_img_fmt::VPX_IMG_FMT_I420 {
            return Err(VideoDecodeError::Decoder {
                codec: VP8,
                detail: format!("unexpected picture format {:?}", img.fmt),
            });
        }
        let (w, h) = (img.d_w as usize, img.d_h as usize);
        check_size(VP8, w, h, self.max_pixels)?;
        let (ys, us, vs) = (
            img.stride[0] as usize,
            img.stride[1] as usize,
            img.stride[2] as usize,
        );
        if us != vs || ys < w || us < w.div_ceil(2) {
            return Err(VideoDecodeError::Decoder {
                codec: VP8,
                detail: format!("unexpected strides {ys}/{us}/{vs} for width {w}"),
            });
        }
        let ch = h.div_ceil(2);
        // SAFETY: libvpx planes hold `stride * rows` bytes for the displayed size.
        let (y, u, v) = unsafe {
            (
                std::slice::from_raw_parts(img.planes[0], ys * h),
                std::slice::from_raw_parts(img.planes[1], us * ch),
                std::slice::from_raw_parts(img.planes[2], vs * ch),
            )
        };
        Ok(Some(Yuv420 {
            width: w,
            height: h,
            y,
            u,
            v,
            y_stride: ys,
            uv_stride: us,
            full_range: img.range == vpx::vpx_color_range::VPX_CR_FULL_RANGE,
        }))
    }

    pub fn decode(&mut self, frame: &[u8]) -> Result<Option<RgbFrame>> {
        Ok(self.decode_yuv(frame)?.map(|p| p.to_rgb()))
    }
}

impl Drop for Vp8Decoder {
    fn drop(&mut self) {
        // SAFETY: the context was initialised in `new` and is destroyed once.
        unsafe {
            vpx::vpx_codec_destroy(self.ctx.as_mut());
        }
    }
}

/// H.264 through OpenH264 (Constrained Baseline, as browsers send it).
pub struct H264Decoder {
    decoder: openh264::decoder::Decoder,
    max_pixels: usize,
    /// The last picture's visible planes, packed (Y, U, V).
    planes: Vec<u8>,
}

const H264: &str = "H.264";

impl H264Decoder {
    pub fn new(max_pixels: usize) -> Result<Self> {
        let config = openh264::decoder::DecoderConfig::new()
            .flush_after_decode(openh264::decoder::Flush::NoFlush);
        let decoder = openh264::decoder::Decoder::with_api_config(
            openh264::OpenH264API::from_source(),
            config,
        )
        .map_err(|e| VideoDecodeError::Decoder {
            codec: H264,
            detail: e.to_string(),
        })?;
        Ok(Self {
            decoder,
            max_pixels,
            planes: Vec::new(),
        })
    }

    /// Decodes one access unit (Annex-B NAL units with start codes).
    pub fn decode_yuv(&mut self, access_unit: &[u8]) -> Result<Option<Yuv420<'_>>> {
        let mut nals = 0;
        for nal in annex_b_nal_units(access_unit) {
            nals += 1;
            if nal.first().map(|b| b & 0x1f) == Some(NAL_SPS) {
                let (w, h) = sps_picture_size(nal)?;
                check_size(H264, w, h, self.max_pixels)?;
            }
        }
        if nals == 0 {
            return Err(VideoDecodeError::Corrupt {
                codec: H264,
                detail: "no NAL unit in the access unit".into(),
            });
        }
        let picture = self
            .decoder
            .decode(access_unit)
            .map_err(|e| VideoDecodeError::Corrupt {
                codec: H264,
                detail: e.to_string(),
            })?;
        let Some(picture) = picture else {
            return Ok(None);
        };
        let (w, h) = copy_picture(&mut self.planes, &picture, self.max_pixels)?;
        Ok(Some(planes_yuv(&self.planes, w, h)))
    }

    pub fn decode(&mut self, access_unit: &[u8]) -> Result<Option<RgbFrame>> {
        Ok(self.decode_yuv(access_unit)?.map(|p| p.to_rgb()))
    }

    /// The pictures the decoder still holds back at the end of a stream (with B-frames the
    /// output runs behind the input), in display order.
    pub fn flush(&mut self) -> Result<Vec<RgbFrame>> {
        let pictures = self
            .decoder
            .flush_remaining()
            .map_err(|e| VideoDecodeError::Corrupt {
                codec: H264,
                detail: e.to_string(),
            })?;
        let mut frames = Vec::with_capacity(pictures.len());
        for picture in &pictures {
            let (w, h) = copy_picture(&mut self.planes, picture, self.max_pixels)?;
            frames.push(planes_yuv(&self.planes, w, h).to_rgb());
        }
        Ok(frames)
    }
}

/// Copies the visible part of an OpenH264 picture into `planes` (Y, U, V packed): the
/// picture borrows the decoder, the copy (cheap next to decoding) can outlive the call.
/// Returns its size.
fn copy_picture(
    planes: &mut Vec<u8>,
    picture: &openh264::decoder::DecodedYUV<'_>,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let (w, h) = picture.dimensions();
    check_size(H264, w, h, max_pixels)?;
    let (ys, us, vs) = picture.strides();
    if us != vs || ys < w || us < w.div_ceil(2) {
        return Err(VideoDecodeError::Decoder {
            codec: H264,
            detail: format!("unexpected strides {ys}/{us}/{vs} for width {w}"),
        });
    }
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    planes.clear();
    copy_plane(planes, picture.y(), ys, w, h);
    copy_plane(planes, picture.u(), us, cw, ch);
    copy_plane(planes, picture.v(), vs, cw, ch);
    Ok((w, h))
}

/// The packed planes [`copy_picture`] wrote, as a picture.
fn planes_yuv(planes: &[u8], w: usize, h: usize) -> Yuv420<'_> {
    let cw = w.div_ceil(2);
    let (y, rest) = planes.split_at(w * h);
    let (u, v) = rest.split_at(cw * h.div_ceil(2));
    Yuv420 {
        width: w,
        height: h,
        y,
        u,
        v,
        y_stride: w,
        uv_stride: cw,
        full_range: false,
    }
}

/// Appends `rows` rows of `width` bytes of a plane with `stride`; rows the plane lacks (a short
/// buffer from a broken stream) are filled with mid grey.
fn copy_plane(out: &mut Vec<u8>, plane: &[u8], stride: usize, width: usize, rows: usize) {
    for r in 0..rows {
        match plane.get(r * stride..r * stride + width) {
            Some(row) => out.extend_from_slice(row),
            None => out.resize(out.len() + width, 128),
        }
    }
}

const NAL_SPS: u8 = 7;

/// The NAL units of an Annex-B byte stream (without their start codes).
pub fn annex_b_nal_units(stream: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|&s| {
            // the unit ends before the next start code, and its optional leading zero
            let mut e = s - 3;
            while e > 0 && stream[e - 1] == 0 {
                e -= 1;
            }
            e
        })
        .chain(std::iter::once(stream.len()))
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .filter(|(s, e)| e > s)
        .map(move |(s, e)| &stream[s..e])
}

/// Reads RBSP bits of a NAL unit, skipping emulation-prevention bytes.
struct BitReader<'a> {
    data: &'a [u8],
    byte: usize,
    bit: u8,
    zeros: usize,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            byte: 0,
            bit: 0,
            zeros: 0,
        }
    }

    fn truncated() -> VideoDecodeError {
        VideoDecodeError::Corrupt {
            codec: H264,
            detail: "truncated sequence parameter set".into(),
        }
    }

    fn bit(&mut self) -> Result<u32> {
        if self.bit == 0 {
            // 0x000003 -> the 03 is not data
            if self.zeros >= 2 && self.data.get(self.byte) == Some(&3) {
                self.byte += 1;
                self.zeros = 0;
            }
            let &b = self.data.get(self.byte).ok_or_else(Self::truncated)?;
            self.zeros = if b == 0 { self.zeros + 1 } else { 0 };
        }
        let &b = self.data.get(self.byte).ok_or_else(Self::truncated)?;
        let v = (b >> (7 - self.bit)) & 1;
        self.bit += 1;
        if self.bit == 8 {
            self.bit = 0;
            self.byte += 1;
        }
        Ok(v as u32)
    }

    fn bits(&mut self, n: u32) -> Result<u32> {
        (0..n).try_fold(0, |acc, _| Ok((acc << 1) | self.bit()?))
    }

    fn ue(&mut self) -> Result<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return Err(VideoDecodeError::Corrupt {
                    codec: H264,
                    detail: "Exp-Golomb code longer than 32 bits".into(),
                });
            }
        }
        Ok(((1u64 << zeros) - 1 + self.bits(zeros)? as u64) as u32)
    }

    fn se(&mut self) -> Result<i64> {
        let k = self.ue()? as i64;
        Ok(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// The coded picture size (before cropping) a sequence parameter set declares (H.264 §7.3.2.1).
pub fn sps_picture_size(nal: &[u8]) -> Result<(usize, usize)> {
    let mut r = BitReader::new(nal);
    let _header = r.bits(8)?;
    let profile_idc = r.bits(8)?;
    let _constraints_and_level = r.bits(16)?;
    let _sps_id = r.ue()?;
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        let chroma_format_idc = r.ue()?;
        if chroma_format_idc == 3 {
            r.bit()?;
        }
        r.ue()?; // bit_depth_luma_minus8
        r.ue()?; // bit_depth_chroma_minus8
        r.bit()?; // qpprime_y_zero_transform_bypass_flag
        if r.bit()? == 1 {
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? == 1 {
                    let size = if i < 6 { 16 } else { 64 };
                    let (mut last, mut next) = (8i64, 8i64);
                    for _ in 0..size {
                        if next != 0 {
                            next = (last + r.se()? + 256).rem_euclid(256);
                        }
                        last = if next == 0 { last } else { next };
                    }
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?;
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            let cycle = r.ue()?;
            if cycle > 255 {
                return Err(VideoDecodeError::Corrupt {
                    codec: H264,
                    detail: format!("{cycle} reference frames in the POC cycle"),
                });
            }
            for _ in 0..cycle {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = r.ue()? as usize + 1;
    let height_units = r.ue()? as usize + 1;
    let frame_mbs_only = r.bit()? as usize;
    Ok((width_mbs * 16, (2 - frame_mbs_only) * height_units * 16))
}

/// A raw 4:2:0 Y4M clip read frame by frame.
pub struct Y4mReader<R> {
    reader: R,
    pub width: usize,
    pub height: usize,
    /// Frames per second (numerator, denominator).
    pub frame_rate: (u32, u32),
    full_range: bool,
}

impl<R: BufRead> Y4mReader<R> {
    pub fn new(mut reader: R) -> Result<Self> {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let mut tokens = header.split_ascii_whitespace();
        if tokens.next() != Some("YUV4MPEG2") {
            return Err(VideoDecodeError::Y4m("missing YUV4MPEG2 signature".into()));
        }
        let (mut width, mut height, mut frame_rate) = (0, 0, (30, 1));
        let mut full_range = false;
        for t in tokens {
            let (tag, value) = t.split_at(1);
            match tag {
                "W" => width = value.parse().unwrap_or(0),
                "H" => height = value.parse().unwrap_or(0),
                "F" => {
                    if let Some((n, d)) = value.split_once(':') {
                        frame_rate = (n.parse().unwrap_or(30), d.parse().unwrap_or(1));
                    }
                }
                "C" if !value.starts_with("420") => {
                    return Err(VideoDecodeError::Y4m(format!(
                        "colour space C{value} (only 4:2:0 is read)"
                    )));
                }
                "X" if value == "COLORRANGE=FULL" => full_range = true,
                _ => {}
            }
        }
        if width == 0 || height == 0 || width * height > DEFAULT_MAX_PIXELS {
            return Err(VideoDecodeError::Y4m(format!(
                "frame size {width}x{height}"
            )));
        }
        if frame_rate.0 == 0 || frame_rate.1 == 0 {
            frame_rate = (30, 1);
        }
        Ok(Self {
            reader,
            width,
            height,
            frame_rate,
            full_range,
        })
    }

    /// The next frame as I420 planes concatenated (Y, then U, then V), `None` at the end.
    pub fn next_i420(&mut self) -> Result<Option<Vec<u8>>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.starts_with("FRAME") {
            return Err(VideoDecodeError::Y4m(format!(
                "expected a FRAME header, found {:?}",
                line.chars().take(16).collect::<String>()
            )));
        }
        let (w, h) = (self.width, self.height);
        let len = w * h + 2 * w.div_ceil(2) * h.div_ceil(2);
        let mut data = vec![0; len];
        self.reader.read_exact(&mut data)?;
        Ok(Some(data))
    }

    /// The next frame converted to RGB, `None` at the end.
    pub fn next_rgb(&mut self) -> Result<Option<RgbFrame>> {
        let Some(data) = self.next_i420()? else {
            return Ok(None);
        };
        let (w, h) = (self.width, self.height);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let (y, rest) = data.split_at(w * h);
        let (u, v) = rest.split_at(cw * ch);
        Ok(Some(
            Yuv420 {
                width: w,
                height: h,
                y,
                u,
                v,
                y_stride: w,
                uv_stride: cw,
                full_range: self.full_range,
            }
            .to_rgb(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn media(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/media")
            .join(name)
    }

    fn reference_frames() -> Vec<RgbFrame> {
        let file = std::fs::File::open(media("testsrc_96x64.y4m")).unwrap();
        let mut y4m = Y4mReader::new(std::io::BufReader::new(file)).unwrap();
        assert_eq!((y4m.width, y4m.height), (96, 64));
        let mut frames = vec![];
        while let Some(f) = y4m.next_rgb().unwrap() {
            frames.push(f);
        }
        frames
    }

    fn psnr(a: &RgbFrame, b: &RgbFrame) -> f64 {
        assert_eq!((a.width, a.height), (b.width, b.height));
        let mse = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            / a.data.len() as f64;
        10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10()
    }

    /// Frames of an IVF file (32-byte header, 12-byte frame headers).
    fn ivf_frames(bytes: &[u8]) -> Vec<&[u8]> {
        let mut frames = vec![];
        let mut at = u16::from_le_bytes([bytes[6], bytes[7]]) as usize;
        while at + 12 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            frames.push(&bytes[at + 12..at + 12 + len]);
            at += 12 + len;
        }
        frames
    }

    /// Access units of an Annex-B stream, split before each slice that starts a picture
    /// (first_mb_in_slice == 0, the first bit after the header set).
    fn access_units(stream: &[u8]) -> Vec<Vec<u8>> {
        let mut units: Vec<Vec<u8>> = vec![];
        let mut current: Vec<u8> = vec![];
        let mut has_slice = false;
        for nal in annex_b_nal_units(stream) {
            let kind = nal[0] & 0x1f;
            let starts_picture = matches!(kind, 1 | 5) && nal.len() > 1 && nal[1] & 0x80 != 0;
            if (starts_picture || matches!(kind, 7..=9)) && has_slice {
                units.push(std::mem::take(&mut current));
                has_slice = false;
            }
            current.extend_from_slice(&[0, 0, 0, 1]);
            current.extend_from_slice(nal);
            has_slice |= matches!(kind, 1 | 5);
        }
        if !current.is_empty() {
            units.push(current);
        }
        units
    }

    #[test]
    fn vp8_clip_decodes_to_the_source_pictures() {
        let reference = reference_frames();
        let bytes = std::fs::read(media("testsrc_96x64.ivf")).unwrap();
        let mut dec = Vp8Decoder::new(DEFAULT_MAX_PIXELS).unwrap();
        let frames = ivf_frames(&bytes);
        assert_eq!(frames.len(), reference.len());
        assert_eq!(
            Vp8Decoder::key_frame_size(frames[0]).unwrap(),
            Some((96, 64))
        );
        for (i, f) in frames.iter().enumerate() {
            let rgb = dec.decode(f).unwrap().expect("one picture per VP8 frame");
            let q = psnr(&rgb, &reference[i]);
            assert!(q > 24.0, "frame {i}: psnr {q:.1} dB");
        }
    }

    #[test]
    fn h264_clip_decodes_to_the_source_pictures() {
        let reference = reference_frames();
        let bytes = std::fs::read(media("testsrc_96x64.h264")).unwrap();
        let sps = annex_b_nal_units(&bytes)
            .find(|n| n[0] & 0x1f == NAL_SPS)
            .unwrap();
        assert_eq!(sps_picture_size(sps).unwrap(), (96, 64));
        let mut dec = H264Decoder::new(DEFAULT_MAX_PIXELS).unwrap();
        let mut decoded = vec![];
        for au in access_units(&bytes) {
            if let Some(rgb) = dec.decode(&au).unwrap() {
                decoded.push(rgb);
            }
        }
        assert_eq!(decoded.len(), reference.len());
        for (i, rgb) in decoded.iter().enumerate() {
            let q = psnr(rgb, &reference[i]);
            assert!(q > 24.0, "frame {i}: psnr {q:.1} dB");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        let mut vp8 = Vp8Decoder::new(DEFAULT_MAX_PIXELS).unwrap();
        assert!(vp8.decode(&[]).is_err());
        assert!(matches!(
            vp8.decode(&[0x10, 0x02, 0x00, 1, 2, 3, 4, 5, 6, 7]),
            Err(VideoDecodeError::Corrupt { .. })
        ));
        let mut h264 = H264Decoder::new(DEFAULT_MAX_PIXELS).unwrap();
        assert!(h264.decode(&[1, 2, 3, 4, 5]).is_err());
        for seed in 0..100u32 {
            let junk: Vec<u8> = (0..(seed % 300 + 5))
                .map(|i| (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 40_503) >> 11) as u8)
                .collect();
            let _ = vp8.decode(&junk);
            let mut au = vec![0, 0, 0, 1];
            au.extend(&junk);
            let _ = h264.decode(&au);
        }
        // still decodes a real clip afterwards
        let bytes = std::fs::read(media("testsrc_96x64.ivf")).unwrap();
        let mut fresh = Vp8Decoder::new(DEFAULT_MAX_PIXELS).unwrap();
        assert!(fresh.decode(ivf_frames(&bytes)[0]).unwrap().is_some());
    }

    #[test]
    fn oversized_frames_are_refused_before_decoding() {
        // a VP8 key frame header declaring 16000x16000
        let mut key = vec![0x50, 0x02, 0x00, 0x9d, 0x01, 0x2a];
        key.extend(16_000u16.to_le_bytes());
        key.extend(16_000u16.to_le_bytes());
        key.extend([0; 32]);
        let mut vp8 = Vp8Decoder::new(DEFAULT_MAX_PIXELS).unwrap();
        let err = vp8.decode(&key).unwrap_err();
        assert!(
            matches!(
                err,
                VideoDecodeError::TooLarge {
                    width: 16_000,
                    height: 16_000,
                    ..
                }
            ),
            "{err}"
        );
        // the real clips against a small limit
        let bytes = std::fs::read(media("testsrc_96x64.ivf")).unwrap();
        let mut small = Vp8Decoder::new(64 * 64).unwrap();
        assert!(matches!(
            small.decode(ivf_frames(&bytes)[0]),
            Err(VideoDecodeError::TooLarge {
                width: 96,
                height: 64,
                ..
            })
        ));
        let bytes = std::fs::read(media("testsrc_96x64.h264")).unwrap();
        let mut small = H264Decoder::new(64 * 64).unwrap();
        let err = small.decode(&access_units(&bytes)[0]).unwrap_err();
        assert!(matches!(err, VideoDecodeError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("96x64"), "{err}");
    }

    #[test]
    fn sps_reader_handles_high_profile_and_emulation_prevention() {
        // High profile (100), 1920x1080 coded as 120x68 macroblocks, as x264 writes it.
        let sps = [
            0x67, 0x64, 0x00, 0x28, 0xac, 0xd9, 0x40, 0x78, 0x02, 0x27, 0xe5, 0x84, 0x00, 0x00,
            0x03, 0x00, 0x04, 0x00, 0x00, 0x03, 0x00, 0xf0, 0x3c, 0x60, 0xc6, 0x58,
        ];
        assert_eq!(sps_picture_size(&sps).unwrap(), (1920, 1088));
        assert!(sps_picture_size(&[0x67, 0x42]).is_err());
        assert!(sps_picture_size(&[0x67, 0x42, 0, 0x1e, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn conversion_uses_bt601_video_range() {
        // 2x2 picture: one chroma sample; white, black, and a saturated red
        let y = [235u8, 16, 235, 16];
        let frame = Yuv420 {
            width: 2,
            height: 2,
            y: &y,
            u: &[128],
            v: &[128],
            y_stride: 2,
            uv_stride: 1,
            full_range: false,
        }
        .to_rgb();
        assert_eq!(&frame.data[..6], &[255, 255, 255, 0, 0, 0]);
        let red = Yuv420 {
            width: 1,
            height: 1,
            y: &[81],
            u: &[90],
            v: &[240],
            y_stride: 1,
            uv_stride: 1,
            full_range: false,
        }
        .to_rgb();
        assert!(
            red.data[0] > 250 && red.data[1] < 5 && red.data[2] < 5,
            "{red:?}"
        );
        // short planes never read out of bounds
        let short = Yuv420 {
            width: 4,
            height: 4,
            y: &[16; 8],
            u: &[128; 2],
            v: &[128; 2],
            y_stride: 4,
            uv_stride: 2,
            full_range: false,
        }
        .to_rgb();
        assert_eq!(short.data.len(), 48);
    }
}
