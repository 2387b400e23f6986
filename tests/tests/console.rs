//! The admin console (`psql -U <admin> handoff`, or the database name `pgbouncer`), with
//! real clients: a driver (tokio-postgres's simple queries) and `psql` itself.

use std::collections::HashMap;
use std::time::Duration;

use handoff_tests::{conn_str, start_proxy, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

const USERS: &str = "postgres=secret,admin=admin-pw";

async fn connect(proxy: &handoff::Proxy, user: &str, db: &str, pw: &str) -> Client {
    let url = conn_str(&proxy.listen_addr(), user, db, Some(pw));
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

use handoff_tests::admin::console_rows as show;

fn num(row: &HashMap<String, Option<String>>, col: &str) -> i64 {
    row.get(col)
        .unwrap_or_else(|| panic!("no column {col} in {row:?}"))
        .as_deref()
        .unwrap_or("0")
        .parse()
        .unwrap_or_else(|_| panic!("{col} is not a number in {row:?}"))
}

fn text<'a>(row: &'a HashMap<String, Option<String>>, col: &str) -> &'a str {
    row.get(col)
        .unwrap_or_else(|| panic!("no column {col} in {row:?}"))
        .as_deref()
        .unwrap_or("")
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default()
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_and_controls_what_pgbouncers_does() {
    let cluster = Cluster::start(1).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_USERS", USERS),
            ("HANDOFF_ADMIN_USERS", "admin"),
            // The console's user is not a server role: the switchover SQL runs as postgres.
            ("HANDOFF_ADMIN_DB_USER", "postgres"),
            ("HANDOFF_STATS_PERIOD", "1s"),
            ("HANDOFF_BUFFER_WINDOW", "20s"),
            ("HANDOFF_BUFFER_MAX_FAILOVER_DURATION", "30s"),
        ],
    )
    .await
    .unwrap();

    // Only HANDOFF_ADMIN_USERS may use it, after authenticating like any client.
    let url = conn_str(&proxy.listen_addr(), "postgres", "handoff", Some("secret"));
    let err = tokio_postgres::connect(&url, NoTls).await.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    let url = conn_str(&proxy.listen_addr(), "admin", "handoff", Some("wrong"));
    let err = tokio_postgres::connect(&url, NoTls).await.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

    let app = connect(&proxy, "postgres", "postgres", "secret").await;
    app.batch_execute("create table console_t (id int primary key)")
        .await
        .unwrap();
    for i in 0..20 {
        app.execute("insert into console_t values ($1)", &[&i])
            .await
            .unwrap();
    }
    let console = connect(&proxy, "admin", "pgbouncer", "admin-pw").await;

    // SHOW POOLS: PgBouncer's columns; the app's pool with its client and connection.
    let pools = show(&console, "SHOW POOLS").await;
    let pool = pools
        .iter()
        .find(|r| text(r, "database") == "postgres" && text(r, "user") == "postgres")
        .unwrap_or_else(|| panic!("{pools:?}"));
    for col in [
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "sv_used",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ] {
        assert!(pool.contains_key(col), "{col}: {pool:?}");
    }
    assert_eq!(num(pool, "cl_active"), 1, "{pool:?}");
    assert!(
        num(pool, "sv_active") + num(pool, "sv_idle") >= 1,
        "{pool:?}"
    );
    assert_eq!(text(pool, "pool_mode"), "transaction");

    // SHOW CLIENTS: the app and the console itself.
    let clients = show(&console, "SHOW CLIENTS").await;
    assert_eq!(clients.len(), 2, "{clients:?}");
    assert!(clients
        .iter()
        .any(|c| text(c, "user") == "postgres" && text(c, "state") == "active"));
    assert!(clients.iter().any(|c| text(c, "database") == "pgbouncer"));
    assert!(clients.iter().all(|c| text(c, "type") == "C"));

    // SHOW SERVERS: real backends (their pids are in pg_stat_activity).
    let servers = show(&console, "SHOW SERVERS").await;
    assert!(!servers.is_empty());
    let direct = connect_direct(&cluster.primary.addr()).await;
    let pids: Vec<i32> = direct
        .query("select pid from pg_stat_activity", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for s in &servers {
        assert!(
            pids.contains(&(num(s, "remote_pid") as i32)),
            "{s:?} not in {pids:?}"
        );
    }

    // SHOW STATS: the transactions counted; averages over the last 1 s period.
    let busy = {
        let app = connect(&proxy, "postgres", "postgres", "secret").await;
        tokio::spawn(async move {
            for _ in 0..400 {
                app.simple_query("select 1").await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stats = show(&console, "SHOW STATS").await;
    let st = stats
        .iter()
        .find(|r| text(r, "database") == "postgres")
        .unwrap_or_else(|| panic!("{stats:?}"));
    assert!(num(st, "total_xact_count") >= 20, "{st:?}");
    assert!(num(st, "total_query_count") >= 20, "{st:?}");
    assert!(num(st, "total_received") > 0 && num(st, "total_sent") > 0);
    assert!(num(st, "avg_query_count") > 0, "{st:?}");
    assert!(num(st, "avg_query_time") > 0, "{st:?}");
    busy.abort();
    let totals = show(&console, "SHOW STATS_TOTALS").await;
    assert!(totals
        .iter()
        .any(|r| text(r, "database") == "postgres" && num(r, "xact_count") >= 20));

    // The rest of the SHOW commands.
    let dbs = show(&console, "SHOW DATABASES").await;
    let star = dbs.iter().find(|r| text(r, "name") == "*").unwrap();
    assert_eq!(
        num(star, "port"),
        cluster.primary.socket_addr().port() as i64
    );
    assert_eq!(num(star, "paused"), 0);
    let config = show(&console, "SHOW CONFIG").await;
    let users = config
        .iter()
        .find(|r| text(r, "key") == "HANDOFF_USERS")
        .unwrap();
    assert_eq!(text(users, "value"), "(set, hidden)");
    assert!(!format!("{config:?}").contains("admin-pw"));
    assert!(config
        .iter()
        .any(|r| text(r, "key") == "HANDOFF_STATS_PERIOD" && text(r, "value") == "1s"));
    // What a running proxy takes on SIGHUP is changeable; the rest needs a restart.
    let changeable = |key: &str| {
        let row = config.iter().find(|r| text(r, "key") == key).unwrap();
        text(row, "changeable")
    };
    assert_eq!(changeable("HANDOFF_TLS_CERT"), "yes");
    assert_eq!(changeable("HANDOFF_USERS_FILE"), "yes");
    assert_eq!(changeable("HANDOFF_POOL_SIZE"), "no");
    let version = show(&console, "show version").await;
    assert!(text(&version[0], "version").starts_with("handoff "));
    let lists = show(&console, "SHOW LISTS").await;
    let used = lists
        .iter()
        .find(|r| text(r, "list") == "used_clients")
        .unwrap();
    assert!(num(used, "items") >= 2, "{lists:?}");
    let shards = show(&console, "SHOW SHARDS").await;
    assert_eq!(text(&shards[0], "state"), "serving");
    assert_eq!(text(&shards[0], "primary"), cluster.primary.addr());
    let buffers = show(&console, "SHOW BUFFERS").await;
    assert_eq!(text(&buffers[0], "state"), "idle");

    // Errors: a precise SQLSTATE, the session goes on.
    let e = console.simple_query("SHOW NOPE").await.unwrap_err();
    assert_eq!(code(&e), "42601", "{e}");
    let e = console
        .simple_query("SWITCHOVER nosuch TO '127.0.0.1:1'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42704", "{e}");
    assert!(message(&e).contains("no shard named"), "{e:?}");
    let e = console.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert_eq!(show(&console, "SHOW VERSION").await.len(), 1);

    // PAUSE holds new transactions until RESUME; PAUSE again is refused as the HTTP
    // API refuses a second revoke.
    // (A new client logs in on a server connection at once, so it connects first.)
    let waiter = connect(&proxy, "postgres", "postgres", "secret").await;
    console.simple_query("PAUSE").await.unwrap();
    let shards = show(&console, "SHOW SHARDS").await;
    assert_eq!(text(&shards[0], "state"), "buffering");
    let e = console.simple_query("PAUSE postgres").await.unwrap_err();
    assert_eq!(code(&e), "55000", "{e}");
    let held = tokio::spawn(async move {
        waiter
            .simple_query("insert into console_t values (100)")
            .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!held.is_finished(), "a transaction ran while paused");
    let clients = show(&console, "SHOW CLIENTS").await;
    assert!(
        clients.iter().any(|c| text(c, "state") == "waiting"),
        "{clients:?}"
    );
    console.simple_query("RESUME").await.unwrap();
    held.await.unwrap().unwrap();

    // RECONNECT: the pool's connections are replaced.
    let before: Vec<i64> = show(&console, "SHOW SERVERS")
        .await
        .iter()
        .map(|s| num(s, "remote_pid"))
        .collect();
    console.simple_query("RECONNECT postgres").await.unwrap();
    app.simple_query("select 1").await.unwrap();
    let after: Vec<i64> = show(&console, "SHOW SERVERS")
        .await
        .iter()
        .map(|s| num(s, "remote_pid"))
        .collect();
    assert!(
        !after.is_empty(),
        "{:?}",
        show(&console, "SHOW POOLS").await
    );
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} → {after:?}"
    );

    // KILL: the database's clients are dropped, even in a transaction (which the
    // server rolls back, and whose connection leaves the pool); the console stays.
    app.simple_query("begin; insert into console_t values (200)")
        .await
        .unwrap();
    let pools = show(&console, "SHOW POOLS").await;
    assert_eq!(num(&pools[0], "sv_active"), 1, "{pools:?}");
    console.simple_query("KILL postgres").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(app.simple_query("select 1").await.is_err());
    let clients = show(&console, "SHOW CLIENTS").await;
    assert_eq!(clients.len(), 1, "{clients:?}");
    let pools = show(&console, "SHOW POOLS").await;
    assert_eq!(
        num(&pools[0], "sv_active") + num(&pools[0], "sv_login"),
        0,
        "{pools:?}"
    );

    // SWITCHOVER through the console: the same switchover as the HTTP API's, and every
    // acknowledged write is on the new primary.
    let target = cluster.standbys[0].addr();
    let report = show(&console, &format!("SWITCHOVER main TO '{target}'")).await;
    assert_eq!(text(&report[0], "outcome"), "completed", "{report:?}");
    assert_eq!(text(&report[0], "to"), target);
    let new_primary = connect_direct(&target).await;
    let n: i64 = new_primary
        .query_one("select count(*) from console_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 21);
    let again = connect(&proxy, "postgres", "postgres", "secret").await;
    again
        .simple_query("insert into console_t values (101)")
        .await
        .unwrap();

    // SHUTDOWN asks the process to stop.
    console.simple_query("SHUTDOWN").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), proxy.shutdown_requested())
        .await
        .expect("SHUTDOWN reaches the process");
    proxy.shutdown().await;
}

async fn connect_direct(addr: &str) -> Client {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let url = conn_str(&addr, "postgres", "postgres", None);
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_uses_the_console() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[("HANDOFF_USERS", USERS), ("HANDOFF_ADMIN_USERS", "admin")],
    )
    .await
    .unwrap();
    let addr = proxy.listen_addr();
    // psql blocks its thread; the proxy runs on the others.
    let psql = |db: &str, cmd: &str| {
        let mut command = std::process::Command::new(cluster.bin.bin("psql"));
        command
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", cmd])
            .arg(format!(
                "host={} port={} user=admin dbname={db} password=admin-pw",
                addr.ip(),
                addr.port()
            ));
        tokio::task::block_in_place(|| command.output().unwrap())
    };
    for db in ["handoff", "pgbouncer"] {
        let out = psql(db, "SHOW POOLS");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("cl_active") && stdout.contains("sv_idle"),
            "{stdout}"
        );
    }
    let out = psql("handoff", "SHOW VERSION");
    assert!(String::from_utf8_lossy(&out.stdout).contains("handoff"));
    let out = psql("handoff", "SHOW SHARDS");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("serving"), "{stdout}");
    let out = psql("handoff", "FROBNICATE");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown command"), "{stderr}");
    proxy.shutdown().await;
}
