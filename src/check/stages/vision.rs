//! The visual half of the Thinker's input: image and video preparation (`image_preprocess`,
//! `video_preprocess`) and the window-attention vision encoder.

use anyhow::Context;
use candle_core::{Device, Tensor};

use crate::check::{Checker, Quantity};
use crate::media::image::{ImagePreprocessor, RgbImage, RgbView};
use crate::media::video::VideoPreprocessor;
use crate::model::thinker::vision_encoder::VisionEncoder;

/// torchvision's uint8 resize is reproduced exactly; the fixture README allows one grey level.
const RESIZE_MAX_LEVELS: u8 = 1;
/// Seconds per temporal grid of the video processor.
const SECOND_PER_GRID_ATOL: f32 = 1e-6;

/// A (H, W, 3) uint8 fixture as a packed RGB image.
pub(super) fn hwc_image(t: &Tensor) -> anyhow::Result<RgbImage> {
    let (h, w, c) = t.dims3()?;
    anyhow::ensure!(c == 3, "fixture image is not RGB ({c} channels)");
    let data = t.flatten_all()?.to_vec1::<u8>()?;
    Ok(RgbImage::new(w, h, data)?)
}

/// A (3, H, W) uint8 fixture as a packed RGB image.
fn chw_image(t: &Tensor) -> anyhow::Result<RgbImage> {
    hwc_image(&t.permute((1, 2, 0))?.contiguous()?)
}

/// Records the largest grey-level difference of two images of the same size.
fn resized_within(check: &mut Checker, what: &str, got: &RgbImage, want: &RgbImage) {
    let size = |i: &RgbImage| (i.width(), i.height());
    if size(got) != size(want) {
        check.equal(&format!("{what} size"), size(got), size(want));
        return;
    }
    let levels = got
        .data()
        .iter()
        .zip(want.data())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    check.rows.push(crate::check::Row {
        stage: check.stage,
        what: format!("{what} (grey levels)"),
        max_abs_diff: Some(levels as f32),
        tolerance: Some(RESIZE_MAX_LEVELS as f32),
        pass: levels <= RESIZE_MAX_LEVELS,
        message: if levels <= RESIZE_MAX_LEVELS {
            String::new()
        } else {
            format!("{what}: {levels} grey levels off")
        },
    });
}

fn grid_of(check: &Checker, key: &str) -> anyhow::Result<Vec<[usize; 3]>> {
    Ok(check
        .fixtures
        .usize_vec(key)?
        .chunks(3)
        .map(|g| [g[0], g[1], g.get(2).copied().unwrap_or(0)])
        .collect())
}

/// The video processor with the fps and per-frame pixel bounds the fixture's call used
/// (gen_reference.py overrides the processor defaults to keep the fixture small).
fn video_processor(check: &Checker) -> anyhow::Result<VideoPreprocessor> {
    let fx = check.fixtures;
    let call = |k: &str| fx.json_f64(&format!("settings/video_processor_call/{k}"));
    Ok(
        VideoPreprocessor::new(&check.processor_config()?.video_processor, call("fps")?)?
            .with_pixel_bounds(call("min_pixels")? as usize, call("max_pixels")? as usize),
    )
}

pub fn image_preprocess(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let proc = ImagePreprocessor::new(&check.processor_config()?.image_processor)?;
    let input = hwc_image(&fx.get("inputs.image")?)?;
    let resized_ref = fx.get("image.resized")?;
    let (n, _, _, _) = resized_ref.dims4()?;
    anyhow::ensure!(
        n == 1,
        "image.resized holds {n} images, the check takes one"
    );
    let want_resized = chw_image(&resized_ref.get(0)?)?;

    let resized = proc.resize(input.view())?;
    resized_within(check, "image.resized", &resized, &want_resized);

    // Normalisation + patchify from the reference's own resized image.
    let patches = proc.patchify(&[want_resized.view()])?;
    check.equal(
        "image.image_grid_thw",
        vec![patches.grid_thw],
        grid_of(check, "image.image_grid_thw")?,
    );
    check.close(
        "image.pixel_values",
        &patches.to_tensor(&Device::Cpu)?,
        &fx.f32("image.pixel_values")?,
        Quantity::Pixels,
    );
    // The whole path from the raw image gives the same grid.
    let full = proc.prepare_image(input.view())?;
    check.equal(
        "image grid from the raw image",
        full.grid_thw,
        patches.grid_thw,
    );
    Ok(())
}

