//! `scripts/gpu-check.sh --cpu-dry-run`: the GPU check's script run here on the CPU build at
//! the tiny model's shapes, so that its first call on a GPU machine is not its first run. Every
//! step it takes there runs here (the reference bench only where python3 has torch).

use std::path::Path;
use std::process::Command;

#[test]
fn the_gpu_check_script_dry_runs_on_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("omnicall-gpu-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new("bash")
        .arg(root.join("scripts/gpu-check.sh"))
        .args(["--cpu-dry-run", "--binary", env!("CARGO_BIN_EXE_omnicall")])
        .env("OUT", &out)
        .env("RUST_LOG", "warn")
        .output()
        .expect("bash runs the script");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let log = std::fs::read_to_string(out.join("gpu-check.log")).unwrap_or_default();
    assert!(run.status.success(), "{stdout}\n--- log ---\n{log}");
    assert!(stdout.contains("all steps passed"), "{stdout}");

    let read = |name: &str| {
        std::fs::read_to_string(out.join(name))
            .unwrap_or_else(|e| panic!("{name} not written: {e}\n{log}"))
    };
    assert!(read("env.txt").contains("dry run: 1"));
    for dtype in ["f32", "bf16"] {
        let table = read(&format!("check-{dtype}.md"));
        assert!(
            table.contains("| pipeline_waveform |"),
            "check {dtype}:\n{table}"
        );
        assert!(table.contains(", 0 failed"), "check {dtype}:\n{table}");
        // The Qwen3-Omni fixtures' table follows the Qwen2.5-Omni one, and passes.
        assert!(
            table.contains("| qwen3_code2wav_streaming |") && table.contains("| qwen3_mel |"),
            "check {dtype}:\n{table}"
        );
        let gated = table
            .split("## measured, not gated")
            .next()
            .unwrap_or_default();
        assert!(!gated.contains("FAIL"), "check {dtype}:\n{table}");
    }
    assert!(read("check-bf16.md").contains("| qwen3_talker_greedy |"));
    let bench = read("bench-tiny.md");
    for row in [
        "thinker decode",
        "engine: end of turn -> first audio frame",
        "engine: end of turn -> first audio frame, p90",
        "engine: Thinker KV growth",
    ] {
        assert!(bench.contains(row), "{row} missing:\n{bench}");
    }
    // At most 8 files come back from the device machine.
    let files = std::fs::read_dir(&out).unwrap().count();
    assert!(files <= 8, "{files} files under $OUT");
    let _ = std::fs::remove_dir_all(&out);
}
