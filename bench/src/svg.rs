//! The report's picture, `report.svg`, written by hand (a few lines of
//! SVG do not need a plotting library).

use std::fmt::Write as _;

/// The report's picture: the latency distribution of each rate (left) and
/// throughput over time of each backlog run (right).
pub fn render(
    size: &str,
    summary: &str,
    latencies: &[(String, Vec<f64>)],
    timelines: &[(String, Vec<(f64, f64)>)],
) -> String {
    const W: f64 = 1100.0;
    const H: f64 = 460.0;
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"##
    );
    let _ = write!(
        out,
        r#"<text x="20" y="22" font-size="14">outbox benchmark ({} size): {}</text>"#,
        size,
        escape(summary)
    );

    // Left: latency distribution (CDF), up to the largest p99.9.
    let x_max = latencies
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(_, v)| v[((v.len() - 1) as f64 * 0.999) as usize])
        .fold(1.0f64, f64::max)
        * 1.1;
    let left = Panel {
        x: 70.0,
        y: 50.0,
        w: 430.0,
        h: 340.0,
        x_max,
        y_max: 1.0,
    };
    left.axes(
        &mut out,
        "commit → row in ClickHouse (ms)",
        "share of events (CDF)",
    );
    for (i, (label, sorted)) in latencies.iter().enumerate() {
        if sorted.is_empty() {
            continue;
        }
        let step = (sorted.len() / 400).max(1);
        let points: Vec<(f64, f64)> = sorted
            .iter()
            .enumerate()
            .step_by(step)
            .map(|(k, v)| (v.min(x_max), (k + 1) as f64 / sorted.len() as f64))
            .collect();
        left.line(&mut out, &points, colors[i % colors.len()]);
        left.legend(&mut out, i, label, colors[i % colors.len()]);
    }

    // Right: throughput over time of the backlog runs.
    let t_max = timelines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(t, _)| *t))
        .fold(1.0f64, f64::max);
    let r_max = timelines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, r)| *r))
        .fold(1.0f64, f64::max)
        * 1.1;
    let right = Panel {
        x: 620.0,
        y: 50.0,
        w: 440.0,
        h: 340.0,
        x_max: t_max,
        y_max: r_max,
    };
    right.axes(&mut out, "seconds since start", "events per second");
    for (i, (label, points)) in timelines.iter().enumerate() {
        right.line(&mut out, points, colors[i % colors.len()]);
        right.legend(&mut out, i, label, colors[i % colors.len()]);
    }
    out.push_str("</svg>\n");
    out
}

struct Panel {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    x_max: f64,
    y_max: f64,
}

impl Panel {
    fn px(&self, x: f64) -> f64 {
        self.x + self.w * (x / self.x_max).clamp(0.0, 1.0)
    }

    fn py(&self, y: f64) -> f64 {
        self.y + self.h * (1.0 - (y / self.y_max).clamp(0.0, 1.0))
    }

    fn axes(&self, out: &mut String, x_label: &str, y_label: &str) {
        let (x0, y0, x1, y1) = (self.x, self.y + self.h, self.x + self.w, self.y);
        let _ = write!(
            out,
            r#"<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="black" fill="none"/>"#
        );
        for k in 0..=5 {
            let fx = self.x_max * f64::from(k) / 5.0;
            let fy = self.y_max * f64::from(k) / 5.0;
            let (tx, ty) = (self.px(fx), self.py(fy));
            let _ = write!(
                out,
                r##"<line x1="{tx}" y1="{y0}" x2="{tx}" y2="{y1}" stroke="#eee"/><text x="{tx}" y="{}" text-anchor="middle">{}</text>"##,
                y0 + 16.0,
                tick(fx)
            );
            let _ = write!(
                out,
                r##"<line x1="{x0}" y1="{ty}" x2="{x1}" y2="{ty}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                x0 - 6.0,
                ty + 4.0,
                tick(fy)
            );
        }
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            self.x + self.w / 2.0,
            y0 + 36.0,
            escape(x_label)
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">{}</text>"#,
            self.x - 52.0,
            self.y + self.h / 2.0,
            self.x - 52.0,
            self.y + self.h / 2.0,
            escape(y_label)
        );
    }

    fn line(&self, out: &mut String, points: &[(f64, f64)], color: &str) {
        if points.is_empty() {
            return;
        }
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", self.px(*x), self.py(*y)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" stroke="{color}" stroke-width="1.5" fill="none"/>"#,
            path.join(" ")
        );
    }

    fn legend(&self, out: &mut String, index: usize, label: &str, color: &str) {
        let y = self.y + 14.0 + 16.0 * index as f64;
        let x = self.x + self.w - 230.0;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="4" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            y - 4.0,
            x + 18.0,
            y + 1.0,
            escape(label)
        );
    }
}

fn tick(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
