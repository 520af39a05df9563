//! `compare --plot FILE.svg`: CPU per datagram per variant (bars) and the
//! round-trip time distribution of each (CDF, log scale), side by side, in
//! one SVG drawn with plotters.

use std::path::Path;

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use plotters::prelude::*;

/// One variant: its name, CPU µs per datagram, its RTT histogram (µs).
pub struct Series<'a> {
    pub name: String,
    pub cpu_us: Option<f64>,
    pub rtt: Option<&'a Histogram<u64>>,
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn colour(i: usize) -> RGBColor {
    COLOURS.get(i % COLOURS.len()).copied().unwrap_or(BLACK)
}

/// The CDF of `h` as (µs, fraction) points.
pub fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = (0..=200)
        .map(|i| {
            let q = f64::from(i) / 200.0;
            (h.value_at_quantile(q).max(1) as f64, q)
        })
        .collect();
    pts.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    pts
}

/// Draws `series` to `path` (SVG).
pub fn draw(path: &Path, title: &str, series: &[Series<'_>]) -> Result<()> {
    let e = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(|x| e(&x))?;
    let (left, right) = root.split_horizontally(560);

    let max_cpu = series.iter().filter_map(|s| s.cpu_us).fold(0.0f64, f64::max).max(0.1) * 1.25;
    let n = series.len().max(1) as f64;
    let mut bars = ChartBuilder::on(&left)
        .caption("CPU per datagram (us)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(10)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..n, 0.0..max_cpu)
        .map_err(|x| e(&x))?;
    bars.configure_mesh().disable_x_mesh().disable_x_axis().y_desc("us").draw().map_err(|x| e(&x))?;
    let label = ("sans-serif", 12).into_font();
    for (i, s) in series.iter().enumerate() {
        let Some(v) = s.cpu_us else { continue };
        let x = i as f64;
        let rect = Rectangle::new([(x + 0.1, 0.0), (x + 0.9, v)], colour(i).filled());
        bars.draw_series(std::iter::once(rect)).map_err(|x| e(&x))?;
        let top = v + max_cpu * 0.02;
        let texts = [
            Text::new(format!("{v:.2}"), (x + 0.15, top + max_cpu * 0.05), label.clone()),
            Text::new(s.name.clone(), (x + 0.15, top), label.clone()),
        ];
        bars.draw_series(texts).map_err(|x| e(&x))?;
    }

    let curves: Vec<(usize, Vec<(f64, f64)>)> =
        series.iter().enumerate().filter_map(|(i, s)| s.rtt.map(|h| (i, cdf(h)))).collect();
    let max_rtt = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.0)).fold(10.0f64, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption("Round-trip time (CDF)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((1.0f64..max_rtt * 1.2).log_scale(), 0.0f64..1.0)
        .map_err(|x| e(&x))?;
    chart.configure_mesh().x_desc("us (log)").y_desc("fraction").draw().map_err(|x| e(&x))?;
    for (i, pts) in curves {
        let name = series.get(i).map_or(String::new(), |s| s.name.clone());
        chart
            .draw_series(LineSeries::new(pts, colour(i).stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour(i).stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn draws_bars_and_curves_into_an_svg() {
        let mut a = Histogram::<u64>::new(3).unwrap();
        let mut b = Histogram::<u64>::new(3).unwrap();
        for v in 1..1000u64 {
            a.record(50 + v).unwrap();
            b.record(100 + 3 * v).unwrap();
        }
        let series = [
            Series { name: "E naive echo".into(), cpu_us: Some(3.2), rtt: Some(&a) },
            Series { name: "R relay".into(), cpu_us: Some(2.1), rtt: Some(&b) },
            Series { name: "no data".into(), cpu_us: None, rtt: None },
        ];
        let path = std::env::temp_dir().join(format!("ztna-plot-{}.svg", std::process::id()));
        draw(&path, "test", &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("E naive echo") && svg.contains("R relay"), "labels drawn");
        assert!(svg.matches("<rect").count() >= 3, "background and two bars");
        assert!(svg.contains("3.20") && svg.contains("2.10"), "values on the bars");
        assert!(svg.contains("<polyline"), "CDF curves");
        let pts = cdf(&a);
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "monotone");
        assert_eq!(pts.last().unwrap().1, 1.0);
    }
}
