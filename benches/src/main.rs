//! `handoff-bench`: the load harness.
//!
//! `handoff-bench demo` starts a local primary + standby (through the test harness),
//! handoff in front of the primary, and runs `pgbench` directly against PostgreSQL and
//! then through handoff, printing both results and their ratio.

use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use handoff_tests::{start_proxy, Cluster};

mod idle;
mod run;

const USAGE: &str = "\
Usage: handoff-bench demo [--seconds N] [--clients N] [--jobs N] [--scale N] [--mode select|tpcb]
                          [--pool-mode transaction|session]
       handoff-bench idle [--clients N] [--pool-mode transaction|session]
       handoff-bench run --target name=postgres://... [--workload select|tpcb|prepared|mixed]
                         [--clients N] [--duration 10s] [--rate TPS] [--event 5s:'cmd'] [--out DIR]

  demo    start a local primary + standby, handoff in front of it, and run pgbench
          direct and through handoff; prints tps, latency, failures and the ratio.
          Defaults: --seconds 10 --clients 16 --jobs 2 --scale 10 --mode select
          --pool-mode transaction
  idle    start handoff (the release binary) and hold N idle logged-in clients;
          prints its resident memory per client. Defaults: --clients 10000
          --pool-mode transaction
";

#[derive(Debug, Clone)]
struct DemoArgs {
    seconds: u32,
    clients: u32,
    jobs: u32,
    scale: u32,
    tpcb: bool,
    pool_mode: String,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<DemoArgs> {
    let mut a = DemoArgs {
        seconds: 10,
        clients: 16,
        jobs: 2,
        scale: 10,
        tpcb: false,
        pool_mode: "transaction".to_string(),
    };
    while let Some(flag) = args.next() {
        let mut value = || -> Result<u32> {
            let v = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            let n: u32 = v
                .parse()
                .with_context(|| format!("{flag}: '{v}' is not a number"))?;
            if n == 0 {
                bail!("{flag} must be at least 1");
            }
            Ok(n)
        };
        match flag.as_str() {
            "--seconds" => a.seconds = value()?,
            "--clients" => a.clients = value()?,
            "--jobs" => a.jobs = value()?,
            "--scale" => a.scale = value()?,
            "--pool-mode" => match args.next().as_deref() {
                Some(m @ ("transaction" | "session")) => a.pool_mode = m.to_string(),
                other => bail!("--pool-mode must be transaction or session, not {other:?}"),
            },
            "--mode" => match args.next().as_deref() {
                Some("select") => a.tpcb = false,
                Some("tpcb") => a.tpcb = true,
                other => bail!("--mode must be select or tpcb, not {other:?}"),
            },
            other => bail!("unknown option '{other}'\n\n{USAGE}"),
        }
    }
    Ok(a)
}

/// What one pgbench run reported.
#[derive(Debug, Clone, Copy)]
struct PgbenchResult {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
    failed: u64,
}

fn parse_pgbench(stdout: &str) -> Result<PgbenchResult> {
    let find = |prefix: &str| -> Result<&str> {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("pgbench output has no '{prefix}':\n{stdout}"))
    };
    let first = |s: &str| s.split_whitespace().next().unwrap_or("").to_string();
    Ok(PgbenchResult {
        tps: first(find("tps =")?).parse()?,
        latency_ms: first(find("latency average =")?).parse()?,
        transactions: first(find("number of transactions actually processed:")?).parse()?,
        failed: first(find("number of failed transactions:")?).parse()?,
    })
}

fn pgbench(cluster: &Cluster, port: u16, args: &DemoArgs) -> Result<PgbenchResult> {
    let mut cmd = Command::new(cluster.bin.bin("pgbench"));
    if !args.tpcb {
        cmd.arg("-S");
    }
    let out = cmd
        .args([
            "-n",
            "-c",
            &args.clients.to_string(),
            "-j",
            &args.jobs.to_string(),
        ])
        .args(["-T", &args.seconds.to_string()])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .env("PGPASSWORD", "demo")
        .output()
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_pgbench(&stdout)
}

