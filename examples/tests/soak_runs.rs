//! The soak tool end to end: short runs of the real program (its client processes, its
//! ledger, its report and exit status), and one aimed at a hub this test serves with TLS and a
//! token, as a deployment would.

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use tether_channels::hub::{ChannelService, Retention};
use tether_integration_tests::harness::{free_addr, test_hub_config};
use tether_integration_tests::TestCert;
use tether_transport::hub::{Hub, StaticTokens};

/// The soak program, built by the same cargo as this test (a no-op when it is up to date).
fn soak_program() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "tether-examples",
            "--example",
            "soak",
        ])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the soak example failed");
    // target/<profile>/deps/this-test → target/<profile>/examples/soak
    let exe = std::env::current_exe().expect("test path");
    let program = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples")
        .join("soak");
    assert!(program.exists(), "{} missing", program.display());
    program
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-soak-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the soak with `args` (at most two minutes).
async fn soak(args: &[&str]) -> Output {
    run_soak(&soak_program(), args).await
}

/// Runs the soak program at `program` with `args` (for timing a run without its build).
async fn run_soak(program: &std::path::Path, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the soak finishes within two minutes")
        .expect("the soak runs");
    eprintln!(
        "--- soak {args:?}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(path: &PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the JSON report")).unwrap()
}

const SHORT: [&str; 12] = [
    "--duration",
    "4",
    "--clients",
    "6",
    "--channels",
    "2",
    "--rate",
    "60",
    "--drain",
    "30s",
    "--faults",
    "cut@1.5s",
];

