//! MP4 video files: the H.264 track demuxed with the `mp4` crate and decoded with OpenH264
//! ([`H264Decoder`]) into RGB frames with their presentation times.
//!
//! Samples are stored in decode order as length-prefixed NAL units (`avcC`); each is rewritten
//! as an Annex-B access unit, with the track's SPS/PPS in front of every sync sample. With
//! B-frames the decoder's output runs behind its input and comes out in display order, so the
//! k-th picture out gets the k-th smallest presentation time.
//!
//! [`Mp4Video::prepare`] samples the file as qwen-omni-utils does ([`sample_file_frames`]: an
//! even number of frames spread over the file at the processor's fps) and decodes only as far
//! as the last frame it needs, keeping only the sampled pictures. A folder of frames is
//! [`crate::media::video::FrameFolder`].

use std::fs::File;
use std::io::{BufReader, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mp4::{MediaType, Mp4Reader, TrackType};

use crate::media::image::{ImageError, RgbImage, RgbView};
use crate::media::video::{PreparedVideo, VideoError, VideoPreprocessor, sample_file_frames};
use crate::media::video_decode::{DEFAULT_MAX_PIXELS, H264Decoder, RgbFrame, VideoDecodeError};

/// Box types an MP4 (ISO base media) file can start with.
const LEADING_BOXES: [&[u8; 4]; 8] = [
    b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid",
];

#[derive(Debug, thiserror::Error)]
pub enum VideoFileError {
    #[error("cannot open video file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an MP4 file ({reason})")]
    NotMp4 { path: PathBuf, reason: String },
    #[error("{path}: corrupt MP4 ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: the MP4 has no video track")]
    NoVideoTrack { path: PathBuf },
    #[error("{path}: the video track is {codec}; only H.264 (avc1) video can be decoded")]
    UnsupportedCodec { path: PathBuf, codec: String },
    #[error("{path}: cannot decode video sample {sample}: {source}")]
    Decode {
        path: PathBuf,
        sample: u32,
        source: VideoDecodeError,
    },
    #[error("{path}: {source}")]
    Video { path: PathBuf, source: VideoError },
}

type Result<T> = std::result::Result<T, VideoFileError>;

/// A decoded picture and when it is shown, from the first picture of the file.
#[derive(Debug, Clone)]
pub struct TimedFrame {
    pub time: Duration,
    pub image: RgbImage,
}

/// The H.264 video track of an MP4 file, opened for decoding.
pub struct Mp4Video {
    path: PathBuf,
    reader: Mp4Reader<BufReader<File>>,
    track_id: u32,
    samples: u32,
    width: usize,
    height: usize,
    duration_secs: f64,
    timescale: u32,
    /// Bytes of the big-endian length in front of every NAL unit of a sample.
    nal_length_size: usize,
    /// SPS and PPS NAL units from `avcC`, as one Annex-B prefix.
    parameter_sets: Vec<u8>,
}

impl std::fmt::Debug for Mp4Video {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mp4Video")
            .field("path", &self.path)
            .field("track_id", &self.track_id)
            .field("frames", &self.samples)
            .field("size", &(self.width, self.height))
            .field("duration_secs", &self.duration_secs)
            .finish_non_exhaustive()
    }
}

/// Runs a call into the `mp4` crate, which panics on some malformed boxes, as an error.
fn guarded<T>(path: &Path, run: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|_| {
        Err(VideoFileError::Corrupt {
            path: path.to_path_buf(),
            reason: "the MP4 parser gave up on a malformed box".into(),
        })
    })
}

