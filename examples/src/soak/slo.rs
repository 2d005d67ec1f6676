//! Service-level objectives a run must meet: `--slo uptime=0.99,recovery_p99=2s,ack_p99=500ms`.
//!
//! Each objective is `NAME=TARGET`. Names:
//!
//! * `uptime` — at least this share of client-time connected: `0.99` or `99%`;
//! * `throughput` — at least this many deliveries per second;
//! * `recovery_STAT` — connection lost → recovered, at most this long;
//! * `recovery_after_path_STAT` — path available again → recovered (what the transport adds);
//! * `ack_STAT`, `delivery_STAT` — publish → ack, publish → delivery;
//! * `detection_STAT` — fault injected → client noticed;
//!
//! where STAT is `p50`, `p95`, `p99` or `max`, and durations have a unit (`ms`, `s`, `m`). The
//! two recovery names may be narrowed to one fault kind: `cut.recovery_p99=500ms`,
//! `refuse.recovery_after_path_p99=1s`. A duration objective with no samples (no outage of
//! that kind in the run) is met: nothing took longer than allowed.

use std::fmt;

use serde::Serialize;

use super::faults::parse_duration;
use super::report::Report;
use super::timeline::{Percentiles, UNATTRIBUTED};

/// Which percentile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// Median.
    P50,
    /// 95th percentile.
    P95,
    /// 99th percentile.
    P99,
    /// Largest.
    Max,
}

impl Stat {
    fn of(self, p: &Percentiles) -> f64 {
        match self {
            Stat::P50 => p.p50,
            Stat::P95 => p.p95,
            Stat::P99 => p.p99,
            Stat::Max => p.max,
        }
    }
}

/// What an objective measures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measure {
    /// Share of client-time connected (a floor).
    Uptime,
    /// Deliveries per second (a floor).
    Throughput,
    /// Connection lost → recovered, overall or for one fault kind (a ceiling).
    Recovery(Stat, Option<String>),
    /// Path available again → recovered, overall or for one fault kind (a ceiling).
    RecoveryAfterPath(Stat, Option<String>),
    /// Publish → ack (a ceiling).
    Ack(Stat),
    /// Publish → delivery (a ceiling).
    Delivery(Stat),
    /// Fault injected → client noticed (a ceiling).
    Detection(Stat),
}

/// One objective: a measure and its target (a ratio, deliveries/s or milliseconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// The objective as written (`recovery_p99=2s`).
    pub text: String,
    /// What it measures.
    pub measure: Measure,
    /// The floor (uptime, throughput) or ceiling (milliseconds).
    pub target: f64,
}

/// How one objective fared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// The objective as written.
    pub objective: String,
    /// The target, as a number (ratio, deliveries/s, or milliseconds).
    pub target: f64,
    /// What the run measured (`None`: no samples).
    pub measured: Option<f64>,
    /// The unit of `target` and `measured`: `ratio`, `deliveries/s` or `ms`.
    pub unit: &'static str,
    /// Whether it was met.
    pub met: bool,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.met { "met   " } else { "MISSED" };
        match self.measured {
            Some(m) if self.unit == "ratio" => {
                write!(f, "{verdict} {}: measured {m:.4}", self.objective)
            }
            Some(m) => write!(
                f,
                "{verdict} {}: measured {m:.0} {}",
                self.objective, self.unit
            ),
            None => write!(f, "{verdict} {}: no samples", self.objective),
        }
    }
}

const KINDS: [&str; 7] = [
    "cut",
    "stall",
    "restart",
    "kill-node",
    "refuse",
    "latency",
    UNATTRIBUTED,
];

/// Parses a comma list of `NAME=TARGET` (see the module documentation). Empty: no objective.
pub fn parse_slo(spec: &str) -> Result<Vec<Objective>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_one)
        .collect()
}

