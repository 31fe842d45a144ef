//! Image and video preparation beyond the fixtures: the resize against torchvision on images of
//! tests/media (made by tests/media/make_resize_refs.py), pictures far outside the pixel bounds,
//! absurd shapes, broken files, and frame folders.

use std::path::{Path, PathBuf};

use omnicall::media::image::{ImageError, ImagePreprocessor, RgbImage, resize_bicubic};
use omnicall::media::video::{FrameFolder, VideoError, VideoPreprocessor};
use omnicall::model::config::ImageProcessorConfig;

fn media(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/media")
        .join(name)
}

/// A fresh scratch folder for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("omnicall-vision-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gradient(width: usize, height: usize) -> RgbImage {
    let data = (0..height)
        .flat_map(|y| {
            (0..width).flat_map(move |x| [(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        })
        .collect();
    RgbImage::new(width, height, data).unwrap()
}

fn save_png(image: &RgbImage, path: &Path) {
    ::image::RgbImage::from_raw(
        image.width() as u32,
        image.height() as u32,
        image.data().to_vec(),
    )
    .unwrap()
    .save(path)
    .unwrap();
}

fn default_processor() -> ImagePreprocessor {
    ImagePreprocessor::new(&ImageProcessorConfig::default()).unwrap()
}

#[test]
fn resize_matches_torchvision_exactly() {
    let cases = [
        ("src_a", [(23, 90), (61, 31), (37, 52)].as_slice()),
        ("src_b", [(28, 28), (13, 200), (131, 100)].as_slice()),
        ("src_c", [(47, 65), (56, 84)].as_slice()),
    ];
    for (name, targets) in cases {
        let src = RgbImage::open(media(&format!("{name}.png"))).unwrap();
        for &(h, w) in targets {
            let want = RgbImage::open(media(&format!("{name}_to_{h}x{w}.png"))).unwrap();
            let got = resize_bicubic(src.view(), h, w);
            assert_eq!((got.width(), got.height()), (w, h));
            let differing = got
                .data()
                .iter()
                .zip(want.data())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differing, 0, "{name} -> {h}x{w}: {differing} values differ");
        }
    }
}

#[test]
fn image_far_above_max_pixels_is_resized_not_rejected() {
    let proc = default_processor().with_pixel_bounds(3136, 200_000);
    let big = gradient(2400, 1800);
    let patches = proc.prepare_image(big.view()).unwrap();
    let [t, h, w] = patches.grid_thw;
    assert_eq!(t, 1);
    let (ph, pw) = (h * proc.patch_size, w * proc.patch_size);
    assert!(ph * pw <= 200_000, "{pw}x{ph} exceeds max_pixels");
    assert_eq!((ph % proc.factor(), pw % proc.factor()), (0, 0));
    // aspect kept: 4:3
    assert!(((pw as f64 / ph as f64) - 4.0 / 3.0).abs() < 0.1);
    // the published bounds on a 48-megapixel photo: a size under 12845056 pixels, no error
    let (h, w) = default_processor().target_size(6000, 8000).unwrap();
    assert!(h * w <= 12_845_056 && h % 28 == 0 && w % 28 == 0);
}

#[test]
fn tiny_image_is_scaled_up_like_the_reference() {
    let proc = default_processor();
    // (width, height) -> grid the reference's smart_resize gives (56x56, 84x56, 56x56 px)
    for ((w, h), grid) in [
        ((1, 1), [1, 4, 4]),
        ((7, 5), [1, 4, 6]),
        ((27, 27), [1, 4, 4]),
    ] {
        let patches = proc.prepare_image(gradient(w, h).view()).unwrap();
        assert_eq!(patches.grid_thw, grid, "{w}x{h}");
        assert!(patches.n_patches() * proc.patch_size * proc.patch_size >= proc.min_pixels);
    }
}

#[test]
fn absurd_aspect_ratio_is_a_clear_error() {
    let err = default_processor()
        .prepare_image(gradient(402, 2).view())
        .unwrap_err();
    assert!(matches!(err, ImageError::AspectRatio { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("402x2") && msg.contains("aspect ratio") && msg.contains("201"),
        "{msg}"
    );
    // 200:1 itself is accepted, as in the reference
    assert!(
        default_processor()
            .prepare_image(gradient(400, 2).view())
            .is_ok()
    );
}

#[test]
fn broken_image_files_are_rejected_naming_the_file() {
    let dir = scratch("broken");
    let garbage = dir.join("garbage.png");
    std::fs::write(&garbage, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    let msg = RgbImage::open(&garbage).unwrap_err().to_string();
    assert!(msg.contains("garbage.png"), "{msg}");

    let good = std::fs::read(media("src_a.png")).unwrap();
    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let msg = RgbImage::open(&truncated).unwrap_err().to_string();
    assert!(msg.contains("truncated.png"), "{msg}");

    let missing = dir.join("missing.jpg");
    let msg = RgbImage::open(&missing).unwrap_err().to_string();
    assert!(msg.contains("missing.jpg"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn jpeg_decodes_and_transparency_goes_over_white() {
    // What PIL (the official loader) decodes from the same file; JPEG decoders may round the
    // IDCT and chroma upsampling a little differently.
    let jpeg = RgbImage::open(media("src_c.jpg")).unwrap();
    let pil = RgbImage::open(media("src_c_jpg_pil.png")).unwrap();
    assert_eq!((jpeg.width(), jpeg.height()), (64, 48));
    assert_eq!((pil.width(), pil.height()), (64, 48));
    let diffs: Vec<u8> = jpeg
        .data()
        .iter()
        .zip(pil.data())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    assert!(
        max <= 4 && mean < 1.0,
        "JPEG decode vs PIL: max {max}, mean {mean}"
    );

    let dir = scratch("alpha");
    let path = dir.join("alpha.png");
    let rgba = ::image::RgbaImage::from_raw(2, 1, vec![10, 20, 30, 0, 10, 20, 30, 255]).unwrap();
    rgba.save(&path).unwrap();
    let img = RgbImage::open(&path).unwrap();
    assert_eq!(img.data(), &[255, 255, 255, 10, 20, 30]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn frame_folder_reads_frames_in_name_order() {
    let dir = scratch("folder");
    // five 2-fps frames written out of order, plus a file that is not a frame
    for i in [3usize, 0, 4, 1, 2] {
        let frame = RgbImage::new(60, 40, vec![(i * 50) as u8; 60 * 40 * 3]).unwrap();
        save_png(&frame, &dir.join(format!("frame{i:03}.png")));
    }
    std::fs::write(dir.join("notes.txt"), "not a frame").unwrap();
    let folder = FrameFolder::open(&dir, 2.0).unwrap();
    assert_eq!(folder.frames.len(), 5);
    let firsts: Vec<u8> = folder.frames.iter().map(|f| f.data()[0]).collect();
    assert_eq!(firsts, vec![0, 50, 100, 150, 200]);

    let proc = VideoPreprocessor::new(&ImageProcessorConfig::default(), 2.0).unwrap();
    let video = folder.prepare(&proc).unwrap();
    // smart_nframes: 5 frames at 2 fps -> 4 frames -> 2 temporal grids
    assert_eq!(video.frames, 4);
    assert_eq!(video.patches.grid_thw[0], 2);
    assert!(
        (video.second_per_grid - 1.25).abs() < 1e-9,
        "{}",
        video.second_per_grid
    );

    // a frame that does not decode is named
    std::fs::write(dir.join("frame005.png"), b"broken").unwrap();
    let msg = FrameFolder::open(&dir, 2.0).unwrap_err().to_string();
    assert!(msg.contains("frame005.png"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();

    let empty = scratch("empty");
    assert!(matches!(
        FrameFolder::open(&empty, 2.0),
        Err(VideoError::EmptyFolder(_))
    ));
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn live_frames_are_sampled_at_the_model_fps() {
    use std::time::Duration;
    let proc = VideoPreprocessor::new(&ImageProcessorConfig::default(), 2.0).unwrap();
    // a 2-s block of a 15-fps camera at 64x48
    let frames: Vec<RgbImage> = (0..30)
        .map(|i| RgbImage::new(64, 48, vec![i as u8 * 8; 64 * 48 * 3]).unwrap())
        .collect();
    let timed: Vec<(Duration, _)> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| (Duration::from_secs_f64(i as f64 / 15.0), f.view()))
        .collect();
    let video = proc.prepare_timed(&timed).unwrap();
    assert_eq!(video.frames, 4);
    assert_eq!(video.patches.grid_thw[0], 2);
    assert!((video.second_per_grid - 1.0).abs() < 1e-12);
    // frames of another size in the same video are scaled to the first one's size
    let odd = RgbImage::new(32, 24, vec![9; 32 * 24 * 3]).unwrap();
    let mixed = proc.prepare(&[frames[0].view(), odd.view()]).unwrap();
    let [_, h, w] = video.patches.grid_thw;
    assert_eq!(mixed.patches.grid_thw, [1, h, w]);
    assert!(matches!(proc.prepare(&[]), Err(VideoError::NoFrames)));
}
