//! Qwen3-Omni (`model_type` "qwen3_omni_moe"), beside Qwen2.5-Omni: the Thinker (Qwen3-MoE
//! text decoder, AuT audio encoder, vision encoder with DeepStack, multimodal positions), the
//! Talker with its code predictor, Code2Wav offline and streamed, and one chat turn
//! ([`pipeline`]). `docs/qwen3-omni.md` has the parity figures and the first-audio schedule.
//!
//! Shared with Qwen2.5-Omni: the weight loading ([`crate::model::loading`], which tells the
//! families apart by `model_type`), sampling, the log-mel and the image/video preparation (with
//! this family's patch size and normalisation), the KV cache with truncation, the linear layers
//! and the RoPE config fields. Different, and kept explicit here: the interleaved M-RoPE, q/k norms, the MoE
//! feed-forward (a shared expert in the Talker), 16 codebooks per 80 ms frame, and a causal
//! ConvNet speech decoder that needs no window of future codes.

pub mod attention;
pub mod audio_encoder;
pub mod code2wav;
pub mod code2wav_transformer;
pub mod code_predictor;
pub mod config;
pub mod moe;
pub mod moe_decoder;
pub mod pipeline;
pub mod rope_index;
pub mod rotary;
pub mod speech;
pub mod talker;
pub mod thinker;
pub mod thinker_text;
pub mod vision_encoder;
