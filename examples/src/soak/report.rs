//! The soak report: the JSON document, the readable text, and the SVG picture.
//!
//! The SVG is written directly (two small charts): charting crates need a system font stack to
//! lay out text, which a fresh machine does not have.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::faults::FaultKind;
use super::latency::LatencyStep;
use super::ledger::Totals;
use super::metrics::HubMetrics;
use super::slo::Outcome;
use super::timeline::{FaultEvent, FaultRecovery, Percentiles};

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
    /// Outages (connection lost, then recovered).
    pub outages: u64,
    /// Connection lost → channels re-attached and replayed.
    pub recovery_ms: Percentiles,
    /// Outages whose fault ended, so that they have a path → recovered figure.
    pub outages_after_path: u64,
    /// Path available again (the fault ended) → channels re-attached and replayed: what the
    /// transport adds to the outage itself.
    pub recovery_after_path_ms: Percentiles,
    /// Recovery by the kind of fault active when the connection was lost.
    pub recovery_by_fault: BTreeMap<String, FaultRecovery>,
    /// Fault-caused losses that were detected.
    pub detections: u64,
    /// Fault injected → client noticed.
    pub detection_ms: Percentiles,
    /// Acks measured.
    pub ack_samples: u64,
    /// Publish call → ack received (at the publisher).
    pub ack_latency_ms: Percentiles,
    /// Deliveries measured.
    pub delivery_samples: u64,
    /// Publish call → delivery at a subscriber (one monotonic clock for every process).
    pub delivery_latency_ms: Percentiles,
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
    /// Client processes (0: the clients ran in the soak process).
    pub client_procs: u32,
    /// The deployment the run was aimed at (`--hub-url`), if any.
    pub hub_url: Option<String>,
    /// That hub's `tether_*` counters over the run (`--hub-url`).
    pub hub_metrics: Option<HubMetrics>,
    /// Each `--slo` objective and how the run fared.
    pub slo: Vec<Outcome>,
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

    /// Whether every `--slo` objective was met (true without any).
    pub fn slo_met(&self) -> bool {
        self.slo.iter().all(|o| o.met)
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
        let hubs = match (&self.hub_url, self.hub_nodes) {
            (Some(url), _) => format!("the hub at {url}"),
            (None, 0) => "1 embedded hub".to_owned(),
            (None, 1) => "1 hub process".to_owned(),
            (None, n) => format!("{n} hub processes"),
        };
        let procs = match self.client_procs {
            0 => String::new(),
            1 => " in 1 client process".to_owned(),
            n => format!(" in {n} client processes"),
        };
        let _ = writeln!(
            s,
            "Tether soak: {} clients{procs} on {} channels for {:.1} s (seed {}); {hubs}, {} store{}",
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
        let _ = writeln!(
            s,
            "  recovery      {} ({} outages)",
            p(&self.recovery_ms),
            self.outages
        );
        let _ = writeln!(
            s,
            "    after path  {} (fault ended → recovered)",
            p(&self.recovery_after_path_ms)
        );
        for (kind, r) in &self.recovery_by_fault {
            let _ = writeln!(
                s,
                "    {kind:<11} ×{:<5} lost → recovered {}",
                r.outages,
                p(&r.lost_to_recovered_ms)
            );
            if r.path_samples > 0 {
                let _ = writeln!(
                    s,
                    "    {:<18} path → recovered {}",
                    "",
                    p(&r.path_to_recovered_ms)
                );
            }
        }
        let _ = writeln!(s, "  detection     {}", p(&self.detection_ms));
        let _ = writeln!(
            s,
            "  ack latency   {} ({} acks)",
            p(&self.ack_latency_ms),
            self.ack_samples
        );
        let _ = writeln!(
            s,
            "  delivery      {} ({} deliveries)",
            p(&self.delivery_latency_ms),
            self.delivery_samples
        );
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
        if let Some(m) = &self.hub_metrics {
            match &m.error {
                Some(e) => {
                    let _ = writeln!(s, "  hub metrics   {} — not read: {e}", m.url);
                }
                None => {
                    let _ = writeln!(
                        s,
                        "  hub metrics   {} — tether_* counters over the run:",
                        m.url
                    );
                    for (series, delta) in m.counter_deltas.iter().filter(|(_, d)| **d != 0.0) {
                        let _ = writeln!(s, "    {series} +{delta}");
                    }
                }
            }
        }
        let _ = writeln!(s, "  verdict       {verdict}");
        if !self.slo.is_empty() {
            let missed = self.slo.iter().filter(|o| !o.met).count();
            let _ = writeln!(
                s,
                "  slo           {}",
                if missed == 0 {
                    "every objective met".to_owned()
                } else {
                    format!("{missed} of {} objectives MISSED", self.slo.len())
                }
            );
            for outcome in &self.slo {
                let _ = writeln!(s, "    {outcome}");
            }
        }
        s
    }

    /// The SVG: a recovery-time histogram; connected clients over time; publish → ack and
    /// publish → delivery latency over time. Every injected fault is marked on both time
    /// charts (a dashed line and a labelled flag drawn over the data, `data-fault` naming its
    /// kind), with a legend of every fault kind.
    pub fn svg(
        &self,
        recovery_ms: &[f64],
        connected: &[(f64, u32)],
        faults: &[FaultEvent],
        ack: &[LatencyStep],
        delivery: &[LatencyStep],
    ) -> String {
        const W: f64 = 900.0;
        const H: f64 = 300.0;
        const M: f64 = 70.0;
        let (pw, ph) = (W - 2.0 * M, H - 110.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" font-family="sans-serif" font-size="12">"#,
            3.0 * H + 20.0
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);

        // Histogram of recovery times, with value ticks on both axes.
        let (x0, y0) = (M, 40.0);
        let _ = writeln!(
            s,
            r#"<text x="{M}" y="20" font-size="14">Recovery time (connection lost → channels re-attached), {} outages</text>"#,
            recovery_ms.len()
        );
        let max = nice_ceiling(recovery_ms.iter().copied().fold(0.0, f64::max).max(1.0));
        let bins = 30usize;
        let mut counts = vec![0u32; bins];
        for v in recovery_ms {
            counts[((v / max * bins as f64) as usize).min(bins - 1)] += 1;
        }
        let top = nice_ceiling(f64::from(counts.iter().copied().max().unwrap_or(0).max(1)));
        let bw = pw / bins as f64;
        for (i, c) in counts.iter().enumerate() {
            let h = ph * f64::from(*c) / top;
            let _ = writeln!(
                s,
                r##"<rect class="bin" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4a7ebb"><title>{:.0}–{:.0} ms: {c}</title></rect>"##,
                x0 + i as f64 * bw + 1.0,
                y0 + ph - h,
                bw - 2.0,
                h,
                max * i as f64 / bins as f64,
                max * (i + 1) as f64 / bins as f64,
            );
        }
        let chart = Chart {
            x0,
            y0,
            w: pw,
            h: ph,
        };
        chart.axes(&mut s, "recovery time (ms)", "outages");
        chart.x_ticks(&mut s, max, "");
        chart.y_ticks(&mut s, top, "");

        // Connected clients over time.
        let end = connected
            .last()
            .map_or(1.0, |c| c.0)
            .max(ack.last().map_or(0.0, |a| a.at_s))
            .max(1.0);
        let chart = Chart {
            x0,
            y0: H + 40.0,
            w: pw,
            h: ph,
        };
        let _ = writeln!(
            s,
            r#"<text x="{M}" y="{:.1}" font-size="14">Connected clients over time (of {}); faults marked</text>"#,
            chart.y0 - 20.0,
            self.clients
        );
        let n = f64::from(self.clients.max(1));
        let points: Vec<String> = connected
            .iter()
            .map(|(t, c)| chart.point(t / end, f64::from(*c) / n))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline class="connected" points="{}" fill="none" stroke="#2ca02c" stroke-width="1.5"/>"##,
            points.join(" ")
        );
        chart.axes(&mut s, "time (s)", "clients connected");
        chart.x_ticks(&mut s, end, "");
        chart.y_ticks(&mut s, n, "");
        chart.fault_markers(&mut s, faults, end);
        legend(&mut s, x0, chart.y0 + ph + 55.0);

        // Latency over time: p50 and p99 per second, ack and delivery.
        let chart = Chart {
            x0,
            y0: 2.0 * H + 40.0,
            w: pw,
            h: ph,
        };
        let _ = writeln!(
            s,
            r#"<text x="{M}" y="{:.1}" font-size="14">Latency over time (p50, p99 per second); faults marked</text>"#,
            chart.y0 - 20.0
        );
        let top = nice_ceiling(
            ack.iter()
                .chain(delivery)
                .map(|l| l.p99_ms)
                .fold(1.0, f64::max),
        );
        let series: [(&str, &[LatencyStep], bool, &str); 4] = [
            ("ack p50", ack, false, "#1f77b4"),
            ("ack p99", ack, true, "#aec7e8"),
            ("delivery p50", delivery, false, "#2ca02c"),
            ("delivery p99", delivery, true, "#98df8a"),
        ];
        for (i, (name, steps, p99, colour)) in series.iter().enumerate() {
            let points: Vec<String> = steps
                .iter()
                .map(|l| {
                    let v = if *p99 { l.p99_ms } else { l.p50_ms };
                    chart.point(l.at_s / end, v / top)
                })
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline class="latency" data-series="{name}" points="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
                points.join(" ")
            );
            let x = x0 + i as f64 * 120.0;
            let y = chart.y0 + ph + 55.0;
            let _ = writeln!(
                s,
                r#"<line x1="{x}" y1="{y}" x2="{:.1}" y2="{y}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
                x + 20.0,
                x + 24.0,
                y + 4.0
            );
        }
        chart.axes(&mut s, "time (s)", "latency (ms)");
        chart.x_ticks(&mut s, end, "");
        chart.y_ticks(&mut s, top, "");
        chart.fault_markers(&mut s, faults, end);
        s.push_str("</svg>\n");
        s
    }
}

