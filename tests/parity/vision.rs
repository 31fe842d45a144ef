//! The visual half of the Thinker's input against the reference fixtures: image and video
//! preparation (`image_preprocess`, `video_preprocess`) and the window-attention vision encoder
//! (`image_vision_encoder`, `video_vision_encoder`).

use candle_core::{Device, Tensor};
use omnicall::media::image::{ImagePreprocessor, RgbImage, RgbView};
use omnicall::media::video::VideoPreprocessor;
use omnicall::model::config::ProcessorConfig;
use omnicall::model::thinker::vision_encoder::VisionEncoder;

use crate::common::{self, Cases};

/// Tolerances of the fixture README.
const PIXEL_ATOL: f32 = 1e-5;
const ENCODER_ATOL: f32 = 1e-4;
/// torchvision's uint8 resize is reproduced exactly; the README allows one grey level.
const RESIZE_MAX_LEVELS: u8 = 1;

fn processor_config() -> ProcessorConfig {
    let path = common::model_dir().join("processor_config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    ProcessorConfig::from_json(&text).expect("processor_config.json parses")
}

/// A (H, W, 3) uint8 fixture as a packed RGB image.
fn hwc_image(t: &Tensor) -> RgbImage {
    let (h, w, c) = t.dims3().unwrap();
    assert_eq!(c, 3, "fixture image is not RGB");
    let data = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    RgbImage::new(w, h, data).unwrap()
}

/// A (3, H, W) uint8 fixture as a packed RGB image.
fn chw_image(t: &Tensor) -> RgbImage {
    hwc_image(&t.permute((1, 2, 0)).unwrap().contiguous().unwrap())
}

/// Largest grey-level difference of two images of the same size.
fn max_level_diff(what: &str, got: &RgbImage, want: &RgbImage) -> u8 {
    assert_eq!(
        (got.width(), got.height()),
        (want.width(), want.height()),
        "{what}: resized size differs from the reference"
    );
    let diff = got
        .data()
        .iter()
        .zip(want.data())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    let count = got
        .data()
        .iter()
        .zip(want.data())
        .filter(|(a, b)| a != b)
        .count();
    eprintln!("{what}: max grey-level diff {diff} ({count} values differ)");
    diff
}

fn grid_of(cases: &Cases, key: &str) -> Vec<[usize; 3]> {
    cases
        .i64_vec(key)
        .chunks(3)
        .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
        .collect()
}

/// fps and per-frame pixel bounds the fixture's video processor call used (gen_reference.py
/// overrides the processor defaults to keep the fixture small).
fn video_call_settings() -> (f64, usize, usize) {
    let json = Cases::json();
    let call = &json["settings"]["video_processor_call"];
    let get = |k: &str| {
        call[k]
            .as_f64()
            .unwrap_or_else(|| panic!("settings.video_processor_call.{k} missing in cases.json"))
    };
    (
        get("fps"),
        get("min_pixels") as usize,
        get("max_pixels") as usize,
    )
}

fn video_processor() -> VideoPreprocessor {
    let (fps, min_pixels, max_pixels) = video_call_settings();
    VideoPreprocessor::new(&processor_config().video_processor, fps)
        .expect("video processor settings")
        .with_pixel_bounds(min_pixels, max_pixels)
}

#[test]
fn image_preprocess() {
    let cases = Cases::load();
    let proc = ImagePreprocessor::new(&processor_config().image_processor).unwrap();
    let input = hwc_image(&cases.get("inputs.image"));
    let resized_ref = cases.get("image.resized");
    let (n, _, _, _) = resized_ref.dims4().unwrap();
    assert_eq!(n, 1, "one image in the fixture");
    let want_resized = chw_image(&resized_ref.get(0).unwrap());

    let resized = proc.resize(input.view()).unwrap();
    let levels = max_level_diff("image.resized", &resized, &want_resized);
    assert!(
        levels <= RESIZE_MAX_LEVELS,
        "image.resized: {levels} grey levels off"
    );

    // Normalisation + patchify from the reference's own resized image.
    let patches = proc.patchify(&[want_resized.view()]).unwrap();
    assert_eq!(
        vec![patches.grid_thw],
        grid_of(&cases, "image.image_grid_thw"),
        "image.image_grid_thw"
    );
    common::assert_close(
        "image.pixel_values",
        &patches.to_tensor(&Device::Cpu).unwrap(),
        &cases.f32("image.pixel_values"),
        PIXEL_ATOL,
    );
    // The whole path from the raw image gives the same grid.
    let full = proc.prepare_image(input.view()).unwrap();
    assert_eq!(full.grid_thw, patches.grid_thw);
}

#[test]
fn video_preprocess() {
    let cases = Cases::load();
    let proc = video_processor();
    let video = cases.get("inputs.video");
    let frames: Vec<RgbImage> = (0..video.dim(0).unwrap())
        .map(|t| hwc_image(&video.get(t).unwrap()))
        .collect();
    let views: Vec<RgbView<'_>> = frames.iter().map(RgbImage::view).collect();

    let resized_ref = cases.get("video.resized").get(0).unwrap();
    let want: Vec<RgbImage> = (0..resized_ref.dim(0).unwrap())
        .map(|t| chw_image(&resized_ref.get(t).unwrap()))
        .collect();
    let resized = proc.resize(&views).unwrap();
    assert_eq!(resized.len(), want.len(), "video.resized frame count");
    for (t, (got, want)) in resized.iter().zip(&want).enumerate() {
        let levels = max_level_diff(&format!("video.resized[{t}]"), got, want);
        assert!(
            levels <= RESIZE_MAX_LEVELS,
            "video.resized[{t}]: {levels} grey levels off"
        );
    }

    let want_views: Vec<RgbView<'_>> = want.iter().map(RgbImage::view).collect();
    let prepared = proc.patchify(&want_views).unwrap();
    assert_eq!(
        vec![prepared.patches.grid_thw],
        grid_of(&cases, "video.video_grid_thw"),
        "video.video_grid_thw"
    );
    common::assert_close(
        "video.pixel_values_videos",
        &prepared.patches.to_tensor(&Device::Cpu).unwrap(),
        &cases.f32("video.pixel_values_videos"),
        PIXEL_ATOL,
    );
    let spg = cases
        .f32("video.second_per_grid")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(spg.len(), 1, "one video in the fixture");
    assert!(
        (prepared.second_per_grid as f32 - spg[0]).abs() <= 1e-6,
        "video.second_per_grid: {} vs reference {}",
        prepared.second_per_grid,
        spg[0]
    );
    // The whole path from the raw frames agrees with the patchified reference frames.
    let full = proc.prepare(&views).unwrap();
    assert_eq!(full.patches.grid_thw, prepared.patches.grid_thw);
}

fn load_encoder() -> VisionEncoder {
    let cfg = common::model_config();
    let vb = common::model_weights();
    VisionEncoder::new(
        &cfg.thinker_config.vision_config,
        vb.pp("thinker").pp("visual"),
    )
    .expect("vision encoder builds")
}

fn usize_vec(cases: &Cases, key: &str) -> Vec<usize> {
    cases.i64_vec(key).into_iter().map(|v| v as usize).collect()
}

/// One case (`image` or `video`): the encoder on the reference's own pixel values.
fn check_vision_encoder(prefix: &str, pixels_key: &str, grid_key: &str) {
    let cases = Cases::load();
    let encoder = load_encoder();
    let grids = grid_of(&cases, grid_key);
    let trace = encoder
        .forward_traced(&cases.f32(pixels_key), &grids)
        .unwrap();
    assert_eq!(
        trace.layout.window_index,
        usize_vec(&cases, &format!("{prefix}.window_index")),
        "{prefix}.window_index"
    );
    assert_eq!(
        trace.layout.cu_window_seqlens,
        usize_vec(&cases, &format!("{prefix}.cu_window_seqlens")),
        "{prefix}.cu_window_seqlens"
    );
    assert_eq!(
        trace.layout.cu_seqlens,
        usize_vec(&cases, &format!("{prefix}.cu_seqlens")),
        "{prefix}.cu_seqlens"
    );
    for (name, got) in [
        ("patch_embed", &trace.patch_embed),
        ("blocks_output", &trace.blocks_output),
        ("embeds", &trace.embeds),
    ] {
        let key = format!("{prefix}.{name}");
        common::assert_close(&key, got, &cases.f32(&key), ENCODER_ATOL);
    }
}

#[test]
fn image_vision_encoder() {
    check_vision_encoder("image", "image.pixel_values", "image.image_grid_thw");
}

#[test]
fn video_vision_encoder() {
    check_vision_encoder("video", "video.pixel_values_videos", "video.video_grid_thw");
}
