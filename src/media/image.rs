//! Image preparation as the published processor (`Qwen2VLImageProcessor`, transformers 5.17,
//! torchvision backend) does it: smart resize to a multiple of `patch * merge` within the pixel
//! bounds, torchvision's uint8 antialiased bicubic resize, rescale + normalise, and patchify into
//! rows of `C * temporal_patch * patch * patch` values in the processor's row order.
//!
//! The resize reproduces torchvision bit for bit: PIL-style separable resampling (horizontal
//! pass, then vertical, through a uint8 buffer) with the Keys cubic (a = -0.5) stretched by the
//! scale when shrinking, and weights rounded to int16 at the precision torch picks per axis.

use std::path::{Path, PathBuf};

use crate::model::config::ImageProcessorConfig;

/// The reference rejects images whose longer side is more than this many times the shorter.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode image {path}: {source}")]
    Decode {
        path: PathBuf,
        source: ::image::ImageError,
    },
    #[error("RGB buffer of {len} bytes does not hold a {width}x{height} image (needs {needed})")]
    Buffer {
        width: usize,
        height: usize,
        len: usize,
        needed: usize,
    },
    #[error("image of {width}x{height} has no pixels")]
    Empty { width: usize, height: usize },
    #[error(
        "image of {width}x{height}: absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1}"
    )]
    AspectRatio {
        width: usize,
        height: usize,
        ratio: f64,
    },
    #[error(
        "frames to patchify must be {expected_w}x{expected_h}, frame {index} is {width}x{height}"
    )]
    FrameSize {
        index: usize,
        width: usize,
        height: usize,
        expected_w: usize,
        expected_h: usize,
    },
    #[error("{0}")]
    Settings(String),
}

/// A borrowed packed RGB picture: 3 bytes a pixel, rows top to bottom. Its size always
/// matches its bytes.
#[derive(Debug, Clone, Copy)]
pub struct RgbView<'a> {
    width: usize,
    height: usize,
    data: &'a [u8],
}

impl<'a> RgbView<'a> {
    /// Checks that `data` holds exactly `width * height` RGB pixels.
    pub fn new(width: usize, height: usize, data: &'a [u8]) -> Result<Self, ImageError> {
        let needed = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(3))
            .ok_or_else(|| {
                ImageError::Settings(format!("image size {width}x{height} overflows"))
            })?;
        if data.len() != needed {
            return Err(ImageError::Buffer {
                width,
                height,
                len: data.len(),
                needed,
            });
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn data(&self) -> &'a [u8] {
        self.data
    }
}

/// An owned packed RGB picture. Its size always matches its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self, ImageError> {
        RgbView::new(width, height, &data)?;
        Ok(Self {
            width,
            height,
            data,
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }

    pub fn view(&self) -> RgbView<'_> {
        RgbView {
            width: self.width,
            height: self.height,
            data: &self.data,
        }
    }

    /// Decodes a PNG or JPEG file (format from its bytes, not its name). Transparent pixels are
    /// put over white, as the official qwen-omni-utils loader does.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::decode(&bytes, path)
    }

    /// Decodes PNG or JPEG bytes; `name` is what errors call the source.
    pub fn decode(bytes: &[u8], name: impl AsRef<Path>) -> Result<Self, ImageError> {
        let decode_error = |source| ImageError::Decode {
            path: name.as_ref().to_path_buf(),
            source,
        };
        let decoded = ::image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| decode_error(::image::ImageError::IoError(e)))?
            .decode()
            .map_err(decode_error)?;
        let (width, height) = (decoded.width() as usize, decoded.height() as usize);
        if width == 0 || height == 0 {
            return Err(ImageError::Empty { width, height });
        }
        let data = if decoded.color().has_alpha() {
            let rgba = decoded.to_rgba8();
            rgba.pixels()
                .flat_map(|p| {
                    let [r, g, b, a] = p.0;
                    [r, g, b].map(|c| over_white(c, a))
                })
                .collect()
        } else {
            decoded.to_rgb8().into_raw()
        };
        Self::new(width, height, data)
    }
}

