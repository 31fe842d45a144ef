//! The media of an offline prompt, from files or from memory, prepared as the processor does
//! and handed to the model as [`MediaInput`]s: log-mel features of 16 kHz audio, image patches,
//! video patches (an MP4/H.264 file or a folder of frames) with, on request, the file's sound
//! track.
//!
//! Videos are resized within qwen-omni-utils' per-frame pixel bounds (the official pipeline's
//! `VIDEO_MIN_PIXELS` / `VIDEO_MAX_PIXELS`, the latter shrunk for long videos so that all
//! frames stay within `VIDEO_TOTAL_PIXELS`) unless fixed bounds are given; images use the
//! processor config's bounds, as the official image loader's are the same.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::Device;

use crate::media::audio_file;
use crate::media::image::{ImagePreprocessor, RgbImage, RgbView};
use crate::media::mel::LogMel;
use crate::media::video::{
    FRAME_FACTOR, FrameFolder, OFFICIAL_VIDEO_MAX_PIXELS, OFFICIAL_VIDEO_MIN_PIXELS, PreparedVideo,
    VideoPreprocessor, smart_nframes,
};
use crate::media::video_file::Mp4Video;
use crate::model::config::{ImageProcessorConfig, ProcessorConfig};
use crate::model::pipeline::MediaInput;

/// qwen-omni-utils' `VIDEO_TOTAL_PIXELS` (128000 * 28 * 28 * 0.9): the pixel budget of all the
/// frames of one video.
pub const OFFICIAL_VIDEO_TOTAL_PIXELS: usize = 90_316_800;

/// qwen-omni-utils' per-frame bounds for a video of `nframes` sampled frames:
/// `max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / nframes * FRAME_FACTOR), 1.05 *
/// VIDEO_MIN_PIXELS)`.
pub fn official_video_pixel_bounds(nframes: usize) -> (usize, usize) {
    let budget = OFFICIAL_VIDEO_TOTAL_PIXELS as f64 / nframes.max(1) as f64 * FRAME_FACTOR as f64;
    let max = (OFFICIAL_VIDEO_MAX_PIXELS as f64)
        .min(budget)
        .max((OFFICIAL_VIDEO_MIN_PIXELS as f64 * 1.05).floor());
    (OFFICIAL_VIDEO_MIN_PIXELS, max as usize)
}

/// Turns prompt media into encoder inputs with one model's processor settings.
#[derive(Debug, Clone)]
pub struct MediaPreparer {
    mel: LogMel,
    images: ImagePreprocessor,
    video_settings: ImageProcessorConfig,
    fps: f64,
    video_pixel_bounds: Option<(usize, usize)>,
}

impl MediaPreparer {
    /// `fps`: the rate videos are sampled at (the model was trained at 2), and the rate of the
    /// frames of a frame folder.
    pub fn new(processor: &ProcessorConfig, fps: f64) -> anyhow::Result<Self> {
        if !(fps.is_finite() && fps > 0.0) {
            bail!(
                "the video sampling rate must be a positive number of frames per second, got {fps}"
            );
        }
        let mel = LogMel::new(&processor.feature_extractor)
            .context("the processor's feature extractor settings")?;
        let images = ImagePreprocessor::new(&processor.image_processor)
            .context("the processor's image settings")?;
        // Checks the video settings and the fps once, up front.
        VideoPreprocessor::new(&processor.video_processor, fps)
            .context("the processor's video settings")?;
        Ok(Self {
            mel,
            images,
            video_settings: processor.video_processor.clone(),
            fps,
            video_pixel_bounds: None,
        })
    }

    /// Resizes every video frame within these bounds instead of qwen-omni-utils' (a processor
    /// call's `min_pixels` / `max_pixels`).
    pub fn with_video_pixel_bounds(mut self, min_pixels: usize, max_pixels: usize) -> Self {
        self.video_pixel_bounds = Some((min_pixels, max_pixels));
        self
    }

    pub fn fps(&self) -> f64 {
        self.fps
    }

