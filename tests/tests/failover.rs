//! Unplanned failover: the test plays the HA system (kills, freezes, restarts, demotes
//! and promotes real PostgreSQL servers) and handoff detects the failure, holds new
//! transactions, discovers the new primary and releases them to it.

use std::collections::HashSet;
use std::time::Duration;

use handoff_tests::admin::{metric, server, shard_state, watched};
use handoff_tests::load::{ids, Load};
use handoff_tests::{conn_str, eventually, start_proxy, Cluster, Node};
use tokio_postgres::error::SqlState;

async fn client(proxy: &handoff::Proxy) -> tokio_postgres::Client {
    let url = conn_str(&proxy.listen_addr(), "postgres", "postgres", None);
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

/// A new session on `node` is refused because its databases do not accept connections.
fn refused_login(node: &Node) {
    let e = node
        .try_login("postgres", "postgres")
        .expect_err("the fenced server let a session in");
    assert!(e.contains("not currently accepting connections"), "{e}");
}

/// Waits until the watchdog has fenced `node` (a replaced primary that took logins)
/// and reports the split brain.
async fn fenced(proxy: &handoff::Proxy, node: &Node) {
    let host = node.addr();
    eventually(
        Duration::from_secs(10),
        "the watchdog to fence the replaced primary",
        || async {
            let s = shard_state(proxy).await;
            let fenced = watched(&s, &host)
                .is_some_and(|w| w["state"] == "fenced" && w["fenced_by_handoff"] == true);
            Ok(fenced
                && s["split_brain"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|h| h == host.as_str())))
        },
    )
    .await
    .unwrap();
    refused_login(node);
}

/// Waits until the shard serves `primary`.
async fn wait_serving(proxy: &handoff::Proxy, primary: &str, within: Duration) {
    eventually(within, &format!("the shard to serve {primary}"), || async {
        let s = shard_state(proxy).await;
        Ok(s["state"] == "serving" && s["primary"] == primary)
    })
    .await
    .unwrap();
}

/// Waits until the shard has noticed the failure (`what`) and buffers.
async fn wait_buffering(proxy: &handoff::Proxy, what: &str) {
    eventually(Duration::from_secs(10), what, || async {
        Ok(shard_state(proxy).await["state"] == "buffering")
    })
    .await
    .unwrap();
}

/// Errors a client whose request was running when its primary failed may get: the
/// connection was lost (08006), or the server said FATAL as it went (57P01, 57P02).
fn documented_lost_error(e: &str) -> bool {
    (e.starts_with("08006: ") || e.starts_with("57P01: ") || e.starts_with("57P02: "))
        && e.contains("shard \"main\"")
}

/// `n` logged-in clients, each of which has already run a statement: between
/// transactions when the primary fails.
async fn idle_clients(proxy: &handoff::Proxy, n: usize) -> Vec<tokio_postgres::Client> {
    let mut v = Vec::new();
    for _ in 0..n {
        let c = client(proxy).await;
        c.simple_query("SELECT 1").await.unwrap();
        v.push(c);
    }
    v
}

