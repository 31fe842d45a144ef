//! Qwen3-Omni (`model_type` "qwen3_omni_moe"), beside Qwen2.5-Omni: the Thinker's Qwen3-MoE
//! text decoder and Code2Wav so far. Shared with Qwen2.5-Omni: the weight loading, the KV cache
//! with truncation, the linear layers, the RoPE config fields; different and kept explicit
//! here: the interleaved M-RoPE, q/k norms, the MoE feed-forward and the causal ConvNet decoder.

pub mod attention;
pub mod code2wav;
pub mod code2wav_transformer;
pub mod code_predictor;
pub mod config;
pub mod moe;
pub mod moe_decoder;
pub mod rotary;
pub mod talker;
pub mod thinker_text;
