//! The `handoff` binary's command line: `--help` everywhere, configuration errors, and
//! logs without colour codes when they do not go to a terminal.

use std::process::Stdio;
use std::time::{Duration, Instant};

use handoff_tests::handoff_command;

#[test]
fn every_subcommand_answers_help_with_its_usage() {
    let cases: &[&[&str]] = &[
        &["--help"],
        &["-h"],
        &["help"],
        &["switchover", "--help"],
        &["hold", "--help"],
        &["status", "--help"],
        &["status", "-h"],
        &["healthcheck", "--help"],
    ];
    for args in cases {
        let out = handoff_command().args(*args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "handoff {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.to_lowercase().contains("usage"),
            "handoff {args:?} printed no usage: {stdout}"
        );
    }
    // A mistake is still one.
    let out = handoff_command()
        .args(["status", "--bogus", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // The help says how the primary is chosen, as docs/configuration.md does.
    let out = handoff_command().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("highest timeline"), "{help}");
    assert!(!help.contains("first host is the primary"), "{help}");
}

#[test]
fn an_empty_shard_list_is_refused_naming_the_variable() {
    for value in ["", " "] {
        let out = handoff_command()
            .env("HANDOFF_SHARDS", value)
            .env("HANDOFF_LISTEN", "127.0.0.1:0")
            .env("HANDOFF_ADMIN_LISTEN", "127.0.0.1:0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("HANDOFF_SHARDS"), "{stderr}");
        assert!(stderr.contains("empty"), "{stderr}");
    }
}

#[test]
fn logs_written_to_a_file_have_no_colour_codes() {
    // A shard nobody listens on: the proxy starts and logs warnings about it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("handoff.log");
    let mut child = handoff_command()
        .env("HANDOFF_SHARDS", format!("main={closed}"))
        .env("HANDOFF_LISTEN", "127.0.0.1:0")
        .env("HANDOFF_ADMIN_LISTEN", "127.0.0.1:0")
        .env("HANDOFF_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("WARN") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = handoff_tests::signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert!(text.contains("WARN"), "no warning logged: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text:?}"
    );
    assert!(status.success(), "{status:?}");
}

/// Waits until the log file holds a line containing every one of `needles`.
fn log_line(log: &std::path::Path, needles: &[&str]) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Some(line.to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Logs in to `dbname` through the proxy on `port`, which must refuse it, and waits for
/// the log line holding every one of `needles`.
async fn refused_login_line(
    port: u16,
    dbname: &str,
    log: &std::path::Path,
    needles: &[&str],
) -> Option<String> {
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname={dbname}");
    assert!(
        tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err(),
        "a login to {dbname} was accepted"
    );
    tokio::task::block_in_place(|| log_line(log, needles))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_log_lines_name_its_client_user_and_database() {
    let cluster = handoff_tests::Cluster::start(0).unwrap();
    let port = handoff_tests::pg::free_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("handoff.log");
    let mut child = handoff_command()
        .env("HANDOFF_SHARDS", format!("main={}", cluster.primary.addr()))
        .env("HANDOFF_LISTEN", format!("127.0.0.1:{port}"))
        .env("HANDOFF_ADMIN_LISTEN", "127.0.0.1:0")
        .env("HANDOFF_POOL_MODE", "transaction")
        .env("HANDOFF_CLIENT_IDLE_TIMEOUT", "1s")
        .env("HANDOFF_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let mut connected = None;
    for _ in 0..100 {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok(c) => {
                connected = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let (client, conn) = connected.expect("handoff accepts clients");
    let conn = tokio::spawn(conn);
    // One transaction through the relay, so its span is the relay's, not the login's.
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    // Quiet past the limit: the relay's own log line carries the session's context.
    let line = tokio::task::block_in_place(|| {
        log_line(
            &log,
            &["client idle timeout", "user=postgres", "database=postgres"],
        )
    });
    let _ = conn.await;
    // A login that fails is logged in the login's context, written as the relay's: at
    // info the login runs without a span, and its lines name the client themselves.
    let refused = refused_login_line(
        port,
        "no_such_database",
        &log,
        &[
            "server login failed",
            "client.addr=127.0.0.1:",
            "user=postgres database=no_such_database",
        ],
    )
    .await;
    // A login refused before it reaches a server.
    let early = refused_login_line(
        port,
        "postgres@nowhere",
        &log,
        &["client login refused", "3D000", "client.addr=127.0.0.1:"],
    )
    .await;
    let _ = handoff_tests::signal(child.id(), "TERM");
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line =
        line.unwrap_or_else(|| panic!("no idle-timeout line with the session's context:\n{text}"));
    assert!(
        early.is_some(),
        "no refused-login line naming the client:\n{text}"
    );
    // At info the relay runs without a span: its own lines carry the client's fields.
    assert!(line.contains("client.addr=127.0.0.1:"), "{line}");
    assert!(
        refused.is_some(),
        "no login-failure line with its context:\n{text}"
    );
}

/// `HANDOFF_WORKER_THREADS` sets the runtime's worker threads, as `/metrics` reports
/// them (`handoff_worker_threads`); unset, one per CPU.
#[tokio::test(flavor = "multi_thread")]
async fn worker_threads_are_what_the_variable_says() {
    // A shard nobody listens on: the proxy starts all the same.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    for (set, expected) in [(Some("1"), 1), (Some("3"), 3), (None, cpus)] {
        let admin = handoff_tests::pg::free_port().unwrap();
        let admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        let mut cmd = handoff_command();
        cmd.env("HANDOFF_SHARDS", format!("main={closed}"))
            .env("HANDOFF_LISTEN", "127.0.0.1:0")
            .env("HANDOFF_ADMIN_LISTEN", admin.to_string())
            .env("HANDOFF_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(n) = set {
            cmd.env("HANDOFF_WORKER_THREADS", n);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let workers = loop {
            if let Ok((200, body)) = handoff_tests::raw::http(admin, "GET", "/metrics", None).await
            {
                break body
                    .lines()
                    .find_map(|l| l.strip_prefix("handoff_worker_threads "))
                    .and_then(|v| v.trim().parse::<f64>().ok());
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = handoff_tests::signal(child.id(), "TERM");
        let _ = child.wait();
        assert_eq!(
            workers,
            Some(expected as f64),
            "HANDOFF_WORKER_THREADS={set:?}"
        );
    }
}
