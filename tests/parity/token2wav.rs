//! token2wav against the reference fixtures: the flow-matching DiT (one evaluation `dit_probe`,
//! the full ODE sampler `dit_mel`), the BigVGAN vocoder (`bigvgan_waveform`) and the whole
//! codes-to-waveform path (`token2wav_waveform`).

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use omnicall::model::config::Config;
use omnicall::model::token2wav::Token2Wav;
use omnicall::model::token2wav::bigvgan::BigVgan;
use omnicall::model::token2wav::dit::{Dit, SamplerOptions, SpeakerCondition};

use crate::common::{self, Cases};

/// Tolerances of the fixture README: one DiT evaluation, and the mel after the whole ODE.
const PROBE_ATOL: f32 = 1e-4;
const MEL_ATOL: f32 = 5e-4;
/// The task's bound for the vocoder (the README suggests 1e-4; observed error is far smaller).
const WAVEFORM_ATOL: f32 = 1e-3;

fn config_and_weights() -> (Config, VarBuilder<'static>) {
    let cfg = common::model_config();
    let vb = common::model_weights();
    (cfg, vb)
}

fn load_dit() -> Dit {
    let (cfg, vb) = config_and_weights();
    Dit::new(
        &cfg.token2wav_config.dit_config,
        vb.pp("token2wav").pp("code2wav_dit_model"),
    )
    .expect("DiT builds")
}

fn load_bigvgan() -> BigVgan {
    let (cfg, vb) = config_and_weights();
    BigVgan::new(
        &cfg.token2wav_config.bigvgan_config,
        vb.pp("token2wav").pp("code2wav_bigvgan_model"),
    )
    .expect("BigVGAN builds")
}

/// Speaker `Chelsie`, read straight from the fixture's `speakers.safetensors`.
fn chelsie() -> (Tensor, Tensor) {
    let path = common::model_dir().join("speakers.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let cond = t
        .remove("Chelsie.cond")
        .expect("Chelsie.cond in speakers.safetensors");
    let ref_mel = t
        .remove("Chelsie.ref_mel")
        .expect("Chelsie.ref_mel in speakers.safetensors");
    (cond, ref_mel)
}

/// The sampler settings the fixtures were made with (steps from the fixture header).
fn fixture_options() -> SamplerOptions {
    let json = Cases::json();
    let steps = json["spec"]["inputs"]["ode_steps"]
        .as_u64()
        .expect("spec.inputs.ode_steps in cases.json") as usize;
    SamplerOptions {
        steps,
        guidance_scale: 0.5,
        sway: -1.0,
    }
}

#[test]
fn dit_probe() {
    let cases = Cases::load();
    let dit = load_dit();
    let (cond, ref_mel) = chelsie();
    let speaker: SpeakerCondition = dit.speaker_condition(&cond, &ref_mel).unwrap();
    common::assert_close(
        "dit_probe.speaker_encoder_output",
        &speaker.speaker_embedding().unwrap(),
        &cases.f32("dit_probe.speaker_encoder_output"),
        PROBE_ATOL,
    );

    let codes = cases.get("token2wav_fixed.code");
    let x = cases.f32("token2wav_fixed.noise");
    let t = cases
        .f32("dit_probe.time_step")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let out = dit.forward_cfg(&x, &speaker, &codes, t).unwrap();
    common::assert_close(
        "dit_probe.output",
        &out,
        &cases.f32("dit_probe.output"),
        PROBE_ATOL,
    );

    let guided = dit.guided_velocity(&x, &speaker, &codes, t, 0.5).unwrap();
    common::assert_close(
        "dit_probe.guided",
        &guided,
        &cases.f32("dit_probe.guided"),
        PROBE_ATOL,
    );
}

#[test]
fn dit_mel() {
    let cases = Cases::load();
    let dit = load_dit();
    let options = fixture_options();
    let schedule = dit.schedule(&options).unwrap();

    // Random codes, speaker Chelsie from speakers.safetensors.
    let (cond, ref_mel) = chelsie();
    let speaker = dit.speaker_condition(&cond, &ref_mel).unwrap();
    let mel = dit
        .sample_scheduled(
            &speaker,
            &cases.get("token2wav_fixed.code"),
            &cases.f32("token2wav_fixed.noise"),
            &schedule,
        )
        .unwrap();
    common::assert_close(
        "token2wav_fixed.mel",
        &mel,
        &cases.f32("token2wav_fixed.mel"),
        MEL_ATOL,
    );

    // The codes generate() handed to token2wav, with the conditioning it captured.
    let speaker = dit
        .speaker_condition(
            &cases.f32("token2wav.conditioning"),
            &cases.f32("token2wav.reference_mel"),
        )
        .unwrap();
    let mel = dit
        .sample(
            &speaker,
            &cases.get("token2wav.code"),
            &cases.f32("token2wav.noise"),
            &options,
        )
        .unwrap();
    common::assert_close("token2wav.mel", &mel, &cases.f32("token2wav.mel"), MEL_ATOL);
}

#[test]
fn bigvgan_waveform() {
    let cases = Cases::load();
    let vocoder = load_bigvgan();
    for case in ["token2wav", "token2wav_fixed"] {
        let wav = vocoder
            .forward(&cases.f32(&format!("{case}.mel")))
            .unwrap()
            .squeeze(0)
            .unwrap();
        common::assert_close(
            &format!("{case}.waveform"),
            &wav,
            &cases.f32(&format!("{case}.waveform")),
            WAVEFORM_ATOL,
        );
    }
}

#[test]
fn token2wav_waveform() {
    let cases = Cases::load();
    let (cfg, vb) = config_and_weights();
    let t2w = Token2Wav::new(&cfg.token2wav_config, vb.pp("token2wav")).expect("token2wav builds");
    let schedule = t2w.schedule(&fixture_options()).unwrap();
    let codes = |key: &str| -> Vec<u32> { cases.i64_vec(key).iter().map(|&c| c as u32).collect() };

    // What generate() rendered, with the conditioning it captured.
    let speaker = t2w
        .dit()
        .speaker_condition(
            &cases.f32("token2wav.conditioning"),
            &cases.f32("token2wav.reference_mel"),
        )
        .unwrap();
    let wav = t2w
        .synthesize(
            &speaker,
            &codes("token2wav.code"),
            &cases.f32("token2wav.noise"),
            &schedule,
        )
        .unwrap();
    let wav = Tensor::new(wav.as_slice(), &Device::Cpu).unwrap();
    common::assert_close(
        "token2wav.waveform",
        &wav,
        &cases.f32("token2wav.waveform"),
        WAVEFORM_ATOL,
    );
    common::assert_close(
        "generate.waveform",
        &wav,
        &cases.f32("generate.waveform"),
        WAVEFORM_ATOL,
    );

    // Random codes, speaker Chelsie from speakers.safetensors.
    let (cond, ref_mel) = chelsie();
    let speaker = t2w.dit().speaker_condition(&cond, &ref_mel).unwrap();
    let wav = t2w
        .synthesize(
            &speaker,
            &codes("token2wav_fixed.code"),
            &cases.f32("token2wav_fixed.noise"),
            &schedule,
        )
        .unwrap();
    common::assert_close(
        "token2wav_fixed.waveform",
        &Tensor::new(wav.as_slice(), &Device::Cpu).unwrap(),
        &cases.f32("token2wav_fixed.waveform"),
        WAVEFORM_ATOL,
    );
}
