//! The camera: V4L2 capture (through `linuxvideo`, pure Rust: no system package needed),
//! frames converted to packed RGB and sent to the session as `VideoInput` at a modest rate
//! (the model samples 2 frames a second; sending more only costs copies).
//!
//! Frames are dated on the session clock when the driver hands them over (V4L2's own buffer
//! timestamps are not exposed by the crate): that is up to one frame interval plus the USB
//! transfer after the exposure, tens of milliseconds, well below the half-second spacing of the
//! frames the model sees.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::engine::clock::Clock;
use crate::engine::session::{SessionHandle, VideoInput};

/// Which camera to use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CameraChoice {
    #[default]
    None,
    /// `/dev/videoN`.
    Index(u32),
    /// A V4L2 device node.
    Path(PathBuf),
}

impl FromStr for CameraChoice {
    type Err = anyhow::Error;

    /// `none`, an index (`0` for `/dev/video0`) or a device path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            bail!("empty camera: use none, an index like 0, or a path like /dev/video0");
        }
        if s.eq_ignore_ascii_case("none") {
            return Ok(Self::None);
        }
        if s.chars().all(|c| c.is_ascii_digit()) {
            let index = s
                .parse()
                .with_context(|| format!("camera index {s} is too large"))?;
            return Ok(Self::Index(index));
        }
        Ok(Self::Path(PathBuf::from(s)))
    }
}

impl CameraChoice {
    /// The device node, `None` for no camera.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Self::None => None,
            Self::Index(index) => Some(PathBuf::from(format!("/dev/video{index}"))),
            Self::Path(path) => Some(path.clone()),
        }
    }
}

/// Settings of the capture.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraSettings {
    /// Size asked of the driver (it picks the nearest it has).
    pub width: u32,
    pub height: u32,
    /// Frames sent to the session per second.
    pub send_fps: f64,
}

impl Default for CameraSettings {
    fn default() -> Self {
        Self {
            width: 640,
            height: 480,
            send_fps: 4.0,
        }
    }
}

/// Pixel layouts the capture converts to RGB, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelLayout {
    /// Packed 4:2:2, Y0 U Y1 V.
    Yuyv,
    /// Packed 4:2:2, U Y0 V Y1.
    Uyvy,
    /// Motion JPEG: one JPEG picture a frame.
    Mjpeg,
    Rgb24,
    Bgr24,
}

impl PixelLayout {
    pub const PREFERENCE: [PixelLayout; 5] = [
        Self::Yuyv,
        Self::Mjpeg,
        Self::Rgb24,
        Self::Bgr24,
        Self::Uyvy,
    ];

    pub fn fourcc(self) -> [u8; 4] {
        match self {
            Self::Yuyv => *b"YUYV",
            Self::Uyvy => *b"UYVY",
            Self::Mjpeg => *b"MJPG",
            Self::Rgb24 => *b"RGB3",
            Self::Bgr24 => *b"BGR3",
        }
    }

    pub fn from_fourcc(fourcc: [u8; 4]) -> Option<Self> {
        Self::PREFERENCE.into_iter().find(|l| l.fourcc() == fourcc)
    }
}

fn fourcc_text(fourcc: [u8; 4]) -> String {
    fourcc.iter().map(|&b| b as char).collect()
}

fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    // BT.601, limited range, in 8.8 fixed point
    let c = (y as i32 - 16).max(0) * 298;
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let clamp = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [
        clamp(c + 409 * e),
        clamp(c - 100 * d - 208 * e),
        clamp(c + 516 * d),
    ]
}

