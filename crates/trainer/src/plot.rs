//! Training-curve plots: `training_curves.png` next to the model.
//!
//! Rendering is pure Rust (`plotters` with its bitmap backend) and text is drawn with
//! `ab_glyph` from a font compiled into the binary (Noto Sans Regular, Apache-2.0, from the
//! `ttf-noto-sans` crate), so a plot renders the same on a bare machine with no system fonts,
//! fontconfig or freetype.
//!
//! Non-finite values (a diverged loss, a metric that could not be computed) are left out of
//! the plot: the line breaks around them instead of the whole plot failing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// One point per epoch.
#[derive(Debug, Clone)]
pub struct CurvePoint {
    /// Epoch number (as the trainer counts them; usually from 1).
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Validation recall@10 after the epoch.
    pub valid_recall_at_10: f64,
    /// Validation NDCG@10 after the epoch.
    pub valid_ndcg_at_10: f64,
}

/// Why a plot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No points were given.
    #[error("no training-curve points to plot into {}", path.display())]
    NoData { path: PathBuf },
    /// The embedded font could not be parsed (a build problem, not a data problem).
    #[error("embedded plot font could not be loaded while plotting {}", path.display())]
    Font { path: PathBuf },
    /// Plotters failed while drawing or encoding the image.
    #[error("drawing training curves into {}: {message}", path.display())]
    Draw { path: PathBuf, message: String },
    /// Creating the directory, or moving the finished file into place, failed.
    #[error("writing training curves to {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Font family name that every text style in this module uses.
const FONT: &str = "sans-serif";

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 560;

const LOSS_COLOR: RGBColor = RGBColor(31, 119, 180);
const RECALL_COLOR: RGBColor = RGBColor(255, 127, 14);
const NDCG_COLOR: RGBColor = RGBColor(44, 160, 44);

/// Registers the embedded font with plotters, once per process. `false` if it is unusable.
fn ensure_font() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR).is_ok()
    })
}

