//! `omnicall local`: a call with the model from this machine's microphone, speaker and camera,
//! or from WAV files for tests and headless machines.

pub mod camera;
pub mod device;
pub mod echo;
pub mod sink;
pub mod source;
pub mod transcript;
