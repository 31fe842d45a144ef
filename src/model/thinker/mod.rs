//! The Thinker: a Qwen2.5 decoder fed with text, audio and vision embeddings.

pub mod audio_encoder;
pub mod decoder;
pub mod rope;
pub mod vision_encoder;