    /// The rate audio must be at.
    pub fn sample_rate(&self) -> usize {
        self.mel.sampling_rate()
    }

    fn video_processor(&self, nframes: usize) -> anyhow::Result<VideoPreprocessor> {
        let (min, max) = self
            .video_pixel_bounds
            .unwrap_or_else(|| official_video_pixel_bounds(nframes));
        Ok(VideoPreprocessor::new(&self.video_settings, self.fps)?.with_pixel_bounds(min, max))
    }

    /// Log-mel features of mono samples at [`Self::sample_rate`].
    pub fn audio(&self, samples: &[f32]) -> anyhow::Result<MediaInput> {
        let features = self.mel.features(samples)?.to_tensor(&Device::Cpu)?;
        Ok(MediaInput::Audio { features })
    }

    /// An audio file (WAV, FLAC, MP3, OGG, or the sound track of an MP4).
    pub fn audio_file(&self, path: &Path) -> anyhow::Result<MediaInput> {
        let samples = self.load_audio(path)?;
        self.audio(&samples)
            .with_context(|| format!("audio file {}", path.display()))
    }

    fn load_audio(&self, path: &Path) -> anyhow::Result<Vec<f32>> {
        let rate = u32::try_from(self.sample_rate()).context("feature extractor sampling rate")?;
        Ok(audio_file::load_audio_at(path, rate)?)
    }

    /// A still image.
    pub fn image(&self, image: RgbView<'_>) -> anyhow::Result<MediaInput> {
        let patches = self.images.prepare_image(image)?;
        Ok(MediaInput::Image {
            pixel_values: patches.to_tensor(&Device::Cpu)?,
            grid_thw: patches.grid_thw,
        })
    }

    /// A PNG or JPEG file.
    pub fn image_file(&self, path: &Path) -> anyhow::Result<MediaInput> {
        let image = RgbImage::open(path)?;
        self.image(image.view())
            .with_context(|| format!("image file {}", path.display()))
    }

