//! Several proxies coordinated through a real etcd, in front of a real primary and
//! standby, each proxy a separate process: switchovers started on any proxy, a proxy
//! or the coordinator killed mid-way, etcd outages, a crash seen by one proxy, and the
//! external two-step API. Every test checks that no acknowledged write is missing on
//! the primary at the end.

use std::time::Duration;

use handoff_tests::admin::server;
use handoff_tests::etcd::Etcd;
use handoff_tests::load::{history, ids, pgbench, pgbench_done, Load, Outcome};
use handoff_tests::proxies::{acknowledged, ProxyProcess};
use handoff_tests::{eventually, Cluster};

/// Tests here start a cluster, etcd and three proxies each: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A primary and one standby, etcd, and `n` proxies p1..pn coordinated under one
/// prefix.
struct Setup {
    // Dropped in this order: the proxies first.
    proxies: Vec<ProxyProcess>,
    etcd: Etcd,
    cluster: Cluster,
    _logs: tempfile::TempDir,
}

/// Variables every proxy of a test gets.
fn base_vars(etcd: &Etcd) -> Vec<(String, String)> {
    vec![
        ("HANDOFF_ETCD_ENDPOINTS".into(), etcd.endpoint()),
        ("HANDOFF_ETCD_PREFIX".into(), "/handoff-test".into()),
        ("HANDOFF_ETCD_LEASE_TTL".into(), "2s".into()),
        ("HANDOFF_ETCD_TIMEOUT".into(), "1s".into()),
        ("HANDOFF_POOL_SIZE".into(), "6".into()),
        ("HANDOFF_LOG".into(), "info,handoff=debug".into()),
    ]
}

