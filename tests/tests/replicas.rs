//! Reads on standbys: `postgres@replica` through handoff against a real primary with two
//! streaming standbys.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use handoff_tests::admin::shard_state;
use handoff_tests::{conn_str, eventually, start_proxy, Cluster};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

async fn connect(proxy: &handoff::Proxy, db: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&conn_str(&proxy.listen_addr(), "postgres", db, None), NoTls)
            .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Whether the server is in recovery, and its port.
async fn where_am_i(c: &Client) -> Result<(bool, i32), tokio_postgres::Error> {
    let row = c
        .query_one(
            "select pg_is_in_recovery(), current_setting('port')::int",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

fn standby(state: &Value, port: u16) -> &Value {
    handoff_tests::admin::standby(state, &format!("127.0.0.1:{port}"))
        .unwrap_or_else(|| panic!("standby on port {port} listed: {state}"))
}

async fn wait_in_rotation(proxy: &handoff::Proxy, ports: &[u16], want: bool) {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    handoff_tests::admin::wait_in_rotation(proxy, &hosts, want).await;
}

const FAST_CHECKS: (&str, &str) = ("HANDOFF_REPLICA_CHECK_INTERVAL", "100ms");

#[tokio::test]
async fn reads_spread_over_both_standbys_and_a_lagging_one_leaves_and_returns() {
    let cluster = Cluster::start(2).unwrap();
    let ports: Vec<u16> = cluster.standbys.iter().map(|s| s.port).collect();
    let proxy = start_proxy(
        &cluster,
        &[FAST_CHECKS, ("HANDOFF_REPLICA_MAX_LAG", "256kB")],
    )
    .await
    .unwrap();
    wait_in_rotation(&proxy, &ports, true).await;
    let state = shard_state(&proxy).await;
    let primary = standby(&state, cluster.primary.port);
    assert_eq!(primary["in_rotation"], false, "{state}");
    assert_eq!(primary["state"], "not_standby", "{state}");
    let s1 = standby(&state, ports[0]);
    assert_eq!(
        s1["upstream"].as_str(),
        Some(format!("127.0.0.1:{}", cluster.primary.port).as_str()),
        "{state}"
    );

    // Eight clients reading at once: every read on a standby, both standbys used.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = connect(&proxy, "postgres@replica").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..20 {
                seen.push(where_am_i(&c).await.unwrap());
                c.simple_query("select pg_sleep(0.005)").await.unwrap();
            }
            seen
        }));
    }
    let mut servers = HashSet::new();
    for t in tasks {
        for (in_recovery, port) in t.await.unwrap() {
            assert!(in_recovery, "a read ran on the primary (port {port})");
            servers.insert(port as u16);
        }
    }
    assert_eq!(
        servers,
        ports.iter().copied().collect::<HashSet<_>>(),
        "reads spread over both standbys"
    );
    // Writes through @replica get the standby's own refusal; the session goes on.
    let c = connect(&proxy, "postgres@replica").await.unwrap();
    let err = c
        .batch_execute("create table t_on_standby (id int)")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
    assert!(where_am_i(&c).await.unwrap().0);
    // The primary's route is the primary's.
    let p = connect(&proxy, "postgres@primary").await.unwrap();
    assert_eq!(
        where_am_i(&p).await.unwrap(),
        (false, i32::from(cluster.primary.port))
    );

    // Standby 1 stops replaying: once its lag passes 256kB it leaves the rotation.
    cluster.standbys[0]
        .psql("select pg_wal_replay_pause()")
        .unwrap();
    p.batch_execute("create table lag_maker as select g, repeat('x', 100) as pad from generate_series(1, 20000) g")
        .await
        .unwrap();
    wait_in_rotation(&proxy, &ports[..1], false).await;
    let state = shard_state(&proxy).await;
    assert_eq!(standby(&state, ports[0])["state"], "lagging", "{state}");
    assert!(
        standby(&state, ports[0])["lag_bytes"].as_u64().unwrap() > 256 * 1024,
        "{state}"
    );
    for _ in 0..10 {
        assert_eq!(
            where_am_i(&c).await.unwrap(),
            (true, i32::from(ports[1])),
            "reads avoid the lagging standby"
        );
    }
    // Replaying again, it catches up and returns.
    cluster.standbys[0]
        .psql("select pg_wal_replay_resume()")
        .unwrap();
    wait_in_rotation(&proxy, &ports[..1], true).await;
    let mut back = false;
    for _ in 0..20 {
        // One client at a time: ties between the two go round.
        if where_am_i(&c).await.unwrap().1 == i32::from(ports[0]) {
            back = true;
        }
    }
    assert!(back, "reads reach the standby again");
    let rows = c
        .query_one("select count(*) from lag_maker", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), 20000);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_standby_killed_under_read_load_costs_only_the_reads_in_flight() {
    let mut cluster = Cluster::start(2).unwrap();
    let ports: Vec<u16> = cluster.standbys.iter().map(|s| s.port).collect();
    let proxy = start_proxy(&cluster, &[FAST_CHECKS]).await.unwrap();
    wait_in_rotation(&proxy, &ports, true).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    const CLIENTS: usize = 8;
    for _ in 0..CLIENTS {
        let c = connect(&proxy, "postgres@replica").await.unwrap();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match c
                    .query_one(
                        "select current_setting('port')::int, pg_sleep(0.002)::text",
                        &[],
                    )
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        errors.push(e.code().map(|c| c.code().to_string()));
                        // A session the proxy ended fails at once, forever: stop (the
                        // checks below report it) instead of spinning on this runtime.
                        if c.is_closed() {
                            break;
                        }
                    }
                }
            }
            (ok, errors, c)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on = |port: u16| format!("host=\"127.0.0.1:{port}\"");
    let served = handoff_tests::admin::metric(
        &proxy,
        "handoff_replica_transactions_total",
        &[&on(ports[0])],
    )
    .await;
    assert!(served > 10.0, "the standby served reads before: {served}");
    let killed_at = Instant::now();
    cluster.standbys[0].crash().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total_errors = 0;
    for t in tasks {
        let (ok, errors, c) = t.await.unwrap();
        assert!(ok > 0);
        assert!(
            !c.is_closed(),
            "the proxy ended a reader's session when its standby was killed: {errors:?}"
        );
        assert!(
            errors.len() <= 1,
            "a client had more errors than the one read in flight: {errors:?}"
        );
        for e in &errors {
            let code = e.as_deref().unwrap_or("none");
            assert!(
                code.starts_with("08") || code.starts_with("57"),
                "only a lost connection's error: {code}"
            );
        }
        total_errors += errors.len();
        // Every client goes on, on the surviving standby.
        for _ in 0..5 {
            assert_eq!(where_am_i(&c).await.unwrap(), (true, i32::from(ports[1])));
        }
    }
    assert!(total_errors <= CLIENTS, "{total_errors} errors");
    let state = shard_state(&proxy).await;
    assert_eq!(standby(&state, ports[0])["in_rotation"], false, "{state}");
    eprintln!(
        "standby killed: {total_errors} reads in flight failed; checked {:?} after",
        killed_at.elapsed()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn with_no_standby_any_goes_to_the_primary_and_replica_gets_a_clear_error() {
    let mut cluster = Cluster::start(1).unwrap();
    let port = cluster.standbys[0].port;
    let proxy = start_proxy(&cluster, &[FAST_CHECKS, ("HANDOFF_BUFFER_WINDOW", "1s")])
        .await
        .unwrap();
    wait_in_rotation(&proxy, &[port], true).await;
    let any = connect(&proxy, "postgres@any").await.unwrap();
    assert_eq!(where_am_i(&any).await.unwrap(), (true, i32::from(port)));
    let replica = connect(&proxy, "postgres@replica").await.unwrap();

    cluster.standbys[0].stop("fast").unwrap();
    wait_in_rotation(&proxy, &[port], false).await;
    assert_eq!(
        where_am_i(&any).await.unwrap(),
        (false, i32::from(cluster.primary.port)),
        "@any falls back to the primary"
    );
    let started = Instant::now();
    let err = where_am_i(&replica).await.unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code(), &SqlState::CANNOT_CONNECT_NOW, "{db:?}");
    assert!(db.message().contains("no standby"), "{db:?}");
    assert!(
        db.hint().unwrap_or_default().contains("@any"),
        "the hint names the fallback: {db:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it waited for a standby first"
    );
    // The session goes on: back in the rotation, its reads run again.
    cluster.standbys[0].start().unwrap();
    wait_in_rotation(&proxy, &[port], true).await;
    assert_eq!(where_am_i(&replica).await.unwrap(), (true, i32::from(port)));

    // A target handoff does not know is refused at login, naming the ones it does.
    let err = connect(&proxy, "postgres@nonsense").await.unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code(), &SqlState::INVALID_CATALOG_NAME);
    assert!(db.message().contains("\"nonsense\""), "{db:?}");
    assert!(db.hint().unwrap_or_default().contains("@replica"), "{db:?}");
    proxy.shutdown().await;
}

