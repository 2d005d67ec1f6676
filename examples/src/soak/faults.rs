//! Fault schedules: `--faults cut@5s,stall@17s,restart@31s,refuse:2s@23s,latency:100ms@11s,drop@7s`.

use std::fmt;
use std::time::Duration;

/// One kind of fault the soak tool injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// Close every connection (TCP reset) through the proxy.
    Cut,
    /// Stop forwarding on every connection without closing it (half-open).
    Stall,
    /// Stop the hub server and start it again on the same port (with hub processes: a graceful
    /// stop, one node at a time).
    Restart,
    /// SIGKILL one hub process (round robin) and start it again after `--restart-down`.
    KillNode,
    /// Refuse new connections for a while (existing ones are cut so that clients must
    /// reconnect into the refusal).
    Refuse(Duration),
    /// Add one-way latency on every connection for a while.
    Latency(Duration),
    /// Drop about a tenth of the clients (at least one) through the hub's session admin API
    /// (`POST /sessions/{client_id}/disconnect?mode=reset`): the hook that also works against a
    /// real deployment (`--hub-url` with `--admin-token`).
    Drop,
}

impl FaultKind {
    /// The kind's name, as written in a spec and as a report key.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Cut => "cut",
            FaultKind::Stall => "stall",
            FaultKind::Restart => "restart",
            FaultKind::KillNode => "kill-node",
            FaultKind::Refuse(_) => "refuse",
            FaultKind::Latency(_) => "latency",
            FaultKind::Drop => "drop",
        }
    }

    /// Whether the fault takes connections down (so clients must notice it).
    pub fn disconnects(&self) -> bool {
        !matches!(self, FaultKind::Latency(_))
    }
}

/// A fault and how often it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultSpec {
    /// What to inject.
    pub kind: FaultKind,
    /// Every how long (first time after one period).
    pub every: Duration,
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FaultKind::Refuse(d) | FaultKind::Latency(d) => {
                write!(
                    f,
                    "{}:{}ms@{}ms",
                    self.kind.name(),
                    d.as_millis(),
                    self.every.as_millis()
                )
            }
            _ => write!(f, "{}@{}ms", self.kind.name(), self.every.as_millis()),
        }
    }
}

/// Parses `300ms`, `5s`, `1.5s`, `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))
        .ok_or_else(|| format!("{text:?}: missing unit (ms, s, m)"))?;
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: not a number"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{text:?}: must be a non-negative number"));
    }
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a comma list of `KIND@EVERY`, where KIND is `cut`, `stall`, `restart`, `kill-node`,
/// `refuse:DURATION` or `latency:DURATION`. An empty string means no faults.
pub fn parse_faults(spec: &str) -> Result<Vec<FaultSpec>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (kind, every) = item
                .split_once('@')
                .ok_or_else(|| format!("{item:?}: expected KIND@EVERY"))?;
            let every = parse_duration(every)?;
            if every < Duration::from_millis(100) {
                return Err(format!("{item:?}: faults can fire at most every 100 ms"));
            }
            let (name, arg) = match kind.split_once(':') {
                Some((name, arg)) => (name, Some(parse_duration(arg)?)),
                None => (kind, None),
            };
            let kind = match (name, arg) {
                ("cut", None) => FaultKind::Cut,
                ("stall", None) => FaultKind::Stall,
                ("restart", None) => FaultKind::Restart,
                ("kill-node", None) => FaultKind::KillNode,
                ("drop", None) => FaultKind::Drop,
                ("refuse", Some(d)) => FaultKind::Refuse(d),
                ("latency", Some(d)) => FaultKind::Latency(d),
                ("refuse" | "latency", None) => {
                    return Err(format!(
                        "{item:?}: {name} needs a duration, e.g. {name}:2s@10s"
                    ))
                }
                _ => {
                    return Err(format!(
                    "{item:?}: unknown fault (cut, stall, restart, kill-node, drop, refuse:D, latency:D)"
                ))
                }
            };
            Ok(FaultSpec { kind, every })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let specs = parse_faults(
            "cut@5s, stall@17s,restart@31s,refuse:2s@23s,latency:100ms@1.5s,kill-node@9s,drop@4s",
        )
        .unwrap();
        assert_eq!(
            specs,
            vec![
                FaultSpec {
                    kind: FaultKind::Cut,
                    every: Duration::from_secs(5)
                },
                FaultSpec {
                    kind: FaultKind::Stall,
                    every: Duration::from_secs(17)
                },
                FaultSpec {
                    kind: FaultKind::Restart,
                    every: Duration::from_secs(31)
                },
                FaultSpec {
                    kind: FaultKind::Refuse(Duration::from_secs(2)),
                    every: Duration::from_secs(23)
                },
                FaultSpec {
                    kind: FaultKind::Latency(Duration::from_millis(100)),
                    every: Duration::from_millis(1500)
                },
                FaultSpec {
                    kind: FaultKind::KillNode,
                    every: Duration::from_secs(9)
                },
                FaultSpec {
                    kind: FaultKind::Drop,
                    every: Duration::from_secs(4)
                },
            ]
        );
        assert_eq!(parse_faults("").unwrap(), vec![]);
    }

    #[test]
    fn refuses_bad_specs_with_a_reason() {
        for bad in [
            "cut",
            "cut@",
            "cut@5",
            "cut@5h",
            "boom@5s",
            "refuse@5s",
            "cut@10ms",
            "latency:x@5s",
        ] {
            assert!(parse_faults(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("-1s").is_err());
    }
}