/// Every fault kind with its colour, in the legend's order.
pub const FAULT_COLOURS: [(&str, &str); 6] = [
    ("cut", "#d62728"),
    ("stall", "#ff7f0e"),
    ("restart", "#9467bd"),
    ("kill-node", "#17becf"),
    ("refuse", "#8c564b"),
    ("latency", "#e377c2"),
];

fn colour_of(kind: FaultKind) -> &'static str {
    FAULT_COLOURS
        .iter()
        .find(|(name, _)| *name == kind.name())
        .map_or("#000000", |(_, c)| c)
}

fn legend(s: &mut String, x0: f64, y: f64) {
    let _ = writeln!(s, r#"<g class="legend">"#);
    for (i, (name, colour)) in FAULT_COLOURS.iter().enumerate() {
        let x = x0 + i as f64 * 110.0;
        let _ = writeln!(
            s,
            r#"<g data-legend="{name}"><line x1="{x}" y1="{y}" x2="{:.1}" y2="{y}" stroke="{colour}" stroke-width="3" stroke-dasharray="5 3"/><text x="{:.1}" y="{:.1}">{name}</text></g>"#,
            x + 20.0,
            x + 24.0,
            y + 4.0
        );
    }
    let _ = writeln!(s, "</g>");
}

/// The smallest 1, 2 or 5 × 10ⁿ at or above `v` (axis maxima that read well).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|c| *c >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// A plot area: left, top, width, height in pixels.
struct Chart {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
}

impl Chart {
    /// The pixel position of (x, y), both as fractions of the axes.
    fn point(&self, x: f64, y: f64) -> String {
        format!(
            "{:.1},{:.1}",
            self.x0 + self.w * x.clamp(0.0, 1.0),
            self.y0 + self.h - self.h * y.clamp(0.0, 1.0)
        )
    }

    fn axes(&self, s: &mut String, x_label: &str, y_label: &str) {
        axes(s, self.x0, self.y0, self.w, self.h);
        let _ = writeln!(
            s,
            r#"<text class="axis-label" x="{:.1}" y="{:.1}" text-anchor="middle">{x_label}</text>"#,
            self.x0 + self.w / 2.0,
            self.y0 + self.h + 32.0
        );
        let (x, y) = (self.x0 - 45.0, self.y0 + self.h / 2.0);
        let _ = writeln!(
            s,
            r#"<text class="axis-label" x="{x:.1}" y="{y:.1}" text-anchor="middle" transform="rotate(-90 {x:.1} {y:.1})">{y_label}</text>"#
        );
    }

    /// Five ticks from 0 to `max` along x, labelled with their values.
    fn x_ticks(&self, s: &mut String, max: f64, unit: &str) {
        for i in 0..=5 {
            let v = max * f64::from(i) / 5.0;
            let x = self.x0 + self.w * f64::from(i) / 5.0;
            let y = self.y0 + self.h;
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{y:.1}" x2="{x:.1}" y2="{:.1}" stroke="black"/><text class="tick" x="{x:.1}" y="{:.1}" text-anchor="middle">{}{unit}</text>"#,
                y + 4.0,
                y + 16.0,
                tick(v)
            );
        }
    }

    /// Five ticks from 0 to `max` along y, labelled with their values, with light grid lines.
    fn y_ticks(&self, s: &mut String, max: f64, unit: &str) {
        for i in 0..=5 {
            let v = max * f64::from(i) / 5.0;
            let y = self.y0 + self.h - self.h * f64::from(i) / 5.0;
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#dddddd"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}{unit}</text>"##,
                self.x0,
                self.x0 + self.w,
                self.x0 - 6.0,
                y + 4.0,
                tick(v)
            );
        }
    }

    /// One marker per fault, drawn over the data so that none is hidden behind it.
    fn fault_markers(&self, s: &mut String, faults: &[FaultEvent], end: f64) {
        for f in faults {
            let x = self.x0 + self.w * (f.at.as_secs_f64() / end).clamp(0.0, 1.0);
            let colour = colour_of(f.kind);
            let until = f
                .path_back
                .map(|b| format!(", path back at {:.1} s", b.as_secs_f64()))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                r#"<g class="fault" data-fault="{}"><title>{} at {:.1} s{until}</title><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2" stroke-opacity="0.9" stroke-dasharray="5 3"/><path d="M{x:.1},{:.1} l-5,-8 h10 z" fill="{colour}"/></g>"#,
                f.kind.name(),
                f.kind.name(),
                f.at.as_secs_f64(),
                self.y0,
                self.y0 + self.h,
                self.y0,
            );
        }
    }
}

