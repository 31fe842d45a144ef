//! omnicall: realtime voice and video calls with Qwen2.5-Omni, in Rust on candle.
//!
//! Four layers, data flowing one way: `model` (pure candle math), `media` (signal work around
//! the model), `engine` (the realtime session) and the transports that drive a session.

pub mod bench;
pub mod check;
pub mod engine;
pub mod local;
pub mod media;
pub mod model;
pub mod rtc;
