//! Serde types for the published Qwen2.5-Omni `config.json` and the processor settings.
//!
//! Every field carries the default of the reference's configuration class, because
//! checkpoints written with `use_diff` leave out values equal to those defaults.
//! RoPE settings are accepted in both layouts: the published `rope_scaling` + `rope_theta`
//! and the newer `rope_parameters`.

use serde::{Deserialize, Serialize};

/// A token id that some writers store as a number and others as a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` (published layout) or `rope_parameters` (newer layout).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub mrope_section: Option<Vec<usize>>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

/// The RoPE fields every rotary module reads, in either layout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeFields {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
}

impl RopeFields {
    /// The rotary base: `rope_parameters.rope_theta`, else `rope_theta`, else the class default.
    pub fn theta(&self, default: f64) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .or(self.rope_scaling.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(default)
    }

    /// The multimodal rotary split over (temporal, height, width), if the config has one.
    pub fn mrope_section(&self) -> Option<Vec<usize>> {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.mrope_section.clone())
            .or_else(|| {
                self.rope_scaling
                    .as_ref()
                    .and_then(|p| p.mrope_section.clone())
            })
    }
}

fn d_true() -> bool {
    true
}

/// `Qwen2_5OmniConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub thinker_config: ThinkerConfig,
    pub talker_config: TalkerConfig,
    pub token2wav_config: Token2WavConfig,
    #[serde(default = "d_true")]
    pub enable_audio_output: bool,
}

impl Config {
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Checks the relations between fields that the math relies on, naming the field at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        let t = &self.thinker_config;
        let text = &t.text_config;
        anyhow::ensure!(
            text.num_key_value_heads > 0,
            "text_config.num_key_value_heads must be > 0"
        );
        anyhow::ensure!(
            text.num_attention_heads
                .is_multiple_of(text.num_key_value_heads),
            "text_config.num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
            text.num_attention_heads,
            text.num_key_value_heads
        );
        if let Some(sec) = text.rope.mrope_section() {
            anyhow::ensure!(
                sec.iter().sum::<usize>() * 2 == text.head_dim(),
                "text_config mrope_section {:?} does not cover head_dim {} (2*sum must equal it)",
                sec,
                text.head_dim()
            );
        }
        anyhow::ensure!(
            t.audio_config.output_dim == text.hidden_size,
            "audio_config.output_dim ({}) differs from text_config.hidden_size ({})",
            t.audio_config.output_dim,
            text.hidden_size
        );
        anyhow::ensure!(
            t.vision_config.out_hidden_size == text.hidden_size,
            "vision_config.out_hidden_size ({}) differs from text_config.hidden_size ({})",
            t.vision_config.out_hidden_size,
            text.hidden_size
        );
        anyhow::ensure!(
            t.audio_config
                .d_model
                .is_multiple_of(t.audio_config.encoder_attention_heads),
            "audio_config.d_model ({}) is not a multiple of encoder_attention_heads ({})",
            t.audio_config.d_model,
            t.audio_config.encoder_attention_heads
        );
        anyhow::ensure!(
            t.vision_config
                .hidden_size
                .is_multiple_of(t.vision_config.num_heads),
            "vision_config.hidden_size ({}) is not a multiple of num_heads ({})",
            t.vision_config.hidden_size,
            t.vision_config.num_heads
        );
        let talker = &self.talker_config;
        anyhow::ensure!(
            talker.num_key_value_heads > 0
                && talker
                    .num_attention_heads
                    .is_multiple_of(talker.num_key_value_heads),
            "talker_config.num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
            talker.num_attention_heads,
            talker.num_key_value_heads
        );
        if let Some(sec) = talker.rope.mrope_section() {
            anyhow::ensure!(
                sec.iter().sum::<usize>() * 2 == talker.head_dim(),
                "talker_config mrope_section {:?} does not cover head_dim {}",
                sec,
                talker.head_dim()
            );
        }
        anyhow::ensure!(
            talker.embedding_size == text.hidden_size,
            "talker_config.embedding_size ({}) differs from the thinker's hidden_size ({})",
            talker.embedding_size,
            text.hidden_size
        );
        let bigvgan = &self.token2wav_config.bigvgan_config;
        anyhow::ensure!(
            bigvgan.upsample_rates.len() == bigvgan.upsample_kernel_sizes.len(),
            "bigvgan_config.upsample_rates and upsample_kernel_sizes differ in length"
        );
        anyhow::ensure!(
            bigvgan.resblock_kernel_sizes.len() == bigvgan.resblock_dilation_sizes.len(),
            "bigvgan_config.resblock_kernel_sizes and resblock_dilation_sizes differ in length"
        );
        Ok(())
    }
}

