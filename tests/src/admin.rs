//! Helpers for tests that talk to a running proxy's admin API and to servers directly.

use serde_json::Value;

use crate::raw::{http, http_body};
use crate::Node;

/// A connection string for `node` as the `postgres` superuser, database `postgres`.
pub fn server(node: &Node) -> String {
    format!(
        "host={} port={} user=postgres dbname=postgres",
        node.host, node.port
    )
}

/// `POST /v1/shards/main/switchover {"to": to}`: the status and the JSON report,
/// checked against the API's own types (the report, or an error answer).
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
    let typed = if is_error_answer(&v) {
        handoff::api::decode::<handoff::api::ErrorAnswer>(body.as_bytes()).map(drop)
    } else {
        handoff::api::decode::<handoff::api::report::SwitchoverReport>(body.as_bytes()).map(drop)
    };
    typed.unwrap_or_else(|e| panic!("the switchover answer is not the API's type: {e}: {body}"));
    (status, v)
}

/// An error answer (`{"error": …}` and nothing else).
fn is_error_answer(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|o| o.len() == 1 && o.contains_key("error"))
}

/// The first shard of `GET /v1/shards`.
pub async fn shard_state(proxy: &handoff::Proxy) -> Value {
    let (status, body) = http(proxy.admin_addr(), "GET", "/v1/shards", None)
        .await
        .expect("the admin API answers");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    // The answer is read as JSON by the tests, and checked here against the type the
    // server writes it from and the CLI reads it with.
    handoff::api::decode::<handoff::api::Shards>(body.as_bytes())
        .unwrap_or_else(|e| panic!("GET /v1/shards is not the API's type: {e}: {body}"));
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

/// The table's entry for an exposed family.
fn declared(family: &str) -> Option<&'static handoff::metrics::Def> {
    handoff::metrics::all().find(|m| m.name == family)
}

/// Checks a `/metrics` text against the code's table of metrics: every family is
/// declared there with its kind and help, and every series carries only the labels the
/// table names for it (histograms add `le`).
pub fn assert_exposition_matches_table(text: &str) {
    let mut families = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').expect("# TYPE name kind");
            let def = declared(family).unwrap_or_else(|| panic!("{family} is not in the table"));
            assert_eq!(kind, def.kind.as_str(), "{family}");
            families += 1;
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (family, help) = rest.split_once(' ').expect("# HELP name text");
            let def = declared(family).unwrap_or_else(|| panic!("{family} is not in the table"));
            assert_eq!(help, def.help.replace('`', ""), "{family}");
        } else if !line.starts_with('#') && !line.is_empty() {
            let series = line
                .split(['{', ' '])
                .next()
                .expect("a series line starts with its name");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    series
                        .strip_suffix(suffix)
                        .filter(|f| declared(f).is_some())
                })
                .unwrap_or(series);
            let def = declared(family).unwrap_or_else(|| panic!("{series} is not in the table"));
            let labels = line
                .split_once('{')
                .map(|(_, rest)| rest.split('}').next().unwrap_or(""))
                .unwrap_or("");
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let name = pair.split_once('=').expect("label=value").0;
                assert!(
                    name == "le" || def.labels.contains(&name),
                    "{family} has label {name}, the table names {:?}: {line}",
                    def.labels
                );
            }
        }
    }
    assert!(families > 0, "no metric families in:\n{text}");
}

/// `host`'s entry in a shard's `standbys` (from [`shard_state`]), if it is listed.
pub fn standby<'a>(state: &'a Value, host: &str) -> Option<&'a Value> {
    state["standbys"]
        .as_array()?
        .iter()
        .find(|s| s["host"].as_str() == Some(host))
}

/// Waits up to 30 s until every one of `hosts` is in the first shard's read rotation
/// (`want`), or out of it.
/// Waits (up to 60 s) until `proxy` serves `addr` as shard main's primary and, with
/// `manager`, the shard's HA manager names it leader too.
pub async fn wait_serving(proxy: &handoff::Proxy, addr: &str, manager: bool) {
    crate::eventually(
        std::time::Duration::from_secs(60),
        &format!("handoff to serve {addr}"),
        || async {
            let st = shard_state(proxy).await;
            Ok(st["primary"] == addr
                && st["state"] == "serving"
                && (!manager || st["manager"]["agrees"] == true))
        },
    )
    .await
    .unwrap();
}

pub async fn wait_in_rotation(proxy: &handoff::Proxy, hosts: &[String], want: bool) {
    crate::eventually(
        std::time::Duration::from_secs(30),
        &format!("{hosts:?} in the read rotation: {want}"),
        || async {
            let state = shard_state(proxy).await;
            Ok(hosts.iter().all(|h| {
                standby(&state, h).is_some_and(|s| s["in_rotation"].as_bool() == Some(want))
            }))
        },
    )
    .await
    .unwrap();
}

/// A console answer (a simple query to the database `handoff`) as rows of column name
/// → value.
pub async fn console_rows(
    console: &tokio_postgres::Client,
    cmd: &str,
) -> Vec<std::collections::HashMap<String, Option<String>>> {
    let msgs = console
        .simple_query(cmd)
        .await
        .unwrap_or_else(|e| panic!("{cmd}: {e:?}"));
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).map(str::to_string)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}
