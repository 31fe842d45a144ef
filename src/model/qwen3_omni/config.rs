//! Serde types for the published Qwen3-Omni `config.json` (`Qwen3OmniMoeConfig`).
//!
//! Every struct is `#[serde(default)]` with the defaults of the reference's configuration
//! classes (transformers `configuration_qwen3_omni_moe.py`), because writers leave out values
//! equal to those defaults. RoPE settings are read in both layouts (published `rope_scaling` +
//! `rope_theta`, newer `rope_parameters`) through the shared [`RopeFields`].

use serde::{Deserialize, Serialize};

use crate::model::config::{RopeFields, TokenIds};

/// The `model_type` of the whole model, which tells this family from Qwen2.5-Omni.
pub const MODEL_TYPE: &str = "qwen3_omni_moe";

/// `Qwen3OmniMoeConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub model_type: String,
    pub thinker_config: ThinkerConfig,
    pub talker_config: TalkerConfig,
    pub code2wav_config: Code2WavConfig,
    pub enable_audio_output: bool,
    pub im_start_token_id: u32,
    pub im_end_token_id: u32,
    pub tts_pad_token_id: u32,
    pub tts_bos_token_id: u32,
    pub tts_eos_token_id: u32,
    pub system_token_id: u32,
    pub user_token_id: u32,
    pub assistant_token_id: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            model_type: MODEL_TYPE.to_string(),
            thinker_config: ThinkerConfig::default(),
            talker_config: TalkerConfig::default(),
            code2wav_config: Code2WavConfig::default(),
            enable_audio_output: true,
            im_start_token_id: 151644,
            im_end_token_id: 151645,
            tts_pad_token_id: 151671,
            tts_bos_token_id: 151672,
            tts_eos_token_id: 151673,
            system_token_id: 8948,
            user_token_id: 872,
            assistant_token_id: 77091,
        }
    }
}

impl Config {
    /// The published Qwen3-Omni-30B-A3B shapes (`models/qwen3-omni-30b-a3b/config.json`), built in
    /// so that benchmarks run from anywhere.
    pub fn published_30b_a3b() -> anyhow::Result<Self> {
        Self::from_json(include_str!(
            "../../../models/qwen3-omni-30b-a3b/config.json"
        ))
    }

    /// Parses `config.json`; a `model_type` of another family is an error naming it.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let config: Self = serde_json::from_str(text)?;
        anyhow::ensure!(
            config.model_type == MODEL_TYPE,
            "config.json has model_type {:?}, expected {MODEL_TYPE:?} for Qwen3-Omni",
            config.model_type
        );
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields that the math relies on, naming the field at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        let text = &self.thinker_config.text_config;
        anyhow::ensure!(
            text.num_key_value_heads > 0
                && text
                    .num_attention_heads
                    .is_multiple_of(text.num_key_value_heads),
            "thinker text_config.num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
            text.num_attention_heads,
            text.num_key_value_heads
        );
        if let Some(sec) = text.rope.mrope_section() {
            anyhow::ensure!(
                sec.len() == 3 && sec.iter().sum::<usize>() * 2 == text.head_dim(),
                "thinker text_config mrope_section {sec:?} must have 3 parts covering head_dim {} (2*sum)",
                text.head_dim()
            );
        }
        anyhow::ensure!(
            text.num_experts_per_tok <= text.num_experts,
            "thinker text_config.num_experts_per_tok ({}) exceeds num_experts ({})",
            text.num_experts_per_tok,
            text.num_experts
        );
        let c2w = &self.code2wav_config;
        anyhow::ensure!(
            c2w.num_attention_heads > 0 && c2w.hidden_size.is_multiple_of(c2w.num_attention_heads),
            "code2wav_config.hidden_size ({}) is not a multiple of num_attention_heads ({})",
            c2w.hidden_size,
            c2w.num_attention_heads
        );
        anyhow::ensure!(
            c2w.num_key_value_heads > 0
                && c2w
                    .num_attention_heads
                    .is_multiple_of(c2w.num_key_value_heads),
            "code2wav_config.num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
            c2w.num_attention_heads,
            c2w.num_key_value_heads
        );
        anyhow::ensure!(
            c2w.decoder_dim
                .is_multiple_of(1 << c2w.upsample_rates.len()),
            "code2wav_config.decoder_dim ({}) must halve {} times",
            c2w.decoder_dim,
            c2w.upsample_rates.len()
        );
        Ok(())
    }
}

