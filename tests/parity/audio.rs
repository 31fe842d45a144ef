//! The audio path: log-mel features of the processor (`mel`) and the audio tower
//! (`audio_encoder`) against the reference fixtures.

use candle_core::{Device, IndexOp};
use omnicall::media::mel::LogMel;
use omnicall::model::config::ProcessorConfig;
use omnicall::model::thinker::audio_encoder::{AudioEncoder, output_len};

use crate::common::{self, Cases};

/// Tolerances of the fixture README.
const MEL_ATOL: f32 = 1e-4;
const ENCODER_ATOL: f32 = 1e-4;

fn log_mel() -> LogMel {
    let path = common::model_dir().join("processor_config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let processor = ProcessorConfig::from_json(&text).expect("processor_config.json parses");
    LogMel::new(&processor.feature_extractor).expect("feature extractor config")
}

fn load_audio_encoder() -> AudioEncoder {
    let cfg = common::model_config();
    let vb = common::model_weights();
    AudioEncoder::new(
        &cfg.thinker_config.audio_config,
        vb.pp("thinker").pp("audio_tower"),
    )
    .expect("audio tower builds")
}

#[test]
fn mel() {
    let cases = Cases::load();
    let mel = log_mel();
    let waveform = cases
        .f32("inputs.waveform")
        .to_vec1::<f32>()
        .expect("waveform is 1-D");
    let n_valid = cases.i64_vec("mel.n_valid_frames")[0] as usize;
    assert_eq!(
        mel.valid_frames(waveform.len()),
        n_valid,
        "mel.n_valid_frames"
    );
    let full_shape = cases.i64_vec("mel.input_features_full_shape");
    assert_eq!(
        mel.padded_frames(),
        full_shape[2] as usize,
        "padded frame count"
    );
    let mask = cases.i64_vec("mel.feature_attention_mask");
    assert_eq!(mask.iter().filter(|&&m| m == 1).count(), n_valid);

    let head = cases.f32("mel.input_features_head").i(0).unwrap(); // [n_mels, keep]
    let features = mel.features(&waveform).expect("features");
    assert_eq!(features.len(), n_valid);
    common::assert_close(
        "mel.input_features_head (valid frames)",
        &features.to_tensor(&Device::Cpu).unwrap(),
        &head.narrow(1, 0, n_valid).unwrap(),
        MEL_ATOL,
    );

    // The frames after the valid ones: the end of the audio, then pure padding.
    let keep = head.dim(1).unwrap();
    let padded = mel
        .padded_features(&waveform, keep)
        .expect("padded features");
    common::assert_close(
        "mel.input_features_head (valid + padding frames)",
        &padded.to_tensor(&Device::Cpu).unwrap(),
        &head,
        MEL_ATOL,
    );
    let pad_value = cases.f32("mel.pad_frame_value").to_vec1::<f32>().unwrap()[0];
    let last = padded.frame(keep - 1);
    let worst = last
        .iter()
        .map(|v| (v - pad_value).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= MEL_ATOL,
        "mel.pad_frame_value: {worst:e} off ({pad_value})"
    );
}

#[test]
fn audio_encoder() {
    let cases = Cases::load();
    let encoder = load_audio_encoder();
    let features = cases.f32("audio_encoder.input_features");
    let lens = cases.i64_vec("audio_encoder.feature_lens");
    assert_eq!(
        lens.iter().sum::<i64>() as usize,
        features.dim(1).unwrap(),
        "feature_lens cover the features"
    );
    // One audio per length, in order, through one batched pass.
    let mut audios = Vec::new();
    let mut start = 0;
    for &len in &lens {
        audios.push(features.narrow(1, start, len as usize).unwrap());
        start += len as usize;
    }
    let outputs = encoder.forward_many(&audios).expect("forward");
    for (audio, out) in audios.iter().zip(&outputs) {
        assert_eq!(out.dim(0).unwrap(), output_len(audio.dim(1).unwrap()));
    }
    let output = candle_core::Tensor::cat(&outputs, 0).unwrap();
    common::assert_close(
        "audio_encoder.output",
        &output,
        &cases.f32("audio_encoder.output"),
        ENCODER_ATOL,
    );

    assert_eq!(lens.len(), 1, "the traced check below takes one audio");
    let trace = encoder.forward_traced(&features).expect("traced forward");
    common::assert_close(
        "audio_encoder.layer0_input",
        &trace.layer0_input,
        &cases.f32("audio_encoder.layer0_input"),
        ENCODER_ATOL,
    );
    common::assert_close(
        "audio_encoder.pooled",
        &trace.pooled,
        &cases.f32("audio_encoder.pooled"),
        ENCODER_ATOL,
    );
    common::assert_close(
        "audio_encoder.output (traced)",
        &trace.output,
        &cases.f32("audio_encoder.output"),
        ENCODER_ATOL,
    );

    // The processor's features feed the tower: mel of the waveform gives the same embeddings.
    let waveform = cases.f32("inputs.waveform").to_vec1::<f32>().unwrap();
    let ours = log_mel()
        .features(&waveform)
        .unwrap()
        .to_tensor(&Device::Cpu)
        .unwrap();
    common::assert_close("audio_encoder.input_features", &ours, &features, MEL_ATOL);
}