/// One channel of a pixel with coverage `alpha` composited over white.
fn over_white(c: u8, alpha: u8) -> u8 {
    let (c, a) = (c as u32, alpha as u32);
    ((c * a + 255 * (255 - a) + 127) / 255) as u8
}

/// The size the processor resizes an image to: both sides multiples of `factor`, the area
/// within `[min_pixels, max_pixels]`, the aspect ratio kept as well as possible. Same float
/// arithmetic as the reference, including Python's round-half-to-even.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), ImageError> {
    if height == 0 || width == 0 {
        return Err(ImageError::Empty { width, height });
    }
    if factor == 0 {
        return Err(ImageError::Settings("resize factor must be > 0".into()));
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > MAX_ASPECT_RATIO {
        return Err(ImageError::AspectRatio {
            width,
            height,
            ratio,
        });
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    Ok((h_bar, w_bar))
}

/// Resampling weights of one axis, as int16 fixed point at `precision` bits.
struct AxisWeights {
    /// First input index of each output sample.
    starts: Vec<usize>,
    /// Number of taps of each output sample.
    lens: Vec<usize>,
    /// `taps` weights per output sample (unused tail zero).
    weights: Vec<i32>,
    taps: usize,
    precision: u32,
}

/// Keys' cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic).
fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

impl AxisWeights {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        // Shrinking stretches the kernel over `scale` input samples per output sample.
        let (support, inv_scale) = if scale >= 1.0 {
            (2.0 * scale, 1.0 / scale)
        } else {
            (2.0, 1.0)
        };
        let taps = (support.ceil() as usize) * 2 + 1;
        let mut starts = Vec::with_capacity(out_size);
        let mut lens = Vec::with_capacity(out_size);
        let mut float_weights = vec![0f64; out_size * taps];
        let mut max_weight = 0f64;
        for i in 0..out_size {
            let center = scale * (i as f64 + 0.5);
            let start = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let len = end.saturating_sub(start).min(taps);
            let row = &mut float_weights[i * taps..i * taps + len];
            let mut total = 0.0;
            for (j, w) in row.iter_mut().enumerate() {
                *w = bicubic_kernel(((j + start) as f64 - center + 0.5) * inv_scale);
                total += *w;
            }
            if total != 0.0 {
                for w in row.iter_mut() {
                    *w /= total;
                    max_weight = max_weight.max(*w);
                }
            }
            starts.push(start);
            lens.push(len);
        }
        // The most fractional bits that keep the largest weight within int16.
        let precision = (0..22u32)
            .find(|p| (0.5 + max_weight * (1u64 << (p + 1)) as f64) as i64 >= 1 << 15)
            .unwrap_or(22);
        let unit = (1u64 << precision) as f64;
        let weights = float_weights
            .iter()
            .map(|&w| {
                let v = w * unit;
                if v < 0.0 {
                    (v - 0.5) as i32
                } else {
                    (v + 0.5) as i32
                }
            })
            .collect();
        Self {
            starts,
            lens,
            weights,
            taps,
            precision,
        }
    }

    /// First input index and weights of output sample `i`.
    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        (
            self.starts[i],
            &self.weights[i * self.taps..i * self.taps + self.lens[i]],
        )
    }

    /// The accumulator's start: one half in fixed point, so that the shift rounds (weights
    /// reach at least 13 fractional bits, the largest being about 1).
    #[inline]
    fn rounding(&self) -> i32 {
        1 << (self.precision - 1)
    }

    #[inline]
    fn finish(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// Resizes with torchvision's uint8 antialiased bicubic (`tvF.resize(..., BICUBIC,
/// antialias=True)` on a uint8 tensor): exact to the bit.
pub fn resize_bicubic(image: RgbView<'_>, height: usize, width: usize) -> RgbImage {
    let (in_w, in_h) = (image.width, image.height);
    if in_w == 0 || in_h == 0 || width == 0 || height == 0 {
        // Nothing to sample from or into: only the size is meaningful.
        return RgbImage {
            width,
            height,
            data: vec![0; width * height * 3],
        };
    }
    let mut data = image.data.to_vec();
    if width != in_w {
        let axis = AxisWeights::new(in_w, width);
        let mut out = vec![0u8; in_h * width * 3];
        for (src, dst) in data
            .chunks_exact(in_w * 3)
            .zip(out.chunks_exact_mut(width * 3))
        {
            for (x, px) in dst.chunks_exact_mut(3).enumerate() {
                let (start, weights) = axis.taps(x);
                let mut acc = [axis.rounding(); 3];
                let taps = &src[start * 3..(start + weights.len()) * 3];
                for (s, &w) in taps.chunks_exact(3).zip(weights) {
                    acc[0] += s[0] as i32 * w;
                    acc[1] += s[1] as i32 * w;
                    acc[2] += s[2] as i32 * w;
                }
                for c in 0..3 {
                    px[c] = axis.finish(acc[c]);
                }
            }
        }
        data = out;
    }
    if height != in_h {
        let axis = AxisWeights::new(in_h, height);
        let row_len = width * 3;
        let mut out = vec![0u8; height * row_len];
        let mut acc = vec![0i32; row_len];
        for (y, dst) in out.chunks_exact_mut(row_len).enumerate() {
            let (start, weights) = axis.taps(y);
            acc.fill(axis.rounding());
            for (k, &w) in weights.iter().enumerate() {
                let src = &data[(start + k) * row_len..(start + k + 1) * row_len];
                for (a, &s) in acc.iter_mut().zip(src) {
                    *a += s as i32 * w;
                }
            }
            for (d, &a) in dst.iter_mut().zip(&acc) {
                *d = axis.finish(a);
            }
        }
        data = out;
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// Normalised patches of one image or video, ready for the vision encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Patches {
    /// `[n_patches, patch_dim]` row-major: rows grouped by merge window (t, h/m, w/m, m, m),
    /// each row ordered (channel, temporal, y, x).
    pub values: Vec<f32>,
    pub patch_dim: usize,
    /// (t, h, w) in patches.
    pub grid_thw: [usize; 3],
}

impl Patches {
    pub fn n_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Tokens this picture costs the Thinker: one per `merge x merge` patches.
    pub fn n_tokens(&self, merge_size: usize) -> usize {
        self.n_patches() / (merge_size * merge_size).max(1)
    }

    /// The `[n_patches, patch_dim]` f32 tensor.
    pub fn to_tensor(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_slice(&self.values, (self.n_patches(), self.patch_dim), device)
    }

    /// Several pictures as one encoder input: rows stacked, grids in the same order.
    pub fn stack(
        items: &[&Patches],
        device: &candle_core::Device,
    ) -> candle_core::Result<(candle_core::Tensor, Vec<[usize; 3]>)> {
        let tensors = items
            .iter()
            .map(|p| p.to_tensor(device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let grids = items.iter().map(|p| p.grid_thw).collect();
        Ok((candle_core::Tensor::cat(&tensors, 0)?, grids))
    }
}

/// The processor settings every preparation step reads: patch geometry, pixel bounds and the
/// normalisation (mean and std already multiplied by 1/rescale_factor, as the processor fuses
/// them, in f32 like the reference).
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePreprocessor {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub min_pixels: usize,
    pub max_pixels: usize,
    mean: [f32; 3],
    std: [f32; 3],
}

impl ImagePreprocessor {
    /// From `image_processor` (or `video_processor`) of the processor config.
    pub fn new(cfg: &ImageProcessorConfig) -> Result<Self, ImageError> {
        let settings = |msg: String| ImageError::Settings(msg);
        if cfg.patch_size == 0 || cfg.temporal_patch_size == 0 || cfg.merge_size == 0 {
            return Err(settings(format!(
                "processor patch_size {}, temporal_patch_size {} and merge_size {} must all be > 0",
                cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
            )));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(cfg.rescale_factor) || !cfg.image_std.iter().all(|&s| positive(s)) {
            return Err(settings(format!(
                "processor rescale_factor {} and image_std {:?} must be > 0",
                cfg.rescale_factor, cfg.image_std
            )));
        }
        if cfg.min_pixels() > cfg.max_pixels() {
            return Err(settings(format!(
                "processor min_pixels {} exceeds max_pixels {}",
                cfg.min_pixels(),
                cfg.max_pixels()
            )));
        }
        let unscale = (1.0 / cfg.rescale_factor) as f32;
        Ok(Self {
            patch_size: cfg.patch_size,
            temporal_patch_size: cfg.temporal_patch_size,
            merge_size: cfg.merge_size,
            min_pixels: cfg.min_pixels(),
            max_pixels: cfg.max_pixels(),
            mean: cfg.image_mean.map(|m| m as f32 * unscale),
            std: cfg.image_std.map(|s| s as f32 * unscale),
        })
    }

    /// The same settings with other pixel bounds (a call's `min_pixels`/`max_pixels`).
    pub fn with_pixel_bounds(mut self, min_pixels: usize, max_pixels: usize) -> Self {
        self.min_pixels = min_pixels;
        self.max_pixels = max_pixels;
        self
    }

    /// Side multiple of every resized picture: one merge window.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values in one patch row.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// (height, width) the picture is resized to.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize), ImageError> {
        smart_resize(
            height,
            width,
            self.factor(),
            self.min_pixels,
            self.max_pixels,
        )
    }

    /// The processor's resize of one picture.
    pub fn resize(&self, image: RgbView<'_>) -> Result<RgbImage, ImageError> {
        let (h, w) = self.target_size(image.height, image.width)?;
        Ok(resize_bicubic(image, h, w))
    }

    /// A still image: resize, then one temporal patch of the image repeated.
    pub fn prepare_image(&self, image: RgbView<'_>) -> Result<Patches, ImageError> {
        let resized = self.resize(image)?;
        self.patchify(&[resized.view()])
    }

    /// Rescales, normalises and patchifies already resized frames of one size (sides multiples
    /// of [`Self::factor`]); the frame count is padded to a multiple of the temporal patch by
    /// repeating the last frame.
    pub fn patchify(&self, frames: &[RgbView<'_>]) -> Result<Patches, ImageError> {
        let first = frames
            .first()
            .ok_or_else(|| ImageError::Settings("no frames to patchify".into()))?;
        let (height, width) = (first.height, first.width);
        let factor = self.factor();
        if height == 0 || width == 0 || height % factor != 0 || width % factor != 0 {
            return Err(ImageError::Settings(format!(
                "frames to patchify must have sides that are positive multiples of {factor}, got {width}x{height}"
            )));
        }
        for (index, f) in frames.iter().enumerate() {
            if f.width != width || f.height != height {
                return Err(ImageError::FrameSize {
                    index,
                    width: f.width,
                    height: f.height,
                    expected_w: width,
                    expected_h: height,
                });
            }
        }
        let (p, tp, m) = (self.patch_size, self.temporal_patch_size, self.merge_size);
        let grid_t = frames.len().div_ceil(tp);
        let (grid_h, grid_w) = (height / p, width / p);
        let patch_dim = self.patch_dim();
        // Normalise each frame once into planar f32 (channel, y, x); padding repeats the last.
        let plane = height * width;
        let normalised: Vec<Vec<f32>> = frames
            .iter()
            .map(|f| {
                let mut out = vec![0f32; 3 * plane];
                for (i, px) in f.data.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        out[c * plane + i] = (px[c] as f32 - self.mean[c]) / self.std[c];
                    }
                }
                out
            })
            .collect();
        let planes = |t: usize| &normalised[t.min(frames.len() - 1)];

        let mut values = Vec::with_capacity(grid_t * grid_h * grid_w * patch_dim);
        for t in 0..grid_t {
            for hb in 0..grid_h / m {
                for wb in 0..grid_w / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (y0, x0) = ((hb * m + mh) * p, (wb * m + mw) * p);
                            for c in 0..3 {
                                for ti in 0..tp {
                                    let src = &planes(t * tp + ti)[c * plane..(c + 1) * plane];
                                    for py in 0..p {
                                        let row = (y0 + py) * width + x0;
                                        values.extend_from_slice(&src[row..row + p]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(Patches {
            values,
            patch_dim,
            grid_thw: [grid_t, grid_h, grid_w],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor() -> ImagePreprocessor {
        ImagePreprocessor::new(&ImageProcessorConfig::default()).unwrap()
    }

    #[test]
    fn smart_resize_rounds_half_to_even_and_keeps_bounds() {
        // 42 / 28 = 1.5 -> 2, 70 / 28 = 2.5 -> 2 (Python's round).
        assert_eq!(smart_resize(42, 70, 28, 3136, 1 << 30).unwrap(), (56, 56));
        // published camera size: 480x640 -> 476x644
        assert_eq!(
            smart_resize(480, 640, 28, 3136, 12845056).unwrap(),
            (476, 644)
        );
        // too small: scaled up to min_pixels
        assert_eq!(smart_resize(1, 1, 28, 3136, 12845056).unwrap(), (56, 56));
        // too large: scaled down under max_pixels, sides still multiples of 28
        let (h, w) = smart_resize(4000, 6000, 28, 3136, 1_000_000).unwrap();
        assert!(h * w <= 1_000_000 && h % 28 == 0 && w % 28 == 0);
        assert!(matches!(
            smart_resize(10, 2010, 28, 3136, 12845056),
            Err(ImageError::AspectRatio { .. })
        ));
        assert!(smart_resize(10, 2000, 28, 3136, 12845056).is_ok());
        assert!(matches!(
            smart_resize(0, 10, 28, 3136, 12845056),
            Err(ImageError::Empty { .. })
        ));
    }

    #[test]
    fn resize_to_same_size_is_identity_and_flat_stays_flat() {
        let img = RgbImage::new(5, 4, (0..60).map(|i| (i * 4) as u8).collect()).unwrap();
        assert_eq!(resize_bicubic(img.view(), 4, 5), img);
        let flat = RgbImage::new(9, 7, vec![77; 9 * 7 * 3]).unwrap();
        for (h, w) in [(3, 4), (14, 20), (7, 2)] {
            let r = resize_bicubic(flat.view(), h, w);
            assert_eq!((r.width, r.height), (w, h));
            assert!(r.data.iter().all(|&v| v == 77), "{h}x{w}");
        }
    }

    #[test]
    fn patch_rows_follow_merge_windows_and_channel_temporal_order() {
        // 56x28 image: grid (1, 4, 2) patches of 14; pixel value encodes its patch position.
        let (w, h) = (28usize, 56usize);
        let mut data = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let v = ((y / 14) * 2 + x / 14) as u8 * 10;
                data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&[v, v + 1, v + 2]);
            }
        }
        let img = RgbImage::new(w, h, data).unwrap();
        let proc = processor();
        let patches = proc.patchify(&[img.view()]).unwrap();
        assert_eq!(patches.grid_thw, [1, 4, 2]);
        assert_eq!(patches.patch_dim, 3 * 2 * 14 * 14);
        // rows: merge window (0,0) holds patches (0,0),(0,1),(1,0),(1,1), then window (1,0).
        let expected_patch = [0, 1, 2, 3, 4, 5, 6, 7];
        let denorm = |v: f32, c: usize| v * proc.std[c] + proc.mean[c];
        for (row, &patch) in expected_patch.iter().enumerate() {
            let r = &patches.values[row * patches.patch_dim..(row + 1) * patches.patch_dim];
            for c in 0..3 {
                let block = 2 * 14 * 14;
                for &v in &r[c * block..(c + 1) * block] {
                    assert!((denorm(v, c) - (patch * 10 + c) as f32).abs() < 1e-3);
                }
            }
        }
    }

    #[test]
    fn bad_buffers_and_settings_are_named() {
        let err = RgbView::new(4, 4, &[0u8; 10]).unwrap_err().to_string();
        assert!(err.contains("4x4"), "{err}");
        let cfg = ImageProcessorConfig {
            patch_size: 0,
            ..Default::default()
        };
        assert!(ImagePreprocessor::new(&cfg).is_err());
        let err = RgbImage::decode(b"not an image", "broken.png")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.png"), "{err}");
    }
}
