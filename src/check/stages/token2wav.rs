//! token2wav: the flow-matching DiT (one evaluation `dit_probe`, the full ODE sampler
//! `dit_mel`), the BigVGAN vocoder (`bigvgan_waveform`) and the whole codes-to-waveform path
//! (`token2wav_waveform`). token2wav runs in f32 in every run, as the model runs it.

use candle_core::{Device, Tensor};

use crate::check::{Checker, Quantity};
use crate::model::linear::{WeightFormat, with_weight_format};
use crate::model::token2wav::Token2Wav;
use crate::model::token2wav::bigvgan::BigVgan;
use crate::model::token2wav::dit::{Dit, SamplerOptions};

fn load_dit(check: &Checker) -> anyhow::Result<Dit> {
    let cfg = check.config()?;
    let vb = check.token2wav_weights()?;
    // Dense, as `Token2Wav::new` builds it, whatever the run's weight format.
    Ok(with_weight_format(WeightFormat::Dense, || {
        Dit::new(
            &cfg.token2wav_config.dit_config,
            vb.pp("token2wav").pp("code2wav_dit_model"),
        )
    })?)
}

/// The fixture's voice (`settings.speaker`), straight from the fixture's
/// `speakers.safetensors`: its conditioning and reference mel.
fn fixture_speaker(check: &Checker) -> anyhow::Result<(Tensor, Tensor)> {
    let name = check.fixtures.json_str("settings/speaker")?;
    let path = check.fixtures.model_dir().join("speakers.safetensors");
    let mut t = candle_core::safetensors::load(&path, &check.options.device)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut take = |part: &str| {
        t.remove(&format!("{name}.{part}"))
            .ok_or_else(|| anyhow::anyhow!("{name}.{part} missing from {}", path.display()))
    };
    Ok((take("cond")?, take("ref_mel")?))
}

/// The sampler settings the fixtures were made with.
pub(super) fn fixture_sampler(check: &Checker) -> anyhow::Result<SamplerOptions> {
    let fx = check.fixtures;
    Ok(SamplerOptions {
        steps: fx.json_u64("spec/inputs/ode_steps")? as usize,
        guidance_scale: fx.json_f64("settings/guidance_scale")?,
        sway: fx.json_f64("settings/sway_coefficient")?,
    })
}

pub fn dit_probe(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let dit = load_dit(check)?;
    let (cond, ref_mel) = fixture_speaker(check)?;
    let speaker = dit.speaker_condition(&cond, &ref_mel)?;
    check.close(
        "dit_probe.speaker_encoder_output",
        &speaker.speaker_embedding()?,
        &fx.f32("dit_probe.speaker_encoder_output")?,
        Quantity::DitProbe,
    );
    let codes = check.input_ids("token2wav_fixed.code")?;
    let x = check.input("token2wav_fixed.noise")?;
    let t = fx.f32_scalar("dit_probe.time_step")?;
    let out = dit.forward_cfg(&x, &speaker, &codes, t)?;
    check.close(
        "dit_probe.output",
        &out,
        &fx.f32("dit_probe.output")?,
        Quantity::DitProbe,
    );
    let guidance = fixture_sampler(check)?.guidance_scale;
    let guided = dit.guided_velocity(&x, &speaker, &codes, t, guidance)?;
    check.close(
        "dit_probe.guided",
        &guided,
        &fx.f32("dit_probe.guided")?,
        Quantity::DitProbe,
    );
    Ok(())
}

pub fn dit_mel(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let dit = load_dit(check)?;
    let options = fixture_sampler(check)?;
    let schedule = dit.schedule(&options)?;

    // Random codes, the fixture's voice from speakers.safetensors.
    let (cond, ref_mel) = fixture_speaker(check)?;
    let speaker = dit.speaker_condition(&cond, &ref_mel)?;
    let mel = dit.sample_scheduled(
        &speaker,
        &check.input_ids("token2wav_fixed.code")?,
        &check.input("token2wav_fixed.noise")?,
        &schedule,
    )?;
    check.close(
        "token2wav_fixed.mel",
        &mel,
        &fx.f32("token2wav_fixed.mel")?,
        Quantity::DitMel,
    );

    // The codes generate() handed to token2wav, with the conditioning it captured.
    let speaker = dit.speaker_condition(
        &check.input("token2wav.conditioning")?,
        &check.input("token2wav.reference_mel")?,
    )?;
    let mel = dit.sample(
        &speaker,
        &check.input_ids("token2wav.code")?,
        &check.input("token2wav.noise")?,
        &options,
    )?;
    check.close(
        "token2wav.mel",
        &mel,
        &fx.f32("token2wav.mel")?,
        Quantity::DitMel,
    );
    Ok(())
}

pub fn bigvgan_waveform(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let cfg = check.config()?;
    let vb = check.token2wav_weights()?;
    let vocoder = BigVgan::new(
        &cfg.token2wav_config.bigvgan_config,
        vb.pp("token2wav").pp("code2wav_bigvgan_model"),
    )?;
    for case in ["token2wav", "token2wav_fixed"] {
        let wav = vocoder
            .forward(&check.input(&format!("{case}.mel"))?)?
            .squeeze(0)?;
        let key = format!("{case}.waveform");
        check.close(&key, &wav, &fx.f32(&key)?, Quantity::Waveform);
    }
    Ok(())
}

pub fn waveform(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let cfg = check.config()?;
    let t2w = Token2Wav::new(
        &cfg.token2wav_config,
        check.token2wav_weights()?.pp("token2wav"),
    )?;
    let schedule = t2w.schedule(&fixture_sampler(check)?)?;

    // What generate() rendered, with the conditioning it captured.
    let speaker = t2w.dit().speaker_condition(
        &check.input("token2wav.conditioning")?,
        &check.input("token2wav.reference_mel")?,
    )?;
    let wav = t2w.synthesize(
        &speaker,
        &fx.u32_vec("token2wav.code")?,
        &check.input("token2wav.noise")?,
        &schedule,
    )?;
    let wav = Tensor::new(wav.as_slice(), &Device::Cpu)?;
    for key in ["token2wav.waveform", "generate.waveform"] {
        check.close(key, &wav, &fx.f32(key)?, Quantity::Waveform);
    }

    // Random codes, the fixture's voice from speakers.safetensors.
    let (cond, ref_mel) = fixture_speaker(check)?;
    let speaker = t2w.dit().speaker_condition(&cond, &ref_mel)?;
    let wav = t2w.synthesize(
        &speaker,
        &fx.u32_vec("token2wav_fixed.code")?,
        &check.input("token2wav_fixed.noise")?,
        &schedule,
    )?;
    check.close(
        "token2wav_fixed.waveform",
        &Tensor::new(wav.as_slice(), &Device::Cpu)?,
        &fx.f32("token2wav_fixed.waveform")?,
        Quantity::Waveform,
    );
    Ok(())
}