impl Mp4Video {
    /// Reads the file's boxes and picks its first H.264 video track.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let open_error = |source| VideoFileError::Open {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(open_error)?;
        let size = file.metadata().map_err(open_error)?.len();
        let mut head = [0u8; 8];
        let sniffed = file.read_exact(&mut head).is_ok();
        if !sniffed || !LEADING_BOXES.iter().any(|b| head[4..8] == b[..]) {
            return Err(VideoFileError::NotMp4 {
                path,
                reason: if sniffed {
                    "it does not start with an ISO media box".into()
                } else {
                    format!("{size} bytes is too short")
                },
            });
        }
        let file = File::open(&path).map_err(open_error)?;
        guarded(&path.clone(), move || Self::from_reader(path, file, size))
    }

    fn from_reader(path: PathBuf, file: File, size: u64) -> Result<Self> {
        let corrupt = |reason: String| VideoFileError::Corrupt {
            path: path.clone(),
            reason,
        };
        let reader = Mp4Reader::read_header(BufReader::new(file), size).map_err(|e| match e {
            mp4::Error::BoxNotFound(mp4::BoxType::MoovBox) => {
                corrupt("no moov box: the file is cut short or was never finished".into())
            }
            mp4::Error::BoxNotFound(b) => VideoFileError::NotMp4 {
                path: path.clone(),
                reason: format!("no {b} box"),
            },
            e => corrupt(e.to_string()),
        })?;
        let mut video_tracks: Vec<&mp4::Mp4Track> = reader
            .tracks()
            .values()
            .filter(|t| matches!(t.track_type(), Ok(TrackType::Video)))
            .collect();
        video_tracks.sort_by_key(|t| t.track_id());
        let Some(first) = video_tracks.first() else {
            return Err(VideoFileError::NoVideoTrack { path });
        };
        let track = video_tracks
            .iter()
            .find(|t| matches!(t.media_type(), Ok(MediaType::H264)))
            .copied()
            .ok_or_else(|| VideoFileError::UnsupportedCodec {
                path: path.clone(),
                codec: match first.media_type() {
                    Ok(MediaType::H265) => "HEVC (H.265)".into(),
                    Ok(MediaType::VP9) => "VP9".into(),
                    Ok(other) => other.to_string(),
                    Err(_) => "in a format this reader does not know (e.g. AV1, VP8, \
                               MPEG-4 part 2, or HEVC tagged hvc1)"
                        .into(),
                },
            })?;
        let avc1 = track
            .trak
            .mdia
            .minf
            .stbl
            .stsd
            .avc1
            .as_ref()
            .ok_or_else(|| corrupt("the H.264 track has no avc1 sample entry".into()))?;
        let avcc = &avc1.avcc;
        let nal_length_size = avcc.length_size_minus_one as usize % 4 + 1;
        if nal_length_size == 3 {
            return Err(corrupt("avcC gives 3-byte NAL lengths".into()));
        }
        let mut parameter_sets = Vec::new();
        for nal in avcc
            .sequence_parameter_sets
            .iter()
            .chain(&avcc.picture_parameter_sets)
        {
            parameter_sets.extend_from_slice(&[0, 0, 0, 1]);
            parameter_sets.extend_from_slice(&nal.bytes);
        }
        if avcc.sequence_parameter_sets.is_empty() || avcc.picture_parameter_sets.is_empty() {
            return Err(corrupt("avcC holds no SPS/PPS".into()));
        }
        let mdhd = &track.trak.mdia.mdhd;
        if mdhd.timescale == 0 {
            return Err(corrupt("the video track's timescale is 0".into()));
        }
        let duration_secs = mdhd.duration as f64 / mdhd.timescale as f64;
        // The parser allocates each sample's declared size before reading it: a corrupt size
        // must not become a huge allocation.
        let stsz = &track.trak.mdia.minf.stbl.stsz;
        let largest_sample = track
            .trafs
            .iter()
            .filter_map(|traf| traf.trun.as_ref())
            .flat_map(|trun| trun.sample_sizes.iter().copied())
            .chain(stsz.sample_sizes.iter().copied())
            .chain([stsz.sample_size])
            .max()
            .unwrap_or(0);
        if largest_sample as u64 > size {
            return Err(corrupt(format!(
                "a video sample claims {largest_sample} bytes in a file of {size}"
            )));
        }
        let samples = track.sample_count();
        if samples == 0 {
            return Err(corrupt("the video track has no frames".into()));
        }
        if duration_secs.is_nan() || duration_secs <= 0.0 {
            return Err(corrupt("the video track has no duration".into()));
        }
        let (track_id, width, height, timescale) = (
            track.track_id(),
            track.width() as usize,
            track.height() as usize,
            mdhd.timescale,
        );
        Ok(Self {
            path,
            reader,
            track_id,
            samples,
            width,
            height,
            duration_secs,
            timescale,
            nal_length_size,
            parameter_sets,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Frames of the track.
    pub fn frame_count(&self) -> usize {
        self.samples as usize
    }

    /// (width, height) the sample entry declares.
    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_secs)
    }

    /// Average frame rate (frames over the track's duration), as video readers report it.
    pub fn fps(&self) -> f64 {
        self.samples as f64 / self.duration_secs
    }

    /// Every frame in display order.
    pub fn decode_all(&mut self) -> Result<Vec<TimedFrame>> {
        let all: Vec<usize> = (0..self.frame_count()).collect();
        self.decode_frames(&all)
    }

    /// The frames at `indices` (positions in display order, any order, repeats allowed),
    /// returned in the order asked for. Decoding stops once every asked-for picture is out.
    pub fn decode_frames(&mut self, indices: &[usize]) -> Result<Vec<TimedFrame>> {
        let Some(&last) = indices.iter().max() else {
            return Ok(Vec::new());
        };
        if last >= self.frame_count() {
            return Err(self.corrupt(format!(
                "frame {last} asked for, the track has {}",
                self.frame_count()
            )));
        }
        let path = self.path.clone();
        guarded(&path, || self.decode_until(indices, last))
    }

    fn decode_until(&mut self, indices: &[usize], last: usize) -> Result<Vec<TimedFrame>> {
        let mut wanted = indices.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let mut decoder =
            H264Decoder::new(DEFAULT_MAX_PIXELS).map_err(|source| VideoFileError::Decode {
                path: self.path.clone(),
                sample: 0,
                source,
            })?;
        // Presentation times (track ticks) of the samples fed so far, and the pictures out.
        let mut times: Vec<i64> = Vec::with_capacity(self.samples as usize);
        let mut kept: Vec<(usize, RgbFrame)> = Vec::with_capacity(wanted.len());
        let mut produced = 0usize;
        let mut keep = |frame: RgbFrame, produced: &mut usize| {
            if wanted.binary_search(produced).is_ok() {
                kept.push((*produced, frame));
            }
            *produced += 1;
        };
        let mut access_unit = Vec::new();
        for sample_id in 1..=self.samples {
            if produced > last {
                break;
            }
            let sample = self
                .reader
                .read_sample(self.track_id, sample_id)
                .map_err(|e| self.corrupt(format!("sample {sample_id}: {e}")))?
                .ok_or_else(|| self.corrupt(format!("sample {sample_id} is missing")))?;
            times.push(sample.start_time as i64 + sample.rendering_offset as i64);
            access_unit.clear();
            if sample.is_sync || sample_id == 1 {
                access_unit.extend_from_slice(&self.parameter_sets);
            }
            self.append_annex_b(&sample.bytes, sample_id, &mut access_unit)?;
            let decode_error = |source| VideoFileError::Decode {
                path: self.path.clone(),
                sample: sample_id,
                source,
            };
            if let Some(frame) = decoder.decode(&access_unit).map_err(decode_error)? {
                keep(frame, &mut produced);
            }
        }
        if produced <= last {
            let flush_error = |source| VideoFileError::Decode {
                path: self.path.clone(),
                sample: self.samples,
                source,
            };
            for frame in decoder.flush().map_err(flush_error)? {
                keep(frame, &mut produced);
            }
        }
        if produced <= last {
            return Err(self.corrupt(format!(
                "the decoder gave {produced} pictures for {} samples",
                self.samples
            )));
        }
        // Pictures come out in display order: the k-th gets the k-th presentation time of the
        // samples read (all of them when the file was read to its end).
        times.sort_unstable();
        let origin = times.first().copied().unwrap_or(0);
        let time_of = |k: usize| -> Duration {
            let ticks = times.get(k).map_or(0, |&t| (t - origin).max(0));
            Duration::from_secs_f64(ticks as f64 / self.timescale as f64)
        };
        let mut by_index: Vec<(usize, TimedFrame)> = Vec::with_capacity(kept.len());
        for (k, frame) in kept {
            let image = RgbImage::new(frame.width, frame.height, frame.data)
                .map_err(|e: ImageError| self.corrupt(format!("decoded picture {k}: {e}")))?;
            by_index.push((
                k,
                TimedFrame {
                    time: time_of(k),
                    image,
                },
            ));
        }
        indices
            .iter()
            .map(|i| {
                by_index
                    .iter()
                    .find(|(k, _)| k == i)
                    .map(|(_, f)| f.clone())
                    .ok_or_else(|| self.corrupt(format!("picture {i} was not decoded")))
            })
            .collect()
    }

    /// Rewrites one sample's length-prefixed NAL units as Annex-B (start codes).
    fn append_annex_b(&self, sample: &[u8], sample_id: u32, out: &mut Vec<u8>) -> Result<()> {
        let n = self.nal_length_size;
        let mut rest = sample;
        while !rest.is_empty() {
            if rest.len() < n {
                return Err(self.corrupt(format!("sample {sample_id}: truncated NAL length")));
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | b as usize);
            rest = &rest[n..];
            if len == 0 || len > rest.len() {
                return Err(self.corrupt(format!(
                    "sample {sample_id}: NAL unit of {len} bytes in {} remaining",
                    rest.len()
                )));
            }
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(&rest[..len]);
            rest = &rest[len..];
        }
        Ok(())
    }

    fn corrupt(&self, reason: String) -> VideoFileError {
        VideoFileError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    /// The frames qwen-omni-utils reads at `processor`'s fps ([`sample_file_frames`]),
    /// prepared by the video processor; the seconds per grid follow the fps the sampled frames
    /// really have.
    pub fn prepare(&mut self, processor: &VideoPreprocessor) -> Result<PreparedVideo> {
        let video_error = |source| VideoFileError::Video {
            path: self.path.clone(),
            source,
        };
        let (indices, sample_fps) =
            sample_file_frames(self.frame_count(), self.fps(), processor.fps())
                .map_err(video_error)?;
        let frames = self.decode_frames(&indices)?;
        let views: Vec<RgbView<'_>> = frames.iter().map(|f| f.image.view()).collect();
        let mut video = processor
            .prepare(&views)
            .map_err(|source| VideoFileError::Video {
                path: self.path.clone(),
                source,
            })?;
        video.second_per_grid = processor.frame_settings().temporal_patch_size as f64 / sample_fps;
        Ok(video)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn media(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/media")
            .join(name)
    }

    fn mean_red(image: &RgbImage) -> f64 {
        let data = image.data();
        data.iter().step_by(3).map(|&v| v as f64).sum::<f64>() / (data.len() / 3) as f64
    }

    /// ramp_bframes.mp4: 8 grey frames at 4 fps (luma 20 + 25 k), I B B B P B B P in display
    /// order, so the decoder reorders.
    #[test]
    fn b_frames_come_out_in_display_order_with_their_times() {
        let mut video = Mp4Video::open(media("ramp_bframes.mp4")).unwrap();
        assert_eq!(video.frame_count(), 8);
        assert_eq!(video.size(), (64, 48));
        assert!((video.fps() - 4.0).abs() < 1e-9, "{}", video.fps());
        let frames = video.decode_all().unwrap();
        assert_eq!(frames.len(), 8);
        for (k, frame) in frames.iter().enumerate() {
            assert_eq!(
                frame.time,
                Duration::from_millis(250 * k as u64),
                "frame {k}"
            );
            assert_eq!((frame.image.width(), frame.image.height()), (64, 48));
            // BT.601 video range: (Y - 16) * 255 / 219.
            let want = (20.0 + 25.0 * k as f64 - 16.0) * 255.0 / 219.0;
            let got = mean_red(&frame.image);
            assert!((got - want).abs() < 2.0, "frame {k}: red {got} vs {want}");
        }
        // A subset, asked for out of order and with a repeat, comes back as asked.
        let some = video.decode_frames(&[5, 0, 5, 2]).unwrap();
        let times: Vec<u128> = some.iter().map(|f| f.time.as_millis()).collect();
        assert_eq!(times, [1250, 0, 1250, 500]);
        assert_eq!(some[0].image, frames[5].image);
        assert!(video.decode_frames(&[8]).is_err());
    }

    #[test]
    fn a_file_is_sampled_and_prepared_as_qwen_omni_utils_does() {
        let mut video = Mp4Video::open(media("speech.mp4")).unwrap();
        assert_eq!((video.frame_count(), video.size()), (8, (64, 48)));
        let processor = VideoPreprocessor::new(
            &crate::model::config::ImageProcessorConfig::default(),
            crate::media::video::DEFAULT_FPS,
        )
        .unwrap();
        // 8 frames at 2 fps, sampled at 2 fps: all of them, 1 s per temporal grid.
        let prepared = video.prepare(&processor).unwrap();
        assert_eq!(prepared.frames, 8);
        assert_eq!(prepared.patches.grid_thw[0], 4);
        assert!((prepared.second_per_grid - 1.0).abs() < 1e-12);
        // Sampled at 1 fps: 4 frames spread over the file, 2 s per grid.
        let slow =
            VideoPreprocessor::new(&crate::model::config::ImageProcessorConfig::default(), 1.0)
                .unwrap();
        let prepared = video.prepare(&slow).unwrap();
        assert_eq!(prepared.frames, 4);
        assert!((prepared.second_per_grid - 2.0).abs() < 1e-12);
    }

    #[test]
    fn unsupported_and_broken_files_are_named_errors() {
        let err = |name: &str| Mp4Video::open(media(name)).unwrap_err();
        let hevc = err("hevc.mp4");
        assert!(
            matches!(hevc, VideoFileError::UnsupportedCodec { .. }),
            "{hevc}"
        );
        assert!(hevc.to_string().contains("HEVC") && hevc.to_string().contains("hevc.mp4"));
        let vp9 = err("vp9.mp4").to_string();
        assert!(vp9.contains("VP9"), "{vp9}");
        let audio = err("audio_only.mp4");
        assert!(
            matches!(audio, VideoFileError::NoVideoTrack { .. }),
            "{audio}"
        );
        let wav = err("speech.wav");
        assert!(matches!(wav, VideoFileError::NotMp4 { .. }), "{wav}");
        assert!(wav.to_string().contains("speech.wav"));
        let missing = err("no_such_video.mp4");
        assert!(matches!(missing, VideoFileError::Open { .. }), "{missing}");

        // Cut-off copies of a good file fail cleanly wherever they are cut.
        let bytes = std::fs::read(media("speech.mp4")).unwrap();
        let dir = std::env::temp_dir().join(format!("omnicall-video-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for cut in [4, 40, 700, bytes.len() / 2, bytes.len() - 9] {
            let path = dir.join(format!("cut{cut}.mp4"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            if let Ok(mut video) = Mp4Video::open(&path) {
                let _ = video.decode_all();
            }
            // Flipped bytes in the middle of the boxes.
            let mut flipped = bytes.clone();
            for b in &mut flipped[cut.min(bytes.len() - 64)..][..64] {
                *b ^= 0x5a;
            }
            std::fs::write(&path, &flipped).unwrap();
            if let Ok(mut video) = Mp4Video::open(&path) {
                let _ = video.decode_all();
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn annex_b_rewrite_checks_lengths() {
        let mut video = Mp4Video::open(media("speech.mp4")).unwrap();
        video.nal_length_size = 2;
        let mut out = Vec::new();
        video
            .append_annex_b(&[0, 2, 0x65, 1, 0, 1, 0x41], 1, &mut out)
            .unwrap();
        assert_eq!(out, [0, 0, 0, 1, 0x65, 1, 0, 0, 0, 1, 0x41]);
        let err = video.append_annex_b(&[0, 5, 1], 7, &mut out).unwrap_err();
        assert!(err.to_string().contains("sample 7"), "{err}");
    }
}
