//! Signal work around the model: features, image and video preparation, resampling, codecs, VAD,
//! echo cancellation.

pub mod audio_file;
pub mod echo;
pub mod image;
pub mod mel;
pub mod offline;
pub mod opus;
pub mod resample;
pub mod silero;
pub mod smart_turn;
pub mod vad;
pub mod video;
pub mod video_decode;
pub mod video_file;
