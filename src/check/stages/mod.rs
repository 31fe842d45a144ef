//! The stages of the check, one module per part of the model, ported from the parity tests.
//! Everything comes from the fixture folder: nothing here knows a value of the tiny config.

mod audio;
mod pipeline;
mod qwen3;
mod rope;
mod talker;
mod thinker;
mod token2wav;
mod vision;

use anyhow::Context;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::Checker;
use crate::model::config::{Config, ProcessorConfig};
use crate::model::loading::ModelFiles;

pub(super) use qwen3::run as run_qwen3;

/// Runs `check.stage`, one of [`super::STAGES`].
pub(super) fn run(check: &mut Checker) -> anyhow::Result<()> {
    match check.stage {
        "mel" => audio::mel(check),
        "audio_encoder" => audio::audio_encoder(check),
        "image_preprocess" => vision::image_preprocess(check),
        "video_preprocess" => vision::video_preprocess(check),
        "image_vision_encoder" => {
            vision::vision_encoder(check, "image", "image.pixel_values", "image.image_grid_thw")
        }
        "video_vision_encoder" => vision::vision_encoder(
            check,
            "video",
            "video.pixel_values_videos",
            "video.video_grid_thw",
        ),
        "rope_index_text" => rope::case(check, "text"),
        "rope_index_audio" => rope::case(check, "audio"),
        "rope_index_image" => rope::case(check, "image"),
        "rope_index_video" => rope::case(check, "video"),
        "rope_index_video_audio" => rope::video_audio(check),
        "rope_index_talker" => rope::talker(check),
        "chat_template_ids" => rope::chat_template_ids(check),
        "thinker_logits" => thinker::logits(check),
        "thinker_greedy" => thinker::greedy(check),
        "thinker_av_logits" => thinker::av_logits(check),
        "talker_inputs" => talker::inputs(check),
        "talker_logits" => talker::logits(check),
        "talker_greedy" => talker::greedy(check),
        "dit_probe" => token2wav::dit_probe(check),
        "dit_mel" => token2wav::dit_mel(check),
        "bigvgan_waveform" => token2wav::bigvgan_waveform(check),
        "token2wav_waveform" => token2wav::waveform(check),
        "pipeline_thinker_logits" => pipeline::thinker_logits(check),
        "pipeline_thinker_av_logits" => pipeline::thinker_av_logits(check),
        "pipeline_talker" => pipeline::talker(check),
        "pipeline_waveform" => pipeline::waveform(check),
        other => anyhow::bail!("stage {other} has no implementation"),
    }
}

impl Checker<'_> {
    pub(crate) fn model_files(&self) -> anyhow::Result<ModelFiles> {
        ModelFiles::from_dir(&self.fixtures.model_dir()).context("fixture model folder")
    }

    pub(crate) fn config(&self) -> anyhow::Result<Config> {
        self.model_files()?
            .load_config()
            .context("fixture config.json")
    }

    pub(crate) fn processor_config(&self) -> anyhow::Result<ProcessorConfig> {
        self.model_files()?
            .load_processor_config()
            .context("fixture processor_config.json")
    }

    /// The fixture model's weights in the run's dtype on its device.
    pub(crate) fn weights(&self) -> anyhow::Result<VarBuilder<'static>> {
        self.weights_in(self.options.dtype)
    }

    /// token2wav's weights: f32 in every run, as the model loads them.
    pub(crate) fn token2wav_weights(&self) -> anyhow::Result<VarBuilder<'static>> {
        self.weights_in(DType::F32)
    }

    fn weights_in(&self, dtype: DType) -> anyhow::Result<VarBuilder<'static>> {
        let checkpoint = self
            .model_files()?
            .checkpoint()
            .context("fixture weights")?;
        Ok(checkpoint.var_builder(dtype, &self.options.device, "fixture model", &[]))
    }

    /// A float fixture in f32 on the run's device (the model casts to its dtype).
    pub(crate) fn input(&self, key: &str) -> anyhow::Result<Tensor> {
        Ok(self.fixtures.f32(key)?.to_device(&self.options.device)?)
    }

    /// An integer fixture on the run's device, as stored.
    pub(crate) fn input_ids(&self, key: &str) -> anyhow::Result<Tensor> {
        Ok(self.fixtures.get(key)?.to_device(&self.options.device)?)
    }
}
