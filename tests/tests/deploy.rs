//! The Prometheus rules and the Grafana dashboard under `deploy/`: valid for
//! `promtool`, their alerts fire as their unit tests say, and every metric they use is
//! one handoff really exports (checked against a proxy with coordination after a
//! switchover, so that the per-shard, coordination and switchover series exist). The
//! systemd unit's reload is a takeover (what that command does is tested in
//! `takeover.rs`, with a notification socket standing in for systemd's).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_tests::etcd::Etcd;
use handoff_tests::raw::http;
use handoff_tests::{conn_str, start_proxy, Cluster};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `promtool` (Debian's `prometheus` package), installed when missing.
fn promtool() -> PathBuf {
    handoff_tests::setup::promtool().unwrap_or_else(|e| panic!("{e:#}"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Every PromQL expression of the dashboard, Grafana's variables replaced.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("grafana/handoff-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        for t in p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let e = t["expr"].as_str().expect("a target has an expr");
            exprs.push(
                e.replace("$__rate_interval", "1m")
                    .replace("$__range", "1h")
                    .replace("$instance", ".*"),
            );
        }
    }
    assert!(exprs.len() >= 20, "{exprs:?}");
    exprs
}

/// The `handoff_*` metric names in a text.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("handoff_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn the_systemd_unit_reloads_by_a_takeover_and_follows_the_new_process() {
    let unit = std::fs::read_to_string(deploy().join("systemd/handoff.service")).unwrap();
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |key: &str| {
        settings
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{key} is not set:\n{unit}"))
    };
    // READY=1 with MAINPID= from whichever process serves: the new one after a reload.
    assert_eq!(get("Type"), "notify");
    assert_eq!(get("NotifyAccess"), "all");
    assert!(get("ExecReload").ends_with("handoff takeover"), "{unit}");
    assert!(get("ExecStart").ends_with("/handoff"), "{unit}");
    // The takeover socket's default directory.
    assert_eq!(get("RuntimeDirectory"), "handoff");
}

#[test]
fn rules_and_dashboard_are_valid_for_promtool() {
    let promtool = promtool();
    let dir = deploy().join("prometheus");
    run(Command::new(&promtool)
        .args(["check", "rules", "handoff-alerts.yml"])
        .current_dir(&dir));
    let tested = run(Command::new(&promtool)
        .args(["test", "rules", "handoff-alerts.test.yml"])
        .current_dir(&dir));
    assert!(tested.contains("SUCCESS"), "{tested}");

    // The dashboard's queries as recording rules: promtool parses each.
    let tmp = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs().iter().enumerate() {
        rules.push_str(&format!(
            "      - record: handoff_dashboard_query_{i}\n        expr: {}\n",
            serde_json::Value::String(e.clone())
        ));
    }
    std::fs::write(tmp.path().join("dashboard.yml"), rules).unwrap();
    run(Command::new(&promtool)
        .args(["check", "rules", "dashboard.yml"])
        .current_dir(tmp.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_dashboard_use_is_exported() {
    let mut used =
        names(&std::fs::read_to_string(deploy().join("prometheus/handoff-alerts.yml")).unwrap());
    for e in dashboard_exprs() {
        used.extend(names(&e));
    }
    assert!(used.len() > 15, "{used:?}");

    let cluster = Cluster::start(1).unwrap();
    let etcd = Etcd::start().unwrap();
    let endpoint = etcd.endpoint();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_ETCD_ENDPOINTS", endpoint.as_str()),
            ("HANDOFF_ETCD_PREFIX", "/handoff-deploy-test"),
        ],
    )
    .await
    .unwrap();
    let url = conn_str(&proxy.listen_addr(), "postgres", "postgres", None);
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.simple_query("select 1").await.unwrap();
    let target = cluster.standbys[0].addr();
    let (status, report) = handoff_tests::admin::switchover(&proxy, &target).await;
    assert_eq!(status, 200, "{report}");
    c.simple_query("select 1").await.unwrap();

    let (_, text) = http(proxy.admin_addr(), "GET", "/metrics", None)
        .await
        .unwrap();
    // Every series there, switchover's and coordination's included, is what the code's
    // table of metrics declares.
    handoff_tests::admin::assert_exposition_matches_table(&text);
    let families: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n);
            !families.contains(n.as_str()) && !families.contains(base)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "used by deploy/ but not in /metrics: {missing:?}\n{families:?}"
    );
    proxy.shutdown().await;
    drop(etcd);
}