/// What a reader's session offers: named prepared statements, cancel, its parameters,
/// and read-only by default; in both pool modes.
async fn a_readers_session(proxy: &handoff::Proxy, standbys: &[u16]) -> Client {
    let c = connect(proxy, "postgres@replica").await.unwrap();
    let (in_recovery, port) = where_am_i(&c).await.unwrap();
    assert!(in_recovery && standbys.contains(&(port as u16)));
    let stmt = c.prepare("select $1::int + 1").await.unwrap();
    for i in 0..5 {
        let v: i32 = c.query_one(&stmt, &[&i]).await.unwrap().get(0);
        assert_eq!(v, i + 1);
    }
    let ro = c
        .query_one("show default_transaction_read_only", &[])
        .await
        .unwrap();
    assert_eq!(ro.get::<_, String>(0), "on");
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = c.simple_query("select pg_sleep(30)").await.map(|_| ());
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(NoTls).await.unwrap();
    let (c, r) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.unwrap_err().code(), Some(&SqlState::QUERY_CANCELED));
    assert!(where_am_i(&c).await.unwrap().0);
    c
}

#[tokio::test]
async fn readers_get_statements_cancel_and_read_only_in_both_pool_modes() {
    let cluster = Cluster::start(2).unwrap();
    let ports: Vec<u16> = cluster.standbys.iter().map(|s| s.port).collect();
    let proxy = start_proxy(&cluster, &[FAST_CHECKS]).await.unwrap();
    wait_in_rotation(&proxy, &ports, true).await;
    a_readers_session(&proxy, &ports).await;
    proxy.shutdown().await;

    let session = start_proxy(&cluster, &[FAST_CHECKS, ("HANDOFF_POOL_MODE", "session")])
        .await
        .unwrap();
    wait_in_rotation(&session, &ports, true).await;
    let c = a_readers_session(&session, &ports).await;
    // One standby, one backend, for the whole session.
    let pid: i32 = c
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let (_, port) = where_am_i(&c).await.unwrap();
    for _ in 0..5 {
        let again: i32 = c
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(again, pid);
        assert_eq!(where_am_i(&c).await.unwrap().1, port);
    }
    // Two sessions at once go to the two standbys (the least busy first).
    let other = connect(&session, "postgres@replica").await.unwrap();
    assert_ne!(where_am_i(&other).await.unwrap().1, port);
    let primary = connect(&session, "postgres").await.unwrap();
    assert!(!where_am_i(&primary).await.unwrap().0);
    session.shutdown().await;
}

