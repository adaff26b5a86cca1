//! The printed tables: one row per metric and a column per path, and the targets with
//! their verdicts. Pure: strings from results.

use std::fmt::Write as _;

use super::report::{Params, PathKind, PathResult, Target};
use super::stats::ratio;

/// A number printed with a precision that suits its size.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders rows under a header: first column left-aligned, the others right-aligned, two
/// spaces between columns. Widths count characters, so `µ` takes one column.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate().take(cols) {
            let pad = width[i].saturating_sub(cell.chars().count());
            if i == 0 {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            } else {
                text.push_str("  ");
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut header.iter().copied());
    let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut rule.iter().map(String::as_str));
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn path_cell(
    paths: &[PathResult],
    kind: PathKind,
    tunnels_only: bool,
    get: &dyn Fn(&PathResult) -> Option<String>,
) -> String {
    if tunnels_only && !kind.is_tunnel() {
        return "-".into();
    }
    let Some(p) = paths.iter().find(|p| p.path == kind) else {
        return "skipped".into();
    };
    if p.failed.is_some() {
        return "failed".into();
    }
    // Measured on this path but no number: the reason is in the notes under the table.
    get(p).unwrap_or_else(|| "error".into())
}

fn ratio_cell(
    paths: &[PathResult],
    kind: PathKind,
    value: &dyn Fn(&PathResult) -> Option<f64>,
) -> String {
    let of = |k: PathKind| {
        paths
            .iter()
            .find(|p| p.path == k && p.failed.is_none())
            .and_then(value)
    };
    ratio(of(kind), of(PathKind::Haproxy))
        .filter(|r| r.is_finite())
        .map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

/// How a row shows its numbers and what it puts in the ratio columns.
#[derive(Clone, Copy, PartialEq)]
enum Compare {
    /// A measurement with isthmus / haproxy ratios.
    Ratio,
    /// A measurement without ratios.
    None,
    /// A whole count, without ratios.
    Count,
}

type Getter = Box<dyn Fn(&PathResult) -> Option<f64>>;

/// The main table: one row per metric, one column per path, then isthmus ÷ haproxy ratios.
pub fn main_table(paths: &[PathResult], params: &Params) -> String {
    let rows: Vec<(String, bool, Compare, Getter)> = vec![
        (
            format!("bulk 1 stream x {} MiB (MiB/s)", params.bulk_1_mib),
            false,
            Compare::Ratio,
            Box::new(|p| p.bulk_1_mib_s),
        ),
        (
            format!("bulk 8 streams x {} MiB (MiB/s)", params.bulk_8_mib_each),
            false,
            Compare::Ratio,
            Box::new(|p| p.bulk_8_mib_s),
        ),
        (
            "gateway CPU per GiB, bulk (s)".into(),
            true,
            Compare::Ratio,
            Box::new(|p| p.cpu_s_per_gib),
        ),
        (
            format!("new conn/s ({} workers)", params.conn_workers),
            false,
            Compare::Ratio,
            Box::new(|p| p.conn_rate.as_ref().map(|c| c.per_s)),
        ),
        (
            "  new-conn errors".into(),
            false,
            Compare::Count,
            Box::new(|p| p.conn_rate.as_ref().map(|c| c.errors as f64)),
        ),
        (
            "gateway CPU per new conn (µs)".into(),
            true,
            Compare::Ratio,
            Box::new(|p| p.cpu_us_per_conn),
        ),
        (
            "latency p50 (µs)".into(),
            false,
            Compare::None,
            Box::new(|p| p.latency.as_ref().map(|l| l.p50_us)),
        ),
        (
            "latency p99 (µs)".into(),
            false,
            Compare::None,
            Box::new(|p| p.latency.as_ref().map(|l| l.p99_us)),
        ),
        (
            "added p50 vs direct (µs)".into(),
            false,
            Compare::Ratio,
            // NaN: latency measured, but no direct path to compare with.
            Box::new(|p| {
                p.latency
                    .as_ref()
                    .map(|l| l.added_p50_us.unwrap_or(f64::NAN))
            }),
        ),
        (
            "added p99 vs direct (µs)".into(),
            false,
            Compare::Ratio,
            Box::new(|p| {
                p.latency
                    .as_ref()
                    .map(|l| l.added_p99_us.unwrap_or(f64::NAN))
            }),
        ),
        (
            "idle conns held".into(),
            true,
            Compare::Count,
            Box::new(|p| p.memory.as_ref().map(|m| m.conns as f64)),
        ),
        (
            "RSS egress+ingress before (MiB)".into(),
            true,
            Compare::None,
            Box::new(|p| p.memory.as_ref().map(|m| m.before_kib() as f64 / 1024.0)),
        ),
        (
            "RSS egress+ingress held (MiB)".into(),
            true,
            Compare::None,
            Box::new(|p| p.memory.as_ref().map(|m| m.after_kib() as f64 / 1024.0)),
        ),
        (
            "KiB per idle conn".into(),
            true,
            Compare::Ratio,
            Box::new(|p| p.memory.as_ref().map(|m| m.kib_per_conn)),
        ),
    ];
    let header = [
        "metric",
        "direct",
        "isthmus-tcp",
        "isthmus-quic",
        "haproxy",
        "tcp/haproxy",
        "quic/haproxy",
    ];
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(label, tunnels_only, compare, get)| {
            let mut row = vec![label.clone()];
            for kind in PathKind::ALL {
                let shown = |p: &PathResult| {
                    get(p).map(|v| match compare {
                        _ if v.is_nan() => "-".into(),
                        Compare::Count => format!("{v:.0}"),
                        Compare::Ratio | Compare::None => num(v),
                    })
                };
                row.push(path_cell(paths, kind, *tunnels_only, &shown));
            }
            for kind in [PathKind::IsthmusTcp, PathKind::IsthmusQuic] {
                row.push(match compare {
                    Compare::Ratio => ratio_cell(paths, kind, get.as_ref()),
                    Compare::None | Compare::Count => "-".into(),
                });
            }
            row
        })
        .collect();
    let mut out = render(&header, &table);
    out.push_str(
        "ratio columns: isthmus / haproxy; higher is better for MiB/s and conn/s, lower for \
         CPU, latency and memory\n",
    );
    for p in paths {
        if let Some(why) = &p.failed {
            let _ = writeln!(out, "{} failed: {why}", p.path.name());
        }
        for e in &p.errors {
            let _ = writeln!(out, "{}: {e}", p.path.name());
        }
        for n in &p.notes {
            let _ = writeln!(out, "{} (note): {n}", p.path.name());
        }
    }
    out
}