/// `Qwen3OmniMoeThinkerConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ThinkerConfig {
    pub text_config: TextConfig,
    pub audio_config: AudioEncoderConfig,
    pub vision_config: VisionEncoderConfig,
    pub position_id_per_seconds: usize,
    pub audio_start_token_id: u32,
    pub audio_token_id: u32,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub user_token_id: u32,
    pub tie_word_embeddings: bool,
}

impl Default for ThinkerConfig {
    fn default() -> Self {
        Self {
            text_config: TextConfig::default(),
            audio_config: AudioEncoderConfig::default(),
            vision_config: VisionEncoderConfig::default(),
            position_id_per_seconds: 25,
            audio_start_token_id: 151647,
            audio_token_id: 151646,
            image_token_id: 151655,
            video_token_id: 151656,
            vision_start_token_id: 151652,
            user_token_id: 872,
            tie_word_embeddings: false,
        }
    }
}

/// `Qwen3OmniMoeTextConfig`: the Thinker's Qwen3-MoE decoder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Size of the dense MLP of the layers in `mlp_only_layers`.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(flatten)]
    pub rope: RopeFields,
    pub attention_bias: bool,
    /// Every `decoder_sparse_step`-th layer is a MoE layer.
    pub decoder_sparse_step: usize,
    pub moe_intermediate_size: usize,
    pub num_experts_per_tok: usize,
    pub num_experts: usize,
    /// Renormalise the top-k router probabilities to sum to one.
    pub norm_topk_prob: bool,
    pub mlp_only_layers: Vec<usize>,
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 3584,
            hidden_size: 2048,
            intermediate_size: 18944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            head_dim: None,
            hidden_act: "silu".to_string(),
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope: RopeFields::default(),
            attention_bias: false,
            decoder_sparse_step: 1,
            moe_intermediate_size: 768,
            num_experts_per_tok: 8,
            num_experts: 128,
            norm_topk_prob: true,
            mlp_only_layers: Vec::new(),
            tie_word_embeddings: false,
            pad_token_id: None,
            eos_token_id: None,
        }
    }
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The class default theta of `Qwen3OmniMoeTextConfig`.
    pub fn rope_theta(&self) -> f64 {
        self.rope.theta(1e6)
    }

    pub fn mrope_section(&self) -> Vec<usize> {
        mrope_section_or_default(&self.rope)
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        is_sparse_layer(
            layer,
            &self.mlp_only_layers,
            self.num_experts,
            self.decoder_sparse_step,
        )
    }
}

/// The (temporal, height, width) split of half the head dim, the reference's default
/// `[24, 20, 20]` when the config names none.
fn mrope_section_or_default(rope: &RopeFields) -> Vec<usize> {
    rope.mrope_section().unwrap_or_else(|| vec![24, 20, 20])
}

/// Whether decoder layer `layer` has the sparse MoE block (else the dense MLP), as the
/// reference decides it.
fn is_sparse_layer(
    layer: usize,
    mlp_only_layers: &[usize],
    num_experts: usize,
    step: usize,
) -> bool {
    !mlp_only_layers.contains(&layer)
        && num_experts > 0
        && step > 0
        && (layer + 1).is_multiple_of(step)
}

/// `Qwen3OmniMoeAudioEncoderConfig` (the AuT encoder).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AudioEncoderConfig {
    pub num_mel_bins: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub d_model: usize,
    pub activation_function: String,
    pub scale_embedding: bool,
    pub max_source_positions: usize,
    pub n_window: usize,
    pub output_dim: usize,
    pub n_window_infer: usize,
    pub conv_chunksize: usize,
    pub downsample_hidden_size: usize,
}

impl Default for AudioEncoderConfig {
    fn default() -> Self {
        Self {
            num_mel_bins: 128,
            encoder_layers: 32,
            encoder_attention_heads: 20,
            encoder_ffn_dim: 5120,
            d_model: 1280,
            activation_function: "gelu".to_string(),
            scale_embedding: false,
            max_source_positions: 1500,
            n_window: 50,
            output_dim: 3584,
            n_window_infer: 800,
            conv_chunksize: 500,
            downsample_hidden_size: 480,
        }
    }
}

/// `Qwen3OmniMoeVisionEncoderConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionEncoderConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub hidden_act: String,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub out_hidden_size: usize,
    pub num_position_embeddings: usize,
    /// Vision layers whose merged outputs are added to the first decoder layers (DeepStack).
    pub deepstack_visual_indexes: Vec<usize>,
    /// The axial 2-D rotary base (`rope_parameters.rope_theta`, 10000 by default).
    #[serde(flatten)]
    pub rope: RopeFields,
}

impl Default for VisionEncoderConfig {
    fn default() -> Self {
        Self {
            depth: 27,
            hidden_size: 1152,
            hidden_act: "gelu_pytorch_tanh".to_string(),
            intermediate_size: 4304,
            num_heads: 16,
            in_channels: 3,
            patch_size: 16,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            out_hidden_size: 3584,
            num_position_embeddings: 2304,
            deepstack_visual_indexes: vec![8, 16, 24],
            rope: RopeFields::default(),
        }
    }
}

/// `Qwen3OmniMoeTalkerConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TalkerConfig {
    pub text_config: TalkerTextConfig,
    pub code_predictor_config: CodePredictorConfig,
    /// Codebooks per 80 ms frame: codebook 0 from the Talker, the rest from the code predictor.
    pub num_code_groups: usize,
    pub thinker_hidden_size: usize,
    /// The Thinker layer whose hidden states feed the Talker.
    pub accept_hidden_layer: usize,
    pub codec_eos_token_id: u32,
    pub codec_nothink_id: u32,
    pub codec_think_bos_id: u32,
    pub codec_think_eos_id: u32,
    pub codec_pad_id: u32,
    pub codec_bos_id: u32,
    pub audio_token_id: u32,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub position_id_per_seconds: usize,
    pub audio_start_token_id: u32,
    /// Voice name (lower case) to its codec token.
    pub speaker_id: Option<std::collections::BTreeMap<String, u32>>,
    pub spatial_merge_size: usize,
}

impl Default for TalkerConfig {
    fn default() -> Self {
        Self {
            text_config: TalkerTextConfig::default(),
            code_predictor_config: CodePredictorConfig::default(),
            num_code_groups: 32,
            thinker_hidden_size: 2048,
            accept_hidden_layer: 18,
            codec_eos_token_id: 4198,
            codec_nothink_id: 4203,
            codec_think_bos_id: 4204,
            codec_think_eos_id: 4205,
            codec_pad_id: 4196,
            codec_bos_id: 4197,
            audio_token_id: 151646,
            image_token_id: 151655,
            video_token_id: 151656,
            vision_start_token_id: 151652,
            position_id_per_seconds: 25,
            audio_start_token_id: 151669,
            speaker_id: None,
            spatial_merge_size: 2,
        }
    }
}

/// `Qwen3OmniMoeTalkerTextConfig`: the Talker's MoE decoder (with a shared expert).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TalkerTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    #[serde(flatten)]
    pub rope: RopeFields,
    pub decoder_sparse_step: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: Option<usize>,
    pub num_experts_per_tok: usize,
    /// transformers 5 writes this field under its attribute-map name `num_local_experts`.
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    pub norm_topk_prob: bool,
    pub mlp_only_layers: Vec<usize>,
}

impl Default for TalkerTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 3072,
            hidden_size: 1024,
            intermediate_size: 2048,
            num_hidden_layers: 20,
            num_attention_heads: 16,
            num_key_value_heads: 2,
            head_dim: None,
            hidden_act: "silu".to_string(),
            rms_norm_eps: 1e-6,
            rope: RopeFields::default(),
            decoder_sparse_step: 1,
            moe_intermediate_size: 384,
            shared_expert_intermediate_size: None,
            num_experts_per_tok: 8,
            num_experts: 128,
            norm_topk_prob: false,
            mlp_only_layers: Vec::new(),
        }
    }
}

impl TalkerTextConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope.theta(1e6)
    }

    pub fn mrope_section(&self) -> Vec<usize> {
        mrope_section_or_default(&self.rope)
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        is_sparse_layer(
            layer,
            &self.mlp_only_layers,
            self.num_experts,
            self.decoder_sparse_step,
        )
    }
}

