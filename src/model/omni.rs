//! The whole model of a checkpoint folder, as the transports and the engine use it: config,
//! processor settings, tokenizer with the chat template, the Thinker LM and its audio and
//! vision encoders, and the speech parts (Talker, token2wav in f32 as the reference runs it,
//! voices) when the checkpoint has them.
//!
//! Cloning is cheap (weights are shared tensors) and gives an independent KV cache, so each
//! session clones the loaded model.

use anyhow::Context;
use candle_core::{DType, Device};

use crate::model::chat::{ChatTokenizer, Conversation, Reply};
use crate::model::config::{Config, ProcessorConfig};
use crate::model::loading::{GenerationConfig, ModelFiles};
use crate::model::sampling::SamplingOptions;
use crate::model::speakers::Voices;
use crate::model::talker::Talker;
use crate::model::thinker::audio_encoder::AudioEncoder;
use crate::model::thinker::vision_encoder::VisionEncoder;
use crate::model::thinker::{GenerationOptions, MultimodalEmbeds, Thinker};
use crate::model::token2wav::Token2Wav;

/// The parts that turn the Thinker's answer into speech.
#[derive(Clone)]
pub struct Speech {
    pub talker: Talker,
    /// Always f32, whatever the Thinker's dtype: the reference casts token2wav to f32.
    pub token2wav: Token2Wav,
    pub voices: Voices,
}

/// Config, tokenizer, Thinker and encoders of one checkpoint.
#[derive(Clone)]
pub struct OmniModel {
    pub config: Config,
    pub processor: ProcessorConfig,
    pub generation: GenerationConfig,
    pub tokenizer: ChatTokenizer,
    pub thinker: Thinker,
    pub audio_encoder: AudioEncoder,
    pub vision_encoder: VisionEncoder,
    /// `None` for a checkpoint without the Talker (text answers only).
    pub speech: Option<Speech>,
}

impl OmniModel {
    /// Loads a model folder (see [`ModelFiles::locate`]) in `dtype` on `device`.
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let config = files.load_config()?;
        let processor = files.load_processor_config()?;
        let generation = files.load_generation_config()?;
        let tokenizer = ChatTokenizer::load(files, &config.thinker_config)?;
        let checkpoint = files.checkpoint()?;
        let built = |what: &str| format!("cannot build {what} from {}", files.dir.display());
        let vb = checkpoint.var_builder(
            dtype,
            device,
            "the Thinker",
            &[
                "thinker.model.",
                "thinker.lm_head.",
                "thinker.audio_tower.",
                "thinker.visual.",
            ],
        );
        let thinker = Thinker::new(&config.thinker_config, vb.pp("thinker"))
            .with_context(|| built("the Thinker"))?;
        let audio_encoder = AudioEncoder::new(
            &config.thinker_config.audio_config,
            vb.pp("thinker.audio_tower"),
        )
        .with_context(|| built("the audio encoder"))?;
        let vision_encoder = VisionEncoder::new(
            &config.thinker_config.vision_config,
            vb.pp("thinker.visual"),
        )
        .with_context(|| built("the vision encoder"))?;
        let speech = if checkpoint.contains("talker.codec_head.weight") {
            let vb = checkpoint.var_builder(dtype, device, "the Talker", &["talker."]);
            let talker = Talker::new(&config.talker_config, vb.pp("talker"))
                .with_context(|| built("the Talker"))?;
            let vb = checkpoint.var_builder(DType::F32, device, "token2wav", &["token2wav."]);
            let token2wav = Token2Wav::new(&config.token2wav_config, vb.pp("token2wav"))
                .with_context(|| built("token2wav"))?;
            let voices = Voices::load(&files.dir, device)?;
            Some(Speech {
                talker,
                token2wav,
                voices,
            })
        } else {
            tracing::info!("{} has no Talker: text answers only", files.dir.display());
            None
        };
        Ok(Self {
            config,
            processor,
            generation,
            tokenizer,
            thinker,
            audio_encoder,
            vision_encoder,
            speech,
        })
    }

    /// The speech parts, or an error saying the checkpoint has none.
    pub fn speech(&self) -> anyhow::Result<&Speech> {
        self.speech
            .as_ref()
            .context("this checkpoint has no Talker/token2wav: it can only answer in text")
    }

    /// Generation settings: the given sampling, the config's EOS ids (and the generation
    /// config's), at most `max_new_tokens`.
    pub fn generation_options(
        &self,
        max_new_tokens: usize,
        sampling: SamplingOptions,
    ) -> GenerationOptions {
        let mut eos = self.config.thinker_config.eos_token_ids();
        if let Some(more) = &self.generation.eos_token_id {
            eos.extend(more.to_vec());
        }
        eos.sort_unstable();
        eos.dedup();
        GenerationOptions {
            max_new_tokens,
            sampling,
            eos_token_ids: eos,
            suppress_token_ids: Vec::new(),
            keep_step_logits: false,
        }
    }

    /// Answers `conversation` from an empty context; `media` holds the encoder outputs for its
    /// audio, images and videos. `on_text` receives the answer as it is generated.
    /// ([`OmniModel::answer`] also keeps what speaking the answer needs.)
    pub fn reply(
        &mut self,
        conversation: &Conversation,
        media: &MultimodalEmbeds,
        options: &GenerationOptions,
        on_text: impl FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<Reply> {
        Ok(self.answer(conversation, media, options, on_text)?.reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_every_thinker_part_of_the_tiny_model_and_clones_cheaply() -> anyhow::Result<()> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let model = OmniModel::load(&ModelFiles::from_dir(&dir)?, DType::F32, &Device::Cpu)?;
        let cfg = &model.config.thinker_config;
        let features = candle_core::Tensor::zeros(
            (cfg.audio_config.num_mel_bins, 40),
            DType::F32,
            &Device::Cpu,
        )?;
        let audio = model.audio_encoder.forward(&features)?;
        assert_eq!(
            audio.dims(),
            &[
                crate::model::thinker::audio_encoder::output_len(40),
                cfg.text_config.hidden_size
            ]
        );
        let speech = model.speech()?;
        assert!(speech.voices.get("Chelsie").is_ok());
        let mut session = model.clone();
        assert_eq!(session.thinker.cache_len(), 0);
        session.thinker.clear_cache();
        Ok(())
    }
}