fn d_audio_token() -> u32 {
    151646
}
fn d_image_token() -> u32 {
    151655
}
fn d_video_token() -> u32 {
    151656
}
fn d_audio_start() -> u32 {
    151647
}
fn d_audio_end() -> u32 {
    151648
}
fn d_vision_start() -> u32 {
    151652
}
fn d_vision_end() -> u32 {
    151653
}
fn d_vision_token() -> u32 {
    151654
}
fn d_pos_per_second() -> usize {
    25
}
fn d_seconds_per_chunk() -> usize {
    2
}
fn d_user_token() -> u32 {
    872
}

/// `Qwen2_5OmniThinkerConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThinkerConfig {
    pub audio_config: AudioEncoderConfig,
    pub vision_config: VisionEncoderConfig,
    pub text_config: TextConfig,
    #[serde(default = "d_audio_token", alias = "audio_token_id")]
    pub audio_token_index: u32,
    #[serde(default = "d_image_token", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "d_video_token", alias = "video_token_id")]
    pub video_token_index: u32,
    #[serde(default = "d_audio_start")]
    pub audio_start_token_id: u32,
    #[serde(default = "d_audio_end")]
    pub audio_end_token_id: u32,
    #[serde(default = "d_vision_start")]
    pub vision_start_token_id: u32,
    #[serde(default = "d_vision_end")]
    pub vision_end_token_id: u32,
    #[serde(default = "d_vision_token")]
    pub vision_token_id: u32,
    #[serde(default = "d_pos_per_second")]
    pub position_id_per_seconds: usize,
    #[serde(default = "d_seconds_per_chunk")]
    pub seconds_per_chunk: usize,
    #[serde(default = "d_user_token")]
    pub user_token_id: u32,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl ThinkerConfig {
    /// The ids that end a thinker turn (`eos_token_id` of the thinker, else of its text config).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .or(self.text_config.eos_token_id.as_ref())
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
}

fn d_text_vocab() -> usize {
    152064
}
fn d_text_hidden() -> usize {
    3584
}
fn d_text_inter() -> usize {
    18944
}
fn d_text_layers() -> usize {
    28
}
fn d_text_heads() -> usize {
    28
}
fn d_text_kv_heads() -> usize {
    4
}
fn d_silu() -> String {
    "silu".to_string()
}
fn d_max_pos() -> usize {
    32768
}
fn d_rms_eps() -> f64 {
    1e-6
}

/// `Qwen2_5OmniTextConfig`: the Qwen2.5 decoder of the thinker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default = "d_text_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_text_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_text_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_text_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_text_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_text_kv_heads")]
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "d_silu")]
    pub hidden_act: String,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(flatten)]
    pub rope: RopeFields,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn rope_theta(&self) -> f64 {
        self.rope.theta(1e6)
    }
    /// The (temporal, height, width) split of half the head dim; plain 1-D RoPE gives all to temporal.
    pub fn mrope_section(&self) -> Vec<usize> {
        self.rope
            .mrope_section()
            .unwrap_or_else(|| vec![self.head_dim() / 2, 0, 0])
    }
}

fn d_mel_bins() -> usize {
    128
}
fn d_audio_layers() -> usize {
    32
}
fn d_audio_heads() -> usize {
    20
}
fn d_audio_ffn() -> usize {
    5120
}
fn d_audio_d_model() -> usize {
    1280
}
fn d_gelu() -> String {
    "gelu".to_string()
}
fn d_max_source_positions() -> usize {
    1500
}
fn d_n_window() -> usize {
    100
}
fn d_audio_output_dim() -> usize {
    3584
}

