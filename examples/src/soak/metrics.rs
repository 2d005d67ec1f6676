//! A hub's Prometheus `/metrics`, read at the start and the end of a run (`--hub-url`): the
//! report carries how much each `tether_*` counter grew meanwhile.

use std::collections::BTreeMap;

use serde::Serialize;

/// The `tether_*` counters of one scrape: series (`name{labels}` as written) → value.
pub type Counters = BTreeMap<String, f64>;

/// The `tether_*` counters in a Prometheus text exposition (families typed `counter`).
/// Malformed lines are skipped: a scrape is evidence, not a contract.
pub fn parse_counters(text: &str) -> Counters {
    let mut counter_families = std::collections::HashSet::new();
    let mut out = Counters::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some("counter")) = (parts.next(), parts.next()) {
                counter_families.insert(name.to_owned());
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') || !line.starts_with("tether_") {
            continue;
        }
        // `name{labels} value [timestamp]`; label values may hold spaces, so split after '}'.
        let (series, rest) = match line.find('}') {
            Some(end) => (&line[..=end], &line[end + 1..]),
            None => match line.split_once(char::is_whitespace) {
                Some((name, rest)) => (name, rest),
                None => continue,
            },
        };
        let family = series.split('{').next().unwrap_or(series);
        if !counter_families.contains(family) {
            continue;
        }
        if let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            out.insert(series.to_owned(), value);
        }
    }
    out
}

/// How much each counter of `end` grew since `start` (a series new at the end counts from 0;
/// a counter that went down — the hub restarted — counts from 0 too).
pub fn deltas(start: &Counters, end: &Counters) -> Counters {
    end.iter()
        .map(|(series, value)| {
            let before = start.get(series).copied().unwrap_or(0.0);
            let delta = if *value >= before {
                value - before
            } else {
                *value
            };
            (series.clone(), delta)
        })
        .collect()
}

/// What the report says about the hub's metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HubMetrics {
    /// Where they were read.
    pub url: String,
    /// `tether_*` counter growth over the run, per series.
    pub counter_deltas: Counters,
    /// Why a scrape failed, if one did (the run goes on without the figures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `http(s)://host[:port]/metrics` for a hub at `ws(s)://host[:port]/…`.
pub fn metrics_url(hub_url: &str) -> Result<String, String> {
    Ok(format!("{}/metrics", http_base(hub_url)?))
}

/// The hub's HTTP side of a hub URL: `ws://h:p/ws` → `http://h:p`, `wss://…` → `https://…`.
pub fn http_base(hub_url: &str) -> Result<String, String> {
    let (scheme, rest) = if let Some(rest) = hub_url.strip_prefix("wss://") {
        ("https", rest)
    } else if let Some(rest) = hub_url.strip_prefix("ws://") {
        ("http", rest)
    } else {
        return Err(format!(
            "{hub_url:?}: a hub URL starts with ws:// or wss://"
        ));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("{hub_url:?}: no host"));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// An HTTP/1.1 client for the hub's HTTP side, trusting what `tls` trusts.
pub fn http_client(tls: Option<std::sync::Arc<rustls::ClientConfig>>) -> awc::Client {
    let mut connector = awc::Connector::new().timeout(std::time::Duration::from_secs(10));
    if let Some(config) = tls {
        let mut config = (*config).clone();
        // A plain HTTP/1.1 request.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        connector = connector.rustls_0_23(std::sync::Arc::new(config));
    }
    awc::Client::builder()
        .connector(connector)
        .timeout(std::time::Duration::from_secs(10))
        .finish()
}

/// Drops the connections of `client_id` through the admin API at `base` (a TCP reset).
pub async fn admin_drop(
    client: &awc::Client,
    base: &str,
    token: &str,
    client_id: &str,
) -> Result<(), String> {
    let url = format!("{base}/sessions/{client_id}/disconnect?mode=reset");
    let response = client
        .post(&url)
        .insert_header(("Authorization", format!("Bearer {token}")))
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    match response.status().as_u16() {
        // 404: not connected at that moment (already reconnecting): nothing to drop.
        200 | 404 => Ok(()),
        status => Err(format!("POST {url}: {status}")),
    }
}

/// Reads `url` (`http://` or `https://`, trusting what `tls` trusts) and parses its counters.
pub async fn scrape(
    url: &str,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> Result<Counters, String> {
    let client = http_client(tls);
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: {}", response.status()));
    }
    let body = response
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    Ok(parse_counters(&String::from_utf8_lossy(&body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# HELP tether_hub_connections_total Connections accepted.\n\
        # TYPE tether_hub_connections_total counter\n\
        tether_hub_connections_total 12\n\
        # TYPE tether_hub_frames_total counter\n\
        tether_hub_frames_total{direction=\"in\",kind=\"a b\"} 40 1700000000\n\
        tether_hub_frames_total{direction=\"out\"} 7\n\
        # TYPE tether_hub_sessions gauge\n\
        tether_hub_sessions 3\n\
        # TYPE other_total counter\n\
        other_total 9\n\
        tether_hub_connections_total garbage\n";

    #[test]
    fn reads_tether_counters_only() {
        let c = parse_counters(SCRAPE);
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            vec![
                ("tether_hub_connections_total".to_owned(), 12.0),
                (
                    "tether_hub_frames_total{direction=\"in\",kind=\"a b\"}".to_owned(),
                    40.0
                ),
                ("tether_hub_frames_total{direction=\"out\"}".to_owned(), 7.0),
            ]
        );
    }

    #[test]
    fn deltas_count_growth_and_restarts() {
        let start = parse_counters(SCRAPE);
        let end = parse_counters(
            "# TYPE tether_hub_connections_total counter\ntether_hub_connections_total 30\n\
             # TYPE tether_hub_frames_total counter\ntether_hub_frames_total{direction=\"out\"} 2\n\
             # TYPE tether_new_total counter\ntether_new_total 5\n",
        );
        let d = deltas(&start, &end);
        assert_eq!(d["tether_hub_connections_total"], 18.0);
        assert_eq!(
            d["tether_hub_frames_total{direction=\"out\"}"], 2.0,
            "restarted"
        );
        assert_eq!(d["tether_new_total"], 5.0);
    }

    #[test]
    fn metrics_live_beside_the_websocket_path() {
        assert_eq!(
            metrics_url("wss://hub.example:8443/ws?x=1").unwrap(),
            "https://hub.example:8443/metrics"
        );
        assert_eq!(
            metrics_url("ws://127.0.0.1:9000/ws").unwrap(),
            "http://127.0.0.1:9000/metrics"
        );
        assert!(metrics_url("http://x/ws").is_err());
        assert!(metrics_url("ws:///ws").is_err());
    }
}
