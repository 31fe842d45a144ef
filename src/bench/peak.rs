//! This machine's limits, measured in a short probe at the start of `omnicall bench model`, so
//! that every stage's achieved GFLOP/s or GB/s can be read against them: the f32 FMA peak of
//! the widest vector unit the CPU has (on every core) and the memory copy bandwidth.

use std::time::Instant;

/// The measured limits of this machine.
#[derive(Debug, Clone, Copy)]
pub struct MachinePeak {
    /// f32 multiply-adds on every core, in GFLOP/s (an FMA counts two).
    pub fma_gflops: f64,
    /// Which vector unit gave [`Self::fma_gflops`].
    pub fma_unit: &'static str,
    /// Large buffer copy on every core, bytes read plus written, in GB/s.
    pub copy_gbps: f64,
    /// Threads the probe ran on.
    pub threads: usize,
}

/// FMAs per accumulator and call of the inner probe: long enough to hide the call.
const FMA_ROUNDS: usize = 1 << 24;

/// Bytes copied per thread (twice that allocated): far beyond any cache.
const COPY_BYTES_PER_THREAD: usize = 64 << 20;

impl MachinePeak {
    /// Runs the probes on `threads` threads (about a second in all).
    pub fn measure(threads: usize) -> Self {
        let threads = threads.max(1);
        let (fma_unit, flops_per_call) = fma_unit();
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| std::hint::black_box(fma_probe(FMA_ROUNDS)));
            }
        });
        let fma_gflops = (threads * flops_per_call) as f64 * FMA_ROUNDS as f64
            / started.elapsed().as_secs_f64()
            / 1e9;

        let words = COPY_BYTES_PER_THREAD / 4;
        let mut buffers: Vec<(Vec<f32>, Vec<f32>)> = (0..threads)
            .map(|i| (vec![i as f32; words], vec![0f32; words]))
            .collect();
        // One untimed pass so the pages are mapped.
        copy_all(&mut buffers);
        let started = Instant::now();
        let passes = 3;
        for _ in 0..passes {
            copy_all(&mut buffers);
        }
        let bytes = 2 * COPY_BYTES_PER_THREAD * threads * passes;
        let copy_gbps = bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
        Self {
            fma_gflops,
            fma_unit,
            copy_gbps,
            threads,
        }
    }

    /// One line for the bench's output.
    pub fn describe(&self) -> String {
        // The FMA probe is this crate's code: unoptimised in a debug build (the copy is the
        // standard library's memcpy and holds either way).
        let caveat = if cfg!(debug_assertions) {
            "; debug build: the FMA probe runs unoptimised, far below the machine's peak (use a release build for it)"
        } else {
            ""
        };
        format!(
            "machine peak on {} threads: f32 FMA {:.0} GFLOP/s ({}), copy {:.1} GB/s (read + write){caveat}",
            self.threads, self.fma_gflops, self.fma_unit, self.copy_gbps
        )
    }
}

fn copy_all(buffers: &mut [(Vec<f32>, Vec<f32>)]) {
    std::thread::scope(|s| {
        for (from, to) in buffers.iter_mut() {
            s.spawn(move || {
                to.copy_from_slice(from);
                std::hint::black_box(&to);
            });
        }
    });
}

/// The widest FMA unit and the FLOPs one round of [`fma_probe`] does on it.
fn fma_unit() -> (&'static str, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return ("avx512f zmm", x86::ACCUMULATORS * 16 * 2);
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return ("fma ymm", x86::ACCUMULATORS * 8 * 2);
        }
    }
    ("scalar", SCALAR_ACCUMULATORS * 2)
}

/// Runs `rounds` rounds of independent FMAs on the unit [`fma_unit`] names.
fn fma_probe(rounds: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { x86::fma_avx512(rounds) };
        }
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX and FMA (checked above).
            return unsafe { x86::fma_avx2(rounds) };
        }
    }
    fma_scalar(rounds)
}

const SCALAR_ACCUMULATORS: usize = 8;

fn fma_scalar(rounds: usize) -> f32 {
    let mut acc = [1f32; SCALAR_ACCUMULATORS];
    let (a, b) = (
        std::hint::black_box(0.999_999f32),
        std::hint::black_box(1e-7f32),
    );
    for _ in 0..rounds {
        for v in acc.iter_mut() {
            *v = v.mul_add(a, b);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Independent accumulators: more than FMA latency x throughput (4 x 2) needs.
    pub const ACCUMULATORS: usize = 12;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_avx512(rounds: usize) -> f32 {
        let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); ACCUMULATORS];
        for _ in 0..rounds {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut sum = _mm512_setzero_ps();
        for v in acc {
            sum = _mm512_add_ps(sum, v);
        }
        _mm512_reduce_add_ps(sum)
    }

    #[target_feature(enable = "avx,fma")]
    pub unsafe fn fma_avx2(rounds: usize) -> f32 {
        let a = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); ACCUMULATORS];
        for _ in 0..rounds {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        let mut sum = _mm256_setzero_ps();
        for v in acc {
            sum = _mm256_add_ps(sum, v);
        }
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_unit_computes_the_same_recurrence() {
        // Each accumulator runs v <- v * a + b from 1: all units agree on the value.
        let rounds = 1000;
        let (_, flops) = fma_unit();
        let lanes = flops / 2;
        let got = fma_probe(rounds) / lanes as f32;
        let want = fma_scalar(rounds) / SCALAR_ACCUMULATORS as f32;
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }

    #[test]
    fn describe_names_both_figures() {
        let peak = MachinePeak {
            fma_gflops: 330.0,
            fma_unit: "avx512f zmm",
            copy_gbps: 12.5,
            threads: 2,
        };
        let line = peak.describe();
        assert!(
            line.contains("330 GFLOP/s") && line.contains("12.5 GB/s"),
            "{line}"
        );
    }
}
