//! handoff in front of a real Patroni cluster (Patroni from PyPI on a real etcd, two
//! members): switchovers asked of handoff and of `patronictl` (with handoff's
//! `before_stop` hook), Patroni refusing one, the leader killed with SIGKILL, and a hook
//! that runs out of time. Each runs a load through handoff and checks, at the end, that
//! every acknowledged write is on Patroni's leader.

use std::net::SocketAddr;
use std::time::Duration;

use handoff_tests::admin::{metric, shard_state, switchover};
use handoff_tests::load::{assert_acked_on, assert_nothing_lost, ids, Load, Outcome};
use handoff_tests::patroni::{server_user_copy, Options, PatroniCluster};
use handoff_tests::pg::free_port;
use handoff_tests::{eventually, handoff_binary};

/// Each test runs its own Patroni cluster: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    proxy: Option<handoff::Proxy>,
    patroni: PatroniCluster,
    _bin: tempfile::TempDir,
}

impl Setup {
    fn proxy(&self) -> &handoff::Proxy {
        self.proxy.as_ref().expect("running")
    }

    fn listen(&self) -> SocketAddr {
        self.proxy().listen_addr()
    }
}

/// A two-member Patroni cluster and handoff in front of it, shard `main` named by
/// Patroni alone (no hosts in HANDOFF_SHARDS). With `hook`, every member's
/// `before_stop` runs `handoff hold --shard main --timeout <hook>` against this proxy.
async fn setup(hook: Option<&str>, extra: &[(&str, &str)]) -> Setup {
    // Chosen before Patroni starts (its hook needs it), bound only after.
    let admin_port = handoff_tests::pg::free_port_outside_ephemeral().unwrap();
    // The hook runs as the server user: it gets its own copy of the binary.
    let (bin, copy) = server_user_copy(&handoff_binary()).unwrap();
    let opts = Options {
        before_stop: hook.map(|t| {
            format!(
                "{} hold --admin 127.0.0.1:{admin_port} --shard main --primary {{addr}} --timeout {t} >> {}/hook.log 2>&1",
                copy.display(),
                bin.path().display()
            )
        }),
    };
    let patroni = tokio::task::spawn_blocking(move || PatroniCluster::start(2, opts))
        .await
        .unwrap()
        .unwrap();
    Load::prepare(&patroni.members[0].conn()).await.unwrap();
    let admin = format!("127.0.0.1:{admin_port}");
    let endpoints = format!("main={}", patroni.endpoints());
    let vars: Vec<(&str, &str)> = vec![
        ("HANDOFF_LISTEN", "127.0.0.1:0"),
        ("HANDOFF_ADMIN_LISTEN", &admin),
        ("HANDOFF_SHARDS", "main"),
        ("HANDOFF_PATRONI", &endpoints),
        ("HANDOFF_SHUTDOWN_TIMEOUT", "5s"),
        ("HANDOFF_POOL_SIZE", "8"),
    ];
    let proxy = handoff_tests::start_proxy_with(&vars, extra).await.unwrap();
    Setup {
        proxy: Some(proxy),
        patroni,
        _bin: bin,
    }
}

/// No client saw an error, and every acknowledged write is on member `leader`.
async fn nothing_lost(s: &Setup, out: &Outcome, leader: usize) {
    let m = &s.patroni.members[leader];
    assert_nothing_lost(&m.conn(), &m.name, out).await;
}

async fn acked_on(s: &Setup, out: &Outcome, leader: usize) {
    let m = &s.patroni.members[leader];
    assert_acked_on(&m.conn(), &m.name, out).await;
}

/// Member `i` is in the read rotation, and a read through `@replica` runs there.
async fn reads_on(s: &Setup, i: usize) {
    let want = s.patroni.members[i].addr();
    handoff_tests::admin::wait_in_rotation(s.proxy(), std::slice::from_ref(&want), true).await;
    let (c, conn) = tokio_postgres::connect(
        &handoff_tests::conn_str(&s.listen(), "postgres", "postgres@replica", None),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let row = c
        .query_one(
            "select pg_is_in_recovery(), '127.0.0.1:' || current_setting('port')",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), want);
}

