//! `omnicall bench plot`: the latency distribution of a `bench call` CSV, one row per stage
//! (a box of the quartiles with the median, whiskers from min to max, a dot per turn), as a
//! PNG. Drawn with plotters' bitmap backend and a bundled font (a subset of DejaVu Sans,
//! assets/fonts), so it needs no system font library; the PNG is written with `image`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// DejaVu Sans cut down to ASCII (see assets/fonts/README.md for its licence).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";
/// The CSV column that is not a latency.
const UNCERTAINTY_COLUMN: &str = "clock_uncertainty_ms";

/// A `bench call` CSV as a PNG: the latency distribution of every stage.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// A CSV written by `omnicall bench call`.
    #[arg(long)]
    pub csv: PathBuf,
    /// The PNG to write.
    #[arg(long)]
    pub png: PathBuf,
    /// Title of the plot (default: the CSV's file name).
    #[arg(long)]
    pub title: Option<String>,
    /// Width in pixels.
    #[arg(long, default_value_t = 1000)]
    pub width: u32,
}

/// `omnicall bench plot`: reads the CSV, writes the PNG.
pub fn main(args: PlotArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.csv)
        .with_context(|| format!("reading {}", args.csv.display()))?;
    let columns =
        latency_columns(&text).with_context(|| format!("reading {}", args.csv.display()))?;
    let title = args.title.clone().unwrap_or_else(|| {
        args.csv
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let picture = plot_latency(&columns, &title, args.width)?;
    write_png(&picture, &args.png)?;
    eprintln!("wrote {}", args.png.display());
    Ok(())
}

/// Splits one CSV line (fields may be quoted, with `""` for a quote).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// Every latency column of the CSV (`*_ms`, in the file's order, without the `_ms`) with the
/// values present.
pub fn latency_columns(csv: &str) -> anyhow::Result<Vec<(String, Vec<f64>)>> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header = csv_fields(lines.next().context("the CSV is empty")?);
    let picked: Vec<(usize, String)> = header
        .iter()
        .enumerate()
        .filter(|(_, name)| name.ends_with("_ms") && name.as_str() != UNCERTAINTY_COLUMN)
        .map(|(i, name)| (i, name.trim_end_matches("_ms").to_string()))
        .collect();
    if picked.is_empty() {
        bail!("the CSV has no latency column (*_ms): header {header:?}");
    }
    let mut columns: Vec<(String, Vec<f64>)> =
        picked.iter().map(|(_, n)| (n.clone(), vec![])).collect();
    for (row, line) in lines.enumerate() {
        let fields = csv_fields(line);
        if fields.len() != header.len() {
            bail!(
                "row {} has {} fields, the header {}",
                row + 1,
                fields.len(),
                header.len()
            );
        }
        for ((i, name), (_, values)) in picked.iter().zip(columns.iter_mut()) {
            let cell = fields[*i].trim();
            if cell.is_empty() {
                continue;
            }
            let v: f64 = cell
                .parse()
                .with_context(|| format!("row {}: {name} is {cell:?}, not a number", row + 1))?;
            values.push(v);
        }
    }
    Ok(columns)
}

/// The `q`-quantile (0..1) of sorted values, linearly interpolated.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    anyhow::ensure!(ok, "the bundled font cannot be read");
    Ok(())
}

/// Draws the columns that have values (the others are named in a footnote); `width` pixels
/// wide, as tall as the rows need.
pub fn plot_latency(
    columns: &[(String, Vec<f64>)],
    title: &str,
    width: u32,
) -> anyhow::Result<image::RgbImage> {
    anyhow::ensure!(
        (300..=8000).contains(&width),
        "a plot width of {width} pixels (300 to 8000 are drawn)"
    );
    let (measured, empty): (Vec<_>, Vec<_>) = columns.iter().partition(|(_, v)| !v.is_empty());
    anyhow::ensure!(!measured.is_empty(), "no value to plot in any column");
    let measured: Vec<(String, Vec<f64>)> = measured.into_iter().cloned().collect();
    let footnote = (!empty.is_empty()).then(|| {
        let names: Vec<&str> = empty.iter().map(|(n, _)| n.as_str()).collect();
        format!("not measured: {}", names.join(", "))
    });
    register_font()?;
    let height = 120 + 48 * measured.len() as u32;
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    {
        let backend = BitMapBackend::with_buffer_and_format(&mut buf, (width, height))
            .map_err(|e| anyhow::anyhow!("plot buffer: {e:?}"))?;
        let root = backend.into_drawing_area();
        draw(&root, &measured, title, footnote.as_deref())
            .map_err(|e| anyhow::anyhow!("drawing the plot: {e}"))?;
        root.present()
            .map_err(|e| anyhow::anyhow!("drawing the plot: {e}"))?;
    }
    image::RgbImage::from_raw(width, height, buf).context("plot buffer of the wrong size")
}