#[actix_rt::test]
async fn a_missed_objective_fails_a_run_spread_over_client_processes() {
    let dir = scratch("missed");
    let report = dir.join("soak.json");
    let mut args = SHORT.to_vec();
    let report_arg = report.display().to_string();
    args.extend([
        "--client-procs",
        "2",
        "--slo",
        "uptime=0.5,recovery_p99=1ms",
        "--json",
        &report_arg,
    ]);
    let out = soak(&args).await;
    assert_eq!(out.status.code(), Some(3), "an SLO miss exits 3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("1 of 2 objectives MISSED"), "{stdout}");
    assert!(
        stderr.contains("SLO missed: MISSED recovery_p99=1ms"),
        "{stderr}"
    );
    assert!(
        stdout.contains("6 clients in 2 client processes"),
        "{stdout}"
    );

    // One ledger for both processes: everything owed to every client arrived once.
    let r = json(&report);
    assert_eq!(r["client_procs"], 2);
    let published = r["published"].as_u64().unwrap();
    assert!(published > 100, "{published}");
    assert_eq!(r["acked"], published);
    assert_eq!(r["delivered"], r["expected_deliveries"]);
    // 6 clients on 2 channels: every message is owed to 3 subscribers.
    assert_eq!(r["expected_deliveries"].as_u64().unwrap(), 3 * published);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["ack_samples"], published);
    assert!(r["delivery_latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    // The cuts' outages are attributed to them, with both recovery figures.
    let cut = &r["recovery_by_fault"]["cut"];
    assert!(cut["outages"].as_u64().unwrap() >= 6, "{cut}");
    assert!(cut["path_to_recovered_ms"]["p99"].as_f64().unwrap() > 1.0);
    let missed: Vec<&str> = r["slo"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["met"] == false)
        .map(|o| o["objective"].as_str().unwrap())
        .collect();
    assert_eq!(missed, ["recovery_p99=1ms"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[actix_rt::test]
async fn met_objectives_pass_and_the_picture_marks_the_faults() {
    let dir = scratch("met");
    let picture = dir.join("soak.svg");
    let picture_arg = picture.display().to_string();
    let mut args = SHORT.to_vec();
    args.extend([
        "--slo",
        "uptime=0.5,recovery_p99=30s,ack_p99=30s,delivery_p99=30s,cut.recovery_max=30s",
        "--svg",
        &picture_arg,
    ]);
    let out = soak(&args).await;
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("every objective met"), "{stdout}");
    assert!(stdout.contains("    cut "), "the breakdown: {stdout}");
    let svg = std::fs::read_to_string(&picture).unwrap();
    assert!(svg.contains(r#"data-fault="cut""#));
    let _ = std::fs::remove_dir_all(dir);
}

#[actix_rt::test]
async fn a_deployment_over_tls_with_a_token_and_its_metrics() {
    let dir = scratch("deployment");
    let cert = TestCert::localhost();
    let (ca, _) = cert.write_to(&dir).unwrap();
    let service = ChannelService::builder()
        .retention(Retention::default())
        .build()
        .unwrap();
    let addr = free_addr();
    let hub = Hub::start(
        cert.serve(test_hub_config(addr))
            .authenticator(StaticTokens::new(["soak-secret"]))
            .handler(Arc::new(service))
            .build()
            .unwrap(),
    )
    .unwrap();
    let url = format!("wss://localhost:{}/ws", addr.port());
    let ca_arg = ca.display().to_string();
    let report = dir.join("soak.json");
    let report_arg = report.display().to_string();
    let common = [
        "--hub-url",
        url.as_str(),
        "--ca-file",
        &ca_arg,
        "--duration",
        "2",
        "--clients",
        "4",
        "--channels",
        "2",
        "--rate",
        "40",
    ];

    // No proxy in front of a deployment: proxy faults are refused, saying why.
    let mut args = common.to_vec();
    args.extend(["--token", "soak-secret", "--faults", "cut@1s"]);
    let out = soak(&args).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("without the local fault proxy") && stderr.contains("cut"),
        "{stderr}"
    );

    let mut args = common.to_vec();
    args.extend([
        "--token",
        "soak-secret",
        "--client-procs",
        "2",
        "--json",
        &report_arg,
    ]);
    let out = soak(&args).await;
    assert_eq!(out.status.code(), Some(0));
    let r = json(&report);
    assert_eq!(r["hub_url"], url.as_str());
    assert_eq!(r["tls"], true);
    assert_eq!(r["lost"], 0);
    assert!(r["published"].as_u64().unwrap() > 20);
    let metrics = &r["hub_metrics"];
    assert!(metrics["error"].is_null(), "{metrics}");
    assert_eq!(
        metrics["url"],
        format!("https://localhost:{}/metrics", addr.port())
    );
    let deltas = metrics["counter_deltas"].as_object().unwrap();
    assert!(
        deltas
            .iter()
            .any(|(series, delta)| series.starts_with("tether_") && delta.as_f64() > Some(0.0)),
        "{deltas:?}"
    );

    hub.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[actix_rt::test]
async fn a_deployment_that_refuses_the_token_fails_fast_with_its_own_exit_status() {
    let service = ChannelService::builder()
        .retention(Retention::default())
        .build()
        .unwrap();
    let addr = free_addr();
    let hub = Hub::start(
        test_hub_config(addr)
            .authenticator(StaticTokens::new(["soak-secret"]))
            .handler(Arc::new(service))
            .build()
            .unwrap(),
    )
    .unwrap();
    let url = format!("ws://127.0.0.1:{}/ws", addr.port());
    let program = soak_program();
    for procs in ["0", "2"] {
        let started = std::time::Instant::now();
        let out = run_soak(
            &program,
            &[
                "--hub-url",
                url.as_str(),
                "--token",
                "not-the-secret",
                "--duration",
                "30",
                "--clients",
                "4",
                "--channels",
                "2",
                "--client-procs",
                procs,
            ],
        )
        .await;
        assert_eq!(
            out.status.code(),
            Some(4),
            "a refused token exits 4 (client processes: {procs})"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("the hub refused the clients' credentials")
                && stderr.contains("authentication rejected"),
            "{stderr}"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("uptime"), "no report of a run: {stdout}");
        // Fails at the first refusal, long before the 30 s run or any attach deadline.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }
    hub.stop().await;
}

#[actix_rt::test]
async fn drop_faults_go_through_a_deployments_admin_api_and_lose_nothing() {
    const ADMIN: &str = "soak-test-admin-token-0123456789";
    let service = ChannelService::builder()
        .retention(Retention::default())
        .build()
        .unwrap();
    let addr = free_addr();
    let hub = Hub::start(
        test_hub_config(addr)
            .admin_token(ADMIN)
            .heartbeat(Duration::from_millis(500), Duration::from_secs(2))
            .handler(Arc::new(service))
            .build()
            .unwrap(),
    )
    .unwrap();
    let url = format!("ws://127.0.0.1:{}/ws", addr.port());
    let program = soak_program();

    // Without the admin token the drop fault is refused before anything runs.
    let out = run_soak(
        &program,
        &[
            "--hub-url",
            url.as_str(),
            "--faults",
            "drop@1s",
            "--duration",
            "2",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-token"));

    let dir = scratch("drop");
    let report = dir.join("soak.json");
    let report_arg = report.display().to_string();
    let out = run_soak(
        &program,
        &[
            "--hub-url",
            url.as_str(),
            "--admin-token",
            ADMIN,
            "--faults",
            "drop@1s",
            "--duration",
            "5",
            "--clients",
            "20",
            "--channels",
            "2",
            "--rate",
            "60",
            "--client-procs",
            "2",
            "--json",
            &report_arg,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "a correct run");
    let r = json(&report);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["delivered"], r["expected_deliveries"]);
    // Each drop takes two of the 20 clients down (a tenth), in both client processes.
    let drop = &r["recovery_by_fault"]["drop"];
    assert!(drop["outages"].as_u64().unwrap() >= 6, "{drop}");
    assert!(drop["lost_to_recovered_ms"]["p99"].as_f64().unwrap() > 0.0);
    hub.stop().await;
}
