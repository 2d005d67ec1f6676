//! The soak report: the JSON document, the readable text, and the SVG picture.
//!
//! The SVG is written directly (two small charts): charting crates need a system font stack to
//! lay out text, which a fresh machine does not have.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::faults::FaultKind;
use super::ledger::Totals;
use super::timeline::Percentiles;

/// Everything a soak run measured. The JSON keys are a stable interface.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Client transports.
    pub clients: u32,
    /// Channels.
    pub channels: u32,
    /// Length of the measured run (publishing and faults), in seconds.
    pub duration_s: f64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Messages and deliveries, from the full ledger.
    #[serde(flatten)]
    pub totals: Totals,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Connection attempts.
    pub attempts: u64,
    /// Client-time connected over total client-time.
    pub uptime_ratio: f64,
    /// Connection lost → channels re-attached and replayed.
    pub recovery_ms: Percentiles,
    /// Fault injected → client noticed.
    pub detection_ms: Percentiles,
    /// Deliveries per second during the run.
    pub throughput_msgs_per_s: f64,
    /// Process CPU over the run, percent of one core.
    pub cpu_percent: f64,
    /// Peak resident memory of the process.
    pub rss_max_mib: f64,
    /// Whether every publish was answered and every owed delivery made before the drain
    /// deadline.
    pub drained: bool,
    /// The fault schedule.
    pub fault_spec: String,
    /// The seed.
    pub seed: u64,
    /// Where channel history lived: `memory` or `redis`.
    pub store: String,
    /// Hub processes (0: one hub embedded in the soak process).
    pub hub_nodes: u32,
    /// Whether the run had to keep continuity (no discontinuity at all): true unless hub
    /// processes kept their history in memory, where a killed process honestly loses it.
    pub continuity_expected: bool,
    /// Hub restarts (restart, kill-node) after which the hub did not come back.
    pub hub_restart_failures: u64,
    /// Whether clients and hubs spoke TLS (`wss://`, `--tls`).
    pub tls: bool,
}

impl Report {
    /// Whether the run kept every promise: nothing silently lost, duplicated or reordered —
    /// and, where continuity was expected, no discontinuity and nothing lost or repeated across
    /// one either.
    pub fn passed(&self) -> bool {
        let t = &self.totals;
        let silent = t.lost == 0 && t.duplicated == 0 && t.reordered == 0;
        let continuous =
            t.discontinuities == 0 && t.lost_in_gaps == 0 && t.duplicated_across_epochs == 0;
        silent && (continuous || !self.continuity_expected) && self.complete()
    }

    /// Whether the run finished its work: every publish answered (and none failed: the soak's
    /// buffers are large enough that none should), everything owed delivered before the drain
    /// deadline, every hub restart successful.
    pub fn complete(&self) -> bool {
        let t = &self.totals;
        self.drained && t.failed == 0 && t.acked == t.published && self.hub_restart_failures == 0
    }

