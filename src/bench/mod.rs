//! Benchmarks that drive the model and the engine: per-stage model timings at full-size shapes
//! with random weights, and the latency client of a running server ([`call`], plotted by
//! [`plot`]), and the load benchmark of many calls on one server ([`load`]).
//!
//! Every model stage reports [`Measurement`] rows; `omnicall bench model` prints them as one
//! table.

pub mod audio;
pub mod batched;
pub mod call;
pub mod engine;
pub mod load;
pub mod peak;
pub mod plot;
pub mod qwen3_omni;
pub mod speech;
pub mod thinker;
pub mod turn;
pub mod vision;

use std::time::{Duration, Instant};

use crate::model::linear::{ProductWork, product_work};
use peak::MachinePeak;

/// One measured figure of one stage.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    /// The stage, e.g. "thinker decode".
    pub stage: String,
    /// What was run: shapes, lengths, dtype.
    pub setup: String,
    /// The figure itself.
    pub value: f64,
    /// Its unit, e.g. "ms/block", "tokens/s", "x real time".
    pub unit: String,
    /// The rate of the stage's Linear products behind the figure, where it was measured.
    pub achieved: Option<Achieved>,
}

/// The rate at which a stage ran its Linear products (convolutions and attention products are
/// not counted, so this is a lower bound of the arithmetic done).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Achieved {
    pub gflops: f64,
    /// Weight bytes read per second, in GB/s: the figure that bounds decoding.
    pub weight_gbps: f64,
}

impl Achieved {
    /// `work` done in `elapsed`.
    pub fn new(work: ProductWork, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Self {
            gflops: work.flops as f64 / seconds / 1e9,
            weight_gbps: work.weight_bytes as f64 / seconds / 1e9,
        }
    }

    /// The rate, and its share of the machine's peak when that was measured.
    pub fn describe(&self, peak: Option<&MachinePeak>) -> String {
        match peak {
            Some(p) => format!(
                "{:.1} GFLOP/s ({:.0} % of FMA peak), {:.2} GB/s weights ({:.0} % of copy)",
                self.gflops,
                100.0 * self.gflops / p.fma_gflops,
                self.weight_gbps,
                100.0 * self.weight_gbps / p.copy_gbps
            ),
            None => format!(
                "{:.1} GFLOP/s, {:.2} GB/s weights",
                self.gflops, self.weight_gbps
            ),
        }
    }
}

impl Measurement {
    pub fn new(stage: &str, setup: impl Into<String>, value: f64, unit: &str) -> Self {
        Self {
            stage: stage.into(),
            setup: setup.into(),
            value,
            unit: unit.into(),
            achieved: None,
        }
    }

    /// The same figure with the rate of its products.
    pub fn achieving(mut self, achieved: Achieved) -> Self {
        self.achieved = Some(achieved);
        self
    }
}

/// [`median_time`], and the Linear work of one run (the runs' average).
pub fn median_time_and_work<T>(
    warmup: usize,
    iters: usize,
    run: impl FnMut() -> T,
) -> (Duration, ProductWork) {
    let before = product_work();
    let time = median_time(warmup, iters, run);
    (
        time,
        per_run(product_work().since(before), warmup + iters.max(1)),
    )
}

/// `work` of `runs` runs, per run.
pub fn per_run(work: ProductWork, runs: usize) -> ProductWork {
    let runs = runs.max(1) as u64;
    ProductWork {
        flops: work.flops / runs,
        weight_bytes: work.weight_bytes / runs,
    }
}

/// Runs `run` `warmup` times untimed, then `iters` times, and returns the median duration.
pub fn median_time<T>(warmup: usize, iters: usize, mut run: impl FnMut() -> T) -> Duration {
    for _ in 0..warmup {
        std::hint::black_box(run());
    }
    let mut times: Vec<Duration> = (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(run());
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// The rows as a markdown table.
pub fn markdown_table(rows: &[Measurement]) -> String {
    markdown_table_against(rows, None)
}

/// The rows as a markdown table, with each figure's achieved rate against `peak`.
pub fn markdown_table_against(rows: &[Measurement], peak: Option<&MachinePeak>) -> String {
    let mut out = String::from(
        "| stage | setup | value | unit | achieved (Linear products) |\n| --- | --- | ---: | --- | --- |\n",
    );
    for r in rows {
        let value = if r.value.abs() >= 100.0 {
            format!("{:.0}", r.value)
        } else if r.value.abs() >= 1.0 {
            format!("{:.2}", r.value)
        } else {
            format!("{:.4}", r.value)
        };
        let achieved = r.achieved.map(|a| a.describe(peak)).unwrap_or_default();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {achieved} |\n",
            r.stage, r.setup, value, r.unit
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_runs_and_table_layout() {
        let mut n = 0;
        let d = median_time(1, 3, || {
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        });
        assert_eq!(n, 4);
        assert!(d >= Duration::from_millis(1));
        let table = markdown_table(&[Measurement::new(
            "thinker decode",
            "3B f32",
            1.234,
            "tokens/s",
        )]);
        assert!(table.contains("| thinker decode | 3B f32 | 1.23 | tokens/s |  |"));
        let work = ProductWork {
            flops: 4_000_000_000,
            weight_bytes: 2_000_000_000,
        };
        let row = Measurement::new("thinker decode", "3B bf16", 2.0, "tokens/s")
            .achieving(Achieved::new(work, Duration::from_secs(2)));
        let peak = MachinePeak {
            fma_gflops: 8.0,
            fma_unit: "test",
            copy_gbps: 4.0,
            threads: 1,
        };
        let table = markdown_table_against(&[row], Some(&peak));
        assert!(
            table.contains("2.0 GFLOP/s (25 % of FMA peak), 1.00 GB/s weights (25 % of copy)"),
            "{table}"
        );
        assert_eq!(per_run(work, 4).flops, 1_000_000_000);
    }
}
