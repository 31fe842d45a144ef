//! Figures of the echo canceller for the README (not a check: run on demand with
//! `cargo test --test echo_figures -- --ignored --nocapture`, where sonora is built at the
//! dev profile's opt-level 2 for dependencies, or with `--release`): how much weaker a
//! speech echo is after it once converged, how long converging takes, and the CPU time it
//! costs per second of call. The far end is real speech at 24 kHz (the model's rate), the
//! microphone at 16 kHz hears it through [`EchoPath`] 60 ms late, 6 dB down, with a little
//! noise.

use std::time::Duration;

use omnicall::media::audio_file::load_audio_at;
use omnicall::media::echo::{CancellerConfig, EchoCanceller, EchoPath, EchoPathConfig, frame_len};

const FAR_RATE: u32 = 24_000;
const MIC_RATE: u32 = 16_000;
const CALL_SECONDS: usize = 30;

/// Speech, 0.5 s of silence, speech... for `seconds` at `rate`.
fn talk(rate: u32, seconds: usize) -> Vec<f32> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/media/utterance_long.wav");
    let once = load_audio_at(path, rate).unwrap();
    let mut out = Vec::new();
    while out.len() < seconds * rate as usize {
        out.extend(&once);
        out.extend(std::iter::repeat_n(0.0, rate as usize / 2));
    }
    out.truncate(seconds * rate as usize);
    out
}

fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn power(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len().max(1) as f64
}

fn figures(config: CancellerConfig) {
    let far_end = talk(FAR_RATE, CALL_SECONDS);
    let mut path = EchoPath::new(
        EchoPathConfig {
            delay: Duration::from_millis(60),
            gain_db: -6.0,
        },
        MIC_RATE,
    )
    .unwrap();
    let echo = path.process(&talk(MIC_RATE, CALL_SECONDS));
    // a little room noise, -60 dBFS
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mic: Vec<f32> = echo
        .iter()
        .map(|&e| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            e + ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.0035
        })
        .collect();
    let mut aec = EchoCanceller::new(MIC_RATE, FAR_RATE, config).unwrap();
    let (rf, cf) = (frame_len(FAR_RATE), frame_len(MIC_RATE));
    let frames = CALL_SECONDS * 100;
    let mut out = Vec::with_capacity(mic.len());
    let mut estimates = Vec::new();
    let cpu_start = thread_cpu_time();
    for k in 0..frames {
        aec.process_render(&far_end[k * rf..(k + 1) * rf]).unwrap();
        let mut frame = mic[k * cf..(k + 1) * cf].to_vec();
        aec.process_capture(&mut frame).unwrap();
        out.extend(frame);
        estimates.push(aec.stats());
    }
    let cpu = thread_cpu_time() - cpu_start;
    // echo reduction over each 500 ms with echo in it
    let window = MIC_RATE as usize / 2;
    let reductions: Vec<(f64, Option<f64>)> = (0..out.len() / window)
        .map(|w| {
            let range = w * window..(w + 1) * window;
            let p_echo = power(&echo[range.clone()]);
            let t = (w * window) as f64 / MIC_RATE as f64;
            // windows of silence on the far end say nothing about the echo
            let reduction =
                (p_echo > 1e-6).then(|| 10.0 * (p_echo / power(&out[range]).max(1e-12)).log10());
            (t, reduction)
        })
        .collect();
    let steady: Vec<f64> = reductions
        .iter()
        .filter(|&&(t, r)| t >= 5.0 && r.is_some())
        .filter_map(|&(_, r)| r)
        .collect();
    let steady_p: f64 = {
        let (mut pe, mut po) = (0.0, 0.0);
        let from = 5 * MIC_RATE as usize;
        pe += power(&echo[from..out.len()]);
        po += power(&out[from..]);
        10.0 * (pe / po).log10()
    };
    let stats = aec.stats();
    println!("config: {config}");
    println!(
        "echo reduction (linear filter and suppressor) from 5 to {CALL_SECONDS} s: {steady_p:.1} \
         dB overall, 500-ms windows min {:.1} / median {:.1} dB",
        steady.iter().cloned().fold(f64::INFINITY, f64::min),
        {
            let mut s = steady.clone();
            s.sort_by(|a, b| a.partial_cmp(b).unwrap());
            s[s.len() / 2]
        }
    );
    let first = |what: &dyn Fn(&omnicall::media::echo::CancellerStats) -> bool| {
        estimates
            .iter()
            .position(what)
            .map_or("never".into(), |k| format!("{:.2} s", k as f64 / 100.0))
    };
    let final_delay = stats.delay_ms.unwrap_or(i32::MAX);
    println!(
        "AEC3's own estimates at the end: {stats}; its delay within 4 ms of that from {}, its \
         linear filter's ERLE over 10 dB from {}, within 90 % of the final from {}",
        first(&|s| s.delay_ms.is_some_and(|d| (d - final_delay).abs() <= 4)),
        first(&|s| s.erle_db.is_some_and(|e| e > 10.0)),
        first(&|s| s
            .erle_db
            .is_some_and(|e| e >= 0.9 * stats.erle_db.unwrap_or(f64::INFINITY)))
    );
    println!(
        "CPU: {:.1} ms per second of call ({:.2} % of one core), {} s of call in {:.2} s",
        cpu.as_secs_f64() * 1e3 / CALL_SECONDS as f64,
        cpu.as_secs_f64() * 100.0 / CALL_SECONDS as f64,
        CALL_SECONDS,
        cpu.as_secs_f64()
    );
    let curve: Vec<String> = reductions
        .iter()
        .take(12)
        .map(|(t, r)| format!("{t:.1}s:{}", r.map_or("-".into(), |r| format!("{r:.0}"))))
        .collect();
    println!("first 6 s, dB per 500 ms: {}", curve.join(" "));
}

#[test]
#[ignore = "a figure run for the README, not a check"]
fn echo_canceller_figures() {
    figures(CancellerConfig::default());
    figures(CancellerConfig {
        noise_suppression: false,
        high_pass: false,
    });
}
