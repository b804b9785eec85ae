//! The Markdown report: one table of values and ratios with their goals, one of latency and
//! server CPU per command for the load scenarios.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::runner::Runs;
use crate::scenarios::{Goal, Metric, Row, Scenario, Target, Unit};

/// The median of `metric` over a target's runs, or why there is none.
enum Cell {
    Value(f64),
    NotApplicable(&'static str),
    Failed,
    Missing,
}

impl Cell {
    fn value(&self) -> Option<f64> {
        match *self {
            Cell::Value(value) => Some(value),
            _ => None,
        }
    }
}

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// The median of `metric` over `runs`.
pub fn median_of(runs: &Runs, metric: &Metric) -> Option<f64> {
    median(
        runs.samples
            .iter()
            .filter_map(|run| metric.of(run))
            .collect(),
    )
}

fn cell(row: &Row, runs: Option<&Runs>, target: Target) -> Cell {
    if let Some(&(_, reason)) = row.not_applicable.iter().find(|(t, _)| *t == target) {
        return Cell::NotApplicable(reason);
    }
    let Some(runs) = runs else {
        return Cell::Missing;
    };
    if let Some(reason) = runs.not_applicable {
        return Cell::NotApplicable(reason);
    }
    match median_of(runs, &row.metric) {
        Some(value) => Cell::Value(value),
        None if !runs.failures.is_empty() => Cell::Failed,
        None => Cell::Missing,
    }
}

/// `1234567` as `1,234,567`.
pub fn format_rate(rate: f64) -> String {
    let whole = format!("{:.0}", rate);
    let (sign, digits) = whole.split_at(usize::from(whole.starts_with('-')));
    let mut grouped = String::from(sign);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn format_value(value: f64, unit: Unit) -> String {
    match unit {
        Unit::Rate => format!("{}/s", format_rate(value)),
        Unit::Kib if value.abs() >= 1000.0 => format!("{} KiB", format_rate(value)),
        Unit::Kib => format!("{value:.2} KiB"),
        Unit::PercentCore => format!("{value:.2}% of a core"),
        Unit::Millis if value >= 100.0 => format!("{value:.0} ms"),
        Unit::Millis => format!("{value:.2} ms"),
        Unit::Micros => format!("{value:.2} µs"),
        Unit::Times => format!("{value:.2}×"),
        Unit::Count => format_rate(value),
    }
}

fn show(cell: &Cell, unit: Unit) -> String {
    match cell {
        Cell::Value(value) => format_value(*value, unit),
        Cell::NotApplicable(reason) => format!("n/a ({reason})"),
        Cell::Failed => "failed".into(),
        Cell::Missing => "–".into(),
    }
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

fn format_ratio(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "–".into(), |r| format!("{r:.2}×"))
}

/// A goal's bound in its unit: `8 KiB`, `50 ms`.
fn bound(value: f64, unit: Unit) -> String {
    let suffix = match unit {
        Unit::Rate => "/s",
        Unit::Kib => " KiB",
        Unit::PercentCore => "% of a core",
        Unit::Millis => " ms",
        Unit::Micros => " µs",
        Unit::Times => "×",
        Unit::Count => "",
    };
    format!("{value}{suffix}")
}

fn goal_text(
    goal: Goal,
    unit: Unit,
    demo: Option<f64>,
    vs_floor: Option<f64>,
    vs_qsd: Option<f64>,
) -> String {
    let verdict = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "unmeasured",
    };
    match goal {
        Goal::None => String::new(),
        Goal::FloorRatioAtLeast(min) => {
            format!("≥ {min}× floor: {}", verdict(vs_floor.map(|r| r >= min)))
        }
        Goal::FloorAndQsdRatio(floor, qsd) => format!(
            "≥ {floor}× floor: {}; ≥ {qsd}× QSD: {}",
            verdict(vs_floor.map(|r| r >= floor)),
            verdict(vs_qsd.map(|r| r >= qsd))
        ),
        Goal::FloorRatioAtMost(max) => {
            format!("≤ {max}× floor: {}", verdict(vs_floor.map(|r| r <= max)))
        }
        Goal::AtMost(max) => format!(
            "≤ {}: {}",
            bound(max, unit),
            verdict(demo.map(|v| v <= max))
        ),
    }
}

fn micros(value: Option<f64>) -> String {
    match value {
        Some(v) if v >= 10_000.0 => format!("{:.1} ms", v / 1000.0),
        Some(v) => format!("{v:.0} µs"),
        None => "–".into(),
    }
}

/// The report: values and ratios, then latency and server CPU per command.
pub fn report(
    scenarios: &[Scenario],
    results: &[BTreeMap<Target, Runs>],
    notes: &[String],
) -> String {
    let mut table = String::new();
    table.push_str(
        "| scenario | qmp-demo | qmp-floor | qemu-storage-daemon | demo ÷ floor | demo ÷ QSD | goal |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
    );
    for (scenario, runs) in scenarios.iter().zip(results) {
        for row in &scenario.rows {
            let [demo, floor, qsd] =
                [Target::Demo, Target::Floor, Target::Qsd].map(|t| cell(row, runs.get(&t), t));
            let vs_floor = ratio(demo.value(), floor.value());
            let vs_qsd = ratio(demo.value(), qsd.value());
            let _ = writeln!(
                table,
                "| {} | {} | {} | {} | {} | {} | {} |",
                row.label,
                show(&demo, row.unit),
                show(&floor, row.unit),
                show(&qsd, row.unit),
                format_ratio(vs_floor),
                format_ratio(vs_qsd),
                goal_text(row.goal, row.unit, demo.value(), vs_floor, vs_qsd)
            );
        }
    }
    for note in notes {
        let _ = writeln!(table, "\n{note}");
    }
    table.push_str(
        "\nLatency p50 / p99 and server CPU per command (CPU time of the server process ÷ \
         commands; on 2 shared cores the steadier measure of server cost):\n\n\
         | scenario | qmp-demo | qmp-floor | qemu-storage-daemon | CPU/cmd demo ÷ floor | goal |\n\
         |---|---:|---:|---:|---:|---|\n",
    );
    let p50 = Metric::Pointer("/p50_us".into());
    let p99 = Metric::Pointer("/p99_us".into());
    let errors = Metric::Pointer("/errors".into());
    for (scenario, runs) in scenarios.iter().zip(results) {
        if !scenario.is_load() {
            continue;
        }
        let cpu = |target| {
            runs.get(&target)
                .and_then(|runs| median_of(runs, &Metric::CpuPerCommand))
        };
        let cells: Vec<String> = [Target::Demo, Target::Floor, Target::Qsd]
            .into_iter()
            .map(|target| {
                let Some(runs) = runs.get(&target) else {
                    return "–".into();
                };
                if runs.not_applicable.is_some() {
                    return "n/a".into();
                }
                if runs.samples.is_empty() {
                    return if runs.failures.is_empty() {
                        "–".into()
                    } else {
                        "failed".into()
                    };
                }
                let error_count: f64 = runs.samples.iter().filter_map(|r| errors.of(r)).sum();
                let errors = if error_count > 0.0 {
                    format!("; {error_count} errors")
                } else {
                    String::new()
                };
                format!(
                    "{} / {}; {:.2} µs CPU/cmd{errors}",
                    micros(median_of(runs, &p50)),
                    micros(median_of(runs, &p99)),
                    cpu(target).unwrap_or(f64::NAN)
                )
            })
            .collect();
        let cpu_ratio = ratio(cpu(Target::Demo), cpu(Target::Floor));
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} |",
            scenario.label,
            cells.join(" | "),
            format_ratio(cpu_ratio),
            goal_text(scenario.cpu_goal, Unit::Micros, None, cpu_ratio, None)
        );
    }
    let failures: Vec<String> = scenarios
        .iter()
        .zip(results)
        .flat_map(|(scenario, row)| {
            row.iter().flat_map(move |(target, runs)| {
                runs.failures.iter().map(move |failure| {
                    format!("- {} on {}: {failure}", scenario.label, target.name())
                })
            })
        })
        .collect();
    if !failures.is_empty() {
        table.push_str("\nFailed measurements:\n\n");
        table.push_str(&failures.join("\n"));
        table.push('\n');
    }
    table
}
