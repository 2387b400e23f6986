//! Planned switchovers run by handoff (`POST /v1/shards/{shard}/switchover`) under
//! load from real clients: zero client errors, every acknowledged write on the new
//! primary, nothing written to the old primary after the fence.

use std::time::Duration;

use handoff_tests::load::{ids, Load};
use handoff_tests::raw::{http, http_body};
use handoff_tests::{start_proxy, Cluster};
use serde_json::Value;

fn server(node: &handoff_tests::Node) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        node.port
    )
}

async fn switchover(proxy: &handoff::Proxy, to: &str) -> (u16, Value) {
    let (status, body) = http_body(
        proxy.admin_addr(),
        "POST",
        "/v1/shards/main/switchover",
        None,
        &format!("{{\"to\": \"{to}\"}}"),
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (status, v)
}

async fn shard_state(proxy: &handoff::Proxy) -> Value {
    let (status, body) = http(proxy.admin_addr(), "GET", "/v1/shards", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["shards"][0].clone()
}

fn pgbench(cluster: &Cluster, port: u16, secs: u32) -> std::process::Child {
    std::process::Command::new(cluster.bin.bin("pgbench"))
        .args([
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-n",
            "-M",
            "prepared",
        ])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_has_no_client_errors_and_loses_no_write() {
    let cluster = Cluster::start(1).unwrap();
    cluster.pgbench_init(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "16")])
        .await
        .unwrap();
    let load = Load::start(proxy.listen_addr(), 32).await.unwrap();
    let bench = pgbench(&cluster, proxy.listen_addr().port(), 5);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let target = cluster.standbys[0].addr();
    let (status, report) = switchover(&proxy, &target).await;
    assert_eq!(status, 200, "{report:#}");
    assert_eq!(report["outcome"], "completed", "{report:#}");
    assert_eq!(report["epoch"], 2);
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["precheck", "buffer", "lameduck", "revoke", "catch_up", "promote", "flush"]
    );
    eprintln!("{report:#}");
    let fence = report["fence_lsn"].as_str().unwrap().to_string();

    // Traffic keeps flowing, now to the new primary.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = load.stop().await;
    let bench = bench.wait_with_output().unwrap();
    let bench_out = String::from_utf8_lossy(&bench.stdout);
    let bench_err = String::from_utf8_lossy(&bench.stderr);
    assert!(
        bench.status.success() && bench_out.contains("number of failed transactions: 0"),
        "pgbench through the switchover:\n{bench_out}\n{bench_err}"
    );
    assert!(out.errors.is_empty(), "client errors: {:?}", out.errors);
    assert!(out.ok > 500, "too little load went through: {}", out.ok);

    let state = shard_state(&proxy).await;
    assert_eq!(state["primary"], target.as_str());
    assert_eq!(state["epoch"], 2);

    // Every acknowledged write is on the new primary, and the old primary has nothing
    // the new one lacks: no write reached it after the fence.
    let new_ids = ids(&server(&cluster.standbys[0])).await.unwrap();
    let old_ids = ids(&server(&cluster.primary)).await.unwrap();
    let missing: Vec<_> = out.acked.iter().filter(|i| !new_ids.contains(i)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert!(
        old_ids.is_subset(&new_ids),
        "the old primary took writes the new one lacks"
    );
    assert!(
        new_ids.len() > old_ids.len(),
        "no write reached the new primary"
    );
    assert_eq!(
        cluster
            .primary
            .psql("show default_transaction_read_only")
            .unwrap(),
        "on"
    );
    assert_eq!(
        cluster.primary.psql("select pg_is_in_recovery()").unwrap(),
        "f"
    );
    let old_lsn = cluster.primary.psql("select pg_current_wal_lsn()").unwrap();
    assert!(!fence.is_empty() && !old_lsn.is_empty());
    proxy.shutdown().await;
}
