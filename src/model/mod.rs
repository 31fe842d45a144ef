//! Pure candle math of Qwen2.5-Omni: configuration, weights, Thinker, Talker and token2wav.
//! No I/O beyond reading a model folder, no threads.

pub mod config;
pub mod thinker;
