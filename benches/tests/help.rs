//! Every `handoff-bench` subcommand prints its usage on `--help` and exits 0; a wrong
//! option still exits 2.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_handoff-bench"))
        .args(args)
        .output()
        .expect("handoff-bench runs")
}

#[test]
fn every_subcommand_answers_help_with_its_usage() {
    for sub in [
        "demo",
        "idle",
        "compare",
        "switchover",
        "failover",
        "patroni",
        "pgbouncer-switchover",
        "run",
    ] {
        for flag in ["--help", "-h"] {
            let out = bench(&[sub, flag]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(0),
                "handoff-bench {sub} {flag}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                stdout.to_lowercase().contains("usage"),
                "handoff-bench {sub} {flag} printed no usage: {stdout}"
            );
        }
        let out = bench(&[sub, "--no-such-option"]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "handoff-bench {sub} --no-such-option"
        );
    }
    let out = bench(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
}
