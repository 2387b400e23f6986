//! handoff in front of a real pg_auto_failover formation (Debian's pg_autoctl: a
//! monitor and two nodes, each a keeper with its PostgreSQL): switchovers asked of
//! handoff and of `pg_autoctl perform switchover`, with handoff's pg_ctl (the keeper
//! holds through `handoff hold` before it stops PostgreSQL) and without it (handoff
//! holds when the monitor assigns the primary `draining`), the monitor refusing, the
//! monitor down, and the primary killed. Each runs a load through handoff and checks,
//! at the end, that every acknowledged write is on the monitor's primary.

use std::net::SocketAddr;
use std::time::Duration;

use handoff_tests::admin::{metric, shard_state, switchover};
use handoff_tests::load::{assert_acked_on, assert_nothing_lost, ids, Load, Outcome};
use handoff_tests::paf::{AutoFailoverCluster, Hold, Options};
use handoff_tests::patroni::server_user_copy;
use handoff_tests::{eventually, handoff_binary};

/// Each test runs its own formation: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    proxy: Option<handoff::Proxy>,
    paf: AutoFailoverCluster,
    _bin: tempfile::TempDir,
}

impl Setup {
    fn proxy(&self) -> &handoff::Proxy {
        self.proxy.as_ref().expect("running")
    }

    fn listen(&self) -> SocketAddr {
        self.proxy().listen_addr()
    }

    /// Runs `pg_autoctl <args>` against the monitor; its output.
    fn ctl(&self, args: &[&str]) -> std::process::Output {
        tokio::task::block_in_place(|| self.paf.ctl_monitor(args)).unwrap()
    }

    /// Runs `pg_autoctl <args>` on node `i`; panics with its output unless it succeeds.
    fn ctl_node(&self, i: usize, args: &[&str]) {
        let out = tokio::task::block_in_place(|| self.paf.ctl_node(i, args)).unwrap();
        assert!(
            out.status.success(),
            "pg_autoctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn healthy(&self) {
        tokio::task::block_in_place(|| self.paf.wait_healthy(Duration::from_secs(90))).unwrap();
    }
}

/// A two-node formation and handoff in front of it, shard `main` named by the monitor
/// alone (no hosts in HANDOFF_SHARDS). With `wrapper`, every keeper stops PostgreSQL
/// through handoff's pg_ctl, which runs `handoff hold` against this proxy first.
async fn setup(wrapper: bool, extra: &[(&str, &str)]) -> Setup {
    // Chosen before the keepers start (their pg_ctl needs it), bound only after.
    let admin_port = handoff_tests::pg::free_port_outside_ephemeral().unwrap();
    let admin = format!("127.0.0.1:{admin_port}");
    let (bin, copy) = server_user_copy(&handoff_binary()).unwrap();
    let opts = Options {
        hold: wrapper.then(|| Hold {
            shard: "main".into(),
            admin: admin.clone(),
            handoff: copy,
            timeout: "2s".into(),
        }),
    };
    let paf = tokio::task::spawn_blocking(move || AutoFailoverCluster::start(2, opts))
        .await
        .unwrap()
        .unwrap();
    Load::prepare(&paf.nodes[0].conn()).await.unwrap();
    let monitor = format!("main={}", paf.monitor_url());
    let vars: Vec<(&str, &str)> = vec![
        ("HANDOFF_LISTEN", "127.0.0.1:0"),
        ("HANDOFF_ADMIN_LISTEN", &admin),
        ("HANDOFF_SHARDS", "main"),
        ("HANDOFF_PG_AUTO_FAILOVER", &monitor),
        ("HANDOFF_SHUTDOWN_TIMEOUT", "5s"),
        ("HANDOFF_POOL_SIZE", "8"),
        ("HANDOFF_REPLICA_CHECK_INTERVAL", "200ms"),
        ("HANDOFF_ADMIN_USERS", "postgres"),
    ];
    let proxy = handoff_tests::start_proxy_with(&vars, extra).await.unwrap();
    Setup {
        proxy: Some(proxy),
        paf,
        _bin: bin,
    }
}

/// No client saw an error, and every acknowledged write is on node `primary`.
async fn nothing_lost(s: &Setup, out: &Outcome, primary: usize) {
    let m = &s.paf.nodes[primary];
    assert_nothing_lost(&m.conn(), &m.name, out).await;
}

async fn acked_on(s: &Setup, out: &Outcome, primary: usize) {
    let m = &s.paf.nodes[primary];
    assert_acked_on(&m.conn(), &m.name, out).await;
}

/// The proxy serves node `i` as the shard's primary, and the monitor agrees.
async fn serves(s: &Setup, i: usize) {
    handoff_tests::admin::wait_serving(s.proxy(), &s.paf.nodes[i].addr(), true).await;
}

/// pgbench's tpcb-like transactions through handoff for `secs`, started now; joined
/// with [`pgbench_clean`].
fn pgbench(s: &Setup, clients: u32, secs: u32) -> tokio::task::JoinHandle<std::process::Output> {
    let pgbench = handoff_tests::PgBin::find().unwrap().bin("pgbench");
    let port = s.listen().port().to_string();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(pgbench)
            .args(["-c", &clients.to_string(), "-j", "2", "-n"])
            .args(["-T", &secs.to_string()])
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "postgres"])
            .output()
            .unwrap()
    })
}

