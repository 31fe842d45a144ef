//! `omnicall check`: the binary runs the parity stages on the committed fixtures and passes in
//! f32; a planted bad fixture (a NaN in one reference tensor, a key taken out) fails with a
//! non-zero exit and a message naming what was wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_dir() -> PathBuf {
    match std::env::var_os("OMNICALL_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => root().join("tests/fixtures/reference/a"),
    }
}

/// Stages from every part of the model, kept few: the whole list runs in gpu_check_script.rs.
const STAGES: &str =
    "mel,audio_encoder,rope_index_video_audio,thinker_logits,talker_logits,bigvgan_waveform";

fn run_check(reference: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_omnicall"))
        .args(["check", "--reference"])
        .arg(reference)
        .args(["--stages", STAGES])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("omnicall runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// f32, and bf16 through the generic products (the path a GPU takes in bf16).
#[test]
fn check_passes_on_the_committed_fixtures() {
    for (dtype, kernels) in [("f32", "auto"), ("bf16", "generic")] {
        let out = run_check(&fixture_dir(), &["--dtype", dtype, "--kernels", kernels]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{dtype}:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("| stage | what | max abs diff | tolerance | pass |"),
            "{stdout}"
        );
        for stage in STAGES.split(',') {
            assert!(
                stdout.contains(&format!("| {stage} |")),
                "{stage} missing:\n{stdout}"
            );
        }
        assert!(
            stdout.contains("| thinker_logits | thinker.logits |"),
            "{stdout}"
        );
        assert!(!stdout.contains("FAIL"), "{stdout}");
        assert!(stdout.contains(", 0 failed"), "{stdout}");
        let kernels_line = format!(
            "kernels {}",
            if kernels == "auto" { "Auto" } else { "Generic" }
        );
        assert!(stdout.contains(&kernels_line), "{stdout}");
    }
}

/// A copy of the fixture folder whose `cases.safetensors` has a NaN planted in
/// `thinker.logits` and lacks `audio_encoder.pooled`.
fn planted_fixtures() -> PathBuf {
    let src = fixture_dir();
    let dir = std::env::temp_dir().join(format!("omnicall-check-planted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("model")).unwrap();
    for entry in std::fs::read_dir(src.join("model")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("model").join(entry.file_name())).unwrap();
    }
    std::fs::copy(src.join("cases.json"), dir.join("cases.json")).unwrap();
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(src.join("cases.safetensors"), &Device::Cpu).unwrap();
    let logits = &tensors["thinker.logits"];
    let shape = logits.dims().to_vec();
    let mut values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[3] = f32::NAN;
    tensors.insert(
        "thinker.logits".into(),
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap(),
    );
    assert!(tensors.remove("audio_encoder.pooled").is_some());
    candle_core::safetensors::save(&tensors, dir.join("cases.safetensors")).unwrap();
    dir
}

#[test]
fn a_planted_bad_fixture_fails_naming_what_was_wrong() {
    let dir = planted_fixtures();
    let out = run_check(&dir, &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "a bad fixture passed:\n{stdout}");
    // The NaN: named with its side and index, not skipped by a max.
    let nan = stdout
        .lines()
        .find(|l| l.starts_with("| thinker_logits | thinker.logits |"))
        .unwrap_or_else(|| panic!("no thinker.logits row:\n{stdout}"));
    assert!(
        nan.contains("FAIL") && nan.contains("reference value NaN at index"),
        "{nan}"
    );
    // The missing key: a failure naming it and the file, never a skip.
    assert!(
        stdout.contains("fixture key audio_encoder.pooled missing from"),
        "{stdout}"
    );
    assert!(stderr.contains("comparisons failed"), "{stderr}");
    // Everything else still passes: the failures are the planted ones.
    let failed: Vec<&str> = stdout.lines().filter(|l| l.contains("FAIL")).collect();
    assert_eq!(failed.len(), 2, "{failed:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_folder_without_fixtures_is_a_clear_error() {
    let out = run_check(&root().join("models/tiny"), &[]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot read fixtures"), "{stderr}");
    assert!(stderr.contains("cases.safetensors"), "{stderr}");
}

fn qwen3_fixture_dir() -> PathBuf {
    match std::env::var_os("OMNICALL_QWEN3_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => root().join("tests/fixtures/qwen3-omni"),
    }
}

fn run_check_all(reference: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_omnicall"))
        .args(["check", "--reference"])
        .arg(reference)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("omnicall runs")
}

/// A Qwen3-Omni fixture folder (told by its config.json's model_type) runs every Qwen3 stage,
/// and every row passes in f32.
#[test]
fn check_runs_every_qwen3_stage_on_a_qwen3_fixture_folder() {
    let out = run_check_all(&qwen3_fixture_dir(), &["--dtype", "f32"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for stage in omnicall::check::QWEN3_STAGES {
        assert!(
            stdout.contains(&format!("| {stage} |")),
            "{stage} missing:\n{stdout}"
        );
    }
    assert!(!stdout.contains("| thinker_logits |"), "{stdout}");
    let rows = stdout.lines().filter(|l| l.starts_with("| qwen3_")).count();
    let passed = stdout
        .lines()
        .filter(|l| l.starts_with("| qwen3_") && l.ends_with("| pass |"))
        .count();
    assert!(rows > omnicall::check::QWEN3_STAGES.len(), "{stdout}");
    assert_eq!(passed, rows, "{stdout}");
    assert!(stdout.contains(", 0 failed"), "{stdout}");
}

/// A key taken out of a Qwen3-Omni fixture folder is a failed row naming it, never a skip.
#[test]
fn a_missing_qwen3_fixture_key_is_a_failed_row() {
    let src = qwen3_fixture_dir();
    let dir = std::env::temp_dir().join(format!("omnicall-check-qwen3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("model")).unwrap();
    for entry in std::fs::read_dir(src.join("model")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.join("model").join(entry.file_name())).unwrap();
        }
    }
    std::fs::copy(src.join("cases.json"), dir.join("cases.json")).unwrap();
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(src.join("cases.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.remove("code2wav.upsampled").is_some());
    candle_core::safetensors::save(&tensors, dir.join("cases.safetensors")).unwrap();
    let out = run_check_all(&dir, &["--stages", "qwen3_code2wav,qwen3_code2wav_chunked"]);
    let (stdout, _) = text(&out);
    assert!(!out.status.success(), "a missing key passed:\n{stdout}");
    assert!(
        stdout.contains("fixture key code2wav.upsampled missing from"),
        "{stdout}"
    );
    // The other stage still runs and passes.
    assert!(
        stdout.contains("| qwen3_code2wav_chunked | code2wav.chunked_waveform |"),
        "{stdout}"
    );
    let failed = stdout.lines().filter(|l| l.contains("FAIL")).count();
    assert_eq!(failed, 1, "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
