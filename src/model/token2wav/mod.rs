//! token2wav: codec tokens to a 24 kHz waveform (flow-matching DiT, then BigVGAN).

pub mod bigvgan;
pub mod dit;
pub mod ecapa;
pub mod streaming;
