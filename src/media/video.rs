//! Video preparation: frames sampled at the model's fps, each resized as the video processor
//! does (`Qwen2VLVideoProcessor`, its own min/max pixels), grouped by the temporal patch (the
//! last frame repeated to fill the group), and the seconds each temporal grid spans, which
//! TMRoPE turns into temporal position ids.
//!
//! Sources: decoded RGB frames with timestamps (a live camera, a decoded file), a file's frames
//! by index with qwen-omni-utils' `smart_nframes` rule, or a folder of PNG/JPEG frames.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::media::image::{ImageError, ImagePreprocessor, Patches, RgbImage, RgbView};
use crate::model::config::ImageProcessorConfig;

/// Frames per second the model was trained with.
pub const DEFAULT_FPS: f64 = 2.0;
/// qwen-omni-utils' `FPS_MIN_FRAMES` / `FPS_MAX_FRAMES` / `FRAME_FACTOR`.
pub const MIN_FRAMES: usize = 4;
pub const MAX_FRAMES: usize = 768;
pub const FRAME_FACTOR: usize = 2;
/// Per-frame pixel bounds qwen-omni-utils applies to videos before the processor
/// (`VIDEO_MIN_PIXELS` / `VIDEO_MAX_PIXELS`), tighter than the published processor config's;
/// pass them to [`VideoPreprocessor::with_pixel_bounds`] to resize as the official pipeline.
pub const OFFICIAL_VIDEO_MIN_PIXELS: usize = 128 * 28 * 28;
pub const OFFICIAL_VIDEO_MAX_PIXELS: usize = 768 * 28 * 28;

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("video fps must be a positive number, got {0}")]
    Fps(f64),
    #[error("a video needs at least one frame")]
    NoFrames,
    #[error(
        "a video of {total} frames at {video_fps} fps gives {nframes} frames at {fps} fps; at least {FRAME_FACTOR} are needed"
    )]
    TooShort {
        total: usize,
        video_fps: f64,
        fps: f64,
        nframes: usize,
    },
    #[error("cannot list frame folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("frame folder {0} has no .png/.jpg/.jpeg files")]
    EmptyFolder(PathBuf),
}

fn check_fps(fps: f64) -> Result<(), VideoError> {
    if fps.is_finite() && fps > 0.0 {
        Ok(())
    } else {
        Err(VideoError::Fps(fps))
    }
}

/// Frames of a stream with arbitrary timestamps sampled at `fps`: instants `first + k / fps`
/// up to the last timestamp, each taking the newest frame at or before it. Returns indices into
/// `timestamps` (which need not be sorted).
pub fn sample_by_time(timestamps: &[Duration], fps: f64) -> Result<Vec<usize>, VideoError> {
    check_fps(fps)?;
    let mut order: Vec<usize> = (0..timestamps.len()).collect();
    order.sort_by_key(|&i| timestamps[i]);
    let (Some(&first), Some(&last)) = (order.first(), order.last()) else {
        return Err(VideoError::NoFrames);
    };
    let (first_t, last_t) = (
        timestamps[first].as_secs_f64(),
        timestamps[last].as_secs_f64(),
    );
    // A small tolerance so that a frame exactly on an instant is not lost to rounding.
    let count = ((last_t - first_t) * fps + 1e-9).floor() as usize + 1;
    let mut picked = Vec::with_capacity(count);
    let mut cursor = 0;
    for k in 0..count {
        let instant = first_t + k as f64 / fps + 1e-9;
        while cursor + 1 < order.len() && timestamps[order[cursor + 1]].as_secs_f64() <= instant {
            cursor += 1;
        }
        picked.push(order[cursor]);
    }
    Ok(picked)
}

/// qwen-omni-utils' `smart_nframes`: how many of a file's `total_frames` (at `video_fps`) to
/// take at `fps`, an even number within [4, 768] and at most the file's frames.
pub fn smart_nframes(total_frames: usize, video_fps: f64, fps: f64) -> Result<usize, VideoError> {
    check_fps(fps)?;
    check_fps(video_fps)?;
    let min_frames = MIN_FRAMES.div_ceil(FRAME_FACTOR) * FRAME_FACTOR;
    let max_frames = MAX_FRAMES.min(total_frames) / FRAME_FACTOR * FRAME_FACTOR;
    let wanted = total_frames as f64 / video_fps * fps;
    let clamped = wanted
        .max(min_frames as f64)
        .min(max_frames as f64)
        .min(total_frames as f64);
    let nframes = (clamped / FRAME_FACTOR as f64).floor() as usize * FRAME_FACTOR;
    if nframes < FRAME_FACTOR || nframes > total_frames {
        return Err(VideoError::TooShort {
            total: total_frames,
            video_fps,
            fps,
            nframes,
        });
    }
    Ok(nframes)
}