    /// Frames already at [`Self::fps`] (none are dropped), with the video's sound track at
    /// [`Self::sample_rate`] when it is to be interleaved with it.
    pub fn video_frames(
        &self,
        frames: &[RgbView<'_>],
        audio: Option<&[f32]>,
    ) -> anyhow::Result<MediaInput> {
        let video = self.video_processor(frames.len())?.prepare(frames)?;
        self.video_input(video, audio)
    }

    fn video_input(
        &self,
        video: PreparedVideo,
        audio: Option<&[f32]>,
    ) -> anyhow::Result<MediaInput> {
        let audio_features = match audio {
            Some(samples) => Some(
                self.mel
                    .features(samples)
                    .context("the video's sound track")?
                    .to_tensor(&Device::Cpu)?,
            ),
            None => None,
        };
        Ok(MediaInput::Video {
            pixel_values: video.patches.to_tensor(&Device::Cpu)?,
            grid_thw: video.patches.grid_thw,
            second_per_grid: video.second_per_grid,
            audio_features,
        })
    }

    /// A video: an MP4 (H.264) file sampled at [`Self::fps`], or a folder of PNG/JPEG frames
    /// taken as frames at [`Self::fps`]. With `with_audio` the MP4's sound track is
    /// interleaved with it.
    pub fn video_file(&self, path: &Path, with_audio: bool) -> anyhow::Result<MediaInput> {
        let prepared = if path.is_dir() {
            if with_audio {
                bail!(
                    "{} is a folder of frames, which has no sound track to use with the video \
                     (give an MP4 file, or leave out --use-audio-in-video)",
                    path.display()
                );
            }
            let folder = FrameFolder::open(path, self.fps)?;
            let nframes = smart_nframes(folder.frames.len(), self.fps, self.fps)
                .with_context(|| format!("video folder {}", path.display()))?;
            folder
                .prepare(&self.video_processor(nframes)?)
                .with_context(|| format!("video folder {}", path.display()))?
        } else {
            let mut video = Mp4Video::open(path)?;
            let nframes = smart_nframes(video.frame_count(), video.fps(), self.fps)
                .with_context(|| format!("video file {}", path.display()))?;
            video.prepare(&self.video_processor(nframes)?)?
        };
        let audio = if with_audio {
            Some(self.load_audio(path).with_context(|| {
                format!(
                    "the sound track of {} (needed by --use-audio-in-video)",
                    path.display()
                )
            })?)
        } else {
            None
        };
        self.video_input(prepared, audio.as_deref())
            .with_context(|| format!("video file {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn media(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/media")
            .join(name)
    }

    fn preparer() -> MediaPreparer {
        MediaPreparer::new(&ProcessorConfig::default(), 2.0).unwrap()
    }

    #[test]
    fn official_bounds_shrink_for_long_videos_only() {
        assert_eq!(
            official_video_pixel_bounds(8),
            (OFFICIAL_VIDEO_MIN_PIXELS, OFFICIAL_VIDEO_MAX_PIXELS)
        );
        let (_, max) = official_video_pixel_bounds(768);
        assert_eq!(max, 235_200);
        // Never below 1.05 x the minimum.
        let (min, max) = official_video_pixel_bounds(100_000);
        assert_eq!(max, (min as f64 * 1.05).floor() as usize);
    }

    #[test]
    fn an_mp4_with_its_sound_track_and_the_same_frames_from_a_folder() {
        let p = preparer();
        let MediaInput::Video {
            grid_thw,
            second_per_grid,
            audio_features: Some(audio),
            pixel_values,
        } = p.video_file(&media("speech.mp4"), true).unwrap()
        else {
            panic!("not a video with audio");
        };
        // 8 frames at 2 fps: 4 temporal grids of 1 s; 64x48 scaled up to the official minimum.
        assert_eq!(grid_thw[0], 4);
        let patch = ImageProcessorConfig::default().patch_size;
        assert!(grid_thw[1] * grid_thw[2] * patch * patch >= OFFICIAL_VIDEO_MIN_PIXELS);
        assert!((second_per_grid - 1.0).abs() < 1e-12);
        let frames = audio.dim(1).unwrap();
        assert_eq!(frames, 380, "3.8 s of AAC at 100 frames/s");

        // The decoded frames written out as a folder prepare to the same patches.
        let dir = std::env::temp_dir().join(format!("omnicall-offline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let decoded = Mp4Video::open(media("speech.mp4"))
            .unwrap()
            .decode_all()
            .unwrap();
        for (i, f) in decoded.iter().enumerate() {
            ::image::RgbImage::from_raw(
                f.image.width() as u32,
                f.image.height() as u32,
                f.image.data().to_vec(),
            )
            .unwrap()
            .save(dir.join(format!("frame{i:03}.png")))
            .unwrap();
        }
        let MediaInput::Video {
            pixel_values: folder_pixels,
            grid_thw: folder_grid,
            ..
        } = p.video_file(&dir, false).unwrap()
        else {
            panic!("not a video");
        };
        assert_eq!(folder_grid, grid_thw);
        assert_eq!(
            folder_pixels.to_vec2::<f32>().unwrap(),
            pixel_values.to_vec2::<f32>().unwrap()
        );
        let err = p.video_file(&dir, true).unwrap_err().to_string();
        assert!(err.contains("no sound track"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let p = preparer();
        let err = format!(
            "{:#}",
            p.video_file(&media("video_only.mp4"), true).unwrap_err()
        );
        assert!(err.contains("video_only.mp4"), "{err}");
        let err = format!("{:#}", p.image_file(&media("speech.wav")).unwrap_err());
        assert!(err.contains("speech.wav"), "{err}");
        let err = format!("{:#}", p.audio_file(&media("src_a.png")).unwrap_err());
        assert!(err.contains("src_a.png"), "{err}");
        let err = format!("{:#}", p.video_file(&media("hevc.mp4"), false).unwrap_err());
        assert!(err.contains("HEVC"), "{err}");
    }
}
