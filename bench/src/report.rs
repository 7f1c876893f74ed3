//! Turning measurements into the printed lines and the Markdown section of
//! `docs/benchmarks.md`: every figure beside its target and the command that produced it.
//!
//! Owns the targets of issue 8 and the table layout. Never measures anything itself and never
//! rounds a missed target into a met one.

use std::fmt::Write as _;
use std::time::Duration;

use crate::load::{Measurement, Protocol, Rate};

/// Latency and throughput of one run, summarised.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Answered requests per second.
    pub throughput: f64,
    /// Answered requests.
    pub ok: u64,
    /// Failed requests.
    pub errors: u64,
    /// Largest `VmRSS` of the server seen during the run, KiB.
    pub peak_rss_kib: u64,
}

impl Summary {
    /// Summarise `m`; `peak_rss_kib` comes from the memory sampler.
    #[must_use]
    pub fn of(m: &Measurement, peak_rss_kib: u64) -> Self {
        Self {
            p50: m.quantile(0.50),
            p99: m.quantile(0.99),
            p999: m.quantile(0.999),
            throughput: m.throughput(),
            ok: m.ok,
            errors: m.errors,
            peak_rss_kib,
        }
    }
}

/// One cell: a Pod size, a transport and a rate, measured on both servers.
#[derive(Debug, Clone)]
pub struct Row {
    /// Pod size label.
    pub pod: String,
    /// Transport.
    pub protocol: Protocol,
    /// Rate.
    pub rate: Rate,
    /// The injector.
    pub ours: Summary,
    /// The floor server.
    pub floor: Summary,
}

impl Row {
    /// Throughput ours / floor.
    #[must_use]
    pub fn ratio(&self) -> f64 {
        if self.floor.throughput > 0.0 {
            self.ours.throughput / self.floor.throughput
        } else {
            0.0
        }
    }

    /// One line for the terminal.
    #[must_use]
    pub fn line(&self) -> String {
        format!(
            "{:>6} | {:<38} | {:>6} | ours p50 {} p99 {} p99.9 {} {:>8.0}/s | floor p50 {} p99 {} p99.9 {} {:>8.0}/s | ours/floor {:.2} | errors {}/{}",
            self.pod,
            self.protocol.label(),
            self.rate.label(),
            ms(self.ours.p50),
            ms(self.ours.p99),
            ms(self.ours.p999),
            self.ours.throughput,
            ms(self.floor.p50),
            ms(self.floor.p99),
            ms(self.floor.p999),
            self.floor.throughput,
            self.ratio(),
            self.ours.errors,
            self.floor.errors,
        )
    }
}

/// Memory of the injector outside the cells.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFigures {
    /// `VmRSS` after start-up, before the first request, KiB.
    pub idle_start_kib: u64,
    /// `VmRSS` after the whole run, once idle again, KiB.
    pub idle_after_kib: u64,
    /// `VmHWM` at the end of the run (peak over everything), KiB.
    pub hwm_kib: u64,
    /// The same three for the floor server.
    pub floor: [u64; 3],
}

/// Everything the run measured, plus where and how.
#[derive(Debug, Clone)]
pub struct Report {
    /// CPU model, core count, kernel.
    pub machine: String,
    /// When the run started (UTC).
    pub date: String,
    /// The command that produced the figures.
    pub command: String,
    /// Seconds per cell and the workers of closed-loop runs.
    pub setup: String,
    /// The cells.
    pub rows: Vec<Row>,
    /// Memory figures.
    pub memory: MemoryFigures,
}

/// Milliseconds with three decimals.
#[must_use]
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> f64 {
    crate::load::to_f64(kib) / 1024.0
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**not met**"
    }
}

