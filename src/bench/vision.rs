//! Vision stage timings: camera-frame preparation and the vision encoder on one 2-s block of
//! video at the default camera resolution and fps, with random weights of the configured size,
//! and what such a block costs in Thinker tokens.

use std::time::Duration;

use anyhow::Context;
use candle_core::{DType, Device};

use crate::bench::{Achieved, Measurement, median_time, median_time_and_work};
use crate::media::image::RgbImage;
use crate::media::video::{DEFAULT_FPS, VideoPreprocessor};
use crate::model::config::{Config, ImageProcessorConfig};
use crate::model::random_weights::RandomWeights;
use crate::model::thinker::vision_encoder::VisionEncoder;

/// The browser's default camera resolution.
pub const CAMERA_WIDTH: usize = 640;
pub const CAMERA_HEIGHT: usize = 480;

/// A deterministic camera-like frame: gradients, a moving square and some texture.
fn camera_frame(index: usize) -> anyhow::Result<RgbImage> {
    let (w, h) = (CAMERA_WIDTH, CAMERA_HEIGHT);
    let square_x = (index * 37) % (w - 80);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let texture = ((x * 7 + y * 13 + index * 5) % 31) as u8;
            if (square_x..square_x + 80).contains(&x) && (h / 3..h / 3 + 80).contains(&y) {
                data.extend_from_slice(&[30, 200 + texture, 60]);
            } else {
                data.extend_from_slice(&[
                    (x * 255 / w) as u8,
                    (y * 255 / h) as u8,
                    100 + texture * 3,
                ]);
            }
        }
    }
    Ok(RgbImage::new(w, h, data)?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Frame preparation and the vision encoder for one 2-s block (the Thinker's block length) of a
/// 640x480 camera sampled at 2 fps, at the shapes of `config` with random weights in `dtype` on
/// `device`; plus the Thinker tokens the block costs (video, and with the block's audio).
pub fn bench_vision(
    config: &Config,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Vec<Measurement>> {
    let thinker = &config.thinker_config;
    let vision = &thinker.vision_config;
    // The published processor settings, on the patch geometry of this model.
    let processor_cfg = ImageProcessorConfig {
        patch_size: vision.patch_size,
        temporal_patch_size: vision.temporal_patch_size,
        merge_size: vision.spatial_merge_size,
        ..Default::default()
    };
    let processor = VideoPreprocessor::new(&processor_cfg, DEFAULT_FPS)?;
    let block_seconds = thinker.seconds_per_chunk as f64;
    let frames_per_block = (block_seconds * DEFAULT_FPS).round() as usize;
    let frames = (0..frames_per_block)
        .map(camera_frame)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let views: Vec<_> = frames.iter().map(RgbImage::view).collect();

    let video = processor
        .prepare(&views)
        .context("preparing the benchmark frames")?;
    let [grid_t, grid_h, grid_w] = video.patches.grid_thw;
    let (res_h, res_w) = (grid_h * vision.patch_size, grid_w * vision.patch_size);
    let prep = median_time(1, 5, || processor.prepare(&views));
    let dtype_name = format!("{dtype:?}").to_lowercase();

    let mut rows = vec![Measurement::new(
        "vision prep",
        format!(
            "{CAMERA_WIDTH}x{CAMERA_HEIGHT} RGB -> {res_w}x{res_h}: resize + normalise + patchify, CPU"
        ),
        ms(prep) / frames_per_block as f64,
        "ms/frame",
    )];

    let vb = RandomWeights::var_builder(dtype, device);
    let encoder = VisionEncoder::new(vision, vb.pp("thinker").pp("visual"))
        .context("building the vision encoder with random weights")?;
    let pixels = video.patches.to_tensor(device)?.to_dtype(dtype)?;
    let grids = [video.patches.grid_thw];
    let run = || -> candle_core::Result<()> {
        let out = encoder.forward(&pixels, &grids)?;
        device.synchronize()?;
        drop(out);
        Ok(())
    };
    run().context("vision encoder forward")?;
    let (warmup, iters) = if device.is_cpu() { (0, 1) } else { (2, 5) };
    let (encode, encode_work) = median_time_and_work(warmup, iters, &run);
    let encode_ms = ms(encode);
    let n_patches = video.patches.n_patches();
    let setup = format!(
        "{} layers x {} hidden, {dtype_name}, {frames_per_block} frames {res_w}x{res_h} = grid ({grid_t}, {grid_h}, {grid_w}), {n_patches} patches",
        vision.depth, vision.hidden_size
    );
    rows.push(
        Measurement::new("vision encoder", setup.clone(), encode_ms, "ms/block")
            .achieving(Achieved::new(encode_work, encode)),
    );
    rows.push(Measurement::new(
        "vision encoder",
        setup,
        block_seconds * 1e3 / encode_ms,
        "x real time",
    ));

    let vision_tokens = video.patches.n_tokens(vision.spatial_merge_size);
    // Audio: 25 tokens (= TMRoPE temporal ids) per second.
    let audio_tokens = (thinker.position_id_per_seconds as f64 * block_seconds).round() as usize;
    rows.push(Measurement::new(
        "vision tokens",
        format!("{block_seconds} s of {CAMERA_WIDTH}x{CAMERA_HEIGHT} video at {DEFAULT_FPS} fps"),
        vision_tokens as f64,
        "tokens/block",
    ));
    rows.push(Measurement::new(
        "block tokens",
        format!("{vision_tokens} video + {audio_tokens} audio"),
        (vision_tokens + audio_tokens) as f64,
        "tokens/block",
    ));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_model_rows_and_token_arithmetic() -> anyhow::Result<()> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny/config.json");
        let config = Config::from_json(&std::fs::read_to_string(path)?)?;
        let rows = bench_vision(&config, DType::F32, &Device::Cpu)?;
        let value = |stage: &str, unit: &str| {
            rows.iter()
                .find(|r| r.stage == stage && r.unit == unit)
                .map(|r| r.value)
                .unwrap_or_else(|| panic!("no row {stage} [{unit}]"))
        };
        assert!(value("vision prep", "ms/frame") > 0.0);
        assert!(value("vision encoder", "ms/block") > 0.0);
        let v = &config.thinker_config.vision_config;
        let (h, w) = crate::media::image::smart_resize(
            CAMERA_HEIGHT,
            CAMERA_WIDTH,
            v.patch_size * v.spatial_merge_size,
            3136,
            12845056,
        )?;
        let frames = (config.thinker_config.seconds_per_chunk as f64 * DEFAULT_FPS) as usize;
        let per_grid =
            (h / v.patch_size) * (w / v.patch_size) / (v.spatial_merge_size * v.spatial_merge_size);
        let expected = frames.div_ceil(v.temporal_patch_size) * per_grid;
        assert_eq!(value("vision tokens", "tokens/block"), expected as f64);
        let audio =
            config.thinker_config.position_id_per_seconds * config.thinker_config.seconds_per_chunk;
        assert_eq!(
            value("block tokens", "tokens/block"),
            (expected + audio) as f64
        );
        Ok(())
    }
}