/// `Qwen2_5OmniAudioEncoderConfig`: the Whisper-style audio tower.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AudioEncoderConfig {
    #[serde(default = "d_mel_bins")]
    pub num_mel_bins: usize,
    #[serde(default = "d_audio_layers")]
    pub encoder_layers: usize,
    #[serde(default = "d_audio_heads")]
    pub encoder_attention_heads: usize,
    #[serde(default = "d_audio_ffn")]
    pub encoder_ffn_dim: usize,
    #[serde(default = "d_audio_d_model")]
    pub d_model: usize,
    #[serde(default = "d_gelu")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "d_max_source_positions")]
    pub max_source_positions: usize,
    #[serde(default = "d_n_window")]
    pub n_window: usize,
    #[serde(default = "d_audio_output_dim")]
    pub output_dim: usize,
}

fn d_vision_depth() -> usize {
    32
}
fn d_vision_hidden() -> usize {
    // The class default is 3584, but every published checkpoint has 1280; a config that
    // omits the field is a published one written with use_diff against the real value.
    3584
}
fn d_vision_inter() -> usize {
    3420
}
fn d_vision_heads() -> usize {
    16
}
fn d_in_channels() -> usize {
    3
}
fn d_patch() -> usize {
    14
}
fn d_merge() -> usize {
    2
}
fn d_temporal_patch() -> usize {
    2
}
fn d_window() -> usize {
    112
}
fn d_vision_out() -> usize {
    3584
}
fn d_fullatt() -> Vec<usize> {
    vec![7, 15, 23, 31]
}

/// `Qwen2_5OmniVisionEncoderConfig`: the Qwen2.5-VL style ViT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VisionEncoderConfig {
    #[serde(default = "d_vision_depth")]
    pub depth: usize,
    #[serde(default = "d_vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_silu")]
    pub hidden_act: String,
    #[serde(default = "d_vision_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_vision_heads")]
    pub num_heads: usize,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_merge")]
    pub spatial_merge_size: usize,
    #[serde(default = "d_temporal_patch")]
    pub temporal_patch_size: usize,
    #[serde(default = "d_window")]
    pub window_size: usize,
    #[serde(default = "d_vision_out")]
    pub out_hidden_size: usize,
    #[serde(default = "d_fullatt")]
    pub fullatt_block_indexes: Vec<usize>,
    #[serde(flatten)]
    pub rope: RopeFields,
}

impl VisionEncoderConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    pub fn rope_theta(&self) -> f64 {
        self.rope.theta(10000.0)
    }
}

fn d_talker_vocab() -> usize {
    8448
}
fn d_talker_layers() -> usize {
    28
}
fn d_talker_heads() -> usize {
    28
}
fn d_talker_kv() -> usize {
    4
}
fn d_talker_inter() -> usize {
    18944
}
fn d_talker_hidden() -> usize {
    3584
}
fn d_talker_embedding() -> usize {
    3584
}
fn d_head_dim_128() -> usize {
    128
}
fn d_tts_text_start() -> u32 {
    151860
}
fn d_tts_text_end() -> u32 {
    151861
}
fn d_tts_text_pad() -> u32 {
    151859
}
fn d_codec_start() -> u32 {
    8293
}
fn d_codec_end() -> u32 {
    8294
}
fn d_codec_pad() -> u32 {
    8292
}
fn d_codec_mask() -> u32 {
    8296
}