/// The targets table: target, goal, measured, verdict.
pub fn targets_table(targets: &[Target]) -> String {
    let rows: Vec<Vec<String>> = targets
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.goal.clone(),
                t.shown.clone(),
                t.verdict.label().into(),
            ]
        })
        .collect();
    render(&["target", "goal", "measured", "verdict"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::fixtures::{params, path};
    use crate::bench::report::{fill_added_latency, targets};

    #[test]
    fn render_aligns_columns() {
        let out = render(
            &["metric", "a", "bb"],
            &[
                vec!["latency (µs)".into(), "1".into(), "2000".into()],
                vec!["x".into(), "333".into(), "4".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "metric          a    bb");
        assert_eq!(lines[1], "------------  ---  ----");
        assert_eq!(lines[2], "latency (µs)    1  2000");
        assert_eq!(lines[3], "x             333     4");
    }

    #[test]
    fn main_table_shows_ratios_and_dashes() {
        let mut paths = vec![
            path(PathKind::Direct, 3000.0, 20_000.0, 20.0, 0.0),
            path(PathKind::IsthmusTcp, 600.0, 16_000.0, 60.0, 20.0),
            path(PathKind::IsthmusQuic, 300.0, 12_000.0, 80.0, 40.0),
            path(PathKind::Haproxy, 400.0, 1_000.0, 70.0, 80.0),
        ];
        fill_added_latency(&mut paths);
        let table = main_table(&paths, &params());
        let cells = |prefix: &str| -> Vec<String> {
            let line = table.lines().find(|l| l.starts_with(prefix)).unwrap();
            line.split_whitespace().map(str::to_owned).collect()
        };
        let conn = cells("new conn/s");
        assert_eq!(
            conn[conn.len() - 6..],
            ["20000", "16000", "12000", "1000", "16.00x", "12.00x"]
        );
        let mem = cells("KiB per");
        // direct has no memory figure.
        assert_eq!(
            mem[mem.len() - 6..],
            ["-", "20.0", "40.0", "80.0", "0.25x", "0.50x"]
        );
        let targets = targets_table(&targets(&paths));
        assert!(targets.lines().nth(2).unwrap().ends_with("PASS"));
    }

    #[test]
    fn numbers_keep_sensible_precision() {
        assert_eq!(num(1234.567), "1235");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.2345), "1.23");
        assert_eq!(num(-3.5), "-3.50");
    }
    #[test]
    fn a_failed_path_shows_failed_and_its_reason() {
        let mut hap = PathResult::new(PathKind::Haproxy);
        hap.failed = Some("haproxy is not installed".into());
        let paths = vec![
            path(PathKind::IsthmusTcp, 600.0, 16_000.0, 60.0, 20.0),
            path(PathKind::IsthmusQuic, 400.0, 12_000.0, 80.0, 40.0),
            hap,
        ];
        let table = main_table(&paths, &params());
        assert!(table.contains("haproxy failed: haproxy is not installed"));
        let bulk = table.lines().find(|l| l.starts_with("bulk 1")).unwrap();
        let cells: Vec<&str> = bulk.split("  ").filter(|c| !c.trim().is_empty()).collect();
        assert_eq!(
            cells[1..].iter().map(|c| c.trim()).collect::<Vec<_>>(),
            ["skipped", "600", "400", "failed", "-", "-"]
        );
        // Latency measured, but no direct path to subtract: a dash, not an error.
        let added = table.lines().find(|l| l.starts_with("added p99")).unwrap();
        let cells: Vec<&str> = added.split_whitespace().collect();
        assert_eq!(
            cells[cells.len() - 6..],
            ["skipped", "-", "-", "failed", "-", "-"]
        );
    }
}
