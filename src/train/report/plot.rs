//! The report's plots: a ROC curve and a reliability diagram per signal and data set, drawn
//! with plotters into PNG files. Text uses the DejaVu Sans font that the `dejavu` crate
//! carries, so no system font or library is needed.

use std::path::Path;

use plotters::prelude::*;

use super::ReportError;
use crate::model::card::Figures;
use crate::train::evaluate::SetResult;
use crate::train::metrics;

pub(super) type PlotResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Plot size in pixels.
const SIZE: (u32, u32) = (640, 560);

const MODEL: RGBColor = RGBColor(31, 119, 180);
const RAW: RGBColor = RGBColor(255, 127, 14);
const BASELINE: RGBColor = RGBColor(214, 39, 40);
const CHANCE: RGBColor = RGBColor(150, 150, 150);

pub(super) fn register_font() -> Result<(), ReportError> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(ReportError::Font)
    }
}

/// The drawing area of one plot, over an RGB buffer.
pub(super) type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type UnitChart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Draws a plot into a white RGB buffer and saves it as a PNG at `path`.
pub(super) fn draw(
    path: &Path,
    plot: impl FnOnce(&Area<'_>) -> PlotResult,
) -> Result<(), ReportError> {
    let failed = |source| ReportError::Plot { path: path.into(), source };
    let mut pixels = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        let drawn = root.fill(&WHITE).map_err(Into::into).and_then(|()| plot(&root));
        drawn.and_then(|()| root.present().map_err(Into::into)).map_err(failed)?;
    }
    save_png(path, &pixels).map_err(failed)
}

/// Encodes RGB `pixels` of [`SIZE`] with the strongest compression: the plots are mostly
/// flat colour, which adaptive filtering shrinks well.
fn save_png(path: &Path, pixels: &[u8]) -> PlotResult {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = png::Encoder::new(file, SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(())
}

/// A chart over the unit square with a title, a grid and axis descriptions.
fn unit_chart<'a, 'b>(
    root: &'a Area<'b>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
) -> Result<UnitChart<'a, 'b>, Box<dyn std::error::Error + Send + Sync>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart.configure_mesh().max_light_lines(0).x_desc(x_desc).y_desc(y_desc).draw()?;
    Ok(chart)
}

pub(super) fn roc_plot(root: &Area<'_>, result: &SetResult) -> PlotResult {
    let e = &result.evaluation;
    let title = format!("{} on {}: ROC, test split", e.signal, e.dataset);
    let mut chart = unit_chart(root, &title, "false positive rate", "true positive rate")?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], CHANCE.stroke_width(1)))?
        .label("chance")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], CHANCE));
    let auc = |v: Option<f64>| v.map_or("—".into(), |a| format!("{a:.3}"));
    let model_auc = e.model.as_ref().and_then(|m| m.auc);
    let mut curves = vec![(format!("model (AUC {})", auc(model_auc)), MODEL, &result.raw)];
    if let (Some(first), Some(figures)) = (result.baselines.first(), e.baselines.first()) {
        let label = format!("{} (AUC {})", first.name, auc(figures.figures.auc));
        curves.push((label, BASELINE, &first.scores));
    }
    for (label, color, scores) in curves {
        let points = metrics::roc(scores, &result.labels);
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

pub(super) fn reliability_plot(root: &Area<'_>, result: &SetResult) -> PlotResult {
    let e = &result.evaluation;
    let title = format!("{} on {}: reliability, test split", e.signal, e.dataset);
    let x = "mean score of the bin (ten equal-width bins)";
    let mut chart = unit_chart(root, &title, x, "observed positive rate")?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], CHANCE.stroke_width(1)))?
        .label("perfect calibration")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], CHANCE));
    let ece = |f: &Option<Figures>| f.as_ref().map_or(f64::NAN, |f| f.ece);
    let series = [
        (format!("uncalibrated (ECE {:.3})", ece(&e.uncalibrated)), RAW, &result.raw),
        (format!("calibrated (ECE {:.3})", ece(&e.model)), MODEL, &result.calibrated),
    ];
    for (label, color, scores) in series {
        let points: Vec<(f64, f64)> = metrics::reliability(scores, &result.labels, metrics::BINS)
            .into_iter()
            .filter(|b| b.count > 0)
            .map(|b| (b.mean_score, b.positive_rate))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
