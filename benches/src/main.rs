//! `handoff-bench`: the load harness.
//!
//! - `run`: a workload against one or more targets, with events, timeline, JSON and plot;
//! - `compare`: direct / PgBouncer / handoff on a local cluster, one table with ratios;
//! - `demo`: the README's main job: a local primary + standby, handoff in front, the
//!   harness run direct and through handoff;
//! - `idle`: handoff's memory with many idle clients;
//! - `crowd`: 10,000 clients on an open-loop schedule: latency percentiles, fairness
//!   and CPU, handoff beside PgBouncer;
//! - `storm`: 10,000 clients logging in at once (SCRAM and trust), handoff beside
//!   PgBouncer;
//! - `takeover`: handoff replaced by a takeover under load, beside PgBouncer's `-R`;
//! - `reads`: reads through `@replica` over two standbys beside direct and PgBouncer,
//!   then reads and writes through a switchover;
//! - `chaos`: the long fault campaign through three proxies, checked over its whole
//!   history.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use handoff_tests::{start_proxy, Cluster};
use run::workload::Workload;
use run::RunArgs;

mod chaos;
mod compare;
mod crowd;
mod idle;
mod patroni;
mod pg_auto_failover;
mod reads;
mod repmgr;
mod run;
mod switchover;
mod takeover;

const USAGE: &str = "\
Usage: handoff-bench demo [--seconds N] [--clients N] [--scale N] [--mode select|tpcb]
                          [--pool-mode transaction|session]
       handoff-bench idle [--clients N] [--concurrency N] [--settle 5s]
                          [--targets handoff,pgbouncer] [--pool-mode transaction|session]
                          [--params name=value,...|jdbc]
       handoff-bench crowd [--clients 10000] [--rate 4000] [--duration 30s] [--pool-size 20]
                           [--rounds 1] [--targets handoff,pgbouncer]
       handoff-bench storm [--clients 10000] [--auth scram,trust] [--pool-size 20]
                           [--rounds 1] [--targets handoff,pgbouncer] [--timeout 120s]
       handoff-bench compare [--workload select|tpcb|prepared|mixed] [--clients 64] [--duration 10s]
                             [--pool-size 20] [--tls]
       handoff-bench switchover [--workload tpcb] [--clients 64] [--duration 12s] [--at 4s]
                                [--targets handoff,pgbouncer,direct] [--proxies N [--uncoordinated]]
       handoff-bench failover   [--workload tpcb] [--clients 64] [--duration 12s] [--at 4s]
                                [--promote-after 1s] [--targets handoff,pgbouncer,direct]
       handoff-bench patroni    [--workload tpcb] [--clients 32] [--duration 14s] [--at 5s]
                                [--targets handoff,handoff-hook,pgbouncer,direct]
       handoff-bench pg-auto-failover [--workload tpcb] [--clients 32] [--duration 16s] [--at 5s]
                                [--targets handoff,pg_autoctl,pg_autoctl-pgctl,pgbouncer,direct]
       handoff-bench repmgr     [--workload tpcb] [--clients 32] [--duration 16s] [--at 5s]
                                [--targets handoff,handoff-hook,repmgr-pgctl,pgbouncer,direct]
       handoff-bench pgbouncer-switchover [--workload tpcb] [--clients 32] [--duration 12s] [--at 4s]
       handoff-bench takeover [--clients 32] [--takeovers 10] [--every 1]
                              [--targets handoff,handoff-session,pgbouncer]
       handoff-bench reads [--clients 32] [--duration 10s] [--pool-size 20]
                           [--switchover-duration 12s] [--at 4s] [--no-switchover]
       handoff-bench chaos [--seed 1] [--switchovers 100] [--crashes 20] [--partitions 10]
                           [--proxy-partitions 5] [--proxy-kills 10] [--takeovers 10]
                           [--etcd-restarts 10] [--settle 1]
       handoff-bench run --target name=postgres://... [--workload select|tpcb|prepared|mixed]
                         [--clients N] [--duration 10s] [--rate TPS] [--event 5s:'cmd'] [--out DIR]

  demo    start a local primary + standby, handoff in front of it, and run the load
          harness direct and through handoff; prints throughput, latency percentiles,
          errors, the longest stall, the ratio, and the paths of the JSON and the plot.
          Defaults: --seconds 10 --clients 16 --scale 1 (100,000 accounts) --mode select
          --pool-mode transaction
  idle    hold N idle logged-in clients through handoff (the release binary) and
          through PgBouncer, logging in --concurrency at a time; prints each proxy's
          resident memory per client right after the logins and after --settle idle.
          Defaults: --clients 10000 --concurrency 200 --settle 5s --pool-mode transaction
  crowd   N connected clients, each sending a point select on its own schedule (open
          loop, --rate in all), through handoff and PgBouncer in one run: latency
          percentiles from when each request was due, per-client fairness, proxy CPU
  storm   N clients logging in at the same moment (SCRAM-SHA-256 and trust), each
          running SELECT 1: time until all are served, login percentiles, errors,
          proxy CPU per login, handoff beside PgBouncer
  patroni one switchover on a real two-member Patroni cluster per target: asked of
          handoff, patronictl with handoff's before_stop hook, PgBouncer paused around
          it, direct multi-host clients; prints each with Patroni's own write gap
  pg-auto-failover
          the same on a real two-node pg_auto_failover formation: asked of handoff,
          pg_autoctl held by the draining goal state, pg_autoctl with handoff's pg_ctl,
          PgBouncer paused around it, direct; with the monitor's own write gap
  chaos   a seeded schedule of switchovers, primary crashes, silent partitions (network
          namespaces; needs root), proxy kills and takeovers, etcd restarts through three
          proxies over etcd, then checks over the whole history: nothing acknowledged lost
          or doubled, errors only where a fault allows them, no wait past the buffer's
          window, serving again within bounds, flat resources; prints a Markdown report
  repmgr  the same on a real two-node repmgr cluster: asked of handoff, repmgr standby
          switchover stopping the primary through handoff's pg_ctl, PgBouncer paused
          around it, direct; with repmgr's own write gap
