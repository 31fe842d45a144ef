//! The audio path: log-mel features of the processor (`mel`) and the audio tower
//! (`audio_encoder`).

use candle_core::{Device, IndexOp, Tensor};

use crate::check::{Checker, Quantity};
use crate::media::mel::LogMel;
use crate::model::thinker::audio_encoder::{AudioEncoder, output_len};

fn log_mel(check: &Checker) -> anyhow::Result<LogMel> {
    Ok(LogMel::new(&check.processor_config()?.feature_extractor)?)
}

fn load_audio_encoder(check: &Checker) -> anyhow::Result<AudioEncoder> {
    let cfg = check.config()?;
    let vb = check.weights()?;
    Ok(AudioEncoder::new(
        &cfg.thinker_config.audio_config,
        vb.pp("thinker").pp("audio_tower"),
    )?)
}

pub fn mel(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let mel = log_mel(check)?;
    let waveform = fx.f32("inputs.waveform")?.to_vec1::<f32>()?;
    let n_valid = fx.i64_vec("mel.n_valid_frames")?[0] as usize;
    check.equal(
        "mel.n_valid_frames",
        mel.valid_frames(waveform.len()),
        n_valid,
    );
    let full_shape = fx.i64_vec("mel.input_features_full_shape")?;
    check.equal(
        "padded frame count",
        Some(mel.padded_frames()),
        full_shape.get(2).map(|&n| n as usize),
    );
    let mask = fx.i64_vec("mel.feature_attention_mask")?;
    check.equal(
        "mel.feature_attention_mask ones",
        mask.iter().filter(|&&m| m == 1).count(),
        n_valid,
    );

    let head = fx.f32("mel.input_features_head")?.i(0)?; // [n_mels, keep]
    let features = mel.features(&waveform)?;
    check.equal("mel frames", features.len(), n_valid);
    check.close(
        "mel.input_features_head (valid frames)",
        &features.to_tensor(&Device::Cpu)?,
        &head.narrow(1, 0, n_valid.min(head.dim(1)?))?,
        Quantity::Mel,
    );

    // The frames after the valid ones: the end of the audio, then pure padding.
    let keep = head.dim(1)?;
    let padded = mel.padded_features(&waveform, keep)?;
    check.close(
        "mel.input_features_head (valid + padding frames)",
        &padded.to_tensor(&Device::Cpu)?,
        &head,
        Quantity::Mel,
    );
    let pad_value = fx.f32_scalar("mel.pad_frame_value")?;
    let last = padded.frame(keep - 1);
    let last = Tensor::new(last, &Device::Cpu)?;
    let want = Tensor::full(pad_value, last.dims(), &Device::Cpu)?;
    check.close(
        "mel.pad_frame_value (last frame)",
        &last,
        &want,
        Quantity::Mel,
    );
    Ok(())
}

pub fn audio_encoder(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let encoder = load_audio_encoder(check)?;
    let features = check.input("audio_encoder.input_features")?;
    let lens = fx.i64_vec("audio_encoder.feature_lens")?;
    check.equal(
        "feature_lens cover the features",
        lens.iter().sum::<i64>() as usize,
        features.dim(1)?,
    );
    // One audio per length, in order, through one batched pass.
    let mut audios = Vec::new();
    let mut start = 0;
    for &len in &lens {
        audios.push(features.narrow(1, start, len as usize)?);
        start += len as usize;
    }
    let outputs = encoder.forward_many(&audios)?;
    let got_lens: Vec<usize> = outputs.iter().map(|o| o.dim(0)).collect::<Result<_, _>>()?;
    let want_lens: Vec<usize> = audios
        .iter()
        .map(|a| a.dim(1).map(output_len))
        .collect::<Result<_, _>>()?;
    check.equal("audio_encoder output lengths", got_lens, want_lens);
    let output = Tensor::cat(&outputs, 0)?;
    let want_output = fx.f32("audio_encoder.output")?;
    check.close(
        "audio_encoder.output",
        &output,
        &want_output,
        Quantity::Encoder,
    );

    anyhow::ensure!(
        lens.len() == 1,
        "the traced check takes one audio, the fixture has {}",
        lens.len()
    );
    let trace = encoder.forward_traced(&features)?;
    for (key, got) in [
        ("audio_encoder.layer0_input", &trace.layer0_input),
        ("audio_encoder.pooled", &trace.pooled),
    ] {
        check.close(key, got, &fx.f32(key)?, Quantity::Encoder);
    }
    check.close(
        "audio_encoder.output (traced)",
        &trace.output,
        &want_output,
        Quantity::Encoder,
    );

    // The processor's features feed the tower: mel of the waveform gives the same features.
    let waveform = fx.f32("inputs.waveform")?.to_vec1::<f32>()?;
    let ours = log_mel(check)?
        .features(&waveform)?
        .to_tensor(&Device::Cpu)?;
    check.close(
        "audio_encoder.input_features (from our mel)",
        &ours,
        &fx.f32("audio_encoder.input_features")?,
        Quantity::Mel,
    );
    Ok(())
}