/// pgbench ended without an aborted client or a failed transaction.
async fn pgbench_clean(run: tokio::task::JoinHandle<std::process::Output>) {
    let out = run.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    assert_eq!(failed, Some(0), "{stdout}");
}

fn init_pgbench(s: &Setup, primary: usize) {
    let bin = handoff_tests::PgBin::find().unwrap().bin("pgbench");
    let out = std::process::Command::new(bin)
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1"])
        .args(["-p", &s.paf.nodes[primary].pg_port.to_string()])
        .args(["-U", "postgres", "postgres"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchovers_through_handoff_and_pg_autoctl_under_load_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let s = setup(true, &[]).await;
    init_pgbench(&s, 0);
    let st = shard_state(s.proxy()).await;
    assert_eq!(st["source"], "pg_auto_failover", "{st}");
    assert_eq!(st["primary"], s.paf.nodes[0].addr().as_str(), "{st}");
    assert_eq!(st["manager"]["kind"], "pg_auto_failover", "{st}");
    assert_eq!(st["manager"]["leader"], "node_1", "{st}");
    assert_eq!(st["manager"]["cluster"], "default/0", "{st}");
    assert!(st["patroni"].is_null(), "{st}");
    // The monitor's secondary serves reads: a member it names, not a host
    // HANDOFF_SHARDS lists.
    handoff_tests::admin::wait_in_rotation(s.proxy(), &[s.paf.nodes[1].addr()], true).await;

    let load = Load::start(s.listen(), 8).await.unwrap();
    let bench = pgbench(&s, 4, 60);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Through handoff, by node name: it holds, lameducks, then asks the monitor.
    let (status, report) = switchover(s.proxy(), "node_2").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "completed", "{report}");
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(steps.contains(&"pg_auto_failover_switchover"), "{report}");
    assert!(
        !steps.contains(&"promote"),
        "handoff must not promote: {report}"
    );
    serves(&s, 1).await;
    assert_eq!(s.paf.primary(), Some(1));
    s.healthy();
    // The console shows the monitor's view beside what handoff serves.
    let (console, conn) = tokio_postgres::connect(
        &handoff_tests::conn_str(&s.listen(), "postgres", "handoff", None),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    eventually(
        Duration::from_secs(10),
        "SHOW MANAGERS to agree",
        || async {
            let rows = handoff_tests::admin::console_rows(&console, "SHOW MANAGERS").await;
            let row = |name: &str| {
                rows.iter()
                    .find(|r| r["member"].as_deref() == Some(name))
                    .cloned()
                    .unwrap_or_default()
            };
            let (n1, n2) = (row("node_1"), row("node_2"));
            Ok(rows.len() == 2
                && n2["manager"].as_deref() == Some("pg_auto_failover")
                && n2["leader"].as_deref() == Some("true")
                && n2["served"].as_deref() == Some("true")
                && n2["addr"].as_deref() == Some(s.paf.nodes[1].addr().as_str())
                && n1["leader"].as_deref() == Some("false")
                && n1["role"].as_deref() == Some("secondary"))
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Holds asked for, by result (`not_primary`: the stop of a server handoff no longer
    // served as primary; `refused`: a hold that could not be made); those that held or
    // found the shard held already count as held.
    let results = || async {
        let mut v = Vec::new();
        for r in ["held", "already_held", "not_primary", "refused"] {
            let q = format!("result=\"{r}\"");
            v.push((
                r,
                metric(s.proxy(), "handoff_holds_total", &[q.as_str()]).await,
            ));
        }
        v
    };
    let holds = |v: &[(&str, f64)]| v[0].1 + v[1].1;
    // Through pg_autoctl, twice: the keeper's pg_ctl holds through handoff before it
    // stops PostgreSQL; the monitor's new primary ends the hold.
    for to in [0, 1] {
        let before = results().await;
        let ctl = s.paf.spawn_ctl_monitor(&["perform", "switchover"]).unwrap();
        let ctl = tokio::task::spawn_blocking(move || ctl.wait_with_output().unwrap());
        let out = ctl.await.unwrap();
        assert!(
            out.status.success(),
            "pg_autoctl perform switchover: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serves(&s, to).await;
        // Two holds asked for each: the goal state's and the keeper's pg_ctl's.
        let after = results().await;
        let asked = holds(&after) - holds(&before);
        assert!(
            asked >= 2.0,
            "{asked} holds for pg_autoctl's switchover to node {to} (by result, before and after: {before:?} {after:?}); the monitor's view: {}",
            shard_state(s.proxy()).await["manager"]
        );
        s.healthy();
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    let out = load.stop().await;
    nothing_lost(&s, &out, 1).await;
    pgbench_clean(bench).await;
    // The keepers stop standbys too (a demoted node rejoining): those are not held.
    let not_primary = metric(
        s.proxy(),
        "handoff_holds_total",
        &["result=\"not_primary\""],
    )
    .await;
    eprintln!("holds for servers that were not the primary: {not_primary}");

    // A target that is not a member is refused before anything changes.
    let (status, report) = switchover(s.proxy(), "node_9").await;
    assert_eq!(status, 400, "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("not a member"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_monitor_changes_nothing_and_its_draining_alone_holds() {
    let _serial = SERIAL.lock().await;
    // No pg_ctl of handoff's: what holds is the monitor assigning the primary `draining`.
    let s = setup(false, &[]).await;
    let load = Load::start(s.listen(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The only secondary may never be promoted: both handoff and the monitor refuse.
    s.ctl_node(1, &["set", "node", "candidate-priority", "0"]);
    eventually(
        Duration::from_secs(20),
        "the monitor's view of priority 0",
        || async {
            let st = shard_state(s.proxy()).await;
            Ok(st["manager"]["members"][1]["not_candidate"]
                .as_str()
                .is_some_and(|w| w.contains("priority 0")))
        },
    )
    .await
    .unwrap();
    let epoch = shard_state(s.proxy()).await["epoch"].clone();
    let (status, report) = switchover(s.proxy(), "node_2").await;
    assert_eq!(status, 409, "{report}");
    assert_eq!(report["outcome"], "refused", "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("priority 0"),
        "{report}"
    );
    // The monitor's own refusal: its only secondary in maintenance, it has no node to
    // promote.
    s.ctl_node(1, &["set", "node", "candidate-priority", "50"]);
    s.ctl_node(1, &["enable", "maintenance"]);
    let out = s.ctl(&["perform", "switchover"]);
    eprintln!(
        "pg_autoctl perform switchover with the secondary in maintenance: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the monitor switched over to a node in maintenance"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = shard_state(s.proxy()).await;
    assert_eq!(st["epoch"], epoch, "{st}");
    assert_eq!(st["state"], "serving", "{st}");
    assert_eq!(s.paf.primary(), Some(0));
    s.ctl_node(1, &["disable", "maintenance"]);
    s.healthy();
    let out = load.stop().await;
    nothing_lost(&s, &out, 0).await;
    let load = Load::start(s.listen(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Back in service, a pg_autoctl switchover is held by its draining goal state.
    let out = s.ctl(&["perform", "switchover"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serves(&s, 1).await;
    let by_goal = metric(
        s.proxy(),
        "handoff_manager_holds_total",
        &["manager=\"pg_auto_failover\""],
    )
    .await;
    assert!(
        by_goal >= 1.0,
        "the draining goal state did not hold the shard"
    );
    s.healthy();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.stop().await;
    // The keeper stops PostgreSQL the moment it reads its goal: without handoff's
    // pg_ctl, a transaction running on it then may be cut (one per client at most);
    // nothing acknowledged is lost.
    assert!(
        out.max_client_errors <= 1,
        "a client saw more than the request in flight fail: {:?}",
        out.errors
    );
    eprintln!("errors without handoff's pg_ctl: {:?}", out.errors);
    acked_on(&s, &out, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_down_then_the_primary_killed() {
    let _serial = SERIAL.lock().await;
    let mut s = setup(
        true,
        &[
            ("HANDOFF_BUFFER_WINDOW", "50s"),
            ("HANDOFF_BUFFER_MAX_FAILOVER_DURATION", "60s"),
            ("HANDOFF_HEALTH_CHECK_INTERVAL", "200ms"),
        ],
    )
    .await;
    let load = Load::start(s.listen(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The monitor goes away: handoff keeps serving the primary it has, and says so.
    tokio::task::block_in_place(|| s.paf.stop_monitor()).unwrap();
    eventually(
        Duration::from_secs(20),
        "the manager reported down",
        || async {
            let st = shard_state(s.proxy()).await;
            Ok(st["manager"]["error"].is_string())
        },
    )
    .await
    .unwrap();
    let rows_before = ids(&s.paf.nodes[0].conn()).await.unwrap().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = shard_state(s.proxy()).await;
    assert_eq!(st["state"], "serving", "{st}");
    assert_eq!(st["primary"], s.paf.nodes[0].addr().as_str(), "{st}");
    let rows_after = ids(&s.paf.nodes[0].conn()).await.unwrap().len();
    assert!(
        rows_after > rows_before,
        "no write went through while the monitor was down"
    );
    tokio::task::block_in_place(|| s.paf.run_monitor()).unwrap();
    eventually(
        Duration::from_secs(20),
        "the manager answering again",
        || async {
            let st = shard_state(s.proxy()).await;
            Ok(st["manager"]["error"].is_null() && st["manager"]["agrees"] == true)
        },
    )
    .await
    .unwrap();
    s.healthy();

    // The primary dies: the monitor promotes the secondary (synchronous: nothing
    // acknowledged is lost), handoff serves it.
    tokio::task::block_in_place(|| s.paf.kill(0)).unwrap();
    serves(&s, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.stop().await;
    assert!(
        out.max_client_errors <= 1,
        "a client saw more than the request in flight fail: {:?}",
        out.errors
    );
    acked_on(&s, &out, 1).await;
    drop(s.proxy.take());
}