impl Report {
    fn find(&self, pod: &str, protocol: Protocol, rate: Rate) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.pod == pod && r.protocol == protocol && r.rate == rate)
    }

    /// The targets table: each figure, its target, met or not.
    #[must_use]
    pub fn targets(&self) -> Vec<(String, String, String, bool)> {
        let mut out = Vec::new();
        for protocol in [Protocol::Http1, Protocol::Http2] {
            if let Some(row) = self.find("10 KiB", protocol, Rate::Max) {
                out.push((
                    format!("throughput, 10 KiB Pods, {}, max", protocol.label()),
                    format!("{:.0} reviews/s", row.ours.throughput),
                    "≥ 10 000 reviews/s".to_owned(),
                    row.ours.throughput >= 10_000.0,
                ));
            }
        }
        for row in self.rows.iter().filter(|r| {
            r.rate == Rate::PerSecond(1000) && !matches!(r.protocol, Protocol::NewConnection { .. })
        }) {
            out.push((
                format!("p99 at 1 000/s, {} Pods, {}", row.pod, row.protocol.label()),
                ms(row.ours.p99),
                "≤ 2 ms".to_owned(),
                row.ours.p99 <= Duration::from_millis(2),
            ));
        }
        // The `distinct` cells show the memo's miss path; the targets are for the workload of
        // the issue (one Pod per size, sent again and again).
        for row in self
            .rows
            .iter()
            .filter(|r| r.rate == Rate::Max && !r.pod.ends_with("distinct"))
        {
            out.push((
                format!(
                    "throughput ours / floor, {} Pods, {}, max",
                    row.pod,
                    row.protocol.label()
                ),
                format!(
                    "{:.2} ({:.0} / {:.0})",
                    row.ratio(),
                    row.ours.throughput,
                    row.floor.throughput
                ),
                "≥ 0.80".to_owned(),
                row.ratio() >= 0.8,
            ));
        }
        let m = &self.memory;
        out.push((
            "injector RSS idle, after start-up".to_owned(),
            format!("{:.1} MiB", mib(m.idle_start_kib)),
            "≤ 15 MiB".to_owned(),
            m.idle_start_kib > 0 && m.idle_start_kib <= 15 * 1024,
        ));
        out.push((
            "injector RSS idle, after the whole run (3 s after the last review)".to_owned(),
            format!("{:.1} MiB", mib(m.idle_after_kib)),
            "≤ 15 MiB".to_owned(),
            m.idle_after_kib > 0 && m.idle_after_kib <= 15 * 1024,
        ));
        let peak_max_load = self
            .rows
            .iter()
            .filter(|r| r.rate == Rate::Max)
            .map(|r| r.ours.peak_rss_kib)
            .max()
            .unwrap_or(0);
        out.push((
            "injector RSS at maximum load (largest VmRSS sampled every 20 ms)".to_owned(),
            format!("{:.1} MiB", mib(peak_max_load)),
            "≤ 40 MiB".to_owned(),
            peak_max_load > 0 && peak_max_load <= 40 * 1024,
        ));
        out.push((
            "injector VmHWM, whole run".to_owned(),
            format!("{:.1} MiB", mib(m.hwm_kib)),
            "≤ 40 MiB".to_owned(),
            m.hwm_kib > 0 && m.hwm_kib <= 40 * 1024,
        ));
        out
    }

    /// The Markdown body of the `## Webhook under load` section.
    #[must_use]
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Machine: {}. Date: {}. Command: `{}` (the load generator runs on the same machine).\n",
            self.machine, self.date, self.command
        );
        let _ = writeln!(s, "{}\n", self.setup);
        let _ = writeln!(s, "### Targets\n");
        let _ = writeln!(s, "| figure | measured | target | verdict |");
        let _ = writeln!(s, "|---|---|---|---|");
        for (figure, measured, target, met) in self.targets() {
            let _ = writeln!(s, "| {figure} | {measured} | {target} | {} |", verdict(met));
        }
        let _ = writeln!(
            s,
            "\n### Every cell (ours = `wg-injector serve`, floor = same stack, no injection)\n"
        );
        let _ = writeln!(
            s,
            "| Pod | transport | rate | ours p50 | ours p99 | ours p99.9 | ours reviews/s | floor p50 | floor p99 | floor p99.9 | floor reviews/s | ours / floor | ours peak RSS | errors ours/floor |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.0} | {:.2} | {:.1} MiB | {}/{} |",
                r.pod,
                r.protocol.label(),
                r.rate.label(),
                ms(r.ours.p50),
                ms(r.ours.p99),
                ms(r.ours.p999),
                r.ours.throughput,
                ms(r.floor.p50),
                ms(r.floor.p99),
                ms(r.floor.p999),
                r.floor.throughput,
                r.ratio(),
                mib(r.ours.peak_rss_kib),
                r.ours.errors,
                r.floor.errors,
            );
        }
        let m = &self.memory;
        let _ = writeln!(
            s,
            "\nFloor server memory: {:.1} MiB idle after start-up, {:.1} MiB idle after the run, {:.1} MiB VmHWM.",
            mib(m.floor[0]),
            mib(m.floor[1]),
            mib(m.floor[2])
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(throughput: f64, p99_us: u64) -> Summary {
        Summary {
            p99: Duration::from_micros(p99_us),
            throughput,
            ok: 1,
            ..Summary::default()
        }
    }

    #[test]
    fn a_missed_target_is_reported_as_not_met() {
        let report = Report {
            machine: "test".to_owned(),
            date: "today".to_owned(),
            command: "make bench".to_owned(),
            setup: String::new(),
            rows: vec![
                Row {
                    pod: "10 KiB".to_owned(),
                    protocol: Protocol::Http1,
                    rate: Rate::Max,
                    ours: summary(9_000.0, 3000),
                    floor: summary(10_000.0, 1000),
                },
                Row {
                    pod: "10 KiB".to_owned(),
                    protocol: Protocol::Http1,
                    rate: Rate::PerSecond(1000),
                    ours: summary(1000.0, 2500),
                    floor: summary(1000.0, 500),
                },
            ],
            memory: MemoryFigures {
                idle_start_kib: 10 * 1024,
                idle_after_kib: 20 * 1024,
                hwm_kib: 30 * 1024,
                floor: [0; 3],
            },
        };
        let targets = report.targets();
        let met = |prefix: &str| {
            targets
                .iter()
                .find(|t| t.0.starts_with(prefix))
                .map(|t| t.3)
        };
        assert_eq!(met("throughput, 10 KiB"), Some(false));
        assert_eq!(met("p99 at 1 000/s"), Some(false));
        assert_eq!(met("throughput ours / floor"), Some(true));
        assert_eq!(met("injector RSS idle, after start-up"), Some(true));
        assert_eq!(met("injector RSS idle, after the whole run"), Some(false));
        let text = report.markdown();
        assert!(
            text.contains("| 0.90 (9000 / 10000) | ≥ 0.80 | met |"),
            "{text}"
        );
        assert!(text.contains("**not met**"), "{text}");
    }
}
