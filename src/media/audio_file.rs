//! Audio files: decoding WAV, FLAC, MP3, OGG/Vorbis and the AAC track of an MP4 (symphonia) to
//! mono f32 at the model's 16 kHz, and writing mono WAVs (hound).
//!
//! Channels are averaged to mono (as librosa's `to_mono`); the rate is converted with
//! [`crate::media::resample`] (the reference loads with librosa's soxr resampler, so resampled
//! audio is close to, not bit-equal with, what it sees; 16 kHz files are passed through as is).
//! Every error names the file.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, Decoder, DecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::{FormatOptions, FormatReader};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use crate::media::resample::{self, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, ResampleError};

/// The rate the audio tower's features are computed at.
pub const MODEL_SAMPLE_RATE: u32 = 16_000;

#[derive(Debug, thiserror::Error)]
pub enum AudioFileError {
    #[error("cannot open audio file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a supported audio file or corrupt ({reason})")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{path}: no decodable audio track")]
    NoAudioTrack { path: PathBuf },
    #[error("{path}: corrupt audio ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: the audio has zero samples")]
    Empty { path: PathBuf },
    #[error(
        "{path}: absurd sample rate {rate} Hz (expected {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE})"
    )]
    SampleRate { path: PathBuf, rate: u32 },
    #[error("{path}: resampling failed: {source}")]
    Resample {
        path: PathBuf,
        source: ResampleError,
    },
    #[error("cannot write WAV {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Decoded audio at its own rate, downmixed to mono.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    /// Channels of the source before the downmix.
    pub channels: usize,
}

impl DecodedAudio {
    pub fn duration_secs(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }
}

/// Loads an audio file (or the first audio track of a video file) as mono f32 at 16 kHz.
pub fn load_audio(path: impl AsRef<Path>) -> Result<Vec<f32>, AudioFileError> {
    load_audio_at(path, MODEL_SAMPLE_RATE)
}