fn draw(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    columns: &[(String, Vec<f64>)],
    title: &str,
    footnote: Option<&str>,
) -> Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let n = columns.len();
    let largest = columns
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max);
    // room on the right for the figures of each row
    let x_max = (largest * 1.5).max(10.0);
    let label_width = 190;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(label_width)
        .build_cartesian_2d(0f64..x_max, -0.6f64..(n as f64 - 0.4))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(10)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("ms from the end of speech (barge-in: from its onset)")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 15))
        .draw()?;
    let row_style = ShapeStyle::from(&BLUE.mix(0.25)).filled();
    let dots = ShapeStyle::from(&RGBColor(20, 40, 120)).filled();
    for (i, (name, values)) in columns.iter().enumerate() {
        // the first stage on top
        let y = (n - 1 - i) as f64;
        let label_at = chart.backend_coord(&(0.0, y));
        let label =
            TextStyle::from((FAMILY, 15).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
        root.draw(&Text::new(
            name.clone(),
            (label_at.0 - 8, label_at.1),
            label,
        ))?;
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
        let (q1, median, q3) = (
            quantile(&sorted, 0.25),
            quantile(&sorted, 0.5),
            quantile(&sorted, 0.75),
        );
        let p90 = quantile(&sorted, 0.9);
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(min, y), (max, y)],
            BLACK.stroke_width(1),
        )))?;
        for end in [min, max] {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(end, y - 0.15), (end, y + 0.15)],
                BLACK.stroke_width(1),
            )))?;
        }
        chart.draw_series(std::iter::once(Rectangle::new(
            [(q1, y - 0.28), (q3, y + 0.28)],
            row_style,
        )))?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(q1, y - 0.28), (q3, y + 0.28)],
            BLUE.stroke_width(1),
        )))?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(median, y - 0.28), (median, y + 0.28)],
            RED.stroke_width(3),
        )))?;
        // each turn, spread a little up and down so that equal values stay visible
        chart.draw_series(values.iter().enumerate().map(|(j, v)| {
            let spread = ((j as f64 * 0.618_034).fract() - 0.5) * 0.36;
            Circle::new((*v, y + spread), 3, dots)
        }))?;
        let at = chart.backend_coord(&(max, y));
        root.draw(&Text::new(
            format!("median {median:.0}, p90 {p90:.0} ms (n={})", values.len()),
            (at.0 + 10, at.1),
            TextStyle::from((FAMILY, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    if let Some(note) = footnote {
        let (_, height) = root.dim_in_pixel();
        root.draw(&Text::new(
            note.to_string(),
            (14, height as i32 - 8),
            TextStyle::from((FAMILY, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Bottom)),
        ))?;
    }
    Ok(())
}

fn write_png(picture: &image::RgbImage, path: &Path) -> anyhow::Result<()> {
    picture
        .save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "turn,server_turn,prompt,speech_end_ms,first_audio_frame_ms,voice_to_voice_ms,barge_in_ms,clock_uncertainty_ms\n\
        1,2,\"a, \"\"b\"\".wav\",30.0,500.0,510.5,,0.40\n\
        2,3,b.wav,31.0,520.0,530.0,,0.40\n";

    #[test]
    fn latency_columns_are_read_from_the_csv() {
        let columns = latency_columns(CSV).unwrap();
        let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "speech_end",
                "first_audio_frame",
                "voice_to_voice",
                "barge_in"
            ]
        );
        assert_eq!(columns[2].1, vec![510.5, 530.0]);
        assert!(columns[3].1.is_empty());
        assert_eq!(
            csv_fields("1,\"a, \"\"b\"\"\",x"),
            vec!["1", "a, \"b\"", "x"]
        );
    }

    #[test]
    fn bad_csvs_are_named() {
        assert!(latency_columns("").is_err());
        let err = latency_columns("turn,prompt\n1,a\n").unwrap_err();
        assert!(err.to_string().contains("no latency column"), "{err}");
        let err = latency_columns("turn,x_ms\n1,fast\n").unwrap_err();
        assert!(format!("{err:#}").contains("not a number"), "{err:#}");
        let err = latency_columns("turn,x_ms\n1,2,3\n").unwrap_err();
        assert!(err.to_string().contains("3 fields"), "{err}");
    }

    #[test]
    fn quartiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.25), 2.0);
        assert_eq!(quantile(&[1.0, 2.0], 0.5), 1.5);
        assert_eq!(quantile(&[7.0], 0.9), 7.0);
    }

    #[test]
    fn the_plot_is_a_picture_with_marks_and_text() {
        let columns = latency_columns(CSV).unwrap();
        let picture = plot_latency(&columns, "latency", 800).unwrap();
        assert_eq!(picture.width(), 800);
        // barge_in has no value: named below, not drawn
        assert_eq!(picture.height(), 120 + 48 * 3);
        let count =
            |pred: &dyn Fn(&image::Rgb<u8>) -> bool| picture.pixels().filter(|p| pred(p)).count();
        // the median lines (red), the boxes (blue tint), text and axes (dark)
        assert!(count(&|p| p[0] > 200 && p[1] < 60 && p[2] < 60) > 50);
        assert!(count(&|p| p[2] > 200 && p[0] < 230 && p[0] > 150) > 200);
        assert!(count(&|p| p[0] < 80 && p[1] < 80 && p[2] < 80) > 2_000);
        let dir = std::env::temp_dir().join(format!("omnicall-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("latency.png");
        write_png(&picture, &png).unwrap();
        let back = image::open(&png).unwrap();
        assert_eq!((back.width(), back.height()), (800, picture.height()));
        std::fs::remove_dir_all(dir).unwrap();
        assert!(plot_latency(&columns, "x", 10).is_err());
        let err = plot_latency(&[("x".into(), vec![])], "x", 800).unwrap_err();
        assert!(err.to_string().contains("no value"), "{err}");
    }
}