/// Draws `training_curves.png`: left panel training loss per epoch, right panel validation
/// recall@10 and NDCG@10 per epoch, with axis labels, a caption and a legend.
///
/// The image is written to a temporary file in the same directory and then renamed onto
/// `path`, so a reader never sees a half-written PNG. The parent directory is created if
/// missing. Non-finite values are skipped. An empty `points` is an error
/// ([`PlotError::NoData`]); a single point is drawn as a marker.
pub fn training_curves(points: &[CurvePoint], path: &Path) -> Result<(), PlotError> {
    if points.is_empty() {
        return Err(PlotError::NoData {
            path: path.to_path_buf(),
        });
    }
    if !ensure_font() {
        return Err(PlotError::Font {
            path: path.to_path_buf(),
        });
    }
    let io_err = |source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    };

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io_err)?;

    // The bitmap backend picks the encoder from the extension, so the temporary name ends
    // in `.png` too.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "training_curves.png".to_owned());
    let tmp = dir.join(format!(
        ".{stem}.{}.{}.tmp.png",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let mut points: Vec<CurvePoint> = points.to_vec();
    points.sort_by_key(|p| p.epoch);

    let drawn = draw(&points, &tmp).map_err(|message| PlotError::Draw {
        path: path.to_path_buf(),
        message,
    });
    let result = drawn.and_then(|()| std::fs::rename(&tmp, path).map_err(io_err));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renders the figure into `file` (format from its extension). Errors are plotters' messages.
fn draw(points: &[CurvePoint], file: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(file, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(
            &format!(
                "Training curves ({} epoch{})",
                points.len(),
                if points.len() == 1 { "" } else { "s" }
            ),
            (FONT, 30),
        )
        .map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(WIDTH / 2);

    let epochs: Vec<usize> = points.iter().map(|p| p.epoch).collect();
    let x_range = epoch_range(&epochs);

    let loss: Vec<(usize, f64)> = points.iter().map(|p| (p.epoch, p.train_loss)).collect();
    draw_panel(
        &left,
        "Training loss",
        "loss",
        x_range.clone(),
        value_range(loss.iter().map(|&(_, v)| v), false),
        &[("train loss", LOSS_COLOR, &loss)],
        // Loss usually falls, leaving the upper right empty.
        SeriesLabelPosition::UpperRight,
    )?;

    let recall: Vec<(usize, f64)> = points
        .iter()
        .map(|p| (p.epoch, p.valid_recall_at_10))
        .collect();
    let ndcg: Vec<(usize, f64)> = points
        .iter()
        .map(|p| (p.epoch, p.valid_ndcg_at_10))
        .collect();
    draw_panel(
        &right,
        "Validation (full ranking)",
        "metric value",
        x_range,
        value_range(recall.iter().chain(ndcg.iter()).map(|&(_, v)| v), true),
        &[
            ("recall@10", RECALL_COLOR, &recall),
            ("NDCG@10", NDCG_COLOR, &ndcg),
        ],
        // Metrics usually rise from a 0-anchored axis, leaving the lower right empty.
        SeriesLabelPosition::LowerRight,
    )?;

    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

type Series<'a> = (&'a str, RGBColor, &'a [(usize, f64)]);

/// One chart: caption, axes with labels, one line + markers per series, and a legend.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    x_range: std::ops::Range<f64>,
    y_range: std::ops::Range<f64>,
    series: &[Series<'_>],
    legend_at: SeriesLabelPosition,
) -> Result<(), String> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_range.clone(), y_range.clone())
        .map_err(|e| e.to_string())?;

    // Integer epochs only: at most ~10 ticks, and a fractional tick gets no label.
    let span = (x_range.end - x_range.start).round().max(1.0) as usize;
    let y_decimals = tick_decimals(y_range.end - y_range.start);
    let y_formatter = move |y: &f64| format_tick(*y, y_decimals);
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_labels((span + 1).clamp(3, 10))
        .y_labels(8)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{}", x.round() as i64)
            } else {
                String::new()
            }
        })
        .y_label_formatter(&y_formatter)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| e.to_string())?;

    let mut any_finite = false;
    for &(label, color, values) in series {
        let style = ShapeStyle::from(&color).stroke_width(2);
        // An empty series that carries only the legend entry, so the legend is right even
        // when every value is NaN.
        chart
            .draw_series(LineSeries::new(std::iter::empty::<(f64, f64)>(), style))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        for segment in finite_segments(values) {
            any_finite = true;
            chart
                .draw_series(LineSeries::new(segment.iter().copied(), style))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(segment.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    if !any_finite {
        let (w, h) = area.dim_in_pixel();
        area.draw_text(
            "no finite values",
            &(FONT, 20).into_text_style(area).color(&RED),
            (w as i32 / 2 - 70, h as i32 / 2),
        )
        .map_err(|e| e.to_string())?;
    }

    chart
        .configure_series_labels()
        .position(legend_at)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Runs of consecutive finite values, as chart coordinates.
fn finite_segments(values: &[(usize, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    for &(epoch, v) in values {
        if v.is_finite() {
            current.push((epoch as f64, v));
        } else if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// X range over the epochs with a little padding so edge markers are not clipped.
fn epoch_range(epochs: &[usize]) -> std::ops::Range<f64> {
    let lo = epochs.iter().copied().min().unwrap_or(0) as f64;
    let hi = epochs.iter().copied().max().unwrap_or(0) as f64;
    let pad = ((hi - lo) * 0.03).max(0.3);
    if hi > lo {
        (lo - pad)..(hi + pad)
    } else {
        (lo - 0.5)..(hi + 0.5)
    }
}

/// Y range over the finite values, padded; `from_zero` anchors non-negative data at 0.
/// Falls back to 0..1 when nothing is finite.
fn value_range(values: impl Iterator<Item = f64>, from_zero: bool) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    if from_zero && lo >= 0.0 {
        lo = 0.0;
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.08
    } else {
        (hi.abs() * 0.1).max(1e-3)
    };
    let lo = if from_zero && lo == 0.0 {
        0.0
    } else {
        lo - pad
    };
    let hi = hi + pad;
    // Guard against spans that overflow to infinity with huge (but finite) values.
    if (hi - lo).is_finite() && hi > lo {
        lo..hi
    } else {
        0.0..1.0
    }
}

/// Decimals that tell ~8 ticks over `span` apart.
fn tick_decimals(span: f64) -> usize {
    let step = span / 8.0;
    if !(step.is_finite() && step > 0.0) {
        return 2;
    }
    (-step.log10()).ceil().clamp(0.0, 6.0) as usize
}

/// Tick labels with the same number of decimals along an axis; scientific notation for very
/// large or very small magnitudes.
fn format_tick(y: f64, decimals: usize) -> String {
    let a = y.abs();
    if a != 0.0 && !(1e-4..1e6).contains(&a) {
        format!("{y:.1e}")
    } else {
        format!("{y:.decimals$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn five_epochs() -> Vec<CurvePoint> {
        (1..=5)
            .map(|e| {
                let t = e as f64;
                CurvePoint {
                    epoch: e,
                    train_loss: 4.0 / t + 1.2,
                    valid_recall_at_10: 0.05 + 0.2 * (1.0 - (-t / 2.0).exp()),
                    valid_ndcg_at_10: 0.03 + 0.12 * (1.0 - (-t / 2.0).exp()),
                }
            })
            .collect()
    }

    fn check_png(path: &Path) -> image::RgbImage {
        let bytes = std::fs::read(path).expect("plot file exists");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "PNG magic bytes");
        assert!(
            bytes.len() > 10_000,
            "implausibly small PNG: {} bytes",
            bytes.len()
        );
        let img = image::load_from_memory(&bytes).expect("decodes").to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        img
    }

    fn count_pixels(img: &image::RgbImage, color: RGBColor) -> usize {
        img.pixels()
            .filter(|p| p.0 == [color.0, color.1, color.2])
            .count()
    }

    #[test]
    fn plot_five_epochs_writes_a_png_with_lines_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("training_curves.png");
        training_curves(&five_epochs(), &path).unwrap();
        let img = check_png(&path);

        let first = *img.get_pixel(0, 0);
        assert!(
            img.pixels().any(|p| *p != first),
            "image is a single colour"
        );
        // Each series is drawn in its own colour.
        for c in [LOSS_COLOR, RECALL_COLOR, NDCG_COLOR] {
            assert!(
                count_pixels(&img, c) > 200,
                "series colour {c:?} barely present"
            );
        }
        // Text (caption, labels) is anti-aliased black: a good number of dark pixels above
        // the plot area where only the caption lives.
        let dark_in_title = (0..40)
            .flat_map(|y| (0..WIDTH).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&v| v < 80))
            .count();
        assert!(
            dark_in_title > 300,
            "caption text not rendered ({dark_in_title} dark pixels)"
        );

        // Atomic write: no temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "stray files: {names:?}");
    }

    #[test]
    fn plot_overwrites_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("training_curves.png");
        std::fs::write(&path, b"old").unwrap();
        training_curves(&five_epochs(), &path).unwrap();
        check_png(&path);
    }

    #[test]
    fn plot_single_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        let p = CurvePoint {
            epoch: 1,
            train_loss: 2.5,
            valid_recall_at_10: 0.1,
            valid_ndcg_at_10: 0.05,
        };
        training_curves(&[p], &path).unwrap();
        let img = check_png(&path);
        assert!(
            count_pixels(&img, LOSS_COLOR) > 20,
            "single point marker not drawn"
        );
    }

    #[test]
    fn plot_nan_and_infinite_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut pts = five_epochs();
        pts[2].train_loss = f64::NAN;
        pts[3].valid_recall_at_10 = f64::INFINITY;
        pts[0].valid_ndcg_at_10 = f64::NEG_INFINITY;
        let path = dir.path().join("nan.png");
        training_curves(&pts, &path).unwrap();
        check_png(&path);

        // Everything NaN still yields a plot, not a panic.
        let all_nan: Vec<_> = (1..=3)
            .map(|e| CurvePoint {
                epoch: e,
                train_loss: f64::NAN,
                valid_recall_at_10: f64::NAN,
                valid_ndcg_at_10: f64::NAN,
            })
            .collect();
        let path = dir.path().join("all_nan.png");
        training_curves(&all_nan, &path).unwrap();
        check_png(&path);
    }

    #[test]
    fn plot_empty_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        let err = training_curves(&[], &path).unwrap_err();
        assert!(matches!(err, PlotError::NoData { .. }));
        assert!(err.to_string().contains("empty.png"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn plot_unwritable_target_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // The target's parent is a regular file, so the directory cannot be created.
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let path = blocker.join("training_curves.png");
        let err = training_curves(&five_epochs(), &path).unwrap_err();
        assert!(err.to_string().contains("training_curves.png"), "{err}");
    }

    #[test]
    fn plot_unsorted_epochs_and_extreme_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut pts = five_epochs();
        pts.reverse();
        pts[0].train_loss = 1e300;
        pts[1].train_loss = -1e300;
        let path = dir.path().join("extreme.png");
        training_curves(&pts, &path).unwrap();
        check_png(&path);
    }
}