    /// The readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let p = |p: &Percentiles| {
            format!(
                "p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                p.p50, p.p95, p.p99, p.max
            )
        };
        let faults = if self.faults.is_empty() {
            "none".to_owned()
        } else {
            self.faults
                .iter()
                .map(|(k, v)| format!("{k} ×{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let hubs = match self.hub_nodes {
            0 => "1 embedded hub".to_owned(),
            1 => "1 hub process".to_owned(),
            n => format!("{n} hub processes"),
        };
        let _ = writeln!(
            s,
            "Tether soak: {} clients on {} channels for {:.1} s (seed {}); {hubs}, {} store{}",
            self.clients,
            self.channels,
            self.duration_s,
            self.seed,
            self.store,
            if self.tls { ", over TLS" } else { "" }
        );
        let _ = writeln!(s, "  faults        {faults}  [{}]", self.fault_spec);
        let _ = writeln!(
            s,
            "  messages      {} published, {} acknowledged, {} failed",
            self.totals.published, self.totals.acked, self.totals.failed
        );
        let _ = writeln!(
            s,
            "  deliveries    {} of {} owed — lost {}, duplicated {}, reordered {}",
            self.totals.delivered,
            self.totals.expected_deliveries,
            self.totals.lost,
            self.totals.duplicated,
            self.totals.reordered
        );
        let _ = writeln!(
            s,
            "  gaps          {} discontinuities reported; inside them {} deliveries lost, {} repeated in a new epoch{}",
            self.totals.discontinuities,
            self.totals.lost_in_gaps,
            self.totals.duplicated_across_epochs,
            match (self.continuity_expected, self.store.as_str()) {
                (true, "memory") => " (none allowed: the embedded hub keeps its history)",
                (true, _) => " (none allowed: durable history)",
                (false, _) => " (history in hub process memory: reported, not silent)",
            }
        );
        let _ = writeln!(
            s,
            "  connections   {} attempts, {} reconnects, uptime {:.3} %",
            self.attempts,
            self.reconnects,
            self.uptime_ratio * 100.0
        );
        let _ = writeln!(s, "  recovery      {}", p(&self.recovery_ms));
        let _ = writeln!(s, "  detection     {}", p(&self.detection_ms));
        let _ = writeln!(
            s,
            "  throughput    {:.0} deliveries/s",
            self.throughput_msgs_per_s
        );
        let _ = writeln!(
            s,
            "  resources     {:.1} % CPU (of one core), {:.1} MiB peak RSS",
            self.cpu_percent, self.rss_max_mib
        );
        let t = &self.totals;
        let verdict = if self.passed() {
            "PASS: nothing silently lost, duplicated or reordered".to_owned()
        } else if t.lost + t.duplicated + t.reordered > 0 {
            "FAIL: silent loss, duplicates or reordering".to_owned()
        } else if !self.complete() {
            format!(
                "FAIL: the run did not finish its work ({} of {} publishes answered, {} failed, drained: {}, hub restarts that failed: {})",
                t.acked + t.failed,
                t.published,
                t.failed,
                self.drained,
                self.hub_restart_failures
            )
        } else {
            "FAIL: a discontinuity where history should have been continuous".to_owned()
        };
        let _ = writeln!(s, "  verdict       {verdict}");
        s
    }

    /// The SVG: recovery-time histogram on top, connected clients over time with the faults
    /// marked below.
    pub fn svg(
        &self,
        recovery_ms: &[f64],
        connected: &[(f64, u32)],
        faults: &[(std::time::Duration, FaultKind)],
    ) -> String {
        const W: f64 = 900.0;
        const H: f64 = 300.0;
        const M: f64 = 50.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" font-family="sans-serif" font-size="12">"#,
            2.0 * H + 40.0
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);

        // Histogram of recovery times.
        let _ = writeln!(
            s,
            r#"<text x="{M}" y="20" font-size="14">Recovery time (connection lost → channels re-attached), {} outages</text>"#,
            recovery_ms.len()
        );
        let max = recovery_ms.iter().copied().fold(0.0, f64::max).max(1.0);
        let bins = 30usize;
        let mut counts = vec![0u32; bins];
        for v in recovery_ms {
            counts[((v / max * bins as f64) as usize).min(bins - 1)] += 1;
        }
        let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
        let (x0, y0, pw, ph) = (M, 30.0, W - 2.0 * M, H - 70.0);
        let bw = pw / bins as f64;
        for (i, c) in counts.iter().enumerate() {
            let h = ph * f64::from(*c) / top;
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4a7ebb"/>"##,
                x0 + i as f64 * bw + 1.0,
                y0 + ph - h,
                bw - 2.0,
                h
            );
        }
        axes(&mut s, x0, y0, pw, ph);
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{:.1}">0 ms</text><text x="{:.1}" y="{:.1}" text-anchor="end">{max:.0} ms</text><text x="{:.1}" y="{:.1}" text-anchor="end">{top:.0}</text>"#,
            y0 + ph + 15.0,
            x0 + pw,
            y0 + ph + 15.0,
            x0 - 4.0,
            y0 + 10.0
        );

        // Connected clients over time, faults as vertical lines.
        let (x0, y0) = (M, H + 50.0);
        let _ = writeln!(
            s,
            r#"<text x="{M}" y="{:.1}" font-size="14">Connected clients over time (of {}); faults marked</text>"#,
            y0 - 10.0,
            self.clients
        );
        let end = connected.last().map_or(1.0, |c| c.0).max(1.0);
        let n = f64::from(self.clients.max(1));
        for (at, kind) in faults {
            let x = x0 + pw * at.as_secs_f64() / end;
            let colour = match kind {
                FaultKind::Cut => "#d62728",
                FaultKind::Stall => "#ff7f0e",
                FaultKind::Restart => "#9467bd",
                FaultKind::KillNode => "#17becf",
                FaultKind::Refuse(_) => "#8c564b",
                FaultKind::Latency(_) => "#7f7f7f",
            };
            let _ = writeln!(
                s,
                r#"<g><title>{} at {:.1} s</title><line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2" stroke-opacity="0.8" stroke-dasharray="5 3"/></g>"#,
                kind.name(),
                at.as_secs_f64(),
                y0 + ph
            );
        }
        let points: Vec<String> = connected
            .iter()
            .map(|(t, c)| {
                format!(
                    "{:.1},{:.1}",
                    x0 + pw * t / end,
                    y0 + ph - ph * f64::from(*c) / n
                )
            })
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#2ca02c" stroke-width="1.5"/>"##,
            points.join(" ")
        );
        axes(&mut s, x0, y0, pw, ph);
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{:.1}">0 s</text><text x="{:.1}" y="{:.1}" text-anchor="end">{end:.0} s</text><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            y0 + ph + 15.0,
            x0 + pw,
            y0 + ph + 15.0,
            x0 - 4.0,
            y0 + 10.0,
            self.clients
        );
        let legend = [
            ("cut", "#d62728"),
            ("stall", "#ff7f0e"),
            ("restart", "#9467bd"),
            ("refuse", "#8c564b"),
            ("latency", "#7f7f7f"),
        ];
        for (i, (name, colour)) in legend.iter().enumerate() {
            let x = x0 + 10.0 + i as f64 * 90.0;
            let _ = writeln!(
                s,
                r#"<line x1="{x}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3" stroke-dasharray="5 3"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
                y0 + ph + 30.0,
                x + 20.0,
                y0 + ph + 30.0,
                x + 24.0,
                y0 + ph + 34.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn axes(s: &mut String, x0: f64, y0: f64, w: f64, h: f64) {
    let _ = writeln!(
        s,
        r#"<polyline points="{x0},{y0} {x0},{:.1} {:.1},{:.1}" fill="none" stroke="black"/>"#,
        y0 + h,
        x0 + w,
        y0 + h
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            clients: 2,
            channels: 1,
            duration_s: 10.0,
            faults: [("cut".to_owned(), 2)].into_iter().collect(),
            totals: Totals {
                published: 0,
                acked: 0,
                failed: 0,
                delivered: 0,
                expected_deliveries: 0,
                lost: 0,
                lost_in_gaps: 0,
                duplicated: 0,
                duplicated_across_epochs: 0,
                reordered: 0,
                discontinuities: 0,
            },
            reconnects: 4,
            attempts: 6,
            uptime_ratio: 0.99,
            recovery_ms: Percentiles::of(&[100.0, 200.0]),
            detection_ms: Percentiles::default(),
            throughput_msgs_per_s: 0.0,
            cpu_percent: 1.0,
            rss_max_mib: 20.0,
            drained: true,
            fault_spec: "cut@5s".into(),
            seed: 1,
            store: "memory".into(),
            hub_nodes: 0,
            continuity_expected: true,
            hub_restart_failures: 0,
            tls: false,
        }
    }

    #[test]
    fn json_has_every_key_as_numbers() {
        let json = serde_json::to_value(report()).unwrap();
        for key in [
            "clients",
            "channels",
            "duration_s",
            "published",
            "acked",
            "delivered",
            "expected_deliveries",
            "lost",
            "lost_in_gaps",
            "duplicated",
            "duplicated_across_epochs",
            "reordered",
            "discontinuities",
            "reconnects",
            "attempts",
            "uptime_ratio",
            "throughput_msgs_per_s",
            "cpu_percent",
            "rss_max_mib",
        ] {
            assert!(json[key].is_number(), "{key}: {}", json[key]);
        }
        for key in ["recovery_ms", "detection_ms"] {
            for p in ["p50", "p95", "p99", "max"] {
                assert!(json[key][p].is_number(), "{key}.{p}");
            }
        }
        assert_eq!(json["faults"]["cut"], 2);
        assert_eq!(json["tls"], false);
    }

    #[test]
    fn the_header_says_when_the_run_was_over_tls() {
        let mut r = report();
        assert!(!r.text().contains("TLS"));
        r.tls = true;
        assert!(r.text().lines().next().unwrap().ends_with(", over TLS"));
    }

    #[test]
    fn verdict_follows_loss_duplicates_and_order() {
        let mut r = report();
        assert!(r.passed());
        r.totals.duplicated = 1;
        assert!(!r.passed());
        assert!(r.text().contains("FAIL"));
    }

    #[test]
    fn an_unfinished_run_fails() {
        let mut r = report();
        r.drained = false;
        assert!(!r.passed());
        assert!(r.text().contains("did not finish"));
        let mut r = report();
        r.totals.published = 5;
        r.totals.acked = 4;
        assert!(!r.passed(), "an unanswered publish");
        let mut r = report();
        r.hub_restart_failures = 1;
        assert!(!r.passed());
    }

    #[test]
    fn reported_gaps_fail_only_where_continuity_was_expected() {
        let mut r = report();
        r.totals.discontinuities = 1;
        r.totals.lost_in_gaps = 10;
        assert!(!r.passed(), "durable history must not have gaps");
        r.continuity_expected = false;
        assert!(
            r.passed(),
            "a process that lost its memory reports, never hides"
        );
        r.totals.lost = 1;
        assert!(!r.passed(), "silent loss fails whatever the store");
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let svg = report().svg(
            &[100.0, 250.0],
            &[(0.0, 0), (1.0, 2), (2.0, 1)],
            &[(std::time::Duration::from_secs(1), FaultKind::Cut)],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("polyline") && svg.contains("cut at 1.0 s"));
    }
}
