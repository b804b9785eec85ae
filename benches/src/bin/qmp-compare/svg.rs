//! A small hand-written SVG chart: throughput and server memory per idle client against
//! clients (lines, one client axis from 1 to the largest count measured) and latency
//! percentiles per scenario (bars on a log scale). No plotting dependency: the chart is a
//! few dozen elements.

use std::fmt::Write as _;

/// One target's line in a panel against clients: (clients, value) points.
pub struct Series<'a> {
    /// Legend text.
    pub name: &'a str,
    /// Points in increasing client order; a missing measurement is left out.
    pub points: Vec<(usize, f64)>,
}

/// The two panels against clients, sharing one axis.
pub struct Lines<'a> {
    /// Commands/s per target.
    pub throughput: &'a [Series<'a>],
    /// KiB of server RSS per idle client per target.
    pub memory: &'a [Series<'a>],
    /// Every client count on the axis, increasing.
    pub client_axis: &'a [usize],
    /// Commands in flight per client of the throughput sweep.
    pub depth: usize,
}

/// One scenario's latency bars: per target, `(p50, p99)` in microseconds, or `None` (n/a).
pub struct LatencyGroup<'a> {
    /// Axis label of the group.
    pub label: &'a str,
    /// One entry per target, in legend order.
    pub bars: Vec<Option<(f64, f64)>>,
}

/// Colours of the targets, in legend order.
const COLOURS: [&str; 4] = ["#1f77b4", "#7f7f7f", "#d62728", "#2ca02c"];

const WIDTH: f64 = 1500.0;
const HEIGHT: f64 = 440.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 370.0;

/// Renders the three panels; `targets` names the legend entries, matching the order of
/// `LatencyGroup::bars` and of the series.
pub fn render(
    title: &str,
    targets: &[&str],
    lines: &Lines<'_>,
    latency: &[LatencyGroup<'_>],
) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let throughput_title = format!(
        "Throughput (commands/s) against clients, {} in flight each",
        lines.depth
    );
    let panel = |svg: &mut String, title: &str, series, unit, left, right| {
        line_panel(
            svg,
            &Panel { title, unit },
            series,
            lines.client_axis,
            left,
            right,
        );
    };
    panel(
        &mut svg,
        &throughput_title,
        lines.throughput,
        "commands/s",
        70.0,
        560.0,
    );
    panel(
        &mut svg,
        "Server KiB per idle client",
        lines.memory,
        "KiB",
        640.0,
        1000.0,
    );
    latency_panel(&mut svg, targets, latency, 1080.0, 1480.0);
    // Legend under both panels.
    for (index, name) in targets.iter().enumerate() {
        let x = 70.0 + index as f64 * 220.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="14" height="14" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            HEIGHT - 28.0,
            COLOURS[index % COLOURS.len()],
            x + 20.0,
            HEIGHT - 16.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A line panel's texts.
struct Panel<'a> {
    title: &'a str,
    /// What a point's value is, for its tooltip.
    unit: &'a str,
}

/// Values (linear) against clients (evenly spaced categories, so 1 to 100,000 fit).
fn line_panel(
    svg: &mut String,
    panel: &Panel<'_>,
    series: &[Series<'_>],
    client_counts: &[usize],
    left: f64,
    right: f64,
) {
    let max = series
        .iter()
        .flat_map(|series| series.points.iter().map(|&(_, rate)| rate))
        .fold(0.0_f64, f64::max);
    let top_value = nice_ceiling(max.max(1.0));
    let y = |rate: f64| BOTTOM - (rate / top_value) * (BOTTOM - TOP);
    let step = (right - left) / client_counts.len().max(1) as f64;
    let x = |clients: usize| {
        let index = client_counts
            .iter()
            .position(|&count| count == clients)
            .unwrap_or(0);
        left + step * (index as f64 + 0.5)
    };
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (left + right) / 2.0,
        TOP - 12.0,
        escape(panel.title)
    );
    for tick in 0..=5 {
        let value = top_value * f64::from(tick) / 5.0;
        let ty = y(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{ty:.1}" x2="{right}" y2="{ty:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 6.0,
            ty + 4.0,
            short_number(value)
        );
    }
    for &clients in client_counts {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x(clients),
            BOTTOM + 18.0,
            short_number(clients as f64)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">clients</text>"#,
        (left + right) / 2.0,
        BOTTOM + 36.0
    );
    for (index, series) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let points: Vec<String> = series
            .points
            .iter()
            .map(|&(clients, rate)| format!("{:.1},{:.1}", x(clients), y(rate)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            points.join(" ")
        );
        for &(clients, rate) in &series.points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{}: {clients} clients, {} {}</title></circle>"#,
                x(clients),
                y(rate),
                escape(series.name),
                short_number(rate),
                escape(panel.unit)
            );
        }
    }
}

