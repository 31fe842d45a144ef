//! Pure candle math of Qwen2.5-Omni: configuration, weights, Thinker, Talker and token2wav.
//! No I/O beyond reading a model folder, no threads.

pub mod activation;
pub mod chat;
pub mod config;
pub mod linear;
pub mod loading;
pub mod norm;
pub mod omni;
pub mod pipeline;
pub mod qwen3_omni;
pub mod random_weights;
pub mod sampling;
pub mod silero_vad;
pub mod smart_turn;
pub mod speakers;
pub mod talker;
pub mod thinker;
pub mod token2wav;
