//! Benchmarks that drive the model and the engine: per-stage model timings at full-size shapes
//! with random weights, and the latency client of a running server ([`call`], plotted by
//! [`plot`]), and the load benchmark of many calls on one server ([`load`]).
//!
//! Every model stage reports [`Measurement`] rows; `omnicall bench model` prints them as one
//! table.

pub mod audio;
pub mod call;
pub mod engine;
pub mod load;
pub mod plot;
pub mod speech;
pub mod thinker;
pub mod vision;

use std::time::{Duration, Instant};

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
}

impl Measurement {
    pub fn new(stage: &str, setup: impl Into<String>, value: f64, unit: &str) -> Self {
        Self {
            stage: stage.into(),
            setup: setup.into(),
            value,
            unit: unit.into(),
        }
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
    let mut out = String::from("| stage | setup | value | unit |\n| --- | --- | ---: | --- |\n");
    for r in rows {
        let value = if r.value.abs() >= 100.0 {
            format!("{:.0}", r.value)
        } else if r.value.abs() >= 1.0 {
            format!("{:.2}", r.value)
        } else {
            format!("{:.4}", r.value)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
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
        assert!(table.contains("| thinker decode | 3B f32 | 1.23 | tokens/s |"));
    }
}
