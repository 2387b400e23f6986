//! The `handoff` binary: help text, configuration errors, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

fn handoff() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_handoff"));
    // Start from a clean slate: no HANDOFF_* from the caller's environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("HANDOFF_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn help_lists_every_variable() {
    let out = handoff().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for v in handoff::config::VARIABLES {
        assert!(text.contains(v.name), "--help misses {}", v.name);
    }
}

#[test]
fn configuration_errors_name_the_variable() {
    for (var, value, expect) in [
        (
            "HANDOFF_LISTNE",
            "x",
            "HANDOFF_LISTNE is not a known variable",
        ),
        ("HANDOFF_LISTEN", "nowhere", "HANDOFF_LISTEN: 'nowhere'"),
        ("HANDOFF_POOL_MODE", "statement", "HANDOFF_POOL_MODE:"),
        ("HANDOFF_SHARDS", "main=db", "HANDOFF_SHARDS:"),
        ("HANDOFF_LOG", "=[bad", "HANDOFF_LOG:"),
    ] {
        let out = handoff().env(var, value).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(expect), "{var}={value}: {err}");
    }
    let out = handoff().arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut child = handoff()
        .env("HANDOFF_LISTEN", "127.0.0.1:0")
        .env("HANDOFF_ADMIN_LISTEN", &admin)
        .env("HANDOFF_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .take(20)
        .map_while(Result::ok)
        .any(|l| l.contains("handoff is listening"));
    assert!(ready, "the proxy never said it was listening");
    // `handoff healthcheck` succeeds against the running admin API, fails elsewhere.
    let hc = handoff()
        .arg("healthcheck")
        .env("HANDOFF_ADMIN_LISTEN", &admin)
        .output()
        .unwrap();
    assert!(
        hc.status.success(),
        "{}",
        String::from_utf8_lossy(&hc.stderr)
    );
    let hc = handoff()
        .arg("healthcheck")
        .env("HANDOFF_ADMIN_LISTEN", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!hc.status.success());
    // SIGTERM by a system call (a fresh machine may have no `kill` program).
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("shutdown complete")),
        "{rest:?}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn status_and_switchover_commands_talk_to_the_admin_api() {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut proxy = handoff()
        .env("HANDOFF_LISTEN", "127.0.0.1:0")
        .env("HANDOFF_ADMIN_LISTEN", &admin)
        .env("HANDOFF_SHARDS", format!("main=127.0.0.1:{}", free_port()))
        .env("HANDOFF_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = handoff()
            .args(["status", "--admin", &admin])
            .output()
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.status.success(), "{text}");
    assert!(
        // Nothing listens on the shard's only host: it buffers, and says why.
        text.contains("SHARD")
            && text.contains("main")
            && text.contains("buffering")
            && text.contains("no primary found at startup"),
        "{text}"
    );

    let usage = handoff()
        .args(["switchover", "--shard", "main"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("--to HOST:PORT"));

    let unknown = handoff()
        .args([
            "switchover",
            "--shard",
            "nope",
            "--to",
            "127.0.0.1:1",
            "--admin",
            &admin,
        ])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    let text = String::from_utf8_lossy(&unknown.stdout).into_owned();
    assert!(text.contains("no shard named \"nope\""), "{text}");

    // The target is unreachable: refused, and the shard keeps serving.
    let refused = handoff()
        .args([
            "switchover",
            "--shard",
            "main",
            "--to",
            &format!("127.0.0.1:{}", free_port()),
            "--admin",
            &admin,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&refused.stdout).into_owned();
    assert_eq!(refused.status.code(), Some(1), "{text}");
    assert!(
        text.contains("refused") && text.contains("precheck"),
        "{text}"
    );

    let nowhere = handoff()
        .args(["status", "--admin", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert_eq!(nowhere.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&nowhere.stderr).contains("cannot reach the admin API"));
    let _ = proxy.kill();
    let _ = proxy.wait();
}