/// `Qwen2_5OmniTalkerConfig`: the dual-track codec-token decoder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TalkerConfig {
    #[serde(default = "d_talker_vocab")]
    pub vocab_size: usize,
    /// Width of the codec embedding = the thinker's hidden size.
    #[serde(default = "d_talker_embedding")]
    pub embedding_size: usize,
    #[serde(default = "d_talker_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_talker_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_talker_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_talker_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_talker_kv")]
    pub num_key_value_heads: usize,
    #[serde(default = "d_head_dim_128")]
    pub head_dim: usize,
    #[serde(default = "d_silu")]
    pub hidden_act: String,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(flatten)]
    pub rope: RopeFields,
    #[serde(default = "d_audio_token", alias = "audio_token_id")]
    pub audio_token_index: u32,
    #[serde(default = "d_image_token", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "d_video_token", alias = "video_token_id")]
    pub video_token_index: u32,
    #[serde(default = "d_audio_start")]
    pub audio_start_token_id: u32,
    #[serde(default = "d_audio_end")]
    pub audio_end_token_id: u32,
    #[serde(default = "d_vision_start")]
    pub vision_start_token_id: u32,
    #[serde(default = "d_vision_end")]
    pub vision_end_token_id: u32,
    #[serde(default = "d_pos_per_second")]
    pub position_id_per_seconds: usize,
    #[serde(default = "d_seconds_per_chunk")]
    pub seconds_per_chunk: usize,
    #[serde(default = "d_merge")]
    pub spatial_merge_size: usize,
    #[serde(default = "d_tts_text_start")]
    pub tts_text_start_token_id: u32,
    #[serde(default = "d_tts_text_end")]
    pub tts_text_end_token_id: u32,
    #[serde(default = "d_tts_text_pad")]
    pub tts_text_pad_token_id: u32,
    #[serde(default = "d_codec_start")]
    pub tts_codec_start_token_id: u32,
    #[serde(default = "d_codec_end")]
    pub tts_codec_end_token_id: u32,
    #[serde(default = "d_codec_pad")]
    pub tts_codec_pad_token_id: u32,
    #[serde(default = "d_codec_mask")]
    pub tts_codec_mask_token_id: u32,
}

impl TalkerConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn rope_theta(&self) -> f64 {
        self.rope.theta(1e6)
    }
    pub fn mrope_section(&self) -> Vec<usize> {
        self.rope
            .mrope_section()
            .unwrap_or_else(|| vec![self.head_dim / 2, 0, 0])
    }
}

/// `Qwen2_5OmniToken2WavConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Token2WavConfig {
    pub dit_config: DiTConfig,
    pub bigvgan_config: BigVGANConfig,
}

fn d_dit_hidden() -> usize {
    1024
}
fn d_dit_layers() -> usize {
    22
}
fn d_dit_heads() -> usize {
    16
}
fn d_dit_head_dim() -> usize {
    64
}
fn d_ff_mult() -> usize {
    2
}
fn d_dit_emb_dim() -> usize {
    512
}
fn d_block_size() -> usize {
    24
}
fn d_look_ahead() -> Vec<usize> {
    vec![10]
}
fn d_look_backward() -> Vec<usize> {
    vec![0, 20]
}
fn d_repeats() -> usize {
    2
}
fn d_num_embeds() -> usize {
    8193
}
fn d_mel_dim() -> usize {
    80
}
fn d_enc_emb_dim() -> usize {
    192
}
fn d_enc_dim() -> usize {
    128
}
fn d_enc_channels() -> Vec<usize> {
    vec![256, 256, 256, 256, 768]
}
fn d_enc_kernels() -> Vec<usize> {
    vec![5, 3, 3, 3, 1]
}
fn d_enc_dilations() -> Vec<usize> {
    vec![1, 2, 3, 4, 1]
}
fn d_enc_attention() -> usize {
    64
}
fn d_enc_res2net() -> usize {
    2
}
fn d_enc_se() -> usize {
    64
}

/// `Qwen2_5OmniDiTConfig`. The published file uses the original names (`dim`, `depth`, `heads`,
/// `enc_lin_neurons`), which the reference ignores: its class defaults are the real values, so
/// unknown keys are ignored here too and the defaults apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiTConfig {
    #[serde(default = "d_dit_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_dit_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_dit_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_dit_head_dim")]
    pub head_dim: usize,
    #[serde(default = "d_ff_mult")]
    pub ff_mult: usize,
    #[serde(default = "d_dit_emb_dim")]
    pub emb_dim: usize,
    #[serde(flatten)]
    pub rope: RopeFields,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_block_size")]
    pub block_size: usize,
    #[serde(default = "d_look_ahead")]
    pub look_ahead_layers: Vec<usize>,
    #[serde(default = "d_look_backward")]
    pub look_backward_layers: Vec<usize>,
    #[serde(default = "d_repeats")]
    pub repeats: usize,
    #[serde(default = "d_num_embeds")]
    pub num_embeds: usize,
    #[serde(default = "d_mel_dim")]
    pub mel_dim: usize,
    #[serde(default = "d_enc_emb_dim")]
    pub enc_emb_dim: usize,
    #[serde(default = "d_enc_dim")]
    pub enc_dim: usize,
    #[serde(default = "d_enc_channels")]
    pub enc_channels: Vec<usize>,
    #[serde(default = "d_enc_kernels")]
    pub enc_kernel_sizes: Vec<usize>,
    #[serde(default = "d_enc_dilations")]
    pub enc_dilations: Vec<usize>,
    #[serde(default = "d_enc_attention")]
    pub enc_attention_channels: usize,
    #[serde(default = "d_enc_res2net")]
    pub enc_res2net_scale: usize,
    #[serde(default = "d_enc_se")]
    pub enc_se_channels: usize,
}