/// The proxy serves member `i` as the shard's primary, named by Patroni.
async fn serves(s: &Setup, i: usize) {
    handoff_tests::admin::wait_serving(s.proxy(), &s.patroni.members[i].addr(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchovers_through_handoff_under_load_lose_nothing_back_and_forth() {
    let _serial = SERIAL.lock().await;
    let s = setup(None, &[("HANDOFF_REPLICA_CHECK_INTERVAL", "200ms")]).await;
    // Patroni's replica serves reads (`@replica`): a member it names, not a host
    // HANDOFF_SHARDS lists.
    reads_on(&s, 1).await;
    let st = shard_state(s.proxy()).await;
    assert_eq!(st["source"], "patroni", "{st}");
    assert_eq!(st["primary"], s.patroni.members[0].addr().as_str(), "{st}");
    assert_eq!(st["patroni"]["leader"], "pg0", "{st}");
    assert!(metric(s.proxy(), "handoff_primary_source", &["source=\"patroni\""]).await >= 1.0);

    let load = Load::start(s.listen(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // By member name.
    let (status, report) = switchover(s.proxy(), "pg1").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "completed", "{report}");
    assert_eq!(
        s.patroni.leader(),
        Some(1),
        "Patroni's leader after the switchover"
    );
    serves(&s, 1).await;
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(steps.contains(&"patroni_switchover"), "{report}");
    assert!(
        !steps.contains(&"promote"),
        "handoff must not promote: {report}"
    );
    // Patroni brings the old leader back as a replica before the way back; streaming
    // from the new leader, it serves reads.
    tokio::task::block_in_place(|| s.patroni.wait_healthy(Duration::from_secs(60))).unwrap();
    reads_on(&s, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Back, by host:port.
    let (status, report) = switchover(s.proxy(), &s.patroni.members[0].addr()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(s.patroni.leader(), Some(0));
    serves(&s, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.stop().await;
    nothing_lost(&s, &out, 0).await;

    // A target that is not a member is refused before anything changes.
    let (status, report) = switchover(s.proxy(), "pg9").await;
    assert_eq!(status, 400, "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("not a member"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_hook_patronictl_and_handoff_switchovers_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let s = setup(Some("10s"), &[("HANDOFF_PATRONI_HOOK", "true")]).await;
    let load = Load::start(s.listen(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (from, to) in [(0, 1), (1, 0), (0, 1)] {
        let (leader, candidate) = (
            s.patroni.members[from].name.clone(),
            s.patroni.members[to].name.clone(),
        );
        let out = tokio::task::block_in_place(|| {
            s.patroni.patronictl(&[
                "switchover",
                "--leader",
                &leader,
                "--candidate",
                &candidate,
                "--force",
            ])
        })
        .unwrap();
        assert!(
            out.status.success(),
            "patronictl: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serves(&s, to).await;
        tokio::task::block_in_place(|| s.patroni.wait_healthy(Duration::from_secs(60))).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Back through handoff: with HANDOFF_PATRONI_HOOK it asks Patroni first and holds
    // when the hook calls.
    let (status, report) = switchover(s.proxy(), "pg0").await;
    assert_eq!(status, 200, "{report}");
    let hook_step = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["step"] == "hook")
        .cloned();
    assert_eq!(
        hook_step.map(|h| h["ok"].clone()),
        Some(serde_json::json!(true)),
        "{report}"
    );
    serves(&s, 0).await;
    tokio::task::block_in_place(|| s.patroni.wait_healthy(Duration::from_secs(60))).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every switchover went through the hook, not through failure detection.
    let held = metric(s.proxy(), "handoff_holds_total", &["result=\"held\""]).await;
    assert!(held >= 4.0, "holds by the hook: {held}");
    // Patroni runs the hook when a replica stops too: that is not held.
    let epoch = shard_state(s.proxy()).await["epoch"].clone();
    let out = tokio::task::block_in_place(|| {
        s.patroni
            .patronictl(&["restart", "handoff", "pg1", "--force"])
    })
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let not_primary = metric(
        s.proxy(),
        "handoff_holds_total",
        &["result=\"not_primary\""],
    )
    .await;
    assert!(not_primary >= 1.0, "the replica's hook was not seen");
    let st = shard_state(s.proxy()).await;
    assert_eq!(st["epoch"], epoch, "{st}");
    assert_eq!(st["state"], "serving", "{st}");
    tokio::task::block_in_place(|| s.patroni.wait_healthy(Duration::from_secs(60))).unwrap();
    let out = load.stop().await;
    nothing_lost(&s, &out, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_patroni_refuses_rolls_back_with_its_message() {
    let _serial = SERIAL.lock().await;
    let s = setup(None, &[]).await;
    tokio::task::block_in_place(|| s.patroni.forbid_failover_to(1)).unwrap();
    let load = Load::start(s.listen(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, report) = switchover(s.proxy(), "pg1").await;
    assert_eq!(status, 409, "{report}");
    assert_eq!(report["outcome"], "rolled_back", "{report}");
    let error = report["error"].as_str().unwrap();
    eprintln!("Patroni refused: {error}");
    assert!(
        error.contains("Patroni refused the switchover (412)"),
        "{report}"
    );
    assert_eq!(s.patroni.leader(), Some(0));
    serves(&s, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = load.stop().await;
    nothing_lost(&s, &out, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_clients_between_transactions_see_only_the_pause() {
    let _serial = SERIAL.lock().await;
    // Patroni's leader key lives 20 s (its minimum ttl): the buffer must outlast it.
    let mut s = setup(
        None,
        &[
            ("HANDOFF_BUFFER_WINDOW", "50s"),
            ("HANDOFF_BUFFER_MAX_FAILOVER_DURATION", "60s"),
            ("HANDOFF_HEALTH_CHECK_INTERVAL", "200ms"),
        ],
    )
    .await;
    // A crash with asynchronous replication may lose the last acknowledged commits: the
    // standby is made synchronous first.
    s.patroni.make_synchronous(Duration::from_secs(60)).unwrap();
    let load = Load::start(s.listen(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.patroni.kill(0).unwrap();
    // A new client, between transactions by definition, only waits.
    let (c, conn) = tokio_postgres::connect(
        &handoff_tests::conn_str(&s.listen(), "postgres", "postgres", None),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let row = tokio::time::timeout(
        Duration::from_secs(55),
        c.query_one("SELECT pg_is_in_recovery()", &[]),
    )
    .await
    .expect("the held query was released within the buffer's bounds")
    .expect("the held query succeeded on the new leader");
    assert!(!row.get::<_, bool>(0));
    serves(&s, 1).await;
    assert_eq!(s.patroni.leader(), Some(1));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.stop().await;
    // Only what was running on the killed server when it died may fail: at most
    // one request per client, and no write acknowledged and lost.
    assert!(
        out.max_client_errors <= 1,
        "a client saw more than the request in flight fail: {:?}",
        out.errors
    );
    acked_on(&s, &out, 1).await;
    drop(s.proxy.take());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_runs_out_of_time_does_not_stall_patroni() {
    let _serial = SERIAL.lock().await;
    // Lameduck would wait 60 s for the open transaction; the hook gives up after 2 s.
    let s = setup(Some("2s"), &[("HANDOFF_DRAIN_TIMEOUT", "60s")]).await;
    let load = Load::start(s.listen(), 4).await.unwrap();
    let (long, conn) = tokio_postgres::connect(
        &handoff_tests::conn_str(&s.listen(), "postgres", "postgres", None),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    long.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let started = std::time::Instant::now();
    let out = tokio::task::block_in_place(|| {
        s.patroni.patronictl(&[
            "switchover",
            "--leader",
            "pg0",
            "--candidate",
            "pg1",
            "--force",
        ])
    })
    .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "patronictl: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Bounded by the hook's 2 s plus Patroni's own work, far below the 60 s lameduck.
    assert!(
        took < Duration::from_secs(30),
        "the switchover took {took:?}"
    );
    let hook_log = std::fs::read_to_string(s._bin.path().join("hook.log")).unwrap_or_default();
    assert!(
        hook_log.contains("no answer within"),
        "hook output: {hook_log}"
    );
    serves(&s, 1).await;
    // The open transaction was cut when Patroni stopped its server.
    assert!(long.batch_execute("COMMIT").await.is_err());
    let out = load.stop().await;
    nothing_lost(&s, &out, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_no_new_leader_ends_goes_back_to_the_old_leader() {
    let _serial = SERIAL.lock().await;
    let s = setup(None, &[("HANDOFF_HOLD_TIMEOUT", "2s")]).await;
    let (c, conn) = tokio_postgres::connect(
        &handoff_tests::conn_str(&s.listen(), "postgres", "postgres", None),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (status, body) = handoff_tests::raw::http_body(
        s.proxy().admin_addr(),
        "POST",
        "/v1/shards/main/hold",
        None,
        r#"{"reason": "test"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["held"], true, "{v}");
    // A second hold (Patroni runs the hook on every stop) adds nothing.
    let (status, body) = handoff_tests::raw::http_body(
        s.proxy().admin_addr(),
        "POST",
        "/v1/shards/main/hold",
        None,
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"already\":true"), "{body}");
    let held = tokio::spawn(async move {
        c.query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map(|r| r.get::<_, bool>(0))
    });
    // Patroni still names the old leader, and it is writable: it may not end the hold
    // while the hold is young (its server is about to stop).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let st = shard_state(s.proxy()).await;
    assert_eq!(st["state"], "buffering", "{st}");
    assert!(!held.is_finished());
    // Nobody stopped it: after HANDOFF_HOLD_TIMEOUT it serves again.
    let in_recovery = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the held query is released")
        .unwrap()
        .expect("the held query succeeds");
    assert!(!in_recovery);
    serves(&s, 0).await;
    assert_eq!(shard_state(s.proxy()).await["epoch"], 2);
}

/// Every one of `proxies` serves `addr`.
async fn all_serve(proxies: &[&handoff_tests::proxies::ProxyProcess], addr: &str) {
    for p in proxies {
        eventually(
            Duration::from_secs(30),
            "each proxy to serve the new leader",
            || async {
                let (v, _) = p.shard().await?;
                Ok(v["primary"] == addr && v["state"] == "serving")
            },
        )
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinated_proxies_hold_together_for_the_hook_and_for_handoff() {
    let _serial = SERIAL.lock().await;
    use handoff_tests::proxies::ProxyProcess;
    let admin1: SocketAddr = format!(
        "127.0.0.1:{}",
        handoff_tests::pg::free_port_outside_ephemeral().unwrap()
    )
    .parse()
    .unwrap();
    let (_bin, copy) = server_user_copy(&handoff_binary()).unwrap();
    // The hook reaches p1 only; coordination holds p2 too.
    let opts = Options {
        before_stop: Some(format!(
            "{} hold --admin {admin1} --shard main --primary {{addr}} --timeout 10s",
            copy.display()
        )),
    };
    let patroni = tokio::task::spawn_blocking(move || PatroniCluster::start(2, opts))
        .await
        .unwrap()
        .unwrap();
    Load::prepare(&patroni.members[0].conn()).await.unwrap();
    let logs = handoff_tests::proxies::log_dir().unwrap();
    let endpoints = format!("main={}", patroni.endpoints());
    // Patroni's own etcd, under another prefix.
    let etcd = patroni.etcd.endpoint();
    let vars: Vec<(&str, &str)> = vec![
        ("HANDOFF_PATRONI", &endpoints),
        ("HANDOFF_ETCD_ENDPOINTS", &etcd),
        ("HANDOFF_ETCD_PREFIX", "/handoff-test"),
        ("HANDOFF_ETCD_LEASE_TTL", "2s"),
        ("HANDOFF_POOL_SIZE", "6"),
    ];
    let p1 = ProxyProcess::start_with("main", admin1, "p1", &vars, logs.path())
        .await
        .unwrap();
    let admin2: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let p2 = ProxyProcess::start_with("main", admin2, "p2", &vars, logs.path())
        .await
        .unwrap();
    for p in [&p1, &p2] {
        eventually(
            Duration::from_secs(20),
            "both proxies in the cluster",
            || async {
                let (_, c) = p.shard().await?;
                Ok(c["members"].as_array().map(Vec::len) == Some(2))
            },
        )
        .await
        .unwrap();
    }
    let loads = [
        Load::start(p1.listen, 6).await.unwrap(),
        Load::start(p2.listen, 6).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(500)).await;
    // patronictl: the hook holds both proxies through p1.
    let out = tokio::task::block_in_place(|| {
        patroni.patronictl(&[
            "switchover",
            "--leader",
            "pg0",
            "--candidate",
            "pg1",
            "--force",
        ])
    })
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    all_serve(&[&p1, &p2], &patroni.members[1].addr()).await;
    tokio::task::block_in_place(|| patroni.wait_healthy(Duration::from_secs(60))).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Back through p2: a coordinated switchover asks Patroni.
    let (status, report) = p2
        .post("/v1/shards/main/switchover", r#"{"to": "pg0"}"#)
        .await
        .unwrap();
    assert_eq!(status, 200, "{report}");
    all_serve(&[&p1, &p2], &patroni.members[0].addr()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let [l1, l2] = loads;
    let outs = [("p1", l1.stop().await), ("p2", l2.stop().await)];
    let present = ids(&patroni.members[0].conn()).await.unwrap();
    for (name, out) in outs {
        assert!(
            out.errors.is_empty(),
            "{name}: clients saw errors: {:?}",
            out.errors
        );
        assert!(out.ok > 0, "{name}: no progress");
        let missing: Vec<i64> = out
            .acked
            .iter()
            .filter(|id| !present.contains(id))
            .copied()
            .collect();
        let on_pg1 = ids(&patroni.members[1].conn()).await.unwrap_or_default();
        assert!(
            missing.is_empty(),
            "{name}: {} acknowledged writes missing on pg0 ({} of them on pg1): {:?}",
            missing.len(),
            missing.iter().filter(|id| on_pg1.contains(id)).count(),
            &missing[..missing.len().min(40)]
        );
    }
    drop((p1, p2));
}