fn tick(v: f64) -> String {
    if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
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
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    pub(crate) fn report() -> Report {
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
            outages: 2,
            recovery_ms: Percentiles::of(&[100.0, 200.0]),
            outages_after_path: 2,
            recovery_after_path_ms: Percentiles::of(&[90.0, 180.0]),
            recovery_by_fault: [(
                "cut".to_owned(),
                FaultRecovery {
                    outages: 2,
                    lost_to_recovered_ms: Percentiles::of(&[100.0, 200.0]),
                    path_to_recovered_ms: Percentiles::of(&[90.0, 180.0]),
                    path_samples: 2,
                },
            )]
            .into_iter()
            .collect(),
            detections: 0,
            detection_ms: Percentiles::default(),
            ack_samples: 0,
            ack_latency_ms: Percentiles::default(),
            delivery_samples: 0,
            delivery_latency_ms: Percentiles::default(),
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
            client_procs: 0,
            hub_url: None,
            hub_metrics: None,
            slo: Vec::new(),
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
        for key in [
            "recovery_ms",
            "recovery_after_path_ms",
            "detection_ms",
            "ack_latency_ms",
            "delivery_latency_ms",
        ] {
            for p in ["p50", "p95", "p99", "max"] {
                assert!(json[key][p].is_number(), "{key}.{p}");
            }
        }
        assert_eq!(json["faults"]["cut"], 2);
        for figure in ["lost_to_recovered_ms", "path_to_recovered_ms"] {
            assert!(json["recovery_by_fault"]["cut"][figure]["p99"].is_number());
        }
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
    fn the_text_breaks_recovery_down_and_names_missed_objectives() {
        let mut r = report();
        let text = r.text();
        assert!(
            text.contains("    cut         ×2     lost → recovered p50 100 ms"),
            "{text}"
        );
        assert!(text.contains("path → recovered p50 90 ms"), "{text}");
        assert!(text.contains("ack latency"));
        assert!(!text.contains("slo"));
        r.slo = crate::soak::slo::evaluate(
            &crate::soak::slo::parse_slo("recovery_p99=150ms,uptime=0.9").unwrap(),
            &r,
        );
        assert!(!r.slo_met());
        let text = r.text();
        assert!(text.contains("1 of 2 objectives MISSED"), "{text}");
        assert!(
            text.contains("MISSED recovery_p99=150ms: measured 200 ms"),
            "{text}"
        );
    }

    fn every_fault() -> Vec<FaultEvent> {
        let kinds = [
            FaultKind::Cut,
            FaultKind::Latency(Duration::from_millis(100)),
            FaultKind::Refuse(Duration::from_secs(1)),
            FaultKind::Stall,
            FaultKind::Restart,
            FaultKind::KillNode,
            FaultKind::Drop,
        ];
        kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| FaultEvent {
                at: Duration::from_secs(2 * i as u64 + 1),
                kind: *kind,
                path_back: Some(Duration::from_secs(2 * i as u64 + 2)),
            })
            .collect()
    }

    #[test]
    fn svg_marks_every_fault_kind_with_a_legend_and_readable_axes() {
        let step = |at_s: f64, p50_ms: f64, p99_ms: f64| LatencyStep {
            at_s,
            p50_ms,
            p99_ms,
        };
        let svg = report().svg(
            &[100.0, 250.0, 3600.0],
            &[(0.0, 0), (1.0, 2), (2.0, 1), (12.0, 2)],
            &every_fault(),
            &[step(0.0, 2.0, 9.0), step(1.0, 3.0, 40.0)],
            &[step(0.0, 4.0, 12.0), step(1.0, 5.0, 80.0)],
        );
        let doc = roxmltree::Document::parse(&svg).expect("the SVG is well-formed XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        let attr = |n: &roxmltree::Node, a: &str| n.attribute(a).unwrap_or_default().to_owned();
        let marked: Vec<String> = root
            .descendants()
            .filter(|n| n.attribute("class") == Some("fault"))
            .map(|n| attr(&n, "data-fault"))
            .collect();
        for (kind, _) in FAULT_COLOURS {
            // On both time charts, each with its line.
            assert_eq!(
                marked.iter().filter(|k| *k == kind).count(),
                2,
                "{kind}: {marked:?}"
            );
            assert!(
                root.descendants()
                    .any(|n| n.attribute("data-legend") == Some(kind)
                        && n.descendants().any(|t| t.text() == Some(kind))),
                "no legend entry for {kind}"
            );
        }
        // Faults are drawn after (over) the data they mark.
        let order: Vec<String> = root
            .descendants()
            .filter_map(|n| n.attribute("class").map(str::to_owned))
            .collect();
        let first_fault = order.iter().position(|c| c == "fault").unwrap();
        let connected = order.iter().position(|c| c == "connected").unwrap();
        assert!(connected < first_fault);
        let texts = |class: &str| -> Vec<String> {
            root.descendants()
                .filter(|n| n.attribute("class") == Some(class))
                .filter_map(|n| n.text().map(str::to_owned))
                .collect()
        };
        let labels = texts("axis-label");
        for label in ["recovery time (ms)", "outages", "time (s)", "latency (ms)"] {
            assert!(labels.iter().any(|l| l == label), "{label}: {labels:?}");
        }
        // The histogram's x axis reads 0 to 5000 ms (the 3.6 s outage rounded up) in steps.
        let ticks = texts("tick");
        for value in ["0", "1000", "2000", "5000"] {
            assert!(ticks.iter().any(|t| t == value), "{value}: {ticks:?}");
        }
        let latency_series = root
            .descendants()
            .filter(|n| n.attribute("class") == Some("latency"))
            .count();
        assert_eq!(latency_series, 4);
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_ceiling(3600.0), 5000.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(11.0), 20.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }
}