/// The frames qwen-omni-utils reads from a file: `nframes` indices spread evenly over the file
/// (`torch.linspace(0, total - 1, n).round()`, in f32 and half-to-even like torch), and the fps
/// they amount to (`nframes / total * video_fps`).
pub fn sample_file_frames(
    total_frames: usize,
    video_fps: f64,
    fps: f64,
) -> Result<(Vec<usize>, f64), VideoError> {
    let n = smart_nframes(total_frames, video_fps, fps)?;
    let (start, end) = (0f32, (total_frames - 1) as f32);
    let step = (end - start) / (n - 1) as f32;
    let indices = (0..n)
        .map(|i| {
            // torch fills the first half forwards from start and the rest backwards from end.
            let v = if i < n / 2 {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            };
            v.round_ties_even() as usize
        })
        .collect();
    Ok((indices, n as f64 / total_frames as f64 * video_fps))
}

/// Patches of one video and the time one temporal grid spans.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedVideo {
    pub patches: Patches,
    /// `temporal_patch_size / fps`: seconds per temporal grid (TMRoPE's `second_per_grid`).
    pub second_per_grid: f64,
    /// Frames used before padding to the temporal patch.
    pub frames: usize,
}

/// The video processor's settings plus the sampling rate of the frames it is given.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoPreprocessor {
    frames: ImagePreprocessor,
    fps: f64,
}

impl VideoPreprocessor {
    /// `cfg` is the `video_processor` section of the processor config.
    pub fn new(cfg: &ImageProcessorConfig, fps: f64) -> Result<Self, VideoError> {
        check_fps(fps)?;
        Ok(Self {
            frames: ImagePreprocessor::new(cfg)?,
            fps,
        })
    }

    /// The same settings with a call's `min_pixels` / `max_pixels` per frame.
    pub fn with_pixel_bounds(mut self, min_pixels: usize, max_pixels: usize) -> Self {
        self.frames = self.frames.with_pixel_bounds(min_pixels, max_pixels);
        self
    }

    pub fn fps(&self) -> f64 {
        self.fps
    }

    /// The per-frame settings (patch geometry, pixel bounds, normalisation).
    pub fn frame_settings(&self) -> &ImagePreprocessor {
        &self.frames
    }

    /// Seconds per temporal grid at this processor's fps.
    pub fn second_per_grid(&self) -> f64 {
        self.frames.temporal_patch_size as f64 / self.fps
    }