/// Converts one captured frame to packed RGB (`width * height * 3` bytes). `stride` is the
/// driver's bytes per line (0: tightly packed).
pub fn to_rgb(
    layout: PixelLayout,
    width: usize,
    height: usize,
    stride: usize,
    data: &[u8],
) -> anyhow::Result<Vec<u8>> {
    if width == 0 || height == 0 {
        bail!("camera frame of {width}x{height} pixels");
    }
    if layout == PixelLayout::Mjpeg {
        let picture = image::load_from_memory_with_format(data, image::ImageFormat::Jpeg)
            .context("camera sent an MJPEG frame that does not decode")?
            .to_rgb8();
        if picture.width() as usize != width || picture.height() as usize != height {
            bail!(
                "camera MJPEG frame is {}x{}, the stream was set to {width}x{height}",
                picture.width(),
                picture.height()
            );
        }
        return Ok(picture.into_raw());
    }
    let packed = match layout {
        PixelLayout::Yuyv | PixelLayout::Uyvy => width * 2,
        _ => width * 3,
    };
    let stride = if stride == 0 { packed } else { stride };
    let needed = stride * (height - 1) + packed;
    if stride < packed || data.len() < needed {
        bail!(
            "camera {layout:?} frame of {width}x{height} needs {needed} bytes with {stride} bytes \
             a line, got {}",
            data.len()
        );
    }
    if matches!(layout, PixelLayout::Yuyv | PixelLayout::Uyvy) && !width.is_multiple_of(2) {
        bail!("camera {layout:?} frame has an odd width {width}");
    }
    let mut rgb = Vec::with_capacity(width * height * 3);
    for row in data.chunks(stride).take(height) {
        let row = &row[..packed];
        match layout {
            PixelLayout::Yuyv | PixelLayout::Uyvy => {
                for quad in row.chunks_exact(4) {
                    let (y0, u, y1, v) = if layout == PixelLayout::Yuyv {
                        (quad[0], quad[1], quad[2], quad[3])
                    } else {
                        (quad[1], quad[0], quad[3], quad[2])
                    };
                    rgb.extend_from_slice(&yuv_to_rgb(y0, u, v));
                    rgb.extend_from_slice(&yuv_to_rgb(y1, u, v));
                }
            }
            PixelLayout::Rgb24 => rgb.extend_from_slice(row),
            PixelLayout::Bgr24 => {
                for px in row.chunks_exact(3) {
                    rgb.extend_from_slice(&[px[2], px[1], px[0]]);
                }
            }
            PixelLayout::Mjpeg => unreachable!("decoded above"),
        }
    }
    Ok(rgb)
}

/// One camera as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CameraInfo {
    pub path: PathBuf,
    pub name: String,
    /// Its capture formats (fourcc codes), those the capture converts marked with `*`.
    pub formats: Vec<String>,
}

/// The video capture devices (`/dev/video*` that capture video), and what went wrong looking.
pub fn list_cameras() -> (Vec<CameraInfo>, Vec<String>) {
    #[cfg(target_os = "linux")]
    {
        linux::list()
    }
    #[cfg(not(target_os = "linux"))]
    {
        (
            Vec::new(),
            vec!["camera capture is implemented for Linux (V4L2) only".into()],
        )
    }
}

/// Counters of a capture.
#[derive(Debug, Default)]
pub struct CameraStats {
    pub captured: AtomicU64,
    pub sent: AtomicU64,
    pub bad_frames: AtomicU64,
}

/// A camera capturing on its own thread into a session.
pub struct CameraCapture {
    description: String,
    stop: Arc<AtomicBool>,
    stats: Arc<CameraStats>,
    failure: crossbeam_channel::Receiver<String>,
}

impl CameraCapture {
    /// Opens the camera `choice` and starts sending its frames to `session`; fails at once,
    /// naming the device, when it is missing or cannot capture in a layout we convert.
    pub fn start(
        choice: &CameraChoice,
        settings: &CameraSettings,
        clock: Arc<dyn Clock>,
        session: SessionHandle,
    ) -> anyhow::Result<Self> {
        let Some(path) = choice.path() else {
            bail!("no camera was chosen");
        };
        if !(settings.send_fps.is_finite() && settings.send_fps > 0.0) {
            bail!("camera send rate {} fps must be > 0", settings.send_fps);
        }
        #[cfg(target_os = "linux")]
        {
            linux::start(path, settings, clock, session)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (clock, session);
            bail!(
                "camera {}: capture is implemented for Linux (V4L2) only",
                path.display()
            )
        }
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    pub fn frames_sent(&self) -> u64 {
        self.stats.sent.load(Ordering::Relaxed)
    }

    pub fn frames_captured(&self) -> u64 {
        self.stats.captured.load(Ordering::Relaxed)
    }

    /// Why the capture stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure.try_recv().ok()
    }
}