/// Each idle client inserts one row (client id `base + i`); returns the tasks.
fn idle_inserts(
    clients: Vec<tokio_postgres::Client>,
    base: i32,
) -> Vec<tokio::task::JoinHandle<Result<i64, String>>> {
    clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(async move {
                c.query_one(
                    "INSERT INTO handoff_load (client, seq) VALUES ($1, 0) RETURNING id",
                    &[&(base + i as i32)],
                )
                .await
                .map(|r| r.get::<_, i64>(0))
                .map_err(|e| format!("{e:?}"))
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_of_the_primary_under_load_costs_clients_between_transactions_nothing() {
    let mut cluster = Cluster::start(1).unwrap();
    // Acknowledged means on the standby too (else a crash may lose it, proxy or not).
    cluster.make_synchronous().unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "16"),
            ("HANDOFF_DRAIN_TIMEOUT", "2s"),
            ("HANDOFF_HEALTH_CHECK_INTERVAL", "200ms"),
        ],
    )
    .await
    .unwrap();
    let idle = idle_clients(&proxy, 8).await;
    let load = Load::start(proxy.listen_addr(), 32).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    cluster.primary.crash().unwrap();
    // Clients that were between transactions at the crash start one now: held.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = idle_inserts(idle, 5000);
    wait_buffering(&proxy, "the crash to be detected").await;
    // The HA system promotes the standby 1.5 s after the crash.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    cluster.promote(0).unwrap();
    let standby = cluster.standbys[0].addr();
    wait_serving(&proxy, &standby, Duration::from_secs(10)).await;

    let mut held_ids = Vec::new();
    for h in held {
        held_ids.push(h.await.unwrap().expect("a held request failed"));
    }
    // Traffic flows to the new primary.
    let before = ids(&server(&cluster.standbys[0])).await.unwrap().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = load.stop().await;
    let after = ids(&server(&cluster.standbys[0])).await.unwrap();
    assert!(
        after.len() > before + 50,
        "little load reached the new primary"
    );

    // Only requests running at the crash failed: one per client at most, each with the
    // documented error.
    eprintln!(
        "ok {} errors {} ({:?})",
        out.ok,
        out.errors.len(),
        out.errors
    );
    assert!(
        out.errors.iter().all(|e| documented_lost_error(e)),
        "undocumented errors: {:?}",
        out.errors
    );
    assert!(
        out.max_client_errors <= 1,
        "a client failed more than once: {:?}",
        out.errors
    );
    assert!(out.errors.len() <= 32);
    let missing: Vec<_> = out
        .acked
        .iter()
        .chain(&held_ids)
        .filter(|i| !after.contains(i))
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");

    let s = shard_state(&proxy).await;
    assert_eq!(s["epoch"], 2);
    assert!(
        metric(
            &proxy,
            "handoff_failovers_total",
            &["result=\"established\""]
        )
        .await
            >= 1.0
    );
    assert!(metric(&proxy, "handoff_failure_signals_total", &[]).await >= 1.0);
    assert!(
        metric(
            &proxy,
            "handoff_discovery_probes_total",
            &["result=\"primary\""]
        )
        .await
            >= 1.0
    );
    assert!(metric(&proxy, "handoff_failover_seconds_count", &[]).await >= 1.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_picks_the_promoted_standby_and_never_a_returning_old_primary() {
    let mut cluster = Cluster::start(2).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_HEALTH_CHECK_INTERVAL", "200ms"),
            ("HANDOFF_HEALTH_CHECK_TIMEOUT", "1s"),
            ("HANDOFF_BUFFER_WINDOW", "1s"),
            ("HANDOFF_BUFFER_MAX_FAILOVER_DURATION", "2s"),
        ],
    )
    .await
    .unwrap();
    let c = client(&proxy).await;
    let old = cluster.primary.addr();
    let (s1, s2) = (cluster.standbys[0].addr(), cluster.standbys[1].addr());

    // The primary crashes; the HA system promotes the *second* standby.
    cluster.primary.crash().unwrap();
    wait_buffering(&proxy, "the crash to be detected").await;
    cluster.promote(1).unwrap();
    let mut seen = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = shard_state(&proxy).await;
        seen.insert(s["primary"].as_str().unwrap().to_string());
        if s["state"] == "serving" && s["primary"] == s2.as_str() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not serving {s2}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !seen.contains(&s1),
        "the proxy chose the standby that was not promoted"
    );
    c.execute("INSERT INTO handoff_load (client, seq) VALUES (1, 1)", &[])
        .await
        .unwrap();

    // The old primary comes back as it was (writable, on the old timeline): the
    // watchdog raises the split-brain alarm and fences it.
    cluster.primary.start().unwrap();
    fenced(&proxy, &cluster.primary).await;
    for i in 0..10 {
        c.execute(
            "INSERT INTO handoff_load (client, seq) VALUES (2, $1)",
            &[&i],
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(shard_state(&proxy).await["primary"], s2.as_str());
    // Every write went to the new primary (each ran once, so none reached the old
    // one, which refuses every login anyway).
    assert_eq!(
        cluster.standbys[1]
            .psql("select count(*) from handoff_load where client = 2")
            .unwrap(),
        "10"
    );

    // The new primary fails too: the old primary is writable but on a lower timeline,
    // the other standby is in recovery. No primary: 57P03 naming the shard, first after
    // the window, then (Unavailable) at once.
    cluster.standbys[1].crash().unwrap();
    let started = std::time::Instant::now();
    let err = c
        .execute("INSERT INTO handoff_load (client, seq) VALUES (3, 1)", &[])
        .await
        .unwrap_err();
    eprintln!("{err:?} after {:?}", started.elapsed());
    assert_eq!(err.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{err:?}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("shard \"main\""), "{msg}");
    eventually(
        Duration::from_secs(10),
        "the shard to be unavailable",
        || async { Ok(shard_state(&proxy).await["state"] == "unavailable") },
    )
    .await
    .unwrap();
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{err:?}");
    assert!(
        metric(
            &proxy,
            "handoff_discovery_probes_total",
            &["result=\"primary\""]
        )
        .await
            >= 2.0
    );
    assert_ne!(shard_state(&proxy).await["primary"], old.as_str());

    // It restarts in place: the shard recovers by itself, on it.
    cluster.standbys[1].start().unwrap();
    wait_serving(&proxy, &s2, Duration::from_secs(15)).await;
    c.execute("INSERT INTO handoff_load (client, seq) VALUES (4, 1)", &[])
        .await
        .unwrap();
    assert_eq!(
        cluster.standbys[1]
            .psql("select count(*) from handoff_load where client = 4")
            .unwrap(),
        "1"
    );
    assert_eq!(
        cluster.standbys[1]
            .psql("select count(*) from handoff_load where client in (3, 4)")
            .unwrap(),
        "1",
        "only the insert after the recovery ran (the one that got 57P03 did not)"
    );
    refused_login(&cluster.primary);
    assert_eq!(shard_state(&proxy).await["epoch"], 3);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restarting_in_place_is_taken_back_without_errors_between_transactions() {
    let mut cluster = Cluster::start(0).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "8"),
            ("HANDOFF_HEALTH_CHECK_INTERVAL", "200ms"),
        ],
    )
    .await
    .unwrap();
    let primary = cluster.primary.addr();
    let idle = idle_clients(&proxy, 8).await;
    let load = Load::start(proxy.listen_addr(), 16).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    cluster.primary.crash().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = idle_inserts(idle, 6000);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(shard_state(&proxy).await["state"], "buffering");
    cluster.primary.start().unwrap();
    wait_serving(&proxy, &primary, Duration::from_secs(10)).await;
    for h in held {
        h.await.unwrap().expect("a held request failed");
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let out = load.stop().await;
    eprintln!("ok {} errors {:?}", out.ok, out.errors);
    assert!(
        out.errors.iter().all(|e| documented_lost_error(e)),
        "undocumented errors: {:?}",
        out.errors
    );
    assert!(out.max_client_errors <= 1, "{:?}", out.errors);
    let now = ids(&server(&cluster.primary)).await.unwrap();
    let missing: Vec<_> = out.acked.iter().filter(|i| !now.contains(i)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert_eq!(shard_state(&proxy).await["epoch"], 2);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_detected_by_timeouts_and_stays_out_after_it_thaws() {
    let cluster = Cluster::start(1).unwrap();
    cluster.make_synchronous().unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "8"),
            ("HANDOFF_HEALTH_CHECK_INTERVAL", "200ms"),
            ("HANDOFF_HEALTH_CHECK_TIMEOUT", "500ms"),
            ("HANDOFF_DRAIN_TIMEOUT", "1s"),
        ],
    )
    .await
    .unwrap();
    let idle = idle_clients(&proxy, 4).await;
    let load = Load::start(proxy.listen_addr(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    cluster.primary.signal("STOP").unwrap();
    wait_buffering(&proxy, "the freeze to be detected").await;
    // Clients between transactions start one now: held until the promotion.
    let held = idle_inserts(idle, 7000);
    let reason = shard_state(&proxy).await["reason"].to_string();
    assert!(reason.contains("unreachable"), "{reason}");
    cluster.promote(0).unwrap();
    let standby = cluster.standbys[0].addr();
    wait_serving(&proxy, &standby, Duration::from_secs(10)).await;
    for h in held {
        h.await.unwrap().expect("a held request failed");
    }

    // It thaws: nothing changes.
    cluster.primary.signal("CONT").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = load.stop().await;
    eprintln!("ok {} errors {:?}", out.ok, out.errors);
    assert!(
        out.errors.iter().all(|e| documented_lost_error(e)),
        "undocumented errors: {:?}",
        out.errors
    );
    assert!(out.max_client_errors <= 1, "{:?}", out.errors);
    let s = shard_state(&proxy).await;
    assert_eq!(
        (s["primary"].as_str(), s["epoch"].as_u64()),
        (Some(standby.as_str()), Some(2))
    );
    let new_ids = ids(&server(&cluster.standbys[0])).await.unwrap();
    let missing: Vec<_> = out.acked.iter().filter(|i| !new_ids.contains(i)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_refusal_is_retried_outside_a_transaction_and_never_inside_one() {
    let cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    // Health checks out of the way: the 25006 answer is what detects the demotion.
    let proxy = start_proxy(&cluster, &[("HANDOFF_HEALTH_CHECK_INTERVAL", "1h")])
        .await
        .unwrap();
    let a = client(&proxy).await;
    let b = client(&proxy).await;
    let insert = b
        .prepare("INSERT INTO handoff_load (client, seq) VALUES ($1, $2) RETURNING id")
        .await
        .unwrap();
    b.query_one(&insert, &[&1i32, &0i32]).await.unwrap();
    let set = |node: &Node, sql: &str| {
        node.psql(sql).unwrap();
        node.psql("SELECT pg_reload_conf()").unwrap();
    };
    let demote = "ALTER SYSTEM SET default_transaction_read_only = on";
    let undemote = "ALTER SYSTEM RESET default_transaction_read_only";

    // The HA system demotes the primary and promotes the standby. An autocommit
    // insert lands on a pooled connection to the demoted primary, gets 25006 for its
    // first statement, and is sent to the new primary instead.
    set(&cluster.primary, demote);
    cluster.promote(0).unwrap();
    let id: i64 = b.query_one(&insert, &[&1i32, &1i32]).await.unwrap().get(0);
    assert_eq!(
        cluster.standbys[0]
            .psql(&format!(
                "select count(*) from handoff_load where id = {id}"
            ))
            .unwrap(),
        "1"
    );
    assert_eq!(
        metric(&proxy, "handoff_retries_total", &["reason=\"read_only\""]).await,
        1.0
    );
    assert!(
        metric(
            &proxy,
            "handoff_failure_signals_total",
            &["signal=\"read_only\""]
        )
        .await
            >= 1.0
    );
    assert_eq!(
        shard_state(&proxy).await["primary"],
        cluster.standbys[0].addr().as_str()
    );

    // Inside a transaction the same refusal reaches the client: the transaction may
    // have done other work.
    set(&cluster.standbys[0], demote);
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.batch_execute("BEGIN").await.unwrap();
    let err = a
        .execute("INSERT INTO handoff_load (client, seq) VALUES (2, 1)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err:?}"
    );
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        metric(&proxy, "handoff_retries_total", &["reason=\"read_only\""]).await,
        1.0
    );
    // Made writable again, it is taken back (its timeline is the highest).
    set(&cluster.standbys[0], undemote);
    wait_serving(&proxy, &cluster.standbys[0].addr(), Duration::from_secs(10)).await;
    a.execute("INSERT INTO handoff_load (client, seq) VALUES (2, 2)", &[])
        .await
        .unwrap();
    assert_eq!(
        cluster.standbys[0]
            .psql("select count(*) from handoff_load where client = 2 and seq = 2")
            .unwrap(),
        "1"
    );
    // The demoted old primary was replaced while it still took logins: the watchdog
    // fenced it, so nothing can reach it any more.
    fenced(&proxy, &cluster.primary).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_establishment_wins_over_discovery() {
    let mut cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    // Discovery probes once at the start of the failover, then not for an hour.
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_HEALTH_CHECK_INTERVAL", "200ms"),
            ("HANDOFF_DISCOVERY_INTERVAL", "1h"),
        ],
    )
    .await
    .unwrap();
    let c = client(&proxy).await;
    cluster.primary.crash().unwrap();
    wait_buffering(&proxy, "the crash to be detected").await;
    let held = tokio::spawn(async move {
        c.execute("INSERT INTO handoff_load (client, seq) VALUES (9, 9)", &[])
            .await
    });
    cluster.promote(0).unwrap();
    // The operator says where the primary is, with the epoch it saw.
    let standby = cluster.standbys[0].addr();
    let (status, body) = handoff_tests::raw::http_body(
        proxy.admin_addr(),
        "POST",
        "/v1/shards/main/primary",
        None,
        &format!("{{\"addr\": \"{standby}\", \"epoch\": 1}}"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    held.await
        .unwrap()
        .expect("the held insert runs on the new primary");
    let s = shard_state(&proxy).await;
    assert_eq!(
        (s["primary"].as_str(), s["epoch"].as_u64()),
        (Some(standby.as_str()), Some(2))
    );
    // (Had discovery established first, `/primary` would have got 409, not 200.)
    proxy.shutdown().await;
}