    /// Resizes frames already sampled at [`Self::fps`] to the size the processor picks for the
    /// first one (a camera that changes resolution mid-video is scaled to it), then
    /// normalises and patchifies them.
    pub fn prepare(&self, frames: &[RgbView<'_>]) -> Result<PreparedVideo, VideoError> {
        let resized = self.resize(frames)?;
        let views: Vec<RgbView<'_>> = resized.iter().map(RgbImage::view).collect();
        self.patchify(&views)
    }

    /// The processor's resize of every frame (to the size chosen from the first).
    pub fn resize(&self, frames: &[RgbView<'_>]) -> Result<Vec<RgbImage>, VideoError> {
        let first = frames.first().ok_or(VideoError::NoFrames)?;
        let (h, w) = self.frames.target_size(first.height(), first.width())?;
        frames
            .iter()
            .map(|f| {
                if f.width() == 0 || f.height() == 0 {
                    return Err(ImageError::Empty {
                        width: f.width(),
                        height: f.height(),
                    }
                    .into());
                }
                Ok(crate::media::image::resize_bicubic(*f, h, w))
            })
            .collect()
    }

    /// Normalises and patchifies resized frames (all one size, sides multiples of the merge
    /// window), padding to the temporal patch with the last frame.
    pub fn patchify(&self, resized: &[RgbView<'_>]) -> Result<PreparedVideo, VideoError> {
        if resized.is_empty() {
            return Err(VideoError::NoFrames);
        }
        Ok(PreparedVideo {
            patches: self.frames.patchify(resized)?,
            second_per_grid: self.second_per_grid(),
            frames: resized.len(),
        })
    }

    /// Frames with timestamps (a camera, a decoded stream): sampled at [`Self::fps`] with
    /// [`sample_by_time`], then prepared.
    pub fn prepare_timed(
        &self,
        frames: &[(Duration, RgbView<'_>)],
    ) -> Result<PreparedVideo, VideoError> {
        let times: Vec<Duration> = frames.iter().map(|(t, _)| *t).collect();
        let picked: Vec<RgbView<'_>> = sample_by_time(&times, self.fps)?
            .into_iter()
            .map(|i| frames[i].1)
            .collect();
        self.prepare(&picked)
    }

    /// All frames of a file (or folder) at `video_fps`: sampled with qwen-omni-utils' rule at
    /// [`Self::fps`]; the seconds per grid follow the fps the sampled frames really have.
    pub fn prepare_file(
        &self,
        frames: &[RgbView<'_>],
        video_fps: f64,
    ) -> Result<PreparedVideo, VideoError> {
        let (indices, sample_fps) = sample_file_frames(frames.len(), video_fps, self.fps)?;
        let picked: Vec<RgbView<'_>> = indices.into_iter().map(|i| frames[i]).collect();
        let mut video = self.prepare(&picked)?;
        video.second_per_grid = self.frames.temporal_patch_size as f64 / sample_fps;
        Ok(video)
    }
}

/// A folder of PNG/JPEG frames read as a video at a given fps, in file-name order.
#[derive(Debug, Clone)]
pub struct FrameFolder {
    pub paths: Vec<PathBuf>,
    pub frames: Vec<RgbImage>,
    pub fps: f64,
}

impl FrameFolder {
    /// Reads every `.png`, `.jpg` and `.jpeg` file of `dir` (other files are ignored); a file
    /// that does not decode is an error naming it.
    pub fn open(dir: impl AsRef<Path>, fps: f64) -> Result<Self, VideoError> {
        check_fps(fps)?;
        let dir = dir.as_ref();
        let folder_error = |source| VideoError::Folder {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(folder_error)? {
            let path = entry.map_err(folder_error)?.path();
            let is_frame = path.is_file()
                && path
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
                    .unwrap_or(false);
            if is_frame {
                paths.push(path);
            }
        }
        if paths.is_empty() {
            return Err(VideoError::EmptyFolder(dir.to_path_buf()));
        }
        paths.sort();
        let frames = paths
            .iter()
            .map(RgbImage::open)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { paths, frames, fps })
    }

    /// Prepares the folder's frames as a file of known length: [`VideoPreprocessor::prepare_file`].
    pub fn prepare(&self, processor: &VideoPreprocessor) -> Result<PreparedVideo, VideoError> {
        let views: Vec<RgbView<'_>> = self.frames.iter().map(RgbImage::view).collect();
        processor.prepare_file(&views, self.fps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn time_sampling_takes_the_newest_frame_at_each_instant() {
        // 10 fps camera for 2 s, one frame dropped at 0.5 s.
        let times: Vec<Duration> = (0..20).filter(|&i| i != 5).map(|i| ms(i * 100)).collect();
        let picked = sample_by_time(&times, 2.0).unwrap();
        let at: Vec<u64> = picked
            .iter()
            .map(|&i| times[i].as_millis() as u64)
            .collect();
        assert_eq!(at, vec![0, 400, 1000, 1500]);
        // unsorted input gives the same frames
        let mut shuffled = times.clone();
        shuffled.reverse();
        let picked = sample_by_time(&shuffled, 2.0).unwrap();
        let at2: Vec<u64> = picked
            .iter()
            .map(|&i| shuffled[i].as_millis() as u64)
            .collect();
        assert_eq!(at2, at);
        assert!(matches!(
            sample_by_time(&[], 2.0),
            Err(VideoError::NoFrames)
        ));
        assert!(matches!(
            sample_by_time(&times, 0.0),
            Err(VideoError::Fps(_))
        ));
    }

    #[test]
    fn smart_nframes_follows_qwen_omni_utils() {
        // 10 s at 30 fps -> 20 frames at 2 fps
        assert_eq!(smart_nframes(300, 30.0, 2.0).unwrap(), 20);
        // short clip: at least 4 frames
        assert_eq!(smart_nframes(30, 30.0, 2.0).unwrap(), 4);
        // odd counts floor to even; never more than the file has
        assert_eq!(smart_nframes(5, 1.0, 2.0).unwrap(), 4);
        assert_eq!(smart_nframes(3, 30.0, 2.0).unwrap(), 2);
        assert!(matches!(
            smart_nframes(1, 30.0, 2.0),
            Err(VideoError::TooShort { .. })
        ));
        let (idx, fps) = sample_file_frames(300, 30.0, 2.0).unwrap();
        assert_eq!(idx.len(), 20);
        assert_eq!((idx[0], idx[19]), (0, 299));
        assert!((fps - 2.0).abs() < 1e-12);
        // linspace(0, 9, 4) = 0, 3, 6, 9
        assert_eq!(
            sample_file_frames(10, 5.0, 2.0).unwrap().0,
            vec![0, 3, 6, 9]
        );
    }

    #[test]
    fn odd_frame_counts_repeat_the_last_frame() {
        let proc = VideoPreprocessor::new(&ImageProcessorConfig::default(), 2.0).unwrap();
        let a = RgbImage::new(56, 56, vec![10; 56 * 56 * 3]).unwrap();
        let b = RgbImage::new(56, 56, vec![200; 56 * 56 * 3]).unwrap();
        let three = proc.prepare(&[a.view(), b.view(), b.view()]).unwrap();
        let four = proc
            .prepare(&[a.view(), b.view(), b.view(), b.view()])
            .unwrap();
        assert_eq!(three.patches, four.patches);
        assert_eq!(three.patches.grid_thw[0], 2);
        assert_eq!(three.frames, 3);
        assert!((three.second_per_grid - 1.0).abs() < 1e-12);
    }
}