fn parse_one(item: &str) -> Result<Objective, String> {
    let (name, target) = item
        .split_once('=')
        .ok_or_else(|| format!("--slo {item:?}: expected NAME=TARGET, e.g. recovery_p99=2s"))?;
    let (name, target) = (name.trim(), target.trim());
    let (kind, base) = match name.split_once('.') {
        Some((kind, base)) => {
            if !KINDS.contains(&kind) {
                return Err(format!(
                    "--slo {item:?}: unknown fault kind {kind:?} (one of {})",
                    KINDS.join(", ")
                ));
            }
            (Some(kind.to_owned()), base)
        }
        None => (None, name),
    };
    let duration_ms = |target: &str| -> Result<f64, String> {
        parse_duration(target)
            .map(|d| d.as_secs_f64() * 1000.0)
            .map_err(|e| format!("--slo {item:?}: {e}"))
    };
    let stat_of = |suffix: &str| match suffix {
        "p50" => Some(Stat::P50),
        "p95" => Some(Stat::P95),
        "p99" => Some(Stat::P99),
        "max" => Some(Stat::Max),
        _ => None,
    };
    let (measure, target) = match base {
        "uptime" => {
            let ratio = match target.strip_suffix('%') {
                Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
                None => target.parse::<f64>(),
            }
            .map_err(|_| {
                format!("--slo {item:?}: uptime is a ratio (0.99) or a percentage (99%)")
            })?;
            if !(0.0..=1.0).contains(&ratio) {
                return Err(format!(
                    "--slo {item:?}: uptime must be between 0 and 1 (0 % and 100 %)"
                ));
            }
            (Measure::Uptime, ratio)
        }
        "throughput" => {
            let rate: f64 = target
                .parse()
                .ok()
                .filter(|r: &f64| r.is_finite() && *r >= 0.0)
                .ok_or_else(|| format!("--slo {item:?}: throughput is deliveries per second, a non-negative number"))?;
            (Measure::Throughput, rate)
        }
        other => {
            let (family, stat) = other
                .rsplit_once('_')
                .and_then(|(family, suffix)| Some((family, stat_of(suffix)?)))
                .ok_or_else(|| unknown(item))?;
            let measure = match family {
                "recovery" => Measure::Recovery(stat, kind.clone()),
                "recovery_after_path" => Measure::RecoveryAfterPath(stat, kind.clone()),
                "ack" => Measure::Ack(stat),
                "delivery" => Measure::Delivery(stat),
                "detection" => Measure::Detection(stat),
                _ => return Err(unknown(item)),
            };
            (measure, duration_ms(target)?)
        }
    };
    if kind.is_some()
        && !matches!(
            measure,
            Measure::Recovery(..) | Measure::RecoveryAfterPath(..)
        )
    {
        return Err(format!(
            "--slo {item:?}: only recovery_* and recovery_after_path_* can be narrowed to a fault kind"
        ));
    }
    Ok(Objective {
        text: item.to_owned(),
        measure,
        target,
    })
}

fn unknown(item: &str) -> String {
    format!(
        "--slo {item:?}: unknown objective (uptime, throughput, recovery_STAT, \
         recovery_after_path_STAT, ack_STAT, delivery_STAT, detection_STAT; STAT one of p50, \
         p95, p99, max)"
    )
}

