//! Helpers for tests that talk to a running proxy's admin API and to servers directly.

use serde_json::Value;

use crate::raw::{http, http_body};
use crate::Node;

/// A connection string for `node` as the `postgres` superuser, database `postgres`.
pub fn server(node: &Node) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        node.port
    )
}

/// `POST /v1/shards/main/switchover {"to": to}`: the status and the JSON report.
pub async fn switchover(proxy: &handoff::Proxy, to: &str) -> (u16, Value) {
    let (status, body) = http_body(
        proxy.admin_addr(),
        "POST",
        "/v1/shards/main/switchover",
        None,
        &format!("{{\"to\": \"{to}\"}}"),
    )
    .await
    .expect("the admin API answers");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (status, v)
}

/// The first shard of `GET /v1/shards`.
pub async fn shard_state(proxy: &handoff::Proxy) -> Value {
    let (status, body) = http(proxy.admin_addr(), "GET", "/v1/shards", None)
        .await
        .expect("the admin API answers");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    v["shards"][0].clone()
}

/// The sum of a metric's series whose labels include every one of `labels`. The
/// recorder is process-wide: tests in one binary share it, so label with the test's own
/// hosts where that matters.
pub async fn metric(proxy: &handoff::Proxy, name: &str, labels: &[&str]) -> f64 {
    let (status, body) = http(proxy.admin_addr(), "GET", "/metrics", None)
        .await
        .expect("the admin API answers");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `watched` entry of `host` in a shard's state, if any.
pub fn watched<'a>(state: &'a Value, host: &str) -> Option<&'a Value> {
    state["watched"]
        .as_array()?
        .iter()
        .find(|w| w["host"] == host)
}