impl Drop for CameraCapture {
    fn drop(&mut self) {
        // The thread is not joined: it may wait in the driver for a frame; it stops at the next
        // one and closes the device.
        self.stop.store(true, Ordering::Release);
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use linuxvideo::format::{PixFormat, PixelFormat};
    use linuxvideo::{BufType, CapabilityFlags, Device};

    pub(super) fn list() -> (Vec<CameraInfo>, Vec<String>) {
        let mut cameras = Vec::new();
        let mut problems = Vec::new();
        let devices = match linuxvideo::list() {
            Ok(devices) => devices,
            Err(e) => return (cameras, vec![format!("cannot list video devices: {e}")]),
        };
        for device in devices {
            let device = match device {
                Ok(device) => device,
                Err(e) => {
                    problems.push(format!("a video device could not be opened: {e}"));
                    continue;
                }
            };
            let path = device.path().unwrap_or_default();
            let Ok(caps) = device.capabilities() else {
                continue;
            };
            if !caps
                .device_capabilities()
                .contains(CapabilityFlags::VIDEO_CAPTURE)
            {
                continue;
            }
            let formats = device
                .formats(BufType::VIDEO_CAPTURE)
                .filter_map(Result::ok)
                .map(|f| {
                    let fourcc = f.pixel_format().as_fourcc();
                    let mark = if PixelLayout::from_fourcc(fourcc).is_some() {
                        "*"
                    } else {
                        ""
                    };
                    format!("{}{mark}", fourcc_text(fourcc))
                })
                .collect();
            cameras.push(CameraInfo {
                path,
                name: caps.card().to_string(),
                formats,
            });
        }
        cameras.sort_by(|a, b| a.path.cmp(&b.path));
        (cameras, problems)
    }

    struct Opened {
        stream: linuxvideo::stream::ReadStream,
        layout: PixelLayout,
        width: usize,
        height: usize,
        stride: usize,
        description: String,
    }

    fn open(path: &std::path::Path, settings: &CameraSettings) -> anyhow::Result<Opened> {
        let shown = path.display();
        let device = Device::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "camera {shown} not found: there is no such video device (list cameras with \
                     --list-devices, or run without --camera)"
                )
            } else {
                anyhow::anyhow!("cannot open the camera {shown}: {e}")
            }
        })?;
        let caps = device
            .capabilities()
            .with_context(|| format!("camera {shown}: cannot read its capabilities"))?;
        let flags = caps.device_capabilities();
        if !flags.contains(CapabilityFlags::VIDEO_CAPTURE) {
            bail!(
                "{shown} ({}) is not a video capture device (a metadata node or an encoder?)",
                caps.card()
            );
        }
        if !flags.contains(CapabilityFlags::STREAMING) {
            bail!(
                "camera {shown} ({}) does not support streaming I/O",
                caps.card()
            );
        }
        let offered: Vec<[u8; 4]> = device
            .formats(BufType::VIDEO_CAPTURE)
            .filter_map(Result::ok)
            .map(|f| f.pixel_format().as_fourcc())
            .collect();
        let Some(layout) = PixelLayout::PREFERENCE
            .into_iter()
            .find(|l| offered.contains(&l.fourcc()))
        else {
            let offered: Vec<String> = offered.into_iter().map(fourcc_text).collect();
            bail!(
                "camera {shown} ({}) offers only {} ; omnicall converts YUYV, UYVY, MJPG, RGB3 \
                 and BGR3",
                caps.card(),
                offered.join(", ")
            );
        };
        let name = caps.card().to_string();
        let capture = device
            .video_capture(PixFormat::new(
                settings.width,
                settings.height,
                PixelFormat::from_fourcc(layout.fourcc()),
            ))
            .with_context(|| format!("camera {shown}: cannot set the capture format"))?;
        let format = capture.format();
        let got =
            PixelLayout::from_fourcc(format.pixel_format().as_fourcc()).with_context(|| {
                format!(
                    "camera {shown}: asked for {}, the driver chose {}",
                    fourcc_text(layout.fourcc()),
                    fourcc_text(format.pixel_format().as_fourcc())
                )
            })?;
        let (width, height) = (format.width() as usize, format.height() as usize);
        let stride = format.bytes_per_line() as usize;
        let stream = capture
            .into_stream()
            .with_context(|| format!("camera {shown}: cannot start streaming"))?;
        Ok(Opened {
            stream,
            layout: got,
            width,
            height,
            stride,
            description: format!(
                "camera {shown} ({name}, {width}x{height} {})",
                fourcc_text(got.fourcc())
            ),
        })
    }

    pub(super) fn start(
        path: PathBuf,
        settings: &CameraSettings,
        clock: Arc<dyn Clock>,
        session: SessionHandle,
    ) -> anyhow::Result<CameraCapture> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CameraStats::default());
        let (opened_tx, opened_rx) = crossbeam_channel::bounded(1);
        let (failure_tx, failure) = crossbeam_channel::bounded(1);
        let period = Duration::from_secs_f64(1.0 / settings.send_fps);
        let settings = settings.clone();
        {
            let (stop, stats) = (stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name("camera".into())
                .spawn(move || {
                    // the stream is opened on this thread: it holds the driver's mapped buffers
                    let mut opened = match open(&path, &settings) {
                        Ok(opened) => {
                            let _ = opened_tx.send(Ok(opened.description.clone()));
                            opened
                        }
                        Err(e) => {
                            let _ = opened_tx.send(Err(e));
                            return;
                        }
                    };
                    let mut last_sent: Option<Duration> = None;
                    while !stop.load(Ordering::Acquire) {
                        let frame = opened.stream.dequeue(|buffer| {
                            let at = clock.now();
                            stats.captured.fetch_add(1, Ordering::Relaxed);
                            if buffer.is_error() || last_sent.is_some_and(|t| at < t + period) {
                                return Ok(None);
                            }
                            Ok(Some((
                                at,
                                to_rgb(
                                    opened.layout,
                                    opened.width,
                                    opened.height,
                                    opened.stride,
                                    &buffer,
                                ),
                            )))
                        });
                        match frame {
                            Ok(None) => {}
                            Ok(Some((at, Ok(rgb)))) => {
                                last_sent = Some(at);
                                let sent = session.push_video(VideoInput {
                                    at,
                                    width: opened.width,
                                    height: opened.height,
                                    rgb: Arc::new(rgb),
                                });
                                if !sent {
                                    return;
                                }
                                stats.sent.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Some((_, Err(e)))) => {
                                // a corrupt frame (a USB hiccup): skip it
                                if stats.bad_frames.fetch_add(1, Ordering::Relaxed) == 0 {
                                    tracing::warn!("{}: {e:#}", opened.description);
                                }
                            }
                            Err(e) => {
                                let _ = failure_tx
                                    .send(format!("{}: capture failed: {e}", opened.description));
                                return;
                            }
                        }
                    }
                })
                .context("cannot start the camera thread")?;
        }
        let description = opened_rx
            .recv()
            .context("the camera thread ended before opening the camera")??;
        Ok(CameraCapture {
            description,
            stop,
            stats,
            failure,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        assert_eq!("none".parse::<CameraChoice>().unwrap(), CameraChoice::None);
        assert_eq!("2".parse::<CameraChoice>().unwrap(), CameraChoice::Index(2));
        assert_eq!(
            "/dev/video5".parse::<CameraChoice>().unwrap().path(),
            Some(PathBuf::from("/dev/video5"))
        );
        assert!("".parse::<CameraChoice>().is_err());
        assert_eq!(
            CameraChoice::Index(1).path(),
            Some(PathBuf::from("/dev/video1"))
        );
    }

    #[test]
    fn yuyv_greys_and_primaries_convert() {
        // two pixels: black and white (limited range), neutral chroma
        let rgb = to_rgb(PixelLayout::Yuyv, 2, 1, 0, &[16, 128, 235, 128]).unwrap();
        assert_eq!(rgb, vec![0, 0, 0, 255, 255, 255]);
        // saturated red in BT.601: Y 81, U 90, V 240
        let rgb = to_rgb(PixelLayout::Yuyv, 2, 1, 0, &[81, 90, 81, 240]).unwrap();
        assert!(rgb[0] > 250 && rgb[1] < 5 && rgb[2] < 5, "{rgb:?}");
        let same = to_rgb(PixelLayout::Uyvy, 2, 1, 0, &[90, 81, 240, 81]).unwrap();
        assert_eq!(rgb, same);
    }

    #[test]
    fn strides_and_short_frames() {
        // 2x2 BGR with 2 bytes of padding a line
        let data = [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12, 0, 0];
        let rgb = to_rgb(PixelLayout::Bgr24, 2, 2, 8, &data).unwrap();
        assert_eq!(rgb, vec![3, 2, 1, 6, 5, 4, 9, 8, 7, 12, 11, 10]);
        let err = to_rgb(PixelLayout::Rgb24, 2, 2, 8, &data[..10]).unwrap_err();
        assert!(err.to_string().contains("needs 14 bytes"), "{err}");
    }

    #[test]
    fn mjpeg_frames_decode() {
        let mut picture = image::RgbImage::new(16, 8);
        for (x, _, p) in picture.enumerate_pixels_mut() {
            *p = image::Rgb([if x < 8 { 250 } else { 10 }, 120, 30]);
        }
        let mut jpeg = Vec::new();
        image::DynamicImage::ImageRgb8(picture)
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        let rgb = to_rgb(PixelLayout::Mjpeg, 16, 8, 0, &jpeg).unwrap();
        assert_eq!(rgb.len(), 16 * 8 * 3);
        assert!(rgb[0] > 200 && rgb[15 * 3] < 60, "{:?}", &rgb[..6]);
        assert!(to_rgb(PixelLayout::Mjpeg, 16, 8, 0, &jpeg[..20]).is_err());
        assert!(to_rgb(PixelLayout::Mjpeg, 32, 8, 0, &jpeg).is_err());
    }
}