impl DiTConfig {
    pub fn rope_theta(&self) -> f64 {
        self.rope.theta(10000.0)
    }
}

fn d_upsample_initial() -> usize {
    1536
}
fn d_resblock_kernels() -> Vec<usize> {
    vec![3, 7, 11]
}
fn d_resblock_dilations() -> Vec<Vec<usize>> {
    vec![vec![1, 3, 5], vec![1, 3, 5], vec![1, 3, 5]]
}
fn d_upsample_rates() -> Vec<usize> {
    vec![5, 3, 2, 2, 2, 2]
}
fn d_upsample_kernels() -> Vec<usize> {
    vec![11, 7, 4, 4, 4, 4]
}

/// `Qwen2_5OmniBigVGANConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BigVGANConfig {
    #[serde(default = "d_mel_dim")]
    pub mel_dim: usize,
    #[serde(default = "d_upsample_initial")]
    pub upsample_initial_channel: usize,
    #[serde(default = "d_resblock_kernels")]
    pub resblock_kernel_sizes: Vec<usize>,
    #[serde(default = "d_resblock_dilations")]
    pub resblock_dilation_sizes: Vec<Vec<usize>>,
    #[serde(default = "d_upsample_rates")]
    pub upsample_rates: Vec<usize>,
    #[serde(default = "d_upsample_kernels")]
    pub upsample_kernel_sizes: Vec<usize>,
}

impl BigVGANConfig {
    /// Waveform samples per mel frame (240 for the published model: 100 Hz mel to 24 kHz).
    pub fn hop_length(&self) -> usize {
        self.upsample_rates.iter().product()
    }
}

// ---------------------------------------------------------------------------------------------
// Processor settings (`preprocessor_config.json` in published checkpoints, `processor_config.json`
// with nested sections in newer writers).

fn d_sampling_rate() -> usize {
    16000
}
fn d_n_fft() -> usize {
    400
}
fn d_hop() -> usize {
    160
}
fn d_chunk_length() -> usize {
    300
}

/// `WhisperFeatureExtractor` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureExtractorConfig {
    #[serde(default = "d_mel_bins")]
    pub feature_size: usize,
    #[serde(default = "d_sampling_rate")]
    pub sampling_rate: usize,
    #[serde(default = "d_n_fft")]
    pub n_fft: usize,
    #[serde(default = "d_hop")]
    pub hop_length: usize,
    /// Longest audio in seconds; the reference truncates beyond it.
    #[serde(default = "d_chunk_length")]
    pub chunk_length: usize,
    #[serde(default)]
    pub dither: f64,
}

impl Default for FeatureExtractorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

fn d_min_pixels() -> usize {
    3136
}
fn d_max_pixels() -> usize {
    12845056
}
fn d_image_mean() -> [f64; 3] {
    [0.48145466, 0.4578275, 0.40821073]
}
fn d_image_std() -> [f64; 3] {
    [0.26862954, 0.26130258, 0.27577711]
}
fn d_rescale() -> f64 {
    1.0 / 255.0
}

/// `{"shortest_edge": min_pixels, "longest_edge": max_pixels}` of newer writers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PixelBounds {
    pub shortest_edge: usize,
    pub longest_edge: usize,
}

/// `Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default)]
    pub min_pixels: Option<usize>,
    #[serde(default)]
    pub max_pixels: Option<usize>,
    #[serde(default)]
    pub size: Option<PixelBounds>,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_temporal_patch")]
    pub temporal_patch_size: usize,
    #[serde(default = "d_merge")]
    pub merge_size: usize,
    #[serde(default = "d_image_mean")]
    pub image_mean: [f64; 3],
    #[serde(default = "d_image_std")]
    pub image_std: [f64; 3],
    #[serde(default = "d_rescale")]
    pub rescale_factor: f64,
}