";

#[derive(Debug, Clone)]
struct DemoArgs {
    seconds: u32,
    clients: u32,
    scale: u32,
    tpcb: bool,
    pool_mode: String,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<DemoArgs> {
    let mut a = DemoArgs {
        seconds: 10,
        clients: 16,
        scale: 1,
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

async fn demo(args: DemoArgs) -> Result<()> {
    println!("starting a PostgreSQL primary and one streaming standby...");
    let cluster = tokio::task::block_in_place(|| Cluster::start(1))?;
    println!(
        "  primary {}  standby {}  (files in {})",
        cluster.primary.addr(),
        cluster.standbys[0].addr(),
        cluster.dir().display()
    );
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_USERS", "postgres=demo"),
            ("HANDOFF_LOG", "warn"),
            ("HANDOFF_POOL_MODE", &args.pool_mode),
        ],
    )
    .await?;
    println!(
        "handoff listening on {} (admin {}), {} pooling",
        proxy.listen_addr(),
        proxy.admin_addr(),
        args.pool_mode
    );
    let workload = if args.tpcb {
        Workload::Tpcb
    } else {
        Workload::Select
    };
    // Half-way through handoff's run, a planned switchover to the standby.
    let at = Duration::from_millis(u64::from(args.seconds) * 500);
    let switch = run::events::Event {
        at,
        command: format!(
            "POST http://{}/v1/shards/main/switchover {{\"to\": \"{}\"}}",
            proxy.admin_addr(),
            cluster.standbys[0].addr()
        ),
    };
    let mut targets = vec![(
        "direct".to_string(),
        format!("postgres://postgres@{}/postgres", cluster.primary.addr()),
    )];
    // PgBouncer too, when it is installed, for the "/ pgbouncer" column (without a
    // switchover: it cannot run one).
    let _pgbouncer = match compare::pgbouncer_binary() {
        Some(bin) => {
            let port = handoff_tests::pg::free_port()?;
            let child = compare::start_pgbouncer(&cluster, &bin, port, 20)?;
            compare::wait_listening(port, "pgbouncer").await?;
            targets.push((
                "pgbouncer".into(),
                format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            ));
            Some(child)
        }
        None => {
            println!("(pgbouncer is not installed: the demo compares direct and handoff only)");
            None
        }
    };
    targets.push((
        "handoff".into(),
        format!("postgres://postgres:demo@{}/postgres", proxy.listen_addr()),
    ));
    let run_args = RunArgs {
        targets,
        workload,
        clients: args.clients as usize,
        duration: Duration::from_secs(u64::from(args.seconds)),
        rate: None,
        events: Vec::new(),
        accounts: (args.scale * 100_000) as i32,
        out: PathBuf::from("handoff-bench-results"),
        quiet: false,
        target_events: vec![("handoff".into(), switch)],
        bypass: Vec::new(),
        cpu_of: Vec::new(),
        meta: vec![
            ("command".into(), "demo".into()),
            ("pool_mode".into(), args.pool_mode.clone()),
            ("scale".into(), args.scale.to_string()),
            ("handoff_version".into(), env!("CARGO_PKG_VERSION").into()),
            ("switchover_at_s".into(), format!("{:.1}", at.as_secs_f64())),
        ],
    };
    println!(
        "direct and pgbouncer: no switchover; handoff: a switchover to the standby {:.1}s into the run",
        at.as_secs_f64()
    );
    let results = run::run(run_args).await?;
    println!();
    print!("{}", compare::ratio_table(&results));
    for r in results.iter().filter(|r| r.name == "handoff") {
        for e in &r.events {
            println!(
                "\nswitchover through handoff ({:.2}s..{:.2}s into the run):",
                e.started, e.ended
            );
            match serde_json::from_str::<serde_json::Value>(&e.output) {
                Ok(v) => {
                    println!(
                        "  outcome {}, {} -> {}, {} ms in all",
                        v["outcome"], v["from"], v["to"], v["total_ms"]
                    );
                    for st in v["steps"].as_array().into_iter().flatten() {
                        println!(
                            "    {:<10} {:>8} ms",
                            st["step"].as_str().unwrap_or("?"),
                            st["ms"]
                        );
                    }
                }
                Err(_) => println!("  {}", e.output.trim()),
            }
            println!(
                "  clients saw {} errors; longest stall {:.0} ms; max latency {:.0} ms; lost writes {}",
                r.summary.errors,
                r.summary.stall_ms,
                r.summary.max,
                r.lost_writes.len()
            );
            if e.exit_code != Some(0) {
                bail!("the switchover did not complete: {}", e.output.trim());
            }
        }
    }
    tokio::time::timeout(Duration::from_secs(30), proxy.shutdown()).await?;
    let errors: u64 = results.iter().map(|r| r.summary.errors).sum();
    let lost: usize = results.iter().map(|r| r.lost_writes.len()).sum();
    if errors > 0 || lost > 0 {
        bail!("{errors} transactions failed and {lost} acknowledged writes were lost");
    }
    Ok(())
}

/// A command line clap refused, or `--help`/`--version`: clap prints it (help on
/// standard output) and says the exit status (0 for help, 2 for a mistake).
fn clap_exit(e: clap::Error) -> ExitCode {
    let _ = e.print();
    ExitCode::from(e.exit_code().clamp(0, 255) as u8)
}

/// A subcommand's options from the rest of the command line, or the exit status after
/// clap printed its help or the mistake.
fn parsed<A: clap::Parser>(name: &str, args: impl Iterator<Item = String>) -> Result<A, ExitCode> {
    A::try_parse_from(std::iter::once(format!("handoff-bench {name}")).chain(args))
        .map_err(clap_exit)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("demo") => {
            let args: Vec<String> = args.collect();
            if args.iter().any(|a| a == "--help" || a == "-h") {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            match parse_args(args.into_iter()) {
                Ok(a) => demo(a).await,
                Err(e) => {
                    eprintln!("handoff-bench demo: {e:#}");
                    return ExitCode::from(2);
                }
            }
        }
        Some("run") => match parsed::<run::RunArgs>("run", args) {
            Ok(a) => run::run(a).await.map(|_| ()),
            Err(code) => return code,
        },
        Some("compare") => match parsed::<compare::CompareArgs>("compare", args) {
            Ok(a) => compare::compare(a).await,
            Err(code) => return code,
        },
        Some("pgbouncer-switchover") => {
            match parsed::<compare::SwitchoverArgs>("pgbouncer-switchover", args) {
                Ok(a) => compare::pgbouncer_switchover(a).await,
                Err(code) => return code,
            }
        }
        Some(cmd @ ("switchover" | "failover")) => {
            use clap::Parser;
            let crash = (cmd == "failover").then(|| "--crash".to_string());
            match switchover::Args::try_parse_from(
                std::iter::once("handoff-bench switchover".to_string())
                    .chain(crash)
                    .chain(args),
            ) {
                Ok(a) => switchover::run(a).await,
                Err(e) => return clap_exit(e),
            }
        }
        Some("chaos") => match parsed::<chaos::Args>("chaos", args) {
            Ok(a) => chaos::run(a).await,
            Err(code) => return code,
        },
        Some("crowd") => match parsed::<crowd::CrowdArgs>("crowd", args) {
            Ok(a) => crowd::crowd(a).await,
            Err(code) => return code,
        },
        Some("storm") => match parsed::<crowd::StormArgs>("storm", args) {
            Ok(a) => crowd::storm(a).await,
            Err(code) => return code,
        },
        Some("takeover") => match parsed::<takeover::Args>("takeover", args) {
            Ok(a) => takeover::run(a).await,
            Err(code) => return code,
        },
        Some("reads") => match parsed::<reads::Args>("reads", args) {
            Ok(a) => reads::run(a).await,
            Err(code) => return code,
        },
        Some("patroni") => match parsed::<patroni::Args>("patroni", args) {
            Ok(a) => patroni::run(a).await,
            Err(code) => return code,
        },
        Some("pg-auto-failover") => {
            match parsed::<pg_auto_failover::Args>("pg-auto-failover", args) {
                Ok(a) => pg_auto_failover::run(a).await,
                Err(code) => return code,
            }
        }
        Some("repmgr") => match parsed::<repmgr::Args>("repmgr", args) {
            Ok(a) => repmgr::run(a).await,
            Err(code) => return code,
        },
        Some("idle") => {
            let mut a = idle::IdleArgs {
                clients: 10_000,
                concurrency: 200,
                pool_mode: "transaction".to_string(),
                targets: vec!["handoff".into(), "pgbouncer".into()],
                settle: Duration::from_secs(5),
                params: Vec::new(),
            };
            let rest: Vec<String> = args.collect();
            let mut it = rest.iter();
            let mut bad = None;
            let positive = |flag: &str, v: &str| -> Result<usize, String> {
                match v.parse() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!("{flag}: '{v}' is not a positive number")),
                }
            };
            while let Some(flag) = it.next() {
                if flag == "--help" || flag == "-h" {
                    print!("{USAGE}");
                    return ExitCode::SUCCESS;
                }
                let r = match (flag.as_str(), it.next()) {
                    ("--clients", Some(v)) => positive(flag, v).map(|n| a.clients = n),
                    ("--concurrency", Some(v)) => positive(flag, v).map(|n| a.concurrency = n),
                    ("--settle", Some(v)) => positive(flag, v.trim_end_matches('s'))
                        .map(|n| a.settle = Duration::from_secs(n as u64)),
                    ("--pool-mode", Some(v)) if v == "transaction" || v == "session" => {
                        a.pool_mode = v.clone();
                        Ok(())
                    }
                    ("--targets", Some(v)) => {
                        a.targets = v.split(',').map(str::to_string).collect();
                        Ok(())
                    }
                    ("--params", Some(v)) => idle::startup_params(v).map(|p| a.params = p),
                    _ => Err(format!("bad option '{flag}'\n\n{USAGE}")),
                };
                if let Err(e) = r {
                    bad = Some(e);
                    break;
                }
            }
            match bad {
                Some(b) => {
                    eprintln!("handoff-bench idle: {b}");
                    return ExitCode::from(2);
                }
                None => idle::run(a).await,
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
