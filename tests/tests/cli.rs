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
    // The help says how the primary is chosen, as the README does.
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
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(text.contains("WARN"), "no warning logged: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text:?}"
    );
    assert!(status.success(), "{status:?}");
}
