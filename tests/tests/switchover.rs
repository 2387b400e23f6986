//! Planned switchovers run by handoff (`POST /v1/shards/{shard}/switchover`) under
//! load from real clients: zero client errors, every acknowledged write on the new
//! primary, nothing written to the old primary after the fence.

use std::time::Duration;

use handoff_tests::admin::{server, shard_state, switchover};
use handoff_tests::load::{ids, Load};
use handoff_tests::raw::{http, http_body};
use handoff_tests::{conn_str, eventually, start_proxy, Cluster};
use serde_json::Value;

/// A client of the proxy (`extra`: more connection parameters); its connection runs in
/// a task.
async fn client(proxy: &handoff::Proxy, extra: &str) -> tokio_postgres::Client {
    let url = format!(
        "{} {extra}",
        conn_str(&proxy.listen_addr(), "postgres", "postgres", None)
    );
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default()
}

fn pgbench(cluster: &Cluster, port: u16, secs: u32) -> std::process::Child {
    cluster
        .pgbench(port)
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
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_has_no_client_errors_and_loses_no_write() {
    let mut cluster = Cluster::start(1).unwrap();
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
        [
            "precheck",
            "sync_target",
            "buffer",
            "lameduck",
            "revoke",
            "catch_up",
            "promote",
            "flush",
            "unsync_target"
        ]
    );
    eprintln!("{report:#}");
    // The target streamed under its own name and was made synchronous before the
    // revocation; the old primary's settings are back to what they were.
    assert_eq!(report["sync_target"], "standby1", "{report:#}");
    assert!(
        report["lag_at_revoke_bytes"].as_f64().is_some(),
        "{report:#}"
    );
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

    // Every acknowledged write is on the new primary. The old primary is fenced: no
    // new session gets in.
    let new_ids = ids(&server(&cluster.standbys[0])).await.unwrap();
    let missing: Vec<_> = out.acked.iter().filter(|i| !new_ids.contains(i)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    let refused = cluster
        .primary
        .try_login("postgres", "postgres")
        .expect_err("the old primary let a new session in");
    assert!(
        refused.contains("not currently accepting connections"),
        "{refused}"
    );
    assert!(!fence.is_empty());
    proxy.shutdown().await;

    // Opened by hand, it has nothing the new one lacks: no write reached it after the
    // fence, and it is still a primary (never promoted, never demoted).
    cluster.primary.lift_fence_by_hand().unwrap();
    let auto_conf = cluster
        .primary
        .psql("select count(*) from pg_file_settings where name like 'synchronous%'")
        .unwrap();
    assert_eq!(
        auto_conf, "0",
        "synchronous settings left on the old primary"
    );
    let old_ids = ids(&server(&cluster.primary)).await.unwrap();
    assert!(
        old_ids.is_subset(&new_ids),
        "the old primary took writes the new one lacks"
    );
    assert!(
        new_ids.len() > old_ids.len(),
        "no write reached the new primary"
    );
    assert_eq!(
        cluster.primary.psql("select pg_is_in_recovery()").unwrap(),
        "f"
    );
}

async fn metric(proxy: &handoff::Proxy, prefix: &str) -> f64 {
    let (_, text) = http(proxy.admin_addr(), "GET", "/metrics", None)
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_switchovers_back_and_forth_under_load() {
    let mut cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "8")])
        .await
        .unwrap();
    let starts_before = metric(&proxy, "handoff_buffer_starts_total{shard=\"main\"}").await;
    let load = Load::start(proxy.listen_addr(), 16).await.unwrap();
    for round in 1..=10u64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The last round's held requests drain first (a switchover while the shard is
        // still draining is refused, rightly); on a loaded machine that can take longer
        // than the pause above.
        eventually(Duration::from_secs(10), "the shard to serve", || async {
            Ok(shard_state(&proxy).await["state"] == "serving")
        })
        .await
        .unwrap();
        let target = cluster.standbys[0].addr();
        let (status, report) = switchover(&proxy, &target).await;
        assert_eq!(status, 200, "round {round}: {report:#}");
        assert_eq!(report["epoch"], round + 1, "round {round}: {report:#}");
        cluster.swap(0);
        // The harness re-joins the old primary as a standby (pg_rewind) while the
        // load keeps running against the new one.
        cluster.rejoin(0).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = load.stop().await;
    assert!(out.errors.is_empty(), "client errors: {:?}", out.errors);
    let starts = metric(&proxy, "handoff_buffer_starts_total{shard=\"main\"}").await;
    // At least: the metric is process-wide and other tests in this binary buffer too;
    // the epoch below is this proxy's own count.
    eprintln!("buffer starts during the test: {}", starts - starts_before);
    assert!(starts - starts_before >= 10.0, "every switchover buffered");
    let state = shard_state(&proxy).await;
    assert_eq!(state["epoch"], 11);
    assert_eq!(state["primary"], cluster.primary.addr().as_str());
    let now = ids(&server(&cluster.primary)).await.unwrap();
    let missing: Vec<_> = out.acked.iter().filter(|i| !now.contains(i)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    proxy.shutdown().await;
}

