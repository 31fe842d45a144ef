//! The vision encoder beyond single-picture parity: several pictures in one call, the whole
//! path from raw frames, and inputs that do not fit the grids.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use omnicall::media::image::{ImagePreprocessor, Patches, RgbImage};
use omnicall::model::config::{Config, ProcessorConfig};
use omnicall::model::thinker::vision_encoder::VisionEncoder;

use common::Cases;

fn encoder_and_config() -> (VisionEncoder, Config) {
    let dir = common::model_dir();
    let cfg = Config::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap())
        .expect("config.json parses");
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .expect("model.safetensors");
    let encoder = VisionEncoder::new(
        &cfg.thinker_config.vision_config,
        vb.pp("thinker").pp("visual"),
    )
    .expect("vision encoder builds");
    (encoder, cfg)
}

fn grid(cases: &Cases, key: &str) -> [usize; 3] {
    let g = cases.i64_vec(key);
    [g[0] as usize, g[1] as usize, g[2] as usize]
}

#[test]
fn several_pictures_in_one_call_equal_separate_calls() {
    let cases = Cases::load();
    let (encoder, _) = encoder_and_config();
    let image = cases.f32("image.pixel_values");
    let video = cases.f32("video.pixel_values_videos");
    let (gi, gv) = (
        grid(&cases, "image.image_grid_thw"),
        grid(&cases, "video.video_grid_thw"),
    );
    let alone_image = encoder.forward(&image, &[gi]).unwrap();
    let alone_video = encoder.forward(&video, &[gv]).unwrap();
    let both = encoder
        .forward(&Tensor::cat(&[&video, &image], 0).unwrap(), &[gv, gi])
        .unwrap();
    let want = Tensor::cat(&[&alone_video, &alone_image], 0).unwrap();
    common::assert_close("video+image in one call", &both, &want, 1e-5);
    // and they match the reference embeddings
    common::assert_close(
        "image alone",
        &alone_image,
        &cases.f32("image.embeds"),
        1e-4,
    );
}

#[test]
fn raw_image_to_embeddings() {
    let cases = Cases::load();
    let (encoder, cfg) = encoder_and_config();
    let processor = ProcessorConfig::from_json(
        &std::fs::read_to_string(common::model_dir().join("processor_config.json")).unwrap(),
    )
    .unwrap();
    let proc = ImagePreprocessor::new(&processor.image_processor).unwrap();
    let raw = cases.get("inputs.image");
    let (h, w, _) = raw.dims3().unwrap();
    let image = RgbImage::new(w, h, raw.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap();
    let patches: Patches = proc.prepare_image(image.view()).unwrap();
    let (pixels, grids) = Patches::stack(&[&patches], &Device::Cpu).unwrap();
    let embeds = encoder.forward(&pixels, &grids).unwrap();
    let merge = cfg.thinker_config.vision_config.spatial_merge_size;
    assert_eq!(
        embeds.dims(),
        &[
            patches.n_tokens(merge),
            cfg.thinker_config.vision_config.out_hidden_size
        ]
    );
    common::assert_close(
        "raw image -> embeds",
        &embeds,
        &cases.f32("image.embeds"),
        1e-4,
    );
}

#[test]
fn inputs_that_do_not_fit_the_grids_are_errors() {
    let cases = Cases::load();
    let (encoder, _) = encoder_and_config();
    let image = cases.f32("image.pixel_values");
    let [t, h, w] = grid(&cases, "image.image_grid_thw");
    let rows = image.dim(0).unwrap();

    let msg = encoder
        .forward(&image, &[[t, h, w + 2]])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("do not match the grids"), "{msg}");
    let narrow = image.narrow(1, 0, 10).unwrap();
    let msg = encoder
        .forward(&narrow, &[[t, h, w]])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("do not match the grids"), "{msg}");
    // a grid side that is not a multiple of the merge size
    let odd = image.narrow(0, 0, rows - t * h).unwrap();
    let msg = encoder
        .forward(&odd, &[[t, h, w - 1]])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("multiples of the merge size"), "{msg}");
    assert!(encoder.forward(&image, &[]).is_err());
}
