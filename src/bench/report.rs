//! Renders benchmark results as Markdown tables, so the CLI's output can be
//! pasted into docs/BENCHMARKS.md as it is.

use std::time::Duration;

use comfy_table::{CellAlignment, Table, presets::ASCII_MARKDOWN};

use super::{
    durable::DurableRow,
    fanout::{Outcome, Row},
    idle::IdleReport,
    workload::Workload,
};

/// One line describing what was run.
pub fn describe_workload(workload: &Workload, herald_placement: &str) -> String {
    let offered = match (workload.rate, workload.window) {
        (Some(rate), _) => format!("paced at {} events/s", thousands(u64::from(rate))),
        (None, 0) => "published as fast as the publisher goes (no window)".to_owned(),
        (None, window) => format!(
            "published as fast as delivered, at most {window} events ahead of the slowest subscriber"
        ),
    };
    format!(
        "{} subscribers (one connection each), {} events of {} bytes, {offered}; \
         Herald broker {herald_placement}",
        workload.subscribers,
        thousands(workload.events),
        workload.payload_bytes,
    )
}

/// The machine the numbers were taken on.
pub fn describe_machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cores} cores available, {model}")
}

/// The fan-out results, one row per system.
pub fn fanout_table(rows: &[Row]) -> String {
    let mut table = Table::new();
    table.load_style(ASCII_MARKDOWN).set_header([
        "system",
        "delivered",
        "lost",
        "deliveries/s",
        "publish events/s",
        "p50",
        "p99",
        "p99.9",
        "max",
        "note",
    ]);
    for row in rows {
        let label = row.system.label().to_owned();
        let cells = match &row.outcome {
            Outcome::Measured(m) => {
                let mut notes = Vec::new();
                if let Some(cpu) = m.server_cpu_per_delivery() {
                    notes.push(format!(
                        "broker CPU {:.2} µs per delivery",
                        cpu.as_secs_f64() * 1e6
                    ));
                }
                if m.reported_missed > 0 {
                    notes.push(format!(
                        "{} reported as lagged",
                        thousands(m.reported_missed)
                    ));
                }
                if let Some(reason) = &m.broken {
                    notes.push(format!(
                        "{} subscriber(s) broke: {reason}",
                        m.broken_subscribers
                    ));
                }
                vec![
                    label,
                    thousands(m.delivered),
                    lost(m.lost(), m.expected),
                    thousands(m.deliveries_per_second().round() as u64),
                    thousands(m.send_rate().round() as u64),
                    latency(m.latency_at(0.5)),
                    latency(m.latency_at(0.99)),
                    latency(m.latency_at(0.999)),
                    latency(m.latency_at(1.0)),
                    notes.join("; "),
                ]
            }
            Outcome::Unreachable(reason) | Outcome::Failed(reason) => failed_row(label, 8, reason),
        };
        table.add_row(cells);
    }
    align_right(&mut table, 1..=8);
    table.to_string()
}

/// The persistent-delivery results, one row per backend.
pub fn durable_table(rows: &[DurableRow]) -> String {
    let mut table = Table::new();
    table.load_style(ASCII_MARKDOWN).set_header([
        "backend",
        "delivered",
        "lost",
        "events/s end to end",
        "fire→receipt p50",
        "p99",
        "FireEvent p50",
        "p99",
        "note",
    ]);
    for row in rows {
        let label = row.backend.label().to_owned();
        let cells = match &row.outcome {
            Ok(measured) => {
                let m = &measured.delivery;
                let fire = |q: f64| {
                    measured
                        .fire_latency
                        .as_ref()
                        .filter(|h| !h.is_empty())
                        .map(|h| Duration::from_nanos(h.value_at_quantile(q)))
                };
                let mut notes = Vec::new();
                if m.delivered > m.expected {
                    notes.push(format!(
                        "{} delivered twice (at-least-once)",
                        thousands(m.delivered - m.expected)
                    ));
                }
                if let Some(reason) = &m.broken {
                    notes.push(format!(
                        "{} subscriber(s) broke: {reason}",
                        m.broken_subscribers
                    ));
                }
                vec![
                    label,
                    thousands(m.delivered),
                    lost(m.lost(), m.expected),
                    thousands(m.deliveries_per_second().round() as u64),
                    latency(m.latency_at(0.5)),
                    latency(m.latency_at(0.99)),
                    latency(fire(0.5)),
                    latency(fire(0.99)),
                    notes.join("; "),
                ]
            }
            Err(reason) => failed_row(label, 7, reason),
        };
        table.add_row(cells);
    }
    align_right(&mut table, 1..=7);
    table.to_string()
}

/// The idle-memory result.
pub fn idle_table(report: &IdleReport) -> String {
    let mut table = Table::new();
    table.load_style(ASCII_MARKDOWN).set_header([
        "subscribers",
        "connections",
        "broker RSS before",
        "with the streams open",
        "per idle subscriber",
        "after closing them",
        "after opening as many again",
    ]);
    table.add_row([
        thousands(report.subscribers as u64),
        thousands(report.connections as u64),
        kib(report.before_kib),
        kib(report.loaded_kib),
        format!("{:.1} KiB", report.per_subscriber_kib()),
        kib(report.after_close_kib),
        kib(report.reopened_kib),
    ]);
    align_right(&mut table, 0..7);
    table.to_string()
}

/// A row for a system or backend that could not be measured: its label, a dash
/// in each of the `blanks` figure columns, and why in the note.
fn failed_row(label: String, blanks: usize, reason: &str) -> Vec<String> {
    let mut cells = vec![label];
    cells.extend(std::iter::repeat_n("-".to_owned(), blanks));
    cells.push(one_line(reason));
    cells
}

fn align_right(table: &mut Table, columns: impl IntoIterator<Item = usize>) {
    for column in columns {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn lost(lost: u64, expected: u64) -> String {
    if lost == 0 || expected == 0 {
        return thousands(lost);
    }
    format!(
        "{} ({:.2}%)",
        thousands(lost),
        lost as f64 * 100.0 / expected as f64
    )
}

fn latency(value: Option<Duration>) -> String {
    match value {
        None => "-".to_owned(),
        Some(d) if d < Duration::from_millis(1) => format!("{} µs", d.as_micros()),
        Some(d) => format!("{:.2} ms", d.as_secs_f64() * 1000.0),
    }
}

fn kib(value: u64) -> String {
    if value >= 10 * 1024 {
        format!("{:.1} MiB", value as f64 / 1024.0)
    } else {
        format!("{value} KiB")
    }
}

/// `1234567` as `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Table cells hold one line; a multi-line error keeps its first.
fn one_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().replace('|', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers_for_people() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(latency(Some(Duration::from_micros(412))), "412 µs");
        assert_eq!(latency(Some(Duration::from_micros(3_214))), "3.21 ms");
        assert_eq!(lost(5, 1000), "5 (0.50%)");
        assert_eq!(kib(512), "512 KiB");
        assert_eq!(kib(20 * 1024), "20.0 MiB");
    }
}