/// The steps of a switchover report that failed.
fn failed_steps(r: &Value) -> Vec<&str> {
    r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ok"] == false)
        .map(|s| s["step"].as_str().unwrap())
        .collect()
}

/// A switchover that must not happen: refused or rolled back, with clients unharmed
/// and the old primary still serving (and writable).
async fn assert_not_switched(proxy: &handoff::Proxy, cluster: &Cluster, load: Load) {
    let state = shard_state(proxy).await;
    assert_eq!(state["state"], "serving", "{state:#}");
    assert_eq!(state["primary"], cluster.primary.addr().as_str());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = load.stop().await;
    assert!(out.errors.is_empty(), "client errors: {:?}", out.errors);
    assert!(out.ok > 0);
    assert_eq!(
        cluster
            .primary
            .psql("show default_transaction_read_only")
            .unwrap(),
        "off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchovers_that_must_not_happen_are_refused_or_rolled_back() {
    let cluster = Cluster::start(1).unwrap();
    let other = Cluster::start(0).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    // A role with every right a switchover needs except pg_promote: it owns the
    // databases (to close and reopen them: the fence) and reads the monitoring views.
    cluster
        .primary
        .psql(
            "CREATE ROLE switcher LOGIN; \
             GRANT pg_monitor TO switcher; \
             ALTER DATABASE postgres OWNER TO switcher; \
             ALTER DATABASE template1 OWNER TO switcher",
        )
        .unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "8"),
            ("HANDOFF_SWITCHOVER_MAX_LAG", "64kB"),
        ],
    )
    .await
    .unwrap();

    // Not a standby (another cluster's primary).
    let load = Load::start(proxy.listen_addr(), 8).await.unwrap();
    let (status, r) = switchover(&proxy, &other.primary.addr()).await;
    assert_eq!(
        (status, r["outcome"].as_str()),
        (409, Some("refused")),
        "{r:#}"
    );
    assert!(
        r["error"].as_str().unwrap().contains("not a standby"),
        "{r:#}"
    );
    // Unreachable.
    let nowhere = format!("127.0.0.1:{}", handoff_tests::pg::free_port().unwrap());
    let (status, r) = switchover(&proxy, &nowhere).await;
    assert_eq!(
        (status, r["outcome"].as_str()),
        (409, Some("refused")),
        "{r:#}"
    );
    assert!(
        r["error"].as_str().unwrap().contains("cannot connect"),
        "{r:#}"
    );
    assert_not_switched(&proxy, &cluster, load).await;

    // Lag above HANDOFF_SWITCHOVER_MAX_LAG: replay paused on the standby, 1 MB written.
    cluster.standbys[0]
        .psql("select pg_wal_replay_pause()")
        .unwrap();
    cluster
        .primary
        .psql("create table bulk as select repeat('x', 1000) as v from generate_series(1, 2000)")
        .unwrap();
    let load = Load::start(proxy.listen_addr(), 8).await.unwrap();
    let (status, r) = switchover(&proxy, &cluster.standbys[0].addr()).await;
    assert_eq!(
        (status, r["outcome"].as_str()),
        (409, Some("refused")),
        "{r:#}"
    );
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("HANDOFF_SWITCHOVER_MAX_LAG"),
        "{r:#}"
    );
    assert_not_switched(&proxy, &cluster, load).await;
    cluster.standbys[0]
        .psql("select pg_wal_replay_resume()")
        .unwrap();
    proxy.shutdown().await;

    // The target does not replay within HANDOFF_SWITCHOVER_TIMEOUT (replay paused after
    // the pre-check's lag was measured small). With the synchronous target, it is found
    // before anything is held: refused at that step, the settings put back. Without it,
    // the switchover gets as far as the catch-up and is rolled back there.
    for (sync, outcome, failed) in [
        ("true", "refused", &["sync_target"][..]),
        ("false", "rolled_back", &["catch_up"][..]),
    ] {
        let proxy = start_proxy(
            &cluster,
            &[
                ("HANDOFF_POOL_SIZE", "8"),
                ("HANDOFF_SWITCHOVER_TIMEOUT", "1s"),
                ("HANDOFF_SWITCHOVER_SYNC_TARGET", sync),
            ],
        )
        .await
        .unwrap();
        let load = Load::start(proxy.listen_addr(), 8).await.unwrap();
        cluster.standbys[0]
            .psql("select pg_wal_replay_pause()")
            .unwrap();
        cluster
            .primary
            .psql(&format!("create table after_pause_{sync} (x int)"))
            .unwrap();
        let (status, r) = switchover(&proxy, &cluster.standbys[0].addr()).await;
        assert_eq!(
            (status, r["outcome"].as_str()),
            (409, Some(outcome)),
            "{r:#}"
        );
        assert_eq!(failed_steps(&r), failed, "{r:#}");
        let auto_conf = cluster
            .primary
            .psql("select count(*) from pg_file_settings where name like 'synchronous%'")
            .unwrap();
        assert_eq!(auto_conf, "0", "synchronous settings left behind: {r:#}");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("HANDOFF_SWITCHOVER_TIMEOUT"),
            "{r:#}"
        );
        assert_not_switched(&proxy, &cluster, load).await;
        cluster.standbys[0]
            .psql("select pg_wal_replay_resume()")
            .unwrap();
        proxy.shutdown().await;
    }

    // The promotion step fails (the admin role may not call pg_promote): rolled back
    // after buffering, lameduck and revocation, clients unharmed. (Nor may that role
    // use ALTER SYSTEM: the target is not made synchronous, and the switchover goes on
    // without.)
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "8"),
            ("HANDOFF_ADMIN_DB_USER", "switcher"),
            ("HANDOFF_SWITCHOVER_TERMINATE", "false"),
        ],
    )
    .await
    .unwrap();
    let load = Load::start(proxy.listen_addr(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, r) = switchover(&proxy, &cluster.standbys[0].addr()).await;
    assert_eq!(
        (status, r["outcome"].as_str()),
        (409, Some("rolled_back")),
        "{r:#}"
    );
    assert_eq!(failed_steps(&r), ["sync_target", "promote"], "{r:#}");
    assert!(r["error"].as_str().unwrap().contains("pg_promote"), "{r:#}");
    assert_eq!(
        cluster.standbys[0]
            .psql("select pg_is_in_recovery()")
            .unwrap(),
        "t"
    );
    assert_not_switched(&proxy, &cluster, load).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_transaction_longer_than_the_drain_timeout_is_cancelled() {
    let cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "8"),
            ("HANDOFF_DRAIN_TIMEOUT", "300ms"),
        ],
    )
    .await
    .unwrap();
    let idle_in_tx = client(&proxy, "").await;
    let sleeper = client(&proxy, "").await;
    let load = Load::start(proxy.listen_addr(), 16).await.unwrap();
    // One client idles inside a transaction, another runs a long statement.
    idle_in_tx
        .batch_execute("BEGIN; INSERT INTO handoff_load (client, seq) VALUES (-1, -1)")
        .await
        .unwrap();
    let long = tokio::spawn(async move {
        let r = sleeper.simple_query("SELECT pg_sleep(30)").await;
        (r.map(|_| ()), sleeper)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, r) = switchover(&proxy, &cluster.standbys[0].addr()).await;
    assert_eq!(status, 200, "{r:#}");
    assert_eq!(r["lameduck_cancelled"], 2, "{r:#}");

    // The long statement was answered with 57P01 and its session goes on.
    let (res, sleeper) = long.await.unwrap();
    let e = res.expect_err("the long statement is cancelled");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "{e}"
    );
    sleeper.simple_query("SELECT 1").await.unwrap();
    // The idle transaction hears of it at its next statement; ROLLBACK then works and
    // the session carries on, on the new primary.
    let e = idle_in_tx.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "{e}"
    );
    idle_in_tx.batch_execute("SELECT 1").await.unwrap();
    let row = idle_in_tx
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), cluster.standbys[0].port as i32);

    let out = load.stop().await;
    assert!(out.errors.is_empty(), "client errors: {:?}", out.errors);
    let new_ids = ids(&server(&cluster.standbys[0])).await.unwrap();
    assert!(out.acked.iter().all(|i| new_ids.contains(i)));
    let orphan = cluster.standbys[0]
        .psql("select count(*) from handoff_load where client = -1")
        .unwrap();
    assert_eq!(orphan, "0", "the cancelled transaction must not commit");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_bounds_give_the_documented_errors() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_BUFFER_SIZE", "2"),
            ("HANDOFF_BUFFER_WINDOW", "3s"),
        ],
    )
    .await
    .unwrap();
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(client(&proxy, "").await);
    }
    let (status, body) = http(proxy.admin_addr(), "POST", "/v1/shards/main/buffer", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // Three requests for a buffer of two: the oldest is evicted with 53300.
    let mut held = Vec::new();
    for c in clients {
        held.push(tokio::spawn(async move {
            let r = c.simple_query("SELECT 1").await.map(|_| ());
            (r, c)
        }));
        eventually(Duration::from_secs(5), "request held", || async {
            Ok(shard_state(&proxy).await["buffer"]["depth"].as_u64() >= Some(1))
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (first, c0) = held.remove(0).await.unwrap();
    let e = first.expect_err("the oldest held request is evicted");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{e}"
    );
    assert!(db_message(&e).contains("HANDOFF_BUFFER_SIZE"), "{e:?}");
    let (status, body) = http(proxy.admin_addr(), "POST", "/v1/shards/main/resume", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    for h in held {
        let (r, _) = h.await.unwrap();
        r.expect("released after resume");
    }
    // The evicted client's session is intact.
    c0.simple_query("SELECT 1").await.unwrap();

    // A stuck revocation: after HANDOFF_BUFFER_WINDOW the request gets 57P03.
    let (status, body) = http(proxy.admin_addr(), "POST", "/v1/shards/main/buffer", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let started = std::time::Instant::now();
    let e = c0.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "{e}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(db_message(&e).contains("HANDOFF_BUFFER_WINDOW"), "{e:?}");
    let (status, _) = http(proxy.admin_addr(), "POST", "/v1/shards/main/resume", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    c0.simple_query("SELECT 1").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_orchestrator_drives_the_switchover() {
    let mut cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "8")])
        .await
        .unwrap();
    let load = Load::start(proxy.listen_addr(), 32).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 1. Revoke: buffering and lameduck, answered once nothing runs on the old primary.
    let (status, body) = http_body(
        proxy.admin_addr(),
        "POST",
        "/v1/shards/main/buffer",
        None,
        r#"{"epoch": 1, "reason": "test orchestrator"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(shard_state(&proxy).await["in_flight"], 0);
    // 2. The orchestrator's own work: stop the old primary, promote the standby.
    cluster.primary.stop("fast").unwrap();
    cluster.promote(0).unwrap();
    // A stale establishment is refused.
    let addr = cluster.standbys[0].addr();
    let (status, body) = http_body(
        proxy.admin_addr(),
        "POST",
        "/v1/shards/main/primary",
        None,
        &format!(r#"{{"addr": "{addr}", "epoch": 7}}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 409, "{body}");
    // 3. Establish.
    let (status, body) = http_body(
        proxy.admin_addr(),
        "POST",
        "/v1/shards/main/primary",
        None,
        &format!(r#"{{"addr": "{addr}", "epoch": 1}}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.stop().await;
    assert!(out.errors.is_empty(), "client errors: {:?}", out.errors);
    let state = shard_state(&proxy).await;
    assert_eq!(
        (state["epoch"].as_u64(), state["state"].as_str()),
        (Some(2), Some("serving"))
    );
    let new_ids = ids(&server(&cluster.standbys[0])).await.unwrap();
    assert!(out.acked.iter().all(|i| new_ids.contains(i)));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_rejects_bad_requests_with_json_errors() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_ADMIN_TOKEN", "s3cret")])
        .await
        .unwrap();
    let admin = proxy.admin_addr();
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, u16, &'a str);
    let cases: &[Case] = &[
        ("GET", "/v1/shards", None, "", 401, "bearer token"),
        ("GET", "/v1/shards", Some("wrong"), "", 401, "bearer token"),
        (
            "POST",
            "/v1/shards/main/switchover",
            Some("s3cret"),
            "{not json",
            400,
            "not valid JSON",
        ),
        (
            "POST",
            "/v1/shards/main/switchover",
            Some("s3cret"),
            "[1]",
            400,
            "JSON object",
        ),
        (
            "POST",
            "/v1/shards/main/switchover",
            Some("s3cret"),
            "{}",
            400,
            "missing \"to\"",
        ),
        (
            "POST",
            "/v1/shards/main/switchover",
            Some("s3cret"),
            r#"{"to": "nohost"}"#,
            400,
            "host:port",
        ),
        (
            "POST",
            "/v1/shards/main/primary",
            Some("s3cret"),
            r#"{"addr": 5}"#,
            400,
            "must be a string",
        ),
        (
            "POST",
            "/v1/shards/main/buffer",
            Some("s3cret"),
            r#"{"epoch": -1}"#,
            400,
            "epoch",
        ),
        (
            "POST",
            "/v1/shards/main/buffer",
            Some("s3cret"),
            r#"{"bogus": 1}"#,
            400,
            "unknown field",
        ),
        (
            "POST",
            "/v1/shards/nope/buffer",
            Some("s3cret"),
            "",
            404,
            "no shard named",
        ),
        (
            "GET",
            "/v1/shards/main/buffer",
            Some("s3cret"),
            "",
            405,
            "use POST",
        ),
        (
            "POST",
            "/v1/shards/main/resume",
            Some("s3cret"),
            "",
            409,
            "not buffering",
        ),
        (
            "POST",
            "/v1/shards/main/frobnicate",
            Some("s3cret"),
            "",
            404,
            "no such endpoint",
        ),
    ];
    for (method, path, token, body, want, text) in cases {
        let (status, resp) = http_body(admin, method, path, *token, body).await.unwrap();
        assert_eq!(status, *want, "{method} {path} {body}: {resp}");
        let v: Value = serde_json::from_str(&resp).unwrap_or_else(|_| panic!("not JSON: {resp}"));
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {resp}"));
        assert!(msg.contains(text), "{method} {path} {body}: {msg}");
    }
    // The shard is untouched by all of that.
    let (status, resp) = http(admin, "GET", "/v1/shards", Some("s3cret"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["shards"][0]["state"], "serving");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_clients_move_with_their_state() {
    let cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_MODE", "session")])
        .await
        .unwrap();
    let url = format!(
        "{} application_name=mover",
        conn_str(&proxy.listen_addr(), "postgres", "postgres", None)
    );
    let mover = client(&proxy, "application_name=mover").await;
    mover
        .batch_execute("SET statement_timeout = '42s'; PREPARE by_sql AS SELECT 7")
        .await
        .unwrap();
    let stmt = mover.prepare("SELECT $1::int + 1").await.unwrap();
    let (locker, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let locker_conn = tokio::spawn(conn);
    locker
        .query_one("SELECT pg_advisory_lock(1)", &[])
        .await
        .unwrap();

    let load = Load::start(proxy.listen_addr(), 16).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, r) = switchover(&proxy, &cluster.standbys[0].addr()).await;
    assert_eq!(status, 200, "{r:#}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = load.stop().await;
    assert!(out.errors.is_empty(), "client errors: {:?}", out.errors);

    // The session is on the new primary with its parameters and statements.
    let port: i32 = mover
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, cluster.standbys[0].port as i32);
    let row = mover.query_one(&stmt, &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let rows = mover.simple_query("SHOW statement_timeout").await.unwrap();
    let shown = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(shown.as_deref(), Some("42s"));
    let app: String = mover
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, "mover");
    let seven = mover.simple_query("EXECUTE by_sql").await.unwrap();
    assert!(seven.iter().any(|m| matches!(m,
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("7"))));

    // The session holding an advisory lock could not move: it was told why (a FATAL
    // its connection received) and closed.
    let e = tokio::time::timeout(Duration::from_secs(5), locker_conn)
        .await
        .expect("the locker's connection ends")
        .unwrap()
        .expect_err("ended by an error");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "{e:?}"
    );
    assert!(db_message(&e).contains("1 advisory locks"), "{e:?}");
    assert!(locker.simple_query("SELECT 1").await.is_err());
    proxy.shutdown().await;
}

/// Runs `sql` on a new client in the background; resolves to the result.
fn spawn_query(
    proxy: &handoff::Proxy,
    sql: String,
) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
    let addr = proxy.listen_addr();
    tokio::spawn(async move {
        let url = conn_str(&addr, "postgres", "postgres", None);
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.simple_query(&sql).await.map(|_| ())
    })
}

async fn post(proxy: &handoff::Proxy, action: &str) {
    let (status, body) = http(
        proxy.admin_addr(),
        "POST",
        &format!("/v1/shards/main/{action}"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{action}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_cap_failover_duration_and_disabled_buffering_give_their_errors() {
    let cluster = Cluster::start(0).unwrap();

    // HANDOFF_BUFFER_MAX_BYTES: a request bigger than the cap is refused at once (53300)
    // while a small one stays held and runs after the resume.
    let proxy = start_proxy(&cluster, &[("HANDOFF_BUFFER_MAX_BYTES", "1kB")])
        .await
        .unwrap();
    let c = client(&proxy, "").await;
    post(&proxy, "buffer").await;
    let small = spawn_query(&proxy, "SELECT 1".into());
    eventually(Duration::from_secs(5), "the small request held", || async {
        Ok(shard_state(&proxy).await["buffer"]["depth"] == 1)
    })
    .await
    .unwrap();
    let big = format!("SELECT '{}'", "x".repeat(2000));
    let e = c.simple_query(&big).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{e:?}"
    );
    assert!(db_message(&e).contains("HANDOFF_BUFFER_MAX_BYTES"), "{e:?}");
    assert!(!small.is_finished(), "the small request is still held");
    post(&proxy, "resume").await;
    small.await.unwrap().expect("released after the resume");
    c.simple_query(&big).await.expect("the session goes on");
    proxy.shutdown().await;

    // HANDOFF_BUFFER_MAX_FAILOVER_DURATION: held requests get 57P03, the shard reads
    // unavailable and refuses new requests at once, and recovers on resume.
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_BUFFER_MAX_FAILOVER_DURATION", "600ms"),
            ("HANDOFF_BUFFER_WINDOW", "600ms"),
        ],
    )
    .await
    .unwrap();
    let c = client(&proxy, "").await;
    post(&proxy, "buffer").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "{e:?}"
    );
    assert!(
        db_message(&e).contains("HANDOFF_BUFFER_MAX_FAILOVER_DURATION"),
        "{e:?}"
    );
    assert_eq!(shard_state(&proxy).await["state"], "unavailable");
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "{e:?}"
    );
    // Refused at once, not held: a held request would have been told its window ran
    // out (HANDOFF_BUFFER_WINDOW). Judged by what the error says, not by a clock.
    assert!(db_message(&e).contains("no primary"), "{e:?}");
    assert!(!db_message(&e).contains("HANDOFF_BUFFER_WINDOW"), "{e:?}");
    post(&proxy, "resume").await;
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(shard_state(&proxy).await["state"], "serving");
    proxy.shutdown().await;

    // Buffering off: while the shard has no primary, requests get 57P03 at once.
    let proxy = start_proxy(&cluster, &[("HANDOFF_BUFFER_ENABLED", "false")])
        .await
        .unwrap();
    let c = client(&proxy, "").await;
    post(&proxy, "buffer").await;
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "{e:?}"
    );
    post(&proxy, "resume").await;
    c.simple_query("SELECT 1").await.unwrap();
    proxy.shutdown().await;
}