/// `Qwen3OmniMoeTalkerCodePredictorConfig`: the small dense decoder of the residual codebooks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CodePredictorConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    #[serde(flatten)]
    pub rope: RopeFields,
    pub num_code_groups: usize,
}

impl Default for CodePredictorConfig {
    fn default() -> Self {
        Self {
            vocab_size: 2048,
            hidden_size: 1024,
            intermediate_size: 3072,
            num_hidden_layers: 5,
            num_attention_heads: 16,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope: RopeFields::default(),
            num_code_groups: 32,
        }
    }
}

/// `Qwen3OmniMoeCode2WavConfig`: codes to 24 kHz waveform.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Code2WavConfig {
    pub codebook_size: usize,
    pub hidden_size: usize,
    pub max_position_embeddings: usize,
    #[serde(flatten)]
    pub rope: RopeFields,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub attention_bias: bool,
    /// Keys a pre-transformer query sees: itself and the `sliding_window - 1` before it.
    pub sliding_window: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_scale_initial_scale: f64,
    pub rms_norm_eps: f64,
    pub num_hidden_layers: usize,
    pub num_quantizers: usize,
    /// Strides of the decoder blocks (after the upsampling stages).
    pub upsample_rates: Vec<usize>,
    /// Strides of the upsampling stages right after the pre-transformer.
    pub upsampling_ratios: Vec<usize>,
    pub decoder_dim: usize,
}

impl Default for Code2WavConfig {
    fn default() -> Self {
        Self {
            codebook_size: 2048,
            hidden_size: 1024,
            max_position_embeddings: 8000,
            rope: RopeFields::default(),
            num_attention_heads: 16,
            num_key_value_heads: 16,
            attention_bias: false,
            sliding_window: 72,
            intermediate_size: 3072,
            hidden_act: "silu".to_string(),
            layer_scale_initial_scale: 0.01,
            rms_norm_eps: 1e-5,
            num_hidden_layers: 8,
            num_quantizers: 16,
            upsample_rates: vec![8, 5, 4, 3],
            upsampling_ratios: vec![2, 2],
            decoder_dim: 1536,
        }
    }
}

impl Code2WavConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope.theta(10000.0)
    }

    /// Waveform samples per code frame: the product of every stride.
    pub fn total_upsample(&self) -> usize {
        self.upsampling_ratios
            .iter()
            .chain(&self.upsample_rates)
            .product()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_json_gives_the_reference_defaults() {
        let c: Config = serde_json::from_str("{}").unwrap();
        assert_eq!(c.model_type, MODEL_TYPE);
        assert_eq!(
            c.thinker_config.text_config.mrope_section(),
            vec![24, 20, 20]
        );
        assert_eq!(c.code2wav_config.total_upsample(), 1920);
        c.validate().unwrap();
    }

    #[test]
    fn the_published_config_parses_with_its_shapes() {
        let c = Config::published_30b_a3b().unwrap();
        let text = &c.thinker_config.text_config;
        assert_eq!(
            text.mrope_section().iter().sum::<usize>() * 2,
            text.head_dim()
        );
        assert!(text.is_moe_layer(0));
        assert_eq!(
            c.talker_config.num_code_groups,
            c.code2wav_config.num_quantizers
        );
    }

    #[test]
    fn another_family_is_named() {
        let err = Config::from_json(r#"{"model_type": "qwen2_5_omni"}"#).unwrap_err();
        assert!(err.to_string().contains("qwen2_5_omni"), "{err}");
    }

    #[test]
    fn published_rope_scaling_layout_is_read() {
        let c: TextConfig = serde_json::from_str(
            r#"{"rope_theta": 5.0, "rope_scaling": {"mrope_section": [4, 2, 2], "interleaved": true}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta(), 5.0);
        assert_eq!(c.mrope_section(), vec![4, 2, 2]);
    }

    #[test]
    fn dense_layers_follow_mlp_only_layers_and_sparse_step() {
        let c = TextConfig {
            mlp_only_layers: vec![0],
            decoder_sparse_step: 2,
            ..TextConfig::default()
        };
        assert!(!c.is_moe_layer(0));
        assert!(c.is_moe_layer(1));
        assert!(!c.is_moe_layer(2));
    }
}