/// Readers through `@replica` until stopped: their errors and the longest time between
/// two answers any of them waited.
struct Readers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>, Duration)>>,
}

impl Readers {
    async fn start(proxy: &handoff::Proxy, n: usize) -> Readers {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let c = connect(proxy, "postgres@replica").await.unwrap();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut errors, mut longest) = (0, Vec::new(), Duration::ZERO);
                let mut last = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match c
                        .query_one(
                            "select pg_is_in_recovery(), count(*) from handoff_load",
                            &[],
                        )
                        .await
                    {
                        Ok(row) if row.get::<_, bool>(0) => ok += 1,
                        Ok(_) => errors.push("a read ran on a primary".to_string()),
                        Err(e) => errors.push(format!("{e:?}")),
                    }
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, errors, longest)
            }));
        }
        Readers { stop, tasks }
    }

    async fn stop(self) -> (u64, Vec<String>, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (mut ok, mut errors, mut longest) = (0, Vec::new(), Duration::ZERO);
        for t in self.tasks {
            let (o, e, l) = t.await.unwrap();
            ok += o;
            errors.extend(e);
            longest = longest.max(l);
        }
        (ok, errors, longest)
    }
}

#[tokio::test]
async fn reads_and_writes_flow_through_a_switchover_and_reads_through_a_crash() {
    use handoff_tests::load::{ids, Load};
    let mut cluster = Cluster::start(2).unwrap();
    let ports: Vec<u16> = cluster.standbys.iter().map(|s| s.port).collect();
    let primary_conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        cluster.primary.port
    );
    Load::prepare(&primary_conn).await.unwrap();
    let proxy = start_proxy(&cluster, &[FAST_CHECKS, ("HANDOFF_POOL_SIZE", "16")])
        .await
        .unwrap();
    wait_in_rotation(&proxy, &ports, true).await;
    let writers = Load::start(proxy.listen_addr(), 8).await.unwrap();
    let readers = Readers::start(&proxy, 8).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let target = cluster.standbys[0].addr();
    let (status, report) = handoff_tests::admin::switchover(&proxy, &target).await;
    assert_eq!(status, 200, "{report:#}");
    assert_eq!(report["outcome"], "completed", "{report:#}");
    // The other standby was pointed at the new primary, and serves reads from it.
    let other = cluster.standbys[1].addr();
    assert_eq!(
        report["repointed_standbys"],
        serde_json::json!([other]),
        "{report:#}"
    );
    let new_primary = format!("127.0.0.1:{}", ports[0]);
    eventually(
        Duration::from_secs(20),
        "the other standby streaming from the new primary, in the rotation",
        || async {
            let state = shard_state(&proxy).await;
            let s = standby(&state, ports[1]);
            Ok(s["upstream"].as_str() == Some(new_primary.as_str()) && s["in_rotation"] == true)
        },
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the new primary checked as no standby",
        || async {
            let state = shard_state(&proxy).await;
            Ok(standby(&state, ports[0])["state"] == "not_standby")
        },
    )
    .await
    .unwrap();
    let state = shard_state(&proxy).await;
    assert_eq!(
        standby(&state, cluster.primary.port)["in_rotation"],
        false,
        "the fenced old primary serves no reads: {state}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let written = writers.stop().await;
    let (reads, read_errors, longest_read) = readers.stop().await;
    assert!(
        written.errors.is_empty(),
        "writers' errors: {:?}",
        written.errors
    );
    assert!(read_errors.is_empty(), "readers' errors: {read_errors:?}");
    assert!(reads > 0 && written.ok > 0);
    // Every acknowledged write is on the new primary.
    let new_conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        ports[0]
    );
    let on_new = ids(&new_conn).await.unwrap();
    let lost: Vec<_> = written
        .acked
        .iter()
        .filter(|id| !on_new.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes missing: {lost:?}");
    eprintln!(
        "switchover: {} writes, {reads} reads, no errors; longest wait for a read {longest_read:?}",
        written.ok
    );

    // The new primary crashes: reads go on, on the standby it fed.
    let readers = Readers::start(&proxy, 8).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.standbys[0].crash().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (reads, read_errors, longest_read) = readers.stop().await;
    assert!(
        read_errors.is_empty(),
        "reads while the primary is down: {read_errors:?}"
    );
    assert!(reads > 100, "{reads} reads");
    let state = shard_state(&proxy).await;
    assert_eq!(standby(&state, ports[1])["in_rotation"], true, "{state}");
    eprintln!("crash: {reads} reads, no errors; longest wait {longest_read:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn scram_clients_read_and_the_console_shows_the_standbys() {
    let cluster = Cluster::start(1).unwrap();
    let port = cluster.standbys[0].port;
    let proxy = start_proxy(
        &cluster,
        &[
            FAST_CHECKS,
            ("HANDOFF_USERS", "postgres=secret,admin=admin-pw"),
            ("HANDOFF_ADMIN_USERS", "admin"),
            ("HANDOFF_ADMIN_DB_USER", "postgres"),
        ],
    )
    .await
    .unwrap();
    wait_in_rotation(&proxy, &[port], true).await;
    let login = |db: &str, pw: &str| {
        let url = conn_str(&proxy.listen_addr(), "postgres", db, Some(pw));
        async move {
            let (c, conn) = tokio_postgres::connect(&url, NoTls).await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(c)
        }
    };
    let err = login("postgres@replica", "wrong").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
    let reader = login("postgres@replica", "secret").await.unwrap();
    assert_eq!(where_am_i(&reader).await.unwrap(), (true, i32::from(port)));

    let url = conn_str(&proxy.listen_addr(), "admin", "handoff", Some("admin-pw"));
    let (console, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    // Each row's values, NULL as "".
    let show = |cmd: &'static str| {
        let console = &console;
        async move {
            handoff_tests::admin::console_rows(console, cmd)
                .await
                .into_iter()
                .map(|r| {
                    r.into_iter()
                        .map(|(k, v)| (k, v.unwrap_or_default()))
                        .collect::<std::collections::HashMap<_, _>>()
                })
                .collect::<Vec<_>>()
        }
    };
    let standbys = show("SHOW STANDBYS").await;
    let row = |host: String| {
        standbys
            .iter()
            .find(|r| r["host"] == host)
            .unwrap_or_else(|| panic!("{host} in {standbys:?}"))
            .clone()
    };
    let s = row(format!("127.0.0.1:{port}"));
    assert_eq!(
        (s["in_rotation"].as_str(), s["state"].as_str()),
        ("true", "in_rotation")
    );
    assert_eq!(s["upstream"], format!("127.0.0.1:{}", cluster.primary.port));
    assert!(
        s["chosen"].parse::<u64>().unwrap() >= 2,
        "login and read: {s:?}"
    );
    let p = row(format!("127.0.0.1:{}", cluster.primary.port));
    assert_eq!(p["state"], "not_standby");
    let pools = show("SHOW POOLS").await;
    let read_pool = pools
        .iter()
        .find(|r| r["role"] == "standby")
        .unwrap_or_else(|| panic!("a read pool in {pools:?}"));
    assert_eq!(read_pool["primary"], format!("127.0.0.1:{port}"));
    assert_eq!(read_pool["database"], "postgres");
    let servers = show("SHOW SERVERS").await;
    assert!(
        servers
            .iter()
            .any(|r| r["role"] == "standby" && r["port"] == port.to_string()),
        "{servers:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_mode_reader_moves_off_a_standby_a_switchover_promotes() {
    let cluster = Cluster::start(2).unwrap();
    let ports: Vec<u16> = cluster.standbys.iter().map(|s| s.port).collect();
    let proxy = start_proxy(&cluster, &[FAST_CHECKS, ("HANDOFF_POOL_MODE", "session")])
        .await
        .unwrap();
    wait_in_rotation(&proxy, &ports, true).await;
    let c = connect(&proxy, "postgres@replica").await.unwrap();
    c.batch_execute("SET application_name = 'reader'")
        .await
        .unwrap();
    let statement = c.prepare("select $1::int + 1").await.unwrap();
    let (in_recovery, on) = where_am_i(&c).await.unwrap();
    assert!(in_recovery);
    // The switchover promotes the very standby this session reads from.
    let i = ports.iter().position(|p| *p as i32 == on).unwrap();
    let (status, report) =
        handoff_tests::admin::switchover(&proxy, &cluster.standbys[i].addr()).await;
    assert_eq!(status, 200, "{report:#}");
    let (in_recovery, now) = where_am_i(&c)
        .await
        .expect("the session goes on after the switchover");
    assert!(in_recovery, "it reads from a standby still");
    assert_ne!(now, on, "not from the promoted one");
    let name: String = c
        .query_one("select current_setting('application_name')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "reader", "its settings came along");
    let two: i32 = c.query_one(&statement, &[&1]).await.unwrap().get(0);
    assert_eq!(two, 2, "its prepared statement came along");
}