/// Loads an audio file as mono f32 at `rate` Hz.
pub fn load_audio_at(path: impl AsRef<Path>, rate: u32) -> Result<Vec<f32>, AudioFileError> {
    let path = path.as_ref();
    let decoded = decode_file(path)?;
    resample::resample(&decoded.samples, decoded.sample_rate, rate).map_err(|source| match source {
        ResampleError::Rate(r) => AudioFileError::SampleRate {
            path: path.to_path_buf(),
            rate: r,
        },
        source => AudioFileError::Resample {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Decodes the first audio track of a file at its own rate, downmixed to mono.
pub fn decode_file(path: impl AsRef<Path>) -> Result<DecodedAudio, AudioFileError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| AudioFileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let edit = mp4_audio_edit(&mut std::io::BufReader::new(&file));
    let mut file = file;
    file.rewind().map_err(|source| AudioFileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let decoded = decode_source(
        MediaSourceStream::new(Box::new(file), Default::default()),
        hint,
        path,
    )?;
    apply_edit(decoded, edit, path)
}

/// Decodes an in-memory file (e.g. an upload); `name` is used in errors and its extension
/// as a format hint.
pub fn decode_bytes(
    bytes: Vec<u8>,
    name: impl AsRef<Path>,
) -> Result<DecodedAudio, AudioFileError> {
    let name = name.as_ref();
    let mut hint = Hint::new();
    if let Some(ext) = name.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let edit = mp4_audio_edit(&mut Cursor::new(&bytes));
    let decoded = decode_source(
        MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default()),
        hint,
        name,
    )?;
    apply_edit(decoded, edit, name)
}

/// The edit of an ISO-MP4 audio track: where its presentation starts in the decoded samples and
/// how long it lasts, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TrackEdit {
    skip_secs: f64,
    keep_secs: Option<f64>,
}

/// Reads the edit list of the first audio track of an ISO-MP4 file (`None` for anything else).
/// Symphonia 0.5 decodes MP4 tracks without it, so AAC's encoder priming (typically 1024
/// samples) would otherwise lead the audio; ffmpeg, which the reference loads videos with,
/// applies it.
fn mp4_audio_edit<R: Read + Seek>(reader: &mut R) -> Option<TrackEdit> {
    let mut head = [0u8; 8];
    reader.read_exact(&mut head).ok()?;
    if &head[4..8] != b"ftyp" {
        return None;
    }
    let size = reader.seek(SeekFrom::End(0)).ok()?;
    reader.seek(SeekFrom::Start(0)).ok()?;
    let mp4 = mp4::Mp4Reader::read_header(reader, size).ok()?;
    let movie_scale = mp4.timescale() as f64;
    let mut tracks: Vec<_> = mp4.tracks().values().collect();
    tracks.sort_by_key(|t| t.track_id());
    let track = tracks
        .into_iter()
        .find(|t| matches!(t.track_type(), Ok(mp4::TrackType::Audio)))?;
    let media_scale = track.timescale() as f64;
    let entries = &track.trak.edts.as_ref()?.elst.as_ref()?.entries;
    // Empty edits (media_time -1) only delay the track; the first real one says what plays.
    let entry = entries
        .iter()
        .find(|e| e.media_time != u32::MAX as u64 && e.media_time != u64::MAX)?;
    if media_scale <= 0.0 || movie_scale <= 0.0 {
        return None;
    }
    Some(TrackEdit {
        skip_secs: entry.media_time as f64 / media_scale,
        keep_secs: (entry.segment_duration > 0)
            .then(|| entry.segment_duration as f64 / movie_scale),
    })
}

fn apply_edit(
    mut decoded: DecodedAudio,
    edit: Option<TrackEdit>,
    path: &Path,
) -> Result<DecodedAudio, AudioFileError> {
    let Some(edit) = edit else {
        return Ok(decoded);
    };
    let rate = decoded.sample_rate as f64;
    let skip = ((edit.skip_secs * rate).round() as usize).min(decoded.samples.len());
    decoded.samples.drain(..skip);
    if let Some(keep) = edit.keep_secs {
        decoded.samples.truncate((keep * rate).round() as usize);
    }
    if decoded.samples.is_empty() {
        return Err(AudioFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(decoded)
}

fn decode_source(
    source: MediaSourceStream,
    hint: Hint,
    path: &Path,
) -> Result<DecodedAudio, AudioFileError> {
    let unsupported = |e: SymphoniaError| AudioFileError::Unsupported {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let format_options = FormatOptions {
        // Trim encoder delay and padding (MP3, AAC) so durations are the source's.
        enable_gapless: true,
        ..Default::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&hint, source, &format_options, &MetadataOptions::default())
        .map_err(unsupported)?;
    let mut format = probed.format;
    let (track_id, mut decoder) = first_audio_track(format.as_ref(), path)?;

    let mut samples = Vec::new();
    let mut rate: Option<u32> = None;
    let mut channels = 0;
    let mut skipped = 0usize;
    let mut last_error = None;
    loop {
        let packet = match format.next_packet() {
            Ok(packet) => packet,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break;
            }
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => {
                return Err(AudioFileError::Corrupt {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(decoded) => decoded,
            // A damaged packet: skip it as players do, but remember why.
            Err(SymphoniaError::DecodeError(e)) => {
                skipped += 1;
                last_error = Some(e.to_string());
                continue;
            }
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break;
            }
            Err(e) => {
                return Err(AudioFileError::Corrupt {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        };
        let spec = *decoded.spec();
        match rate {
            None => rate = Some(spec.rate),
            Some(r) if r != spec.rate => {
                return Err(AudioFileError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("sample rate changes from {r} to {} Hz", spec.rate),
                });
            }
            Some(_) => {}
        }
        channels = spec.channels.count();
        if decoded.frames() == 0 || channels == 0 {
            continue;
        }
        let mut buffer = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        buffer.copy_interleaved_ref(decoded);
        downmix_into(buffer.samples(), channels, &mut samples);
    }
    if skipped > 0 {
        tracing::warn!(
            "{}: skipped {skipped} damaged packet(s): {}",
            path.display(),
            last_error.as_deref().unwrap_or("")
        );
    }
    let rate = rate
        .or(decoder.codec_params().sample_rate)
        .unwrap_or_default();
    if samples.is_empty() {
        return Err(match last_error {
            Some(reason) => AudioFileError::Corrupt {
                path: path.to_path_buf(),
                reason,
            },
            None => AudioFileError::Empty {
                path: path.to_path_buf(),
            },
        });
    }
    if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
        return Err(AudioFileError::SampleRate {
            path: path.to_path_buf(),
            rate,
        });
    }
    if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
        return Err(AudioFileError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("sample {i} is not a finite number"),
        });
    }
    Ok(DecodedAudio {
        samples,
        sample_rate: rate,
        channels,
    })
}

/// The first track with a codec symphonia can decode (video tracks of an MP4 are skipped).
fn first_audio_track(
    format: &dyn FormatReader,
    path: &Path,
) -> Result<(u32, Box<dyn Decoder>), AudioFileError> {
    let mut reason = None;
    for track in format.tracks() {
        if track.codec_params.codec == CODEC_TYPE_NULL {
            continue;
        }
        match symphonia::default::get_codecs().make(&track.codec_params, &DecoderOptions::default())
        {
            Ok(decoder) => return Ok((track.id, decoder)),
            Err(e) => reason = Some(e.to_string()),
        }
    }
    Err(match reason {
        Some(reason) => AudioFileError::Unsupported {
            path: path.to_path_buf(),
            reason,
        },
        None => AudioFileError::NoAudioTrack {
            path: path.to_path_buf(),
        },
    })
}

/// Appends the channel mean of interleaved frames.
fn downmix_into(interleaved: &[f32], channels: usize, out: &mut Vec<f32>) {
    if channels == 1 {
        out.extend_from_slice(interleaved);
        return;
    }
    let scale = 1.0 / channels as f32;
    out.extend(
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() * scale),
    );
}

/// Sample format of a written WAV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WavFormat {
    /// 16-bit PCM; samples are clamped to [-1, 1].
    Pcm16,
    /// 32-bit IEEE float, samples as they are.
    Float32,
}

/// Writes mono samples as a WAV file at any sane rate.
pub fn write_wav(
    path: impl AsRef<Path>,
    samples: &[f32],
    sample_rate: u32,
    format: WavFormat,
) -> Result<(), AudioFileError> {
    let path = path.as_ref();
    let fail = |reason: String| AudioFileError::Write {
        path: path.to_path_buf(),
        reason,
    };
    check_write(samples, sample_rate, path)?;
    let file = File::create(path).map_err(|e| fail(e.to_string()))?;
    write_wav_to(std::io::BufWriter::new(file), samples, sample_rate, format)
        .map_err(|e| fail(e.to_string()))
}

/// The bytes of a mono WAV file.
pub fn wav_bytes(
    samples: &[f32],
    sample_rate: u32,
    format: WavFormat,
) -> Result<Vec<u8>, AudioFileError> {
    let name = Path::new("<in-memory WAV>");
    check_write(samples, sample_rate, name)?;
    let mut cursor = Cursor::new(Vec::new());
    write_wav_to(&mut cursor, samples, sample_rate, format).map_err(|e| AudioFileError::Write {
        path: name.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(cursor.into_inner())
}

fn check_write(samples: &[f32], sample_rate: u32, path: &Path) -> Result<(), AudioFileError> {
    if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&sample_rate) {
        return Err(AudioFileError::SampleRate {
            path: path.to_path_buf(),
            rate: sample_rate,
        });
    }
    if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
        return Err(AudioFileError::Write {
            path: path.to_path_buf(),
            reason: format!("sample {i} is not a finite number ({})", samples[i]),
        });
    }
    Ok(())
}

fn write_wav_to<W: Write + Seek>(
    writer: W,
    samples: &[f32],
    sample_rate: u32,
    format: WavFormat,
) -> hound::Result<()> {
    let (bits_per_sample, sample_format) = match format {
        WavFormat::Pcm16 => (16, hound::SampleFormat::Int),
        WavFormat::Float32 => (32, hound::SampleFormat::Float),
    };
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample,
        sample_format,
    };
    let mut wav = hound::WavWriter::new(writer, spec)?;
    match format {
        WavFormat::Pcm16 => {
            let mut ints = wav.get_i16_writer(samples.len() as u32);
            for &x in samples {
                ints.write_sample((x.clamp(-1.0, 1.0) * i16::MAX as f32).round() as i16);
            }
            ints.flush()?;
        }
        WavFormat::Float32 => {
            for &x in samples {
                wav.write_sample(x)?;
            }
        }
    }
    wav.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downmix_averages_channels() {
        let mut out = vec![9.0];
        downmix_into(&[1.0, 0.0, 0.5, -0.5, -1.0, -1.0], 2, &mut out);
        assert_eq!(out, vec![9.0, 0.5, 0.0, -1.0]);
        let mut mono = Vec::new();
        downmix_into(&[0.25, -0.25], 1, &mut mono);
        assert_eq!(mono, vec![0.25, -0.25]);
    }

    #[test]
    fn in_memory_wav_round_trip() {
        let ramp: Vec<f32> = (0..4800).map(|i| (i as f32 / 4800.0) - 0.5).collect();
        let bytes = wav_bytes(&ramp, 48_000, WavFormat::Float32).unwrap();
        let decoded = decode_bytes(bytes, "ramp.wav").unwrap();
        assert_eq!(decoded.samples, ramp);
        assert_eq!((decoded.sample_rate, decoded.channels), (48_000, 1));
        assert!((decoded.duration_secs() - 0.1).abs() < 1e-9);

        let bytes = wav_bytes(&[2.0, -2.0, 0.5], 8_000, WavFormat::Pcm16).unwrap();
        let decoded = decode_bytes(bytes, "clipped.wav").unwrap();
        // Clamped to full scale, 0.5 quantised to 16 bits.
        assert_eq!(decoded.samples[0], 32767.0 / 32768.0);
        assert_eq!(decoded.samples[1], -32767.0 / 32768.0);
        assert!((decoded.samples[2] - 0.5).abs() < 1.0 / 32768.0);
    }

    #[test]
    fn edit_lists_trim_priming_and_padding() {
        let audio = DecodedAudio {
            samples: (0..100).map(|i| i as f32).collect(),
            sample_rate: 10,
            channels: 1,
        };
        let edit = TrackEdit {
            skip_secs: 0.5,
            keep_secs: Some(2.0),
        };
        let trimmed = apply_edit(audio.clone(), Some(edit), Path::new("x.mp4")).unwrap();
        assert_eq!(
            trimmed.samples,
            (5..25).map(|i| i as f32).collect::<Vec<_>>()
        );
        let untouched = apply_edit(audio.clone(), None, Path::new("x.mp4")).unwrap();
        assert_eq!(untouched, audio);
        let all_cut = TrackEdit {
            skip_secs: 20.0,
            keep_secs: None,
        };
        let err = apply_edit(audio, Some(all_cut), Path::new("x.mp4")).unwrap_err();
        assert!(err.to_string().contains("x.mp4"), "{err}");
        // Not an MP4: no edit.
        assert_eq!(
            mp4_audio_edit(&mut Cursor::new(b"RIFF....WAVE".to_vec())),
            None
        );
    }

    #[test]
    fn garbage_bytes_name_the_source() {
        let err = decode_bytes(vec![7u8; 512], "upload.bin").unwrap_err();
        assert!(err.to_string().contains("upload.bin"), "{err}");
    }
}
