//! `/metrics` as a monitoring system sees it: every family described, label values in
//! one case, the documented counters there from startup, no series for a pool that
//! never had a connection. (One test in its own binary: the metrics are process-wide,
//! so nothing else may have run first.)

use std::collections::BTreeSet;

use handoff_tests::raw::http;
use handoff_tests::{conn_str, start_proxy, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// Every metric the code's table declares (the proxy's and the buffer's).
fn documented() -> BTreeSet<String> {
    handoff::metrics::all()
        .map(|m| m.name.to_string())
        .collect()
}

#[tokio::test]
async fn metrics_are_described_consistent_and_there_from_startup() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[]).await.unwrap();
    let (status, fresh) = http(proxy.admin_addr(), "GET", "/metrics", None)
        .await
        .unwrap();
    assert_eq!(status, 200);

    // Documented counters and gauges exist before their first event (histograms have
    // no series before their first observation; coordination's and the HA managers' only
    // where configured; split brain is per host; a pool's once it has a connection,
    // checked below).
    let documented = documented();
    assert!(documented.len() > 50, "{documented:?}");
    for name in &documented {
        let later = name.ends_with("_seconds")
            || name.starts_with("handoff_coordination_")
            || name.starts_with("handoff_patroni_")
            || name.starts_with("handoff_manager_")
            || name == "handoff_split_brain"
            || name.starts_with("handoff_pool_")
            || name.ends_with('_');
        if later {
            continue;
        }
        assert!(
            fresh.contains(&format!("\n{name}{{")) || fresh.contains(&format!("\n{name} ")),
            "{name} is documented but not in /metrics at startup:\n{fresh}"
        );
    }

    // A client of a database that does not exist gets the server's error, and no pool
    // series appears for it.
    let url = conn_str(&proxy.listen_addr(), "postgres", "nosuchdb", None);
    let err = match tokio_postgres::connect(&url, NoTls).await {
        Ok((c, conn)) => {
            tokio::spawn(conn);
            c.simple_query("select 1").await.unwrap_err()
        }
        Err(e) => e,
    };
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");
    // A real client, so that the pool series of an existing database do appear.
    let url = conn_str(&proxy.listen_addr(), "postgres", "postgres", None);
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    c.simple_query("select 1").await.unwrap();
    let (_, text) = http(proxy.admin_addr(), "GET", "/metrics", None)
        .await
        .unwrap();
    assert!(!text.contains("nosuchdb"), "{text}");
    assert!(
        text.contains(r#"handoff_pool_idle_connections{pool="postgres@postgres/main"}"#),
        "{text}"
    );

    // Every family has HELP and TYPE.
    let typed: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let helped: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(typed.len() > 30, "{typed:?}");
    let undescribed: Vec<_> = typed.difference(&helped).collect();
    assert!(
        undescribed.is_empty(),
        "families without # HELP: {undescribed:?}"
    );

    // The exposition is the table: kinds, help and label names.
    handoff_tests::admin::assert_exposition_matches_table(&text);

    // Label values that name a kind of thing are snake_case everywhere.
    let enum_labels = [
        "reason",
        "result",
        "outcome",
        "kind",
        "signal",
        "event",
        "what",
        "source",
        "direction",
        "step",
        "request",
    ];
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, labels)) = line.split_once('{') else {
            continue;
        };
        let labels = labels.split('}').next().unwrap_or("");
        for pair in labels.split(',') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            if !enum_labels.contains(&k) {
                continue;
            }
            let v = v.trim_matches('"');
            assert!(
                !v.is_empty()
                    && v.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "label {k}=\"{v}\" is not snake_case: {line}"
            );
        }
    }
    proxy.shutdown().await;
}
