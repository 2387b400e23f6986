//! The hard fence (docs/fence.md), against real PostgreSQL: writers that bypass handoff
//! and override the read-only default lose nothing across a switchover and cannot
//! commit on the old primary after the fence; a rollback lifts exactly what the fence
//! changed; the demote command runs and is reported; the split-brain watchdog fires
//! when a replaced primary accepts connections again, and fences it.

use std::time::{Duration, Instant};

use handoff_tests::admin::{metric, server, shard_state, switchover, watched};
use handoff_tests::bypass::{self, Mode, Writers};
use handoff_tests::load::{ids, Load};
use handoff_tests::{eventually, start_proxy, Cluster, Node};
use serde_json::Value;

/// A role that is not a superuser and may write the bypass table.
fn create_plain_role(node: &Node) {
    node.psql("DROP ROLE IF EXISTS plain_writer; CREATE ROLE plain_writer LOGIN")
        .unwrap();
}

fn refused_by_fence(node: &Node, user: &str) {
    let e = node
        .try_login(user, "postgres")
        .expect_err("the fenced server let a new session in");
    assert!(e.contains("not currently accepting connections"), "{e}");
}

fn summary(outcomes: &[bypass::WriterOutcome]) -> String {
    outcomes
        .iter()
        .map(|o| {
            format!(
                "writer {} ({}, {}): {} acknowledged, errors {:?}",
                o.writer,
                o.mode.name(),
                o.user,
                o.acks.len(),
                o.errors
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypassing_writers_lose_nothing_and_cannot_write_after_the_fence() {
    let mut cluster = Cluster::start(1).unwrap();
    create_plain_role(&cluster.primary);
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    bypass::prepare(&server(&cluster.primary), Some("plain_writer"))
        .await
        .unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "8")])
        .await
        .unwrap();
    let load = Load::start(proxy.listen_addr(), 16).await.unwrap();
    let old = cluster.primary.addr();
    let mut kinds: Vec<(Mode, &str)> = Mode::ALL.iter().map(|m| (*m, "postgres")).collect();
    kinds.push((Mode::BeginReadWrite, "plain_writer"));
    let writers = Writers::start(&old, &kinds);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let target = cluster.standbys[0].addr();
    let (status, report) = switchover(&proxy, &target).await;
    let fenced_at = Instant::now();
    assert_eq!(status, 200, "{report:#}");
    assert_eq!(report["outcome"], "completed", "{report:#}");
    let databases: Vec<&str> = report["fence"]["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        databases.contains(&"postgres") && databases.contains(&"template1"),
        "{report:#}"
    );
    assert!(!databases.contains(&"template0"), "{report:#}");
    assert!(
        report["fence"]["terminated_sessions"].as_u64().unwrap() >= 1,
        "the bypassing writers' sessions were terminated: {report:#}"
    );
    // From the fence on, nobody logs in: superuser or not.
    refused_by_fence(&cluster.primary, "postgres");
    refused_by_fence(&cluster.primary, "plain_writer");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = load.stop().await;
    let written = writers.stop().await;
    eprintln!("{}", summary(&written));
    assert!(out.errors.is_empty(), "client errors: {:?}", out.errors);

    // Every acknowledged write, through handoff or not, is on the new primary; nothing
    // was acknowledged on the old one after the fence, though every writer kept trying.
    let new_load = ids(&server(&cluster.standbys[0])).await.unwrap();
    let new_bypass = bypass::ids(&server(&cluster.standbys[0])).await.unwrap();
    let missing: Vec<_> = out.acked.iter().filter(|i| !new_load.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged through handoff but lost: {missing:?}"
    );
    assert_eq!(written.len(), kinds.len());
    for w in &written {
        assert!(
            !w.acks.is_empty(),
            "writer {} never wrote before the switchover:\n{}",
            w.writer,
            summary(&written)
        );
        let lost: Vec<i64> = w
            .acks
            .iter()
            .map(|a| a.id)
            .filter(|i| !new_bypass.contains(i))
            .collect();
        assert!(
            lost.is_empty(),
            "writer {} ({}): acknowledged on the old primary but not on the new one: {lost:?}",
            w.writer,
            w.mode.name()
        );
        assert_eq!(
            w.acked_after(fenced_at),
            0,
            "writer {} wrote after the fence",
            w.writer
        );
        assert!(
            w.attempted_after(fenced_at) > 0,
            "writer {} stopped trying",
            w.writer
        );
    }

    // The old primary is watched: fenced, no split brain.
    let state = shard_state(&proxy).await;
    let w = watched(&state, &old).unwrap_or_else(|| panic!("{state:#}"));
    assert_eq!(w["why"], "switchover", "{state:#}");
    assert_eq!(w["state"], "fenced", "{state:#}");
    assert_eq!(w["split_brain"], Value::Null, "{state:#}");
    assert_eq!(state["split_brain"], serde_json::json!([]), "{state:#}");
    proxy.shutdown().await;

    // Opened by hand afterwards, the old primary holds nothing the new one lacks.
    cluster.primary.lift_fence_by_hand().unwrap();
    let old_load = ids(&server(&cluster.primary)).await.unwrap();
    let old_bypass = bypass::ids(&server(&cluster.primary)).await.unwrap();
    assert!(
        old_load.is_subset(&new_load),
        "the old primary took writes the new one lacks"
    );
    assert!(
        old_bypass.is_subset(&new_bypass),
        "the old primary took bypassing writes the new one lacks: {:?}",
        old_bypass.difference(&new_bypass).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_lifts_exactly_what_the_fence_changed() {
    let cluster = Cluster::start(1).unwrap();
    bypass::prepare(&server(&cluster.primary), None)
        .await
        .unwrap();
    // A database that refused connections before: the fence does not touch it, and the
    // rollback must not open it.
    cluster
        .primary
        .psql("CREATE DATABASE closed_before")
        .unwrap();
    cluster
        .primary
        .psql("ALTER DATABASE closed_before ALLOW_CONNECTIONS false")
        .unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    // Without the synchronous target: with it, a target that stops replaying is found
    // before the fence, and the switchover is refused instead of rolled back.
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "8"),
            ("HANDOFF_SWITCHOVER_TIMEOUT", "1s"),
            ("HANDOFF_SWITCHOVER_SYNC_TARGET", "false"),
        ],
    )
    .await
    .unwrap();
    let load = Load::start(proxy.listen_addr(), 8).await.unwrap();
    let old = cluster.primary.addr();
    let writers = Writers::start(&old, &[(Mode::BeginReadWrite, "postgres")]);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The target stops replaying: the catch-up cannot finish, the switchover rolls back.
    cluster.standbys[0]
        .psql("select pg_wal_replay_pause()")
        .unwrap();
    let (status, r) = switchover(&proxy, &cluster.standbys[0].addr()).await;
    let rolled_back_at = Instant::now();
    assert_eq!(
        (status, r["outcome"].as_str()),
        (409, Some("rolled_back")),
        "{r:#}"
    );
    let fenced: Vec<&str> = r["fence"]["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        fenced.contains(&"postgres") && fenced.contains(&"template1"),
        "{r:#}"
    );
    assert!(!fenced.contains(&"closed_before"), "{r:#}");

    // Confirmed from new sessions: what the fence closed is open, the rest as it was.
    cluster.primary.try_login("postgres", "postgres").unwrap();
    cluster.primary.try_login("postgres", "template1").unwrap();
    assert_eq!(
        cluster
            .primary
            .psql("select datname || '=' || datallowconn from pg_database order by datname")
            .unwrap(),
        "closed_before=false\npostgres=true\ntemplate0=false\ntemplate1=true"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = load.stop().await;
    let written = writers.stop().await;
    eprintln!("{}", summary(&written));
    assert!(out.errors.is_empty(), "client errors: {:?}", out.errors);
    let state = shard_state(&proxy).await;
    assert_eq!(
        (state["state"].as_str(), state["primary"].as_str()),
        (Some("serving"), Some(old.as_str()))
    );
    assert_eq!(state["watched"], serde_json::json!([]), "{state:#}");

    // The bypassing writer writes on the old primary again and lost nothing.
    let now = bypass::ids(&server(&cluster.primary)).await.unwrap();
    let w = &written[0];
    assert!(
        w.acked_after(rolled_back_at) > 0,
        "no write after the rollback: {:?}",
        w.errors
    );
    let lost: Vec<i64> = w
        .acks
        .iter()
        .map(|a| a.id)
        .filter(|i| !now.contains(i))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let load_now = ids(&server(&cluster.primary)).await.unwrap();
    assert!(out.acked.iter().all(|i| load_now.contains(i)));
    cluster.standbys[0]
        .psql("select pg_wal_replay_resume()")
        .unwrap();
    proxy.shutdown().await;
}

/// A demote command that records its environment in `dir/env` and then runs `then`.
fn demote_command(dir: &std::path::Path, then: &str) -> String {
    format!(
        "echo \"shard=$HANDOFF_SHARD old=$HANDOFF_OLD_PRIMARY new=$HANDOFF_NEW_PRIMARY \
         old_port=$HANDOFF_OLD_PRIMARY_PORT epoch=$HANDOFF_EPOCH lsn=$HANDOFF_FENCE_LSN\" > {}/env; {then}",
        dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demote_command_runs_and_a_failing_or_hanging_one_changes_nothing() {
    let mut cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let as_pg = if std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(1)
        == 0
    {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let stop = format!(
        "echo stopping $HANDOFF_OLD_PRIMARY; {as_pg}{} -D {} -m fast -w stop",
        cluster.bin.bin("pg_ctl").display(),
        cluster.primary.data.display()
    );

    // 1. The command stops the old primary.
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "4"),
            (
                "HANDOFF_SWITCHOVER_DEMOTE_COMMAND",
                &demote_command(dir.path(), &stop),
            ),
        ],
    )
    .await
    .unwrap();
    let load = Load::start(proxy.listen_addr(), 4).await.unwrap();
    let (old, new) = (cluster.primary.addr(), cluster.standbys[0].addr());
    let (status, r) = switchover(&proxy, &new).await;
    assert_eq!(status, 200, "{r:#}");
    let d = &r["demote"];
    assert_eq!(d["ok"], true, "{r:#}");
    assert_eq!(d["exit_code"], 0, "{r:#}");
    assert!(
        d["output"]
            .as_str()
            .unwrap()
            .contains(&format!("stopping {old}")),
        "{r:#}"
    );
    let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
    assert_eq!(
        env.trim(),
        format!(
            "shard=main old={old} new={new} old_port={} epoch=2 lsn={}",
            cluster.primary.port,
            r["fence_lsn"].as_str().unwrap()
        )
    );
    let e = cluster
        .primary
        .try_login("postgres", "postgres")
        .unwrap_err();
    assert!(!e.contains("not currently accepting"), "{e}");
    eventually(
        Duration::from_secs(5),
        "the watchdog to see the old primary down",
        || async {
            Ok(watched(&shard_state(&proxy).await, &old).is_some_and(|w| w["state"] == "down"))
        },
    )
    .await
    .unwrap();
    let out = load.stop().await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    proxy.shutdown().await;
    cluster.swap(0);
    cluster.rejoin(0).unwrap();

    // 2. A failing command, then 3. a hanging one: reported, switchover completed.
    for (then, timeout) in [("echo broken >&2; exit 3", "30s"), ("sleep 60", "500ms")] {
        let proxy = start_proxy(
            &cluster,
            &[
                ("HANDOFF_POOL_SIZE", "4"),
                (
                    "HANDOFF_SWITCHOVER_DEMOTE_COMMAND",
                    &demote_command(dir.path(), then),
                ),
                ("HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT", timeout),
            ],
        )
        .await
        .unwrap();
        let load = Load::start(proxy.listen_addr(), 4).await.unwrap();
        let to = cluster.standbys[0].addr();
        let started = Instant::now();
        let (status, r) = switchover(&proxy, &to).await;
        assert_eq!(
            (status, r["outcome"].as_str()),
            (200, Some("completed")),
            "{r:#}"
        );
        let d = &r["demote"];
        assert_eq!(d["ok"], false, "{r:#}");
        if then.starts_with("sleep") {
            assert_eq!(d["timed_out"], true, "{r:#}");
            assert!(started.elapsed() < Duration::from_secs(30), "{r:#}");
        } else {
            assert_eq!(d["exit_code"], 3, "{r:#}");
            assert!(d["output"].as_str().unwrap().contains("broken"), "{r:#}");
        }
        assert_eq!(shard_state(&proxy).await["primary"], to.as_str());
        let out = load.stop().await;
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        // The old primary stays fenced.
        refused_by_fence(&cluster.primary, "postgres");
        proxy.shutdown().await;
        cluster.swap(0);
        cluster.rejoin(0).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_fires_when_a_fenced_old_primary_is_opened_by_hand() {
    let mut cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "4")])
        .await
        .unwrap();
    let old = cluster.primary.addr();
    let (status, r) = switchover(&proxy, &cluster.standbys[0].addr()).await;
    assert_eq!(status, 200, "{r:#}");
    let host_label = format!("host=\"{old}\"");
    let labels = [host_label.as_str()];
    eventually(
        Duration::from_secs(5),
        "the old primary to be watched as fenced",
        || async {
            Ok(watched(&shard_state(&proxy).await, &old).is_some_and(|w| w["state"] == "fenced"))
        },
    )
    .await
    .unwrap();
    assert_eq!(metric(&proxy, "handoff_split_brain", &labels).await, 0.0);

    // An operator opens it again by hand (single-user mode, restart).
    cluster.primary.lift_fence_by_hand().unwrap();
    eventually(Duration::from_secs(10), "the split-brain alarm", || async {
        Ok(shard_state(&proxy).await["split_brain"] == serde_json::json!([old.as_str()]))
    })
    .await
    .unwrap();
    assert_eq!(metric(&proxy, "handoff_split_brain", &labels).await, 1.0);
    let state = shard_state(&proxy).await;
    let w = watched(&state, &old).unwrap();
    assert!(
        w["split_brain"]
            .as_str()
            .unwrap()
            .contains("not in recovery"),
        "{state:#}"
    );
    // The watchdog fenced it again, and handoff never routed there.
    eventually(Duration::from_secs(10), "the watchdog's fence", || async {
        Ok(cluster.primary.try_login("postgres", "postgres").is_err())
    })
    .await
    .unwrap();
    refused_by_fence(&cluster.primary, "postgres");
    assert_eq!(state["primary"], cluster.standbys[0].addr().as_str());

    // `handoff status` shows it.
    let out = handoff_tests::handoff_command()
        .args(["status", "--admin", &proxy.admin_addr().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("SPLIT BRAIN  shard main: {old}")),
        "{text}"
    );

    // The alarm stays until the host rejoins as a standby.
    cluster.swap(0);
    cluster.rejoin(0).unwrap();
    eventually(
        Duration::from_secs(10),
        "the alarm to clear once it is a standby",
        || async {
            let s = shard_state(&proxy).await;
            Ok(s["split_brain"] == serde_json::json!([]) && watched(&s, &old).is_none())
        },
    )
    .await
    .unwrap();
    assert_eq!(metric(&proxy, "handoff_split_brain", &labels).await, 0.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_restarting_in_place_after_a_promotion_is_fenced() {
    let mut cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_HEALTH_CHECK_INTERVAL", "200ms"),
            ("HANDOFF_HEALTH_CHECK_TIMEOUT", "1s"),
        ],
    )
    .await
    .unwrap();
    let old = cluster.primary.addr();
    let standby = cluster.standbys[0].addr();
    cluster.primary.crash().unwrap();
    cluster.promote(0).unwrap();
    eventually(
        Duration::from_secs(10),
        "the promoted standby to serve",
        || async {
            let s = shard_state(&proxy).await;
            Ok(s["state"] == "serving" && s["primary"] == standby.as_str())
        },
    )
    .await
    .unwrap();
    let s = shard_state(&proxy).await;
    let w = watched(&s, &old).unwrap_or_else(|| panic!("{s:#}"));
    assert_eq!(w["why"], "failed", "{s:#}");

    // It comes back as it was: writable, on the old timeline. A writer that bypasses
    // handoff hammers it from the moment it is up.
    cluster.primary.start().unwrap();
    let writers = Writers::start(&old, &[(Mode::BeginReadWrite, "postgres")]);
    eventually(Duration::from_secs(10), "the split-brain alarm", || async {
        Ok(shard_state(&proxy).await["split_brain"] == serde_json::json!([old.as_str()]))
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "the watchdog's fence", || async {
        Ok(cluster.primary.try_login("postgres", "postgres").is_err())
    })
    .await
    .unwrap();
    refused_by_fence(&cluster.primary, "postgres");
    let fenced_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = writers.stop().await;
    eprintln!("{}", summary(&written));
    // Whatever slipped in before the fence is the split brain the alarm reports;
    // after it, nothing.
    assert_eq!(written[0].acked_after(fenced_at), 0);
    assert!(written[0].attempted_after(fenced_at) > 0);
    let s = shard_state(&proxy).await;
    assert_eq!(s["primary"], standby.as_str(), "{s:#}");
    let w = watched(&s, &old).unwrap();
    assert_eq!(w["state"], "fenced", "{s:#}");
    assert_eq!(w["fenced_by_handoff"], true, "{s:#}");
    let fences = metric(
        &proxy,
        "handoff_fences_total",
        &["source=\"watchdog\"", "result=\"ok\""],
    )
    .await;
    assert!(fences >= 1.0, "{fences}");

    // Clients through handoff still write to the new primary.
    let (c, conn) = tokio_postgres::connect(
        &handoff_tests::conn_str(&proxy.listen_addr(), "postgres", "postgres", None),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, cluster.standbys[0].port as i32);
    proxy.shutdown().await;
}