pub fn video_preprocess(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let proc = video_processor(check)?;
    let video = fx.get("inputs.video")?;
    let frames: Vec<RgbImage> = (0..video.dim(0)?)
        .map(|t| hwc_image(&video.get(t)?))
        .collect::<anyhow::Result<_>>()?;
    let views: Vec<RgbView<'_>> = frames.iter().map(RgbImage::view).collect();

    let resized_ref = fx.get("video.resized")?.get(0)?;
    let want: Vec<RgbImage> = (0..resized_ref.dim(0)?)
        .map(|t| chw_image(&resized_ref.get(t)?))
        .collect::<anyhow::Result<_>>()?;
    let resized = proc.resize(&views)?;
    check.equal("video.resized frame count", resized.len(), want.len());
    for (t, (got, want)) in resized.iter().zip(&want).enumerate() {
        resized_within(check, &format!("video.resized[{t}]"), got, want);
    }

    let want_views: Vec<RgbView<'_>> = want.iter().map(RgbImage::view).collect();
    let prepared = proc.patchify(&want_views)?;
    check.equal(
        "video.video_grid_thw",
        vec![prepared.patches.grid_thw],
        grid_of(check, "video.video_grid_thw")?,
    );
    check.close(
        "video.pixel_values_videos",
        &prepared.patches.to_tensor(&Device::Cpu)?,
        &fx.f32("video.pixel_values_videos")?,
        Quantity::Pixels,
    );
    let spg = fx.f32("video.second_per_grid")?.flatten_all()?;
    anyhow::ensure!(
        spg.dim(0)? == 1,
        "video.second_per_grid: one video expected"
    );
    check.close_within(
        "video.second_per_grid",
        &Tensor::new(&[prepared.second_per_grid as f32], &Device::Cpu)?,
        &spg,
        SECOND_PER_GRID_ATOL,
    );
    // The whole path from the raw frames agrees with the patchified reference frames.
    let full = proc.prepare(&views)?;
    check.equal(
        "video grid from the raw frames",
        full.patches.grid_thw,
        prepared.patches.grid_thw,
    );
    Ok(())
}

/// One case (`image` or `video`): the encoder on the reference's own pixel values.
pub fn vision_encoder(
    check: &mut Checker,
    prefix: &str,
    pixels_key: &str,
    grid_key: &str,
) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let cfg = check.config()?;
    let vb = check.weights()?;
    let encoder = VisionEncoder::new(
        &cfg.thinker_config.vision_config,
        vb.pp("thinker").pp("visual"),
    )
    .context("vision encoder builds")?;
    let grids = grid_of(check, grid_key)?;
    let trace = encoder.forward_traced(&check.input(pixels_key)?, &grids)?;
    for (name, got) in [
        ("window_index", &trace.layout.window_index),
        ("cu_window_seqlens", &trace.layout.cu_window_seqlens),
        ("cu_seqlens", &trace.layout.cu_seqlens),
    ] {
        let key = format!("{prefix}.{name}");
        check.equal(&key, got.clone(), fx.usize_vec(&key)?);
    }
    for (name, got) in [
        ("patch_embed", &trace.patch_embed),
        ("blocks_output", &trace.blocks_output),
        ("embeds", &trace.embeds),
    ] {
        let key = format!("{prefix}.{name}");
        check.close(&key, got, &fx.f32(&key)?, Quantity::Encoder);
    }
    Ok(())
}