async fn demo(args: DemoArgs) -> Result<()> {
    println!("starting a PostgreSQL primary and one streaming standby...");
    let cluster = tokio::task::block_in_place(|| Cluster::start(1))?;
    println!(
        "  primary {}  standby {}  (files in {})",
        cluster.primary.addr(),
        cluster.standbys[0].addr(),
        cluster.dir().display()
    );
    println!("initialising pgbench tables (scale {})...", args.scale);
    let init = Command::new(cluster.bin.bin("pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            &args.scale.to_string(),
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &cluster.primary.port.to_string(), "postgres"])
        .output()?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    let proxy = start_proxy(
        &cluster,
        &[("HANDOFF_USERS", "postgres=demo"), ("HANDOFF_LOG", "warn")],
    )
    .await?;
    println!(
        "handoff listening on {} (admin {})",
        proxy.listen_addr(),
        proxy.admin_addr()
    );
    let mode = if args.tpcb {
        "TPC-B-like"
    } else {
        "select-only (-S)"
    };
    println!(
        "running pgbench {mode}, {} clients, {} threads, {} s: direct, then through handoff...",
        args.clients, args.jobs, args.seconds
    );
    let a = args.clone();
    let port = cluster.primary.port;
    let direct = tokio::task::block_in_place(|| pgbench(&cluster, port, &a))?;
    let port = proxy.listen_addr().port();
    let via = tokio::task::block_in_place(|| pgbench(&cluster, port, &a))?;

    println!();
    println!(
        "{:<10} {:>12} {:>16} {:>14} {:>8}",
        "target", "tps", "avg latency ms", "transactions", "failed"
    );
    for (name, r) in [("direct", direct), ("handoff", via)] {
        println!(
            "{:<10} {:>12.1} {:>16.3} {:>14} {:>8}",
            name, r.tps, r.latency_ms, r.transactions, r.failed
        );
    }
    println!(
        "\nhandoff / direct throughput ratio: {:.2}",
        via.tps / direct.tps
    );
    tokio::time::timeout(Duration::from_secs(30), proxy.shutdown()).await?;
    if direct.failed + via.failed > 0 {
        bail!("{} transactions failed", direct.failed + via.failed);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("demo") => match parse_args(args) {
            Ok(a) => demo(a).await,
            Err(e) => Err(e),
        },
        Some("run") => {
            use clap::Parser;
            match run::RunArgs::try_parse_from(
                std::iter::once("handoff-bench run".to_string()).chain(args),
            ) {
                Ok(a) => run::run(a).await.map(|_| ()),
                Err(e) => {
                    let _ = e.print();
                    return ExitCode::from(2);
                }
            }
        }
        Some("idle") => {
            let mut clients = 10_000usize;
            let mut mode = "transaction".to_string();
            let rest: Vec<String> = args.collect();
            let mut it = rest.iter();
            let mut bad = None;
            while let Some(flag) = it.next() {
                match (flag.as_str(), it.next()) {
                    ("--clients", Some(v)) => match v.parse() {
                        Ok(n) if n > 0 => clients = n,
                        _ => bad = Some(format!("--clients: '{v}' is not a positive number")),
                    },
                    ("--pool-mode", Some(v)) if v == "transaction" || v == "session" => {
                        mode = v.clone()
                    }
                    _ => bad = Some(format!("bad option '{flag}'\n\n{USAGE}")),
                }
            }
            match bad {
                Some(b) => Err(anyhow::anyhow!(b)),
                None => idle::run(clients, &mode).await,
            }
        }
        Some("-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handoff-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbench_15_output() {
        let out = "\
transaction type: <builtin: select only>
scaling factor: 10
query mode: simple
number of clients: 16
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 171234
number of failed transactions: 0 (0.000%)
latency average = 0.934 ms
initial connection time = 21.456 ms
tps = 17125.123456 (without initial connection time)
";
        let r = parse_pgbench(out).unwrap();
        assert_eq!(r.transactions, 171_234);
        assert_eq!(r.failed, 0);
        assert!((r.tps - 17125.123456).abs() < 1e-6);
        assert!((r.latency_ms - 0.934).abs() < 1e-9);
        assert!(parse_pgbench("garbage").is_err());
    }

    #[test]
    fn parses_arguments() {
        let a = parse_args(
            ["--seconds", "3", "--mode", "tpcb"]
                .map(String::from)
                .into_iter(),
        )
        .unwrap();
        assert_eq!((a.seconds, a.clients, a.tpcb), (3, 16, true));
        assert!(parse_args(["--seconds", "0"].map(String::from).into_iter()).is_err());
        assert!(parse_args(["--what"].map(String::from).into_iter()).is_err());
        assert!(parse_args(["--mode", "x"].map(String::from).into_iter()).is_err());
    }
}
