//! Parity with the reference implementation (Hugging Face transformers) on the golden fixtures
//! of `$OMNICALL_REFERENCE_DIR` (default: tests/fixtures/reference/a), through the comparisons
//! of `omnicall::check` (the same ones `omnicall check` prints). One test per stage, named
//! after it, so that `cargo test --test reference_parity STAGE` selects it; the `bf16_*` tests
//! run the Thinker, the Talker and token2wav in bf16 on the CPU against the f32 reference,
//! within the measured bf16 tolerances. `OMNICALL_KERNELS=generic` runs them all through the
//! device-generic products a GPU takes (scripts/test.sh does both). Nothing here knows a value
//! of the tiny config: everything comes from the fixture folder.

mod common;

use candle_core::DType;
use omnicall::check::STAGES;
use omnicall::model::linear::WeightFormat;

/// Runs one stage and fails naming every comparison that failed.
fn check(stage: &str, dtype: DType) {
    check_with(stage, dtype, WeightFormat::Dense);
}

/// [`check`] with the Thinker's and Talker's Linear weights stored in `weights`.
fn check_with(stage: &str, dtype: DType, weights: WeightFormat) {
    common::check_stage(&common::reference_dir(), stage, dtype, weights);
}

macro_rules! stages {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name), DType::F32);
            }
        )*

        /// Every stage of the library has its test here.
        #[test]
        fn every_stage_has_a_test() {
            let tested = [$(stringify!($name)),*];
            assert_eq!(tested.as_slice(), STAGES);
        }
    };
}

stages!(
    mel,
    audio_encoder,
    image_preprocess,
    video_preprocess,
    image_vision_encoder,
    video_vision_encoder,
    rope_index_text,
    rope_index_audio,
    rope_index_image,
    rope_index_video,
    rope_index_video_audio,
    rope_index_talker,
    chat_template_ids,
    thinker_logits,
    thinker_greedy,
    thinker_av_logits,
    talker_inputs,
    talker_logits,
    talker_greedy,
    dit_probe,
    dit_mel,
    bigvgan_waveform,
    token2wav_waveform,
    pipeline_thinker_logits,
    pipeline_thinker_av_logits,
    pipeline_talker,
    pipeline_waveform,
);

/// The Thinker in bf16: every layer and the logits of the audio+image prompt, and its greedy
/// answer with the step logits.
#[test]
fn bf16_thinker() {
    check("thinker_logits", DType::BF16);
    check("thinker_greedy", DType::BF16);
}

/// The Talker in bf16: prefill logits and greedy codes from the reference's rows.
#[test]
fn bf16_talker() {
    check("talker_logits", DType::BF16);
    check("talker_greedy", DType::BF16);
}

/// The whole bf16 pipeline from the raw inputs to the waveform: a bf16 Thinker and Talker,
/// then token2wav (f32, as the model runs it) on their codes.
#[test]
fn bf16_token2wav() {
    check("pipeline_waveform", DType::BF16);
}

/// The Thinker with int8 (Q8_0) weights, f32 activations: its logits and greedy answer, within
/// the measured q8 tolerances.
#[test]
fn q8_thinker() {
    check_with("thinker_logits", DType::F32, WeightFormat::Q8);
    check_with("thinker_greedy", DType::F32, WeightFormat::Q8);
}

/// The Talker with int8 weights: prefill logits and greedy codes.
#[test]
fn q8_talker() {
    check_with("talker_logits", DType::F32, WeightFormat::Q8);
    check_with("talker_greedy", DType::F32, WeightFormat::Q8);
}

/// The audio and vision encoders with int8 weights.
#[test]
fn q8_encoders() {
    check_with("audio_encoder", DType::F32, WeightFormat::Q8);
    check_with("image_vision_encoder", DType::F32, WeightFormat::Q8);
}