impl ImageProcessorConfig {
    pub fn min_pixels(&self) -> usize {
        self.min_pixels
            .or(self.size.as_ref().map(|s| s.shortest_edge))
            .unwrap_or_else(d_min_pixels)
    }
    pub fn max_pixels(&self) -> usize {
        self.max_pixels
            .or(self.size.as_ref().map(|s| s.longest_edge))
            .unwrap_or_else(d_max_pixels)
    }
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// The processor settings of a model folder.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessorConfig {
    pub feature_extractor: FeatureExtractorConfig,
    pub image_processor: ImageProcessorConfig,
    pub video_processor: ImageProcessorConfig,
}

impl ProcessorConfig {
    /// Parses either layout: nested sections (`processor_config.json`) or the flat
    /// `preprocessor_config.json` of published checkpoints (one object with both the
    /// feature-extractor and the image-processor fields).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        if value.get("feature_extractor").is_some() || value.get("image_processor").is_some() {
            #[derive(Deserialize)]
            struct Nested {
                #[serde(default)]
                feature_extractor: Option<FeatureExtractorConfig>,
                #[serde(default)]
                image_processor: Option<ImageProcessorConfig>,
                #[serde(default)]
                video_processor: Option<ImageProcessorConfig>,
            }
            let nested: Nested = serde_json::from_value(value)?;
            let image = nested.image_processor.unwrap_or_default();
            Ok(Self {
                feature_extractor: nested.feature_extractor.unwrap_or_default(),
                video_processor: nested.video_processor.unwrap_or_else(|| image.clone()),
                image_processor: image,
            })
        } else {
            let feature_extractor: FeatureExtractorConfig = serde_json::from_value(value.clone())?;
            let image: ImageProcessorConfig = serde_json::from_value(value)?;
            Ok(Self {
                feature_extractor,
                video_processor: image.clone(),
                image_processor: image,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
    }

    #[test]
    fn both_rope_layouts_give_the_same_settings() {
        let new =
            Config::from_json(&std::fs::read_to_string(tiny_dir().join("config.json")).unwrap())
                .unwrap();
        let legacy = Config::from_json(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("models/tiny/config.legacy_rope.json"),
            )
            .unwrap(),
        )
        .unwrap();
        for cfg in [&new, &legacy] {
            cfg.validate().unwrap();
        }
        let (a, b) = (
            &new.thinker_config.text_config,
            &legacy.thinker_config.text_config,
        );
        assert_eq!(a.mrope_section(), b.mrope_section());
        assert_eq!(a.rope_theta(), b.rope_theta());
        assert_eq!(
            new.talker_config.mrope_section(),
            legacy.talker_config.mrope_section()
        );
        assert_eq!(
            new.token2wav_config.dit_config.rope_theta(),
            legacy.token2wav_config.dit_config.rope_theta()
        );
        assert_eq!(
            new.thinker_config.vision_config.rope_theta(),
            legacy.thinker_config.vision_config.rope_theta()
        );
    }

    #[test]
    fn published_configs_parse_and_validate() {
        for size in ["3b", "7b"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models")
                .join(size)
                .join("config.json");
            let cfg = Config::from_json(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            cfg.validate().unwrap();
            assert_eq!(cfg.thinker_config.vision_config.hidden_size, 1280);
            assert_eq!(cfg.token2wav_config.bigvgan_config.hop_length(), 240);
        }
    }

    #[test]
    fn processor_config_both_layouts() {
        let nested = ProcessorConfig::from_json(
            &std::fs::read_to_string(tiny_dir().join("processor_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(nested.feature_extractor.n_fft, 400);
        assert_eq!(nested.image_processor.min_pixels(), 3136);
        let flat = ProcessorConfig::from_json(
            r#"{"feature_size": 128, "hop_length": 160, "min_pixels": 3136, "max_pixels": 12845056,
                "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}"#,
        )
        .unwrap();
        assert_eq!(flat.image_processor.max_pixels(), 12845056);
        assert_eq!(flat.feature_extractor.hop_length, 160);
    }
}