async fn setup(n: usize, per_proxy: &[&[(&str, &str)]]) -> Setup {
    let cluster = Cluster::start(1).unwrap();
    cluster.pgbench_init(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let etcd = Etcd::start().unwrap();
    let logs = handoff_tests::proxies::log_dir().unwrap();
    let mut proxies = Vec::new();
    for i in 0..n {
        let mut vars = base_vars(&etcd);
        for (k, v) in per_proxy.get(i).copied().unwrap_or(&[]) {
            vars.retain(|(name, _)| name != k);
            vars.push((k.to_string(), v.to_string()));
        }
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let p = ProxyProcess::start(&cluster, &format!("p{}", i + 1), &vars, logs.path())
            .await
            .unwrap();
        proxies.push(p);
    }
    for p in &proxies {
        wait_members(p, n).await;
    }
    Setup {
        cluster,
        etcd,
        proxies,
        _logs: logs,
    }
}

/// Waits until `p` sees coordination up with `n` members.
async fn wait_members(p: &ProxyProcess, n: usize) {
    eventually(
        Duration::from_secs(20),
        "the proxy to see its cluster",
        || async {
            let (_, c) = p.shard().await?;
            Ok(c["up"] == true && c["members"].as_array().map(Vec::len) == Some(n))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{}: {e}\n{}", p.id, p.log_tail()));
}

/// Waits until every proxy serves `primary` at `epoch`.
async fn wait_primary(proxies: &[&ProxyProcess], primary: &str, epoch: u64) {
    for p in proxies {
        eventually(
            Duration::from_secs(30),
            "the proxy to serve the primary",
            || async {
                let (s, _) = p.shard().await?;
                Ok(s["primary"] == primary && s["epoch"] == epoch && s["state"] == "serving")
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", p.id, p.log_tail()));
    }
}

/// Every write `out` saw acknowledged is on `node`.
async fn assert_no_loss(who: &str, out: &Outcome, node: &handoff_tests::Node) {
    let now = ids(&server(node)).await.unwrap();
    let missing: Vec<_> = out.acked.iter().filter(|i| !now.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "{who}: {} acknowledged writes missing on {}: {missing:?}",
        missing.len(),
        node.addr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_started_on_any_proxy_holds_all_three_and_loses_nothing() {
    let _one = SERIAL.lock().await;
    let mut s = setup(3, &[]).await;
    for round in 0..2u64 {
        let old = s.cluster.primary.addr();
        let target = s.cluster.standbys[0].addr();
        // Counted before pgbench starts: its first commits come within milliseconds.
        let history_before = history(&s.cluster.primary).await;
        let loads: Vec<Load> =
            futures_util::future::join_all(s.proxies.iter().map(|p| Load::start(p.listen, 6)))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        let benches: Vec<_> = s
            .proxies
            .iter()
            .map(|p| pgbench(&s.cluster, p.listen.port(), 3, 6))
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The first round is started on p2, the way back on p3.
        let coordinator = &s.proxies[1 + round as usize];
        let (status, report) = coordinator.switchover(&target).await.unwrap();
        assert_eq!(status, 200, "{report:#}");
        assert_eq!(report["outcome"], "completed", "{report:#}");
        let c = &report["coordination"];
        let acked = acknowledged(&report);
        assert_eq!(acked.len(), 3, "every proxy acknowledged: {c:#}");
        assert!(c["missing"].as_array().unwrap().is_empty(), "{c:#}");
        eprintln!("round {round}: {:#}", c["proxies"]);
        let epoch = 2 + round;
        let all: Vec<&ProxyProcess> = s.proxies.iter().collect();
        wait_primary(&all, &target, epoch).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;

        let mut committed = 0;
        for (p, bench) in s.proxies.iter().zip(benches) {
            committed += pgbench_done(&p.id, bench);
        }
        let new_primary = &s.cluster.standbys[0];
        let all: Vec<&ProxyProcess> = s.proxies.iter().collect();
        finish_loads(&all, loads, new_primary).await;
        let rows = history(new_primary).await - history_before;
        assert!(
            rows >= committed,
            "pgbench committed {committed} transactions, the new primary has {rows} history rows"
        );
        // The old primary is fenced: no session of anyone's gets in.
        let refused = s
            .cluster
            .primary
            .try_login("postgres", "postgres")
            .expect_err("the old primary let a new session in");
        assert!(
            refused.contains("not currently accepting connections"),
            "{refused}"
        );
        assert_ne!(old, target);
        // The old primary rejoins as a standby for the way back.
        s.cluster.swap(0);
        s.cluster.rejoin(0).unwrap();
    }
    for p in &mut s.proxies {
        p.stop().await;
    }
    drop(s.etcd);
}

/// `POST /v1/shards/main/switchover` to `proxy`, in a task (it may never answer if
/// the proxy is killed meanwhile).
fn spawn_switchover(
    proxy: &ProxyProcess,
    to: &str,
) -> tokio::task::JoinHandle<anyhow::Result<(u16, String)>> {
    let admin = proxy.admin;
    let body = format!("{{\"to\": \"{to}\"}}");
    tokio::spawn(async move {
        handoff_tests::raw::http_body(admin, "POST", "/v1/shards/main/switchover", None, &body)
            .await
    })
}

/// Loads of `clients` clients through each of `proxies`.
async fn loads(proxies: &[&ProxyProcess], clients: usize) -> Vec<Load> {
    let mut out = Vec::new();
    for p in proxies {
        out.push(Load::start(p.listen, clients).await.unwrap());
    }
    out
}

/// Stops each load; asserts no client error and no acknowledged write missing on
/// `primary`.
async fn finish_loads(proxies: &[&ProxyProcess], loads: Vec<Load>, primary: &handoff_tests::Node) {
    for (p, load) in proxies.iter().zip(loads) {
        let out = load.stop().await;
        assert!(
            out.errors.is_empty(),
            "{}: client errors: {:?}",
            p.id,
            out.errors
        );
        assert!(
            out.ok > 20,
            "{}: too little load went through: {}",
            p.id,
            out.ok
        );
        assert_no_loss(&p.id, &out, primary).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_while_the_coordinator_waits_for_it_drops_out_of_the_switchover() {
    let _one = SERIAL.lock().await;
    // Lameduck (and so the wait for acknowledgements) may last 20 s everywhere.
    let slow: &[(&str, &str)] = &[("HANDOFF_DRAIN_TIMEOUT", "20s")];
    let mut s = setup(3, &[slow, slow, slow]).await;
    let target = s.cluster.standbys[0].addr();
    let (p1, p2) = (&s.proxies[0], &s.proxies[1]);
    let running = loads(&[p1, p2], 6).await;
    // A transaction left open through p3: its lameduck waits for it.
    let url = handoff_tests::conn_str(&s.proxies[2].listen, "postgres", "postgres", None);
    let (open, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    open.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let task = spawn_switchover(p1, &target);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!task.is_finished(), "the switchover did not wait for p3");
    s.proxies[2].kill();
    let killed = std::time::Instant::now();
    let (status, body) = task.await.unwrap().unwrap();
    let waited = killed.elapsed();
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200, "{report:#}");
    // p3's lease (2 s) expired and the coordinator stopped counting on it, long before
    // the 20 s lameduck deadline.
    assert!(
        waited < Duration::from_secs(8),
        "the switchover went on {waited:?} after p3 died"
    );
    let c = &report["coordination"];
    assert_eq!(acknowledged(&report), ["p1", "p2"], "{c:#}");
    let (p1, p2) = (&s.proxies[0], &s.proxies[1]);
    wait_primary(&[p1, p2], &target, 2).await;
    finish_loads(&[p1, p2], running, &s.cluster.standbys[0]).await;
}

/// The coordinator (p1) pauses at `point` and is killed there; p2 and p3 must finish
/// the switchover: forward to the standby when the promotion was published, back to
/// the old primary when not.
async fn coordinator_killed_at(point: &str, forward: bool) {
    let _one = SERIAL.lock().await;
    let failpoint = format!("{point}:60s");
    let mut s = setup(3, &[&[("HANDOFF_FAILPOINT", &failpoint)]]).await;
    let old = s.cluster.primary.addr();
    let target = s.cluster.standbys[0].addr();
    let (p2, p3) = (&s.proxies[1], &s.proxies[2]);
    let running = loads(&[p2, p3], 6).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let task = spawn_switchover(&s.proxies[0], &target);
    let log = s.proxies[0].log.clone();
    eventually(Duration::from_secs(30), "the coordinator to pause", || {
        let log = log.clone();
        async move { Ok(std::fs::read_to_string(&log)?.contains("failpoint: pausing")) }
    })
    .await
    .unwrap();
    s.proxies[0].kill();
    let killed = std::time::Instant::now();
    let _ = task.await;
    let (primary, epoch, node) = if forward {
        (target.clone(), 2, &s.cluster.standbys[0])
    } else {
        (old.clone(), 1, &s.cluster.primary)
    };
    let (p2, p3) = (&s.proxies[1], &s.proxies[2]);
    wait_primary(&[p2, p3], &primary, epoch).await;
    eprintln!(
        "{point}: the others finished {:?} after the kill",
        killed.elapsed()
    );
    let (_, _) = p2.shard().await.unwrap();
    let (state, _) = p2.shard().await.unwrap();
    let op = &state["coordination"]["operation"];
    let phase = if forward { "done" } else { "rolled_back" };
    assert_eq!(op["phase"], phase, "{op:#}");
    let recoveries = p2
        .metric("handoff_coordination_recoveries_total", &[])
        .await
        .unwrap()
        + p3.metric("handoff_coordination_recoveries_total", &[])
            .await
            .unwrap();
    assert_eq!(recoveries, 1.0, "exactly one proxy finished the operation");
    finish_loads(&[p2, p3], running, node).await;
    if forward {
        let refused = s
            .cluster
            .primary
            .try_login("postgres", "postgres")
            .expect_err("the old primary let a new session in");
        assert!(
            refused.contains("not currently accepting connections"),
            "{refused}"
        );
    } else {
        // The fence (if it was on) is lifted: anyone can log in again.
        s.cluster.primary.try_login("postgres", "postgres").unwrap();
        assert_eq!(
            s.cluster.standbys[0]
                .psql("select pg_is_in_recovery()")
                .unwrap(),
            "t",
            "the standby was not promoted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_killed_while_all_hold_is_rolled_back_by_another_proxy() {
    coordinator_killed_at("held", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_killed_behind_its_fence_is_lifted_and_rolled_back() {
    coordinator_killed_at("fenced", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_killed_after_publishing_the_promotion_is_rolled_forward() {
    coordinator_killed_at("promoting", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_killed_after_promoting_is_rolled_forward() {
    coordinator_killed_at("promoted", true).await;
}

/// Waits until `p` says whether coordination is up.
async fn wait_up(p: &ProxyProcess, up: bool) {
    eventually(
        Duration::from_secs(20),
        "coordination to change",
        || async {
            let (_, c) = p.shard().await?;
            Ok(c["up"] == up)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{}: {e}\n{}", p.id, p.log_tail()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_proxies_keep_serving_refuse_switchovers_and_catch_up() {
    let _one = SERIAL.lock().await;
    let mut s = setup(2, &[]).await;
    let target = s.cluster.standbys[0].addr();
    let all: Vec<&ProxyProcess> = s.proxies.iter().collect();
    let running = loads(&all, 6).await;
    s.etcd.stop();
    for p in &s.proxies {
        wait_up(p, false).await;
        let (_, c) = p.shard().await.unwrap();
        assert!(c["error"].as_str().unwrap_or("").contains("etcd"), "{c:#}");
        assert_eq!(p.metric("handoff_coordination_up", &[]).await.unwrap(), 0.0);
        // Still ready: it serves on what it knows.
        assert_eq!(p.get("/readyz").await.unwrap().0, 200);
    }
    let (status, body) = s.proxies[0].switchover(&target).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("coordination is down"),
        "{body}"
    );
    let (status, body) = s.proxies[1]
        .post("/v1/shards/main/buffer", "{}")
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    // Clients never noticed.
    tokio::time::sleep(Duration::from_millis(1000)).await;

    s.etcd.restart().unwrap();
    for p in &s.proxies {
        wait_up(p, true).await;
        assert_eq!(p.metric("handoff_coordination_up", &[]).await.unwrap(), 1.0);
    }
    wait_members(&s.proxies[0], 2).await;
    let (status, report) = s.proxies[1].switchover(&target).await.unwrap();
    assert_eq!(status, 200, "{report:#}");
    let all: Vec<&ProxyProcess> = s.proxies.iter().collect();
    wait_primary(&all, &target, 2).await;
    finish_loads(&all, running, &s.cluster.standbys[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lost_in_the_middle_of_a_switchover_rolls_it_back_everywhere() {
    let _one = SERIAL.lock().await;
    // The coordinator pauses 3 s once every proxy holds; etcd goes down meanwhile.
    let mut s = setup(2, &[&[("HANDOFF_FAILPOINT", "held:3s")]]).await;
    let old = s.cluster.primary.addr();
    let target = s.cluster.standbys[0].addr();
    let all: Vec<&ProxyProcess> = s.proxies.iter().collect();
    let running = loads(&all, 6).await;
    let task = spawn_switchover(&s.proxies[0], &target);
    let log = s.proxies[0].log.clone();
    eventually(Duration::from_secs(30), "the coordinator to pause", || {
        let log = log.clone();
        async move { Ok(std::fs::read_to_string(&log)?.contains("failpoint: pausing")) }
    })
    .await
    .unwrap();
    s.etcd.stop();
    // The coordinator cannot publish the fence: it rolls back, and p2 keeps holding
    // until it can read that.
    let (status, body) = task.await.unwrap().unwrap();
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 409, "{report:#}");
    assert_eq!(report["outcome"], "rolled_back", "{report:#}");
    let (p2_state, _) = s.proxies[1].shard().await.unwrap();
    assert_eq!(p2_state["state"], "buffering", "{p2_state:#}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.etcd.restart().unwrap();
    let all: Vec<&ProxyProcess> = s.proxies.iter().collect();
    wait_primary(&all, &old, 1).await;
    finish_loads(&all, running, &s.cluster.primary).await;
    s.cluster.primary.try_login("postgres", "postgres").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_found_by_one_proxy_moves_the_others_without_their_own_discovery() {
    let _one = SERIAL.lock().await;
    // p1 checks every 100 ms; p2 and p3 would need a minute to notice, and then 30 s
    // between discovery rounds.
    let quick: &[(&str, &str)] = &[
        ("HANDOFF_HEALTH_CHECK_INTERVAL", "100ms"),
        ("HANDOFF_DISCOVERY_INTERVAL", "100ms"),
    ];
    let slow: &[(&str, &str)] = &[
        ("HANDOFF_HEALTH_CHECK_INTERVAL", "60s"),
        ("HANDOFF_DISCOVERY_INTERVAL", "30s"),
    ];
    let mut s = setup(3, &[quick, slow, slow]).await;
    // Acknowledged commits survive the crash.
    s.cluster.make_synchronous().unwrap();
    let target = s.cluster.standbys[0].addr();
    let all: Vec<&ProxyProcess> = s.proxies.iter().collect();
    let mut clients = Vec::new();
    for p in &all {
        clients.push(handoff_tests::load::Load::start(p.listen, 3).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.cluster.primary.crash().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.cluster.promote(0).unwrap();
    let promoted = std::time::Instant::now();
    let mut took = Vec::new();
    for p in &s.proxies {
        eventually(
            Duration::from_secs(20),
            "the proxy to serve the new primary",
            || async {
                let (st, _) = p.shard().await?;
                Ok(st["primary"] == target.as_str() && st["state"] != "buffering")
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", p.id, p.log_tail()));
        took.push((p.id.clone(), promoted.elapsed()));
    }
    eprintln!("serving the new primary after the promotion: {took:?}");
    for (id, t) in &took[1..] {
        assert!(
            *t < Duration::from_secs(15),
            "{id} took {t:?}: it did not take the primary p1 published"
        );
    }
    for p in &s.proxies[1..] {
        let followed = p
            .metric("handoff_coordination_followed_total", &["what=\"primary\""])
            .await
            .unwrap();
        assert!(
            followed >= 1.0,
            "{} did not follow the published primary",
            p.id
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new_primary = &s.cluster.standbys[0];
    for (p, load) in all.iter().zip(clients) {
        let out = load.stop().await;
        // A crash fails what was in flight; what was acknowledged must be there.
        assert!(
            out.ok > 20,
            "{}: too little load went through: {}",
            p.id,
            out.ok
        );
        assert_no_loss(&p.id, &out, new_primary).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_two_step_api_called_on_different_proxies_applies_to_all() {
    let _one = SERIAL.lock().await;
    let mut s = setup(3, &[]).await;
    let old = s.cluster.primary.addr();
    let target = s.cluster.standbys[0].addr();
    let all: Vec<&ProxyProcess> = s.proxies.iter().collect();
    let running = loads(&all, 4).await;

    // /buffer on p2 then /resume on p1: every proxy holds, then every proxy serves again.
    let (status, body) = s.proxies[1]
        .post("/v1/shards/main/buffer", "{}")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(
        body["coordination"]["proxies"].as_array().unwrap().len(),
        3,
        "{body:#}"
    );
    for p in &s.proxies {
        let (st, _) = p.shard().await.unwrap();
        assert_eq!(st["state"], "buffering", "{}: {st:#}", p.id);
    }
    // `handoff status` on another proxy shows the cluster and the operation.
    let status_out = handoff_tests::handoff_command()
        .args(["status", "--admin", &s.proxies[2].admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status_out.stdout);
    assert!(status_out.status.success(), "{text}");
    assert!(
        text.contains("coordination up: proxy p3 of /handoff-test (3 members"),
        "{text}"
    );
    assert!(
        text.contains("(external, coordinated by p2): hold; acknowledged by ["),
        "{text}"
    );
    assert!(text.contains("this proxy: taking part"), "{text}");
    let (status, body) = s.proxies[0]
        .post("/v1/shards/main/resume", "{}")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body:#}");
    wait_primary(&all, &old, 1).await;
    // Nothing holds the shard now.
    let (status, body) = s.proxies[2]
        .post("/v1/shards/main/resume", "{}")
        .await
        .unwrap();
    assert_eq!(status, 409, "{body:#}");

    // /buffer on p1; the orchestrator stops the old primary and promotes the standby;
    // /primary on p3.
    let (status, body) = s.proxies[0]
        .post("/v1/shards/main/buffer", "{\"epoch\": 1}")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body:#}");
    s.cluster.primary.stop("fast").unwrap();
    s.cluster.promote(0).unwrap();
    let (status, body) = s.proxies[2]
        .post(
            "/v1/shards/main/primary",
            &format!("{{\"addr\": \"{target}\", \"epoch\": 1}}"),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["epoch"], 2, "{body:#}");
    wait_primary(&all, &target, 2).await;
    finish_loads(&all, running, &s.cluster.standbys[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_is_verified_against_the_given_ca() {
    let _one = SERIAL.lock().await;
    let cluster = Cluster::start(0).unwrap();
    let ca = handoff_tests::tls::TestCa::new("etcd test CA").unwrap();
    let etcd = Etcd::start_tls(&ca).unwrap();
    let logs = tempfile::Builder::new()
        .prefix("handoff-proxies-")
        .tempdir()
        .unwrap();
    let ca_file = logs.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let ca_path = ca_file.display().to_string();
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));
    let vars = [
        ("HANDOFF_ETCD_ENDPOINTS", endpoint.as_str()),
        ("HANDOFF_ETCD_CA_FILE", ca_path.as_str()),
        ("HANDOFF_ETCD_LEASE_TTL", "2s"),
    ];
    let p = ProxyProcess::start(&cluster, "tls1", &vars, logs.path())
        .await
        .unwrap();
    wait_members(&p, 1).await;
    let (state, _) = p.shard().await.unwrap();
    assert_eq!(
        state["coordination"]["recorded"]["primary"],
        cluster.primary.addr().as_str(),
        "{state:#}"
    );

    // Another CA's certificate is not trusted: that proxy never gets through.
    let other = handoff_tests::tls::TestCa::new("someone else").unwrap();
    let other_file = logs.path().join("other.pem");
    std::fs::write(&other_file, &other.cert_pem).unwrap();
    let other_path = other_file.display().to_string();
    let vars = [
        ("HANDOFF_ETCD_ENDPOINTS", endpoint.as_str()),
        ("HANDOFF_ETCD_CA_FILE", other_path.as_str()),
    ];
    let q = ProxyProcess::start(&cluster, "tls2", &vars, logs.path())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, c) = q.shard().await.unwrap();
    assert_eq!(c["up"], false, "{c:#}");
    let (_, c) = p.shard().await.unwrap();
    assert_eq!(c["members"].as_array().unwrap().len(), 1, "{c:#}");
}

/// A proxy's tokio tasks (`handoff_tasks`) after `settle`.
async fn tasks_after(p: &ProxyProcess, settle: Duration) -> f64 {
    tokio::time::sleep(settle).await;
    p.metric("handoff_tasks", &[]).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_keeps_as_many_tasks_through_lease_renewals_and_etcd_restarts() {
    let _one = SERIAL.lock().await;
    let mut s = setup(1, &[]).await;
    let p = &s.proxies[0];
    let at_start = tasks_after(p, Duration::from_secs(2)).await;
    // With a 2 s lease, renewed every ~0.7 s: each renewal once left a task behind.
    let idle = tasks_after(p, Duration::from_secs(6)).await;
    s.etcd.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.etcd.restart().unwrap();
    wait_members(p, 1).await;
    // The reconnection's own tasks (connection attempts made while etcd was down) end
    // within a few seconds of it: a count that settles back is no leak, one that stays
    // up (a task left per reconnection) is.
    let mut after_restart = tasks_after(p, Duration::from_secs(4)).await;
    for _ in 0..16 {
        if after_restart <= at_start + 1.0 {
            break;
        }
        after_restart = tasks_after(p, Duration::from_secs(1)).await;
    }
    eprintln!(
        "tasks: {at_start} at start, {idle} after 6 s idle, {after_restart} after an etcd restart"
    );
    assert!(
        idle <= at_start + 1.0 && after_restart <= at_start + 1.0,
        "tasks grew: {at_start} at start, {idle} after 6 s idle, {after_restart} after an etcd restart"
    );
}