/// How the run fared against each objective.
pub fn evaluate(objectives: &[Objective], report: &Report) -> Vec<Outcome> {
    objectives
        .iter()
        .map(|o| {
            let samples = |p: &Percentiles, n: u64| (n > 0).then_some(*p);
            let (measured, floor) = match &o.measure {
                Measure::Uptime => (Some(report.uptime_ratio), true),
                Measure::Throughput => (Some(report.throughput_msgs_per_s), true),
                Measure::Recovery(stat, kind) => {
                    let p = match kind {
                        None => samples(&report.recovery_ms, report.outages),
                        Some(k) => report
                            .recovery_by_fault
                            .get(k)
                            .and_then(|r| samples(&r.lost_to_recovered_ms, r.outages)),
                    };
                    (p.map(|p| stat.of(&p)), false)
                }
                Measure::RecoveryAfterPath(stat, kind) => {
                    let p = match kind {
                        None => samples(&report.recovery_after_path_ms, report.outages_after_path),
                        Some(k) => report
                            .recovery_by_fault
                            .get(k)
                            .and_then(|r| samples(&r.path_to_recovered_ms, r.path_samples)),
                    };
                    (p.map(|p| stat.of(&p)), false)
                }
                Measure::Ack(stat) => (
                    samples(&report.ack_latency_ms, report.ack_samples).map(|p| stat.of(&p)),
                    false,
                ),
                Measure::Delivery(stat) => (
                    samples(&report.delivery_latency_ms, report.delivery_samples)
                        .map(|p| stat.of(&p)),
                    false,
                ),
                Measure::Detection(stat) => (
                    samples(&report.detection_ms, report.detections).map(|p| stat.of(&p)),
                    false,
                ),
            };
            let unit = match o.measure {
                Measure::Uptime => "ratio",
                Measure::Throughput => "deliveries/s",
                _ => "ms",
            };
            let met = match measured {
                Some(m) if floor => m >= o.target,
                Some(m) => m <= o.target,
                None => !floor,
            };
            Outcome {
                objective: o.text.clone(),
                target: o.target,
                measured,
                unit,
                met,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_objective() {
        let slo = parse_slo(
            "uptime=0.99, throughput=100,recovery_p99=2s,ack_p50=20ms,delivery_max=1.5s,\
             detection_p95=3s,cut.recovery_p99=500ms,refuse.recovery_after_path_max=1s,\
             uptime=99.5%",
        )
        .unwrap();
        let measures: Vec<(Measure, f64)> =
            slo.iter().map(|o| (o.measure.clone(), o.target)).collect();
        assert_eq!(
            measures,
            vec![
                (Measure::Uptime, 0.99),
                (Measure::Throughput, 100.0),
                (Measure::Recovery(Stat::P99, None), 2000.0),
                (Measure::Ack(Stat::P50), 20.0),
                (Measure::Delivery(Stat::Max), 1500.0),
                (Measure::Detection(Stat::P95), 3000.0),
                (Measure::Recovery(Stat::P99, Some("cut".into())), 500.0),
                (
                    Measure::RecoveryAfterPath(Stat::Max, Some("refuse".into())),
                    1000.0
                ),
                (Measure::Uptime, 0.995),
            ]
        );
        assert_eq!(slo[2].text, "recovery_p99=2s");
        assert!(parse_slo("").unwrap().is_empty());
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (bad, says) in [
            ("recovery_p99", "expected NAME=TARGET"),
            ("recovery_p99=2", "missing unit"),
            ("recovery_p98=2s", "unknown objective"),
            ("latency_p99=2s", "unknown objective"),
            ("uptime=1.5", "between 0 and 1"),
            ("uptime=high", "ratio"),
            ("throughput=-3", "non-negative"),
            ("boom.recovery_p99=1s", "unknown fault kind \"boom\""),
            ("cut.ack_p99=1s", "only recovery_"),
            ("ack_p99=fast", "not a number"),
        ] {
            let error = parse_slo(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
            assert!(
                error.contains(bad.split('=').next().unwrap()),
                "{bad}: {error}"
            );
        }
    }

    fn report() -> Report {
        let mut r = crate::soak::report::tests::report();
        r.uptime_ratio = 0.98;
        r.throughput_msgs_per_s = 150.0;
        r.outages = 3;
        r.recovery_ms = Percentiles {
            p50: 200.0,
            p95: 900.0,
            p99: 1200.0,
            max: 1500.0,
        };
        r.ack_samples = 10;
        r.ack_latency_ms = Percentiles {
            p50: 3.0,
            p95: 8.0,
            p99: 40.0,
            max: 90.0,
        };
        r
    }

    #[test]
    fn evaluation_names_what_was_missed() {
        let slo = parse_slo("uptime=0.99,recovery_p99=2s,ack_p99=10ms,throughput=100").unwrap();
        let outcomes = evaluate(&slo, &report());
        let missed: Vec<&str> = outcomes
            .iter()
            .filter(|o| !o.met)
            .map(|o| o.objective.as_str())
            .collect();
        assert_eq!(missed, ["uptime=0.99", "ack_p99=10ms"]);
        assert_eq!(outcomes[1].measured, Some(1200.0));
        assert_eq!(
            outcomes[2].to_string(),
            "MISSED ack_p99=10ms: measured 40 ms"
        );
    }

    #[test]
    fn a_kind_without_outages_has_no_samples_and_is_met() {
        let slo = parse_slo("stall.recovery_p99=1ms,delivery_p99=1ms").unwrap();
        let outcomes = evaluate(&slo, &report());
        assert!(
            outcomes.iter().all(|o| o.met && o.measured.is_none()),
            "{outcomes:?}"
        );
        assert!(outcomes[0].to_string().ends_with("no samples"));
    }
}
