//! The report's chart: vision success ratio and latency per window, windows without enough
//! data shaded, kill-switch events marked. PNG (built-in glyphs, no fonts needed) and SVG.
use crate::glyph::GlyphBitmap;
use crate::policy::SwitchAction;
use crate::report::{axis_ms, Report};
use crate::window::Verdict;
use chrono::{DateTime, Utc};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::io::Cursor;

/// Chart size in pixels.
pub const SIZE: (u32, u32) = (1200, 800);

const PASS: RGBColor = RGBColor(30, 150, 60);
const BREACH: RGBColor = RGBColor(210, 40, 40);
const NO_DATA: RGBColor = RGBColor(150, 150, 150);
const VISION: RGBColor = RGBColor(40, 90, 200);
const TEXT: RGBColor = RGBColor(170, 170, 170);
const P95: RGBColor = RGBColor(230, 130, 20);
const SWITCH: RGBColor = RGBColor(190, 0, 60);

/// The chart as PNG bytes.
pub fn png(report: &Report) -> Result<Vec<u8>, String> {
    let mut buffer = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    {
        let root = GlyphBitmap::with_buffer(&mut buffer, SIZE).into_drawing_area();
        draw(&root, report).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    let image = image::RgbImage::from_raw(SIZE.0, SIZE.1, buffer)
        .ok_or("chart buffer has the wrong size")?;
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(png)
}

/// The chart as an SVG document.
pub fn svg(report: &Report) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, report).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn verdict_colour(v: &Verdict) -> RGBColor {
    match v {
        Verdict::Pass => PASS,
        Verdict::Breach { .. } => BREACH,
        Verdict::InsufficientData { .. } => NO_DATA,
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &Report,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (Some(first), Some(last)) = (report.windows.first(), report.windows.last()) else {
        root.draw(&Text::new(
            "no judged windows in this period",
            (40, 60),
            ("sans-serif", 24),
        ))?;
        return Ok(());
    };
    let title = format!(
        "cathedral canary  {} - {} UTC",
        first.start.format("%Y-%m-%d %H:%M:%S"),
        last.end.format("%Y-%m-%d %H:%M:%S")
    );
    let root = root.titled(&title, ("sans-serif", 24))?;
    let t0 = first.start;
    let span = (last.end - t0).num_milliseconds() as f64 / 1000.0;
    let secs = |t: DateTime<Utc>| (t - t0).num_milliseconds() as f64 / 1000.0;
    let format = if span > 86_400.0 * 2.0 {
        "%m-%d %H:%M"
    } else if span > 7200.0 {
        "%H:%M"
    } else {
        "%H:%M:%S"
    };
    let x_label = |x: &f64| {
        (t0 + chrono::Duration::milliseconds((x * 1000.0) as i64))
            .format(format)
            .to_string()
    };
    let mid = |w: &crate::window::WindowVerdict| (secs(w.start) + secs(w.end)) / 2.0;
    let engages: Vec<(f64, &'static str)> = report
        .events
        .iter()
        .filter(|e| e.succeeded())
        .map(|e| {
            let label = match e.action {
                SwitchAction::Engage => "kill switch engaged",
                SwitchAction::Release => "kill switch released",
            };
            (secs(e.at).clamp(0.0, span), label)
        })
        .collect();

    let (upper, lower) = root.split_vertically(SIZE.1 as i32 / 2 - 20);

    // Success ratio.
    let mut chart = ChartBuilder::on(&upper)
        .margin(16)
        .margin_right(48)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..span.max(1.0), 0.0..105.0)?;
    chart
        .configure_mesh()
        .x_labels(8)
        .y_labels(6)
        .x_label_formatter(&x_label)
        .y_label_formatter(&|y| format!("{y:.0}%"))
        .y_desc("success")
        .draw()?;
    for w in &report.windows {
        if matches!(w.verdict, Verdict::InsufficientData { .. }) {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(secs(w.start), 0.0), (secs(w.end), 105.0)],
                NO_DATA.mix(0.2).filled(),
            )))?;
        }
    }
    let ratio = |s: &crate::window::KindStats| s.success_ratio().map(|r| r * 100.0);
    chart
        .draw_series(LineSeries::new(
            report
                .windows
                .iter()
                .filter_map(|w| Some((mid(w), ratio(&w.text)?))),
            TEXT.stroke_width(2),
        ))?
        .label("text probes")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TEXT.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            report
                .windows
                .iter()
                .filter_map(|w| Some((mid(w), ratio(&w.vision)?))),
            VISION.stroke_width(2),
        ))?
        .label("vision probes (dot: verdict)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], VISION.stroke_width(2)));
    chart.draw_series(report.windows.iter().map(|w| {
        let y = ratio(&w.vision).unwrap_or(0.0);
        Circle::new((mid(w), y), 5, verdict_colour(&w.verdict).filled())
    }))?;
    for (x, label) in &engages {
        chart.draw_series(LineSeries::new(
            vec![(*x, 0.0), (*x, 105.0)],
            SWITCH.stroke_width(3),
        ))?;
        // Label on the side of the line with room for it.
        let h = if *x > span / 2.0 {
            HPos::Right
        } else {
            HPos::Left
        };
        let style = ("sans-serif", 14)
            .into_font()
            .color(&SWITCH)
            .pos(Pos::new(h, VPos::Top));
        chart.draw_series(std::iter::once(Text::new(
            format!(" {label} "),
            (*x, 104.0),
            style,
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    // Latency of the successful vision probes.
    let top = report
        .windows
        .iter()
        .filter_map(|w| w.vision.p95_ms)
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&lower)
        .margin(16)
        .margin_right(48)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..span.max(1.0), 0.0..top)?;
    chart
        .configure_mesh()
        .x_labels(8)
        .y_labels(6)
        .x_label_formatter(&x_label)
        .y_label_formatter(&|y| axis_ms(*y))
        .y_desc("latency")
        .x_desc("window start (UTC)")
        .draw()?;
    for (series, colour, label) in [(0usize, VISION, "vision p50"), (1usize, P95, "vision p95")] {
        let points: Vec<(f64, f64)> = report
            .windows
            .iter()
            .filter_map(|w| {
                let v = if series == 0 {
                    w.vision.p50_ms
                } else {
                    w.vision.p95_ms
                };
                Some((mid(w), v?))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, colour.filled())),
        )?;
    }
    for (x, _) in &engages {
        chart.draw_series(LineSeries::new(
            vec![(*x, 0.0), (*x, top)],
            SWITCH.stroke_width(3),
        ))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
