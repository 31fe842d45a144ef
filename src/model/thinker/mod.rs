//! The Thinker: a Qwen2.5 decoder fed with text, audio and vision embeddings.

pub mod decoder;