/// Latency p50 (solid) and p99 (pale) bars per scenario and target, log scale in µs.
fn latency_panel(
    svg: &mut String,
    targets: &[&str],
    groups: &[LatencyGroup<'_>],
    left: f64,
    right: f64,
) {
    let values = groups
        .iter()
        .flat_map(|group| group.bars.iter().flatten())
        .flat_map(|&(p50, p99)| [p50, p99])
        .filter(|value| *value > 0.0);
    let (min, max) = values.fold((f64::MAX, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low_exp, high_exp) = if max > 0.0 {
        (
            min.log10().floor() as i32,
            max.log10().ceil().max(1.0) as i32,
        )
    } else {
        (0, 1)
    };
    let high_exp = high_exp.max(low_exp + 1);
    let y = |micros: f64| {
        let fraction = (micros.max(10f64.powi(low_exp)).log10() - f64::from(low_exp))
            / f64::from(high_exp - low_exp);
        BOTTOM - fraction * (BOTTOM - TOP)
    };
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">Latency p50 (solid) and p99 (pale), µs, log scale</text>"#,
        (left + right) / 2.0,
        TOP - 12.0
    );
    for exp in low_exp..=high_exp {
        let ty = y(10f64.powi(exp));
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{ty:.1}" x2="{right}" y2="{ty:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 6.0,
            ty + 4.0,
            short_number(10f64.powi(exp))
        );
    }
    let group_width = (right - left) / groups.len().max(1) as f64;
    let bar_width = (group_width * 0.8) / targets.len().max(1) as f64;
    for (group_index, group) in groups.iter().enumerate() {
        let group_left = left + group_width * group_index as f64 + group_width * 0.1;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            group_left + group_width * 0.4,
            BOTTOM + 18.0,
            escape(group.label)
        );
        for (target_index, bar) in group.bars.iter().enumerate() {
            let colour = COLOURS[target_index % COLOURS.len()];
            let bx = group_left + bar_width * target_index as f64;
            let Some((p50, p99)) = *bar else {
                let _ = writeln!(
                    svg,
                    r##"<text x="{:.1}" y="{}" text-anchor="middle" font-size="9" fill="#999">n/a</text>"##,
                    bx + bar_width / 2.0,
                    BOTTOM - 4.0
                );
                continue;
            };
            for (value, opacity, name) in [(p99, 0.35, "p99"), (p50, 1.0, "p50")] {
                let ty = y(value);
                let _ = writeln!(
                    svg,
                    r#"<rect x="{bx:.1}" y="{ty:.1}" width="{:.1}" height="{:.1}" fill="{colour}" fill-opacity="{opacity}"><title>{} {}: {name} {value:.0} µs</title></rect>"#,
                    bar_width - 2.0,
                    (BOTTOM - ty).max(0.0),
                    escape(targets[target_index]),
                    escape(group.label)
                );
            }
        }
    }
}

/// The smallest of 1, 2, 2.5 or 5 times a power of ten that is at least `value`.
fn nice_ceiling(value: f64) -> f64 {
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|factor| factor * magnitude)
        .find(|&candidate| candidate >= value)
        .unwrap_or(10.0 * magnitude)
}

/// `1500000` as `1.5M`, `20000` as `20k`.
fn short_number(value: f64) -> String {
    let (scaled, suffix) = if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    let text = format!("{scaled:.1}");
    format!("{}{suffix}", text.trim_end_matches(".0"))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
