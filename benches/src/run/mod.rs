//! `handoff-bench run`: load against one or more targets, one after another, with
//! events injected at given times; throughput, latency percentiles, errors, the longest
//! stall, a 100 ms timeline, lost-write checking, JSON and an SVG plot.

pub mod events;
pub mod plot;
pub mod stats;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;
use tokio_postgres::NoTls;

use events::{Event, EventRecord};
use stats::{Recorder, Summary};
use workload::{Outcome, Session, Workload};

/// Options of `handoff-bench run`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "handoff-bench run",
    about = "Run a workload against one or more targets"
)]
pub struct RunArgs {
    /// A target as name=postgres://… (repeatable; run one after another).
    #[arg(long = "target", required = true, value_parser = parse_target)]
    pub targets: Vec<(String, String)>,
    #[arg(long, value_enum, default_value = "select")]
    pub workload: Workload,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// How long each target runs (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = events::parse_duration)]
    pub duration: Duration,
    /// Open loop: start this many transactions per second in total, whatever the
    /// latency (latency is measured from the intended start: no coordinated omission).
    #[arg(long)]
    pub rate: Option<f64>,
    /// `<time>:<shell command>` run at that time into each target's run (repeatable).
    #[arg(long = "event", value_parser = events::parse)]
    pub events: Vec<Event>,
    /// Rows in the accounts table.
    #[arg(long, default_value_t = 100_000)]
    pub accounts: i32,
    /// Directory for the JSON and SVG results.
    #[arg(long, default_value = "handoff-bench-results")]
    pub out: PathBuf,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Events for one target only (by target name), besides `events`.
    #[arg(skip)]
    pub target_events: Vec<(String, Event)>,
    /// Writers that bypass the target, straight to a server: (target name, server
    /// host:port, how many), running during that target's run.
    #[arg(skip)]
    pub bypass: Vec<(String, String, usize)>,
    /// The process serving a target (by target name), whose CPU time during that
    /// target's run is reported per transaction.
    #[arg(skip)]
    pub cpu_of: Vec<(String, u32)>,
    /// What the caller knows of the run's setting (pool mode, scale, …), written into
    /// the JSON report's `meta`.
    #[arg(skip)]
    pub meta: Vec<(String, String)>,
}

fn parse_target(s: &str) -> Result<(String, String)> {
    let (name, url) = s
        .split_once('=')
        .with_context(|| format!("--target '{s}': expected name=postgres://…"))?;
    if name.is_empty() || url.is_empty() {
        bail!("--target '{s}': expected name=postgres://…");
    }
    Ok((name.to_string(), url.to_string()))
}

/// Everything one target's run produced.
#[derive(Debug, Clone)]
pub struct TargetResult {
    pub name: String,
    pub summary: Summary,
    pub errors: Vec<(String, u64)>,
    pub events: Vec<EventRecord>,
    pub acknowledged_writes: usize,
    pub lost_writes: Vec<i64>,
    /// What the bypassing writers saw (see [`RunArgs::bypass`]).
    pub bypass: Vec<handoff_tests::bypass::WriterOutcome>,
    /// CPU time (user + system) of the target's process during its run, per
    /// transaction, in µs (see [`RunArgs::cpu_of`]).
    pub cpu_us_per_txn: Option<f64>,
}

fn error_key(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let msg: String = db.message().chars().take(120).collect();
            format!("{} {msg}", db.code().code())
        }
        None => {
            let msg: String = e.to_string().chars().take(120).collect();
            format!("client {msg}")
        }
    }
}

/// Connects; a URL with `sslrootcert=<CA file>` (and `sslmode=require`) connects over
/// TLS trusting that CA (rustls), checking the host name.
pub(crate) async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    if let Some((base, ca)) = split_rootcert(url) {
        let pem = std::fs::read_to_string(&ca).unwrap_or_else(|e| panic!("sslrootcert {ca}: {e}"));
        let tls = handoff_tests::tls::MakeRustls::trusting(&pem)
            .unwrap_or_else(|e| panic!("sslrootcert {ca}: {e}"));
        let (client, conn) = tokio_postgres::connect(&base, tls).await?;
        tokio::spawn(conn);
        return Ok(client);
    }
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// `url` without its `sslrootcert=` parameter, and that parameter's value.
fn split_rootcert(url: &str) -> Option<(String, String)> {
    let start = url.find("sslrootcert=")?;
    let value_start = start + "sslrootcert=".len();
    let end = url[value_start..]
        .find('&')
        .map_or(url.len(), |i| value_start + i);
    let ca = url[value_start..end].to_string();
    let mut base = format!("{}{}", &url[..start], &url[end..]);
    base = base.replace("?&", "?").replace("&&", "&");
    if base.ends_with('&') || base.ends_with('?') {
        base.pop();
    }
    Some((base, ca))
}

struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
}

/// One client's loop. Returns what it recorded and the ids of its acknowledged writes.
#[allow(clippy::too_many_arguments)]
async fn worker(
    index: u64,
    epoch: i64,
    url: String,
    mut session: Session,
    args: Arc<RunArgs>,
    start: Instant,
    starts: Option<Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instant>>>>,
    progress: Arc<Progress>,
) -> (Recorder, Vec<i64>) {
    let deadline = start + args.duration;
    let mut rec = Recorder::new();
    let mut acked = Vec::new();
    let mut seq: i64 = 0;
    loop {
        let intended = match &starts {
            None => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                now
            }
            Some(rx) => match rx.lock().await.recv().await {
                Some(t) => t,
                None => break,
            },
        };
        seq += 1;
        // Unique across runs: this run's epoch, then the client, then its sequence.
        let id = epoch | ((index as i64) << 28) | seq;
        let result = tokio::time::timeout_at(
            deadline + Duration::from_secs(30),
            session.run(args.workload, id),
        )
        .await;
        let now = Instant::now();
        let at = now - start;
        match result {
            Ok(Ok(outcome)) => {
                rec.ok(at, now - intended);
                if let Outcome::Wrote(id) = outcome {
                    acked.push(id);
                }
                progress.done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                rec.error(at, error_key(&e));
                progress.errors.fetch_add(1, Ordering::Relaxed);
                if !session.client.is_closed() {
                    // A write transaction that failed half-way leaves the session in an
                    // aborted transaction: end it before the next one.
                    let _ = session.client.batch_execute("rollback").await;
                }
                if session.client.is_closed() {
                    // Reconnect until it works or the run is over; each failure counts.
                    loop {
                        if Instant::now() >= deadline {
                            return (rec, acked);
                        }
                        match connect(&url).await {
                            Ok(c) => {
                                session = Session::new(c, index * 7919 + seq as u64, args.accounts);
                                break;
                            }
                            Err(e) => {
                                rec.error(Instant::now() - start, error_key(&e));
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
            }
            Err(_) => {
                rec.error(
                    at,
                    "client transaction did not finish 30 s after the run".into(),
                );
                break;
            }
        }
    }
    (rec, acked)
}

/// Runs the workload against one target.
/// `epoch` keeps the ids of runs made at the same time apart (`None`: the next one
/// after every id written so far).
pub async fn run_target(
    name: &str,
    url: &str,
    args: Arc<RunArgs>,
    epoch: Option<i64>,
) -> Result<TargetResult> {
    let setup = connect(url)
        .await
        .with_context(|| format!("connecting to target {name}"))?;
    workload::setup(&setup, args.accounts).await?;
    let epoch = match epoch {
        Some(e) => e,
        None => workload::next_epoch(&setup).await?,
    };
    let mut sessions = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let c = connect(url)
            .await
            .with_context(|| format!("opening client {i} to target {name}"))?;
        sessions.push(Session::new(c, i as u64 + 1, args.accounts));
    }
    let progress = Arc::new(Progress {
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let start = Instant::now();
    let deadline = start + args.duration;
    let starts = args.rate.map(|rate| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Instant>(args.clients * 4 + 16);
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        tokio::spawn(async move {
            let mut next = start;
            while next < deadline {
                tokio::time::sleep_until(next).await;
                if tx.send(next).await.is_err() {
                    break;
                }
                next += interval;
            }
        });
        Arc::new(tokio::sync::Mutex::new(rx))
    });
    let mine = args.events.iter().cloned().chain(
        args.target_events
            .iter()
            .filter(|(t, _)| t == name)
            .map(|(_, e)| e.clone()),
    );
    let events = tokio::spawn(events::run_all(mine.collect(), start));
    let ticker = (!args.quiet).then(|| {
        let progress = Arc::clone(&progress);
        let name = name.to_string();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick =
                tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
            loop {
                tick.tick().await;
                let done = progress.done.load(Ordering::Relaxed);
                eprintln!(
                    "  {name}: {:>4.0}s  {:>8} tps  {} errors",
                    start.elapsed().as_secs_f64(),
                    done - last,
                    progress.errors.load(Ordering::Relaxed)
                );
                last = done;
            }
        })
    });
    let mut tasks = Vec::new();
    for (i, s) in sessions.into_iter().enumerate() {
        tasks.push(tokio::spawn(worker(
            i as u64 + 1,
            epoch,
            url.to_string(),
            s,
            Arc::clone(&args),
            start,
            starts.clone(),
            Arc::clone(&progress),
        )));
    }
    let mut rec = Recorder::new();
    let mut acked = Vec::new();
    for t in tasks {
        let (r, a) = t.await.context("a client task panicked")?;
        rec.merge(r);
        acked.extend(a);
    }
    if let Some(t) = ticker {
        t.abort();
    }
    let events = events.await.context("the event task panicked")?;
    let summary = rec.summary(args.duration);
    let lost_writes = if args.workload.writes() {
        let check = connect(url)
            .await
            .with_context(|| format!("reconnecting to {name} to check writes"))?;
        workload::find_lost(&check, &acked).await?
    } else {
        Vec::new()
    };
    let mut errors: Vec<(String, u64)> = rec.errors.into_iter().collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    Ok(TargetResult {
        name: name.to_string(),
        summary,
        errors,
        events,
        acknowledged_writes: acked.len(),
        lost_writes,
        bypass: Vec::new(),
        cpu_us_per_txn: None,
    })
}

/// A process's CPU time so far (user + system, all its threads), from `/proc`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, in parentheses): utime and
    // stime are the 12th and 13th of them, in clock ticks.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(
        ticks as f64 / clock_ticks()? as f64,
    ))
}

/// A size line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, …), in KiB: `None` once the
/// process is gone.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The most memory a process has held so far (`VmHWM`: its peak resident set), in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM").map(|kib| kib as f64 / 1024.0)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux), asked once.
fn clock_ticks() -> Option<u64> {
    static HZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        let out = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .ok()
            .filter(|hz| *hz > 0)
    })
}

/// The JSON document of a run.
/// An event's output: the JSON it printed (a switchover's report), else its text.
fn event_output(output: &str) -> (serde_json::Value, Option<&str>) {
    match serde_json::from_str::<serde_json::Value>(output.trim()) {
        Ok(v @ serde_json::Value::Object(_)) => (v, None),
        _ => (serde_json::Value::Null, Some(output)),
    }
}

pub fn to_json(args: &RunArgs, results: &[TargetResult]) -> serde_json::Value {
    use serde_json::json;
    let mut meta = serde_json::Map::new();
    meta.insert(
        "handoff_bench_version".into(),
        json!(env!("CARGO_PKG_VERSION")),
    );
    meta.insert(
        "finished_at".into(),
        json!(handoff::utc::Utc::of(std::time::SystemTime::now()).iso()),
    );
    meta.insert("accounts".into(), json!(args.accounts));
    for (k, v) in &args.meta {
        meta.insert(k.clone(), json!(v));
    }
    // Every event run, whichever target it ran with, its report nested when it
    // printed JSON.
    let events: Vec<serde_json::Value> = results
        .iter()
        .flat_map(|r| {
            r.events.iter().map(|e| {
                let (report, text) = event_output(&e.output);
                json!({
                    "target": r.name, "command": e.command, "started_s": e.started,
                    "ended_s": e.ended, "exit_code": e.exit_code, "report": report, "output": text,
                })
            })
        })
        .collect();
    json!({
        "meta": meta,
        "workload": workload::name(args.workload),
        "clients": args.clients,
        "duration_s": args.duration.as_secs_f64(),
        "rate": args.rate,
        "planned_events": args.events.iter().map(|e| json!({"at_s": e.at.as_secs_f64(), "command": e.command}))
            .chain(args.target_events.iter().map(|(t, e)| json!({"target": t, "at_s": e.at.as_secs_f64(), "command": e.command})))
            .collect::<Vec<_>>(),
        "events": events,
        "targets": results.iter().map(|r| {
            let s = &r.summary;
            json!({
                "name": r.name,
                "transactions": s.txns,
                "errors": s.errors,
                "tps": s.tps,
                "latency_ms": {"p50": s.p50, "p90": s.p90, "p99": s.p99, "p99_9": s.p999, "max": s.max},
                "longest_stall_ms": s.stall_ms,
                "longest_stall_at_ms": s.stall_at_ms,
                "errors_by_kind": r.errors.iter().map(|(k, n)| json!({"error": k, "count": n})).collect::<Vec<_>>(),
                "events": r.events.iter().map(|e| {
                    let (report, text) = event_output(&e.output);
                    json!({
                        "command": e.command, "started_s": e.started, "ended_s": e.ended,
                        "exit_code": e.exit_code, "report": report, "output": text,
                    })
                }).collect::<Vec<_>>(),
                "acknowledged_writes": r.acknowledged_writes,
                "cpu_us_per_txn": r.cpu_us_per_txn,
                "lost_writes": r.lost_writes.len(),
                "lost_write_ids": r.lost_writes.iter().take(100).collect::<Vec<_>>(),
                "timeline": s.timeline.iter().map(|p| json!({
                    "t": p.t, "txns": p.txns, "errors": p.errors, "p99_ms": p.p99, "max_ms": p.max,
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
    })
}

/// The human summary.
pub fn table(results: &[TargetResult]) -> String {
    let mut s = format!(
        "{:<12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10} {:>6}\n",
        "target",
        "tps",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9",
        "max ms",
        "errors",
        "stall ms",
        "lost"
    );
    for r in results {
        let m = &r.summary;
        s.push_str(&format!(
            "{:<12} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8} {:>10.1} {:>6}\n",
            r.name,
            m.tps,
            m.p50,
            m.p90,
            m.p99,
            m.p999,
            m.max,
            m.errors,
            m.stall_ms,
            r.lost_writes.len()
        ));
        for (k, n) in r.errors.iter().take(5) {
            s.push_str(&format!("    {n:>8} x {k}\n"));
        }
    }
    s
}

/// `handoff-bench run`: every target in turn, then the report files.
pub async fn run(args: RunArgs) -> Result<Vec<TargetResult>> {
    let args = Arc::new(args);
    let mut results = Vec::new();
    for (name, url) in &args.targets {
        if !args.quiet {
            eprintln!(
                "running the {} workload with {} clients for {:?} against {name}",
                workload::name(args.workload),
                args.clients,
                args.duration
            );
        }
        let writers = args
            .bypass
            .iter()
            .find(|(t, _, _)| t == name)
            .map(|(_, addr, n)| {
                use handoff_tests::bypass::{Mode, Writers};
                let kinds: Vec<(Mode, &str)> =
                    (0..*n).map(|i| (Mode::ALL[i % 3], "postgres")).collect();
                Writers::start(addr, &kinds)
            });
        let pid = args.cpu_of.iter().find(|(t, _)| t == name).map(|(_, p)| *p);
        let before = pid.and_then(cpu_time);
        let mut r = run_target(name, url, Arc::clone(&args), None).await?;
        if let (Some(pid), Some(before)) = (pid, before) {
            r.cpu_us_per_txn = cpu_time(pid)
                .filter(|_| r.summary.txns > 0)
                .map(|after| (after - before).as_secs_f64() * 1e6 / r.summary.txns as f64);
        }
        if let Some(w) = writers {
            r.bypass = w.stop().await;
        }
        results.push(r);
    }
    report(&args, &results)?;
    Ok(results)
}

/// Every target at the same time (several proxies in front of one cluster), each with
/// `clients` clients, then the report files.
pub async fn run_together(args: RunArgs) -> Result<Vec<TargetResult>> {
    let args = Arc::new(args);
    // The tables first, through the first target, so the runs do not race to create
    // them; and one epoch per run, so their write ids never collide.
    let Some((name, url)) = args.targets.first() else {
        return Ok(Vec::new());
    };
    let c = connect(url)
        .await
        .with_context(|| format!("connecting to target {name}"))?;
    workload::setup(&c, args.accounts).await?;
    let base = workload::next_epoch(&c).await?;
    if !args.quiet {
        eprintln!(
            "running the {} workload with {} clients through each of {} targets at once for {:?}",
            workload::name(args.workload),
            args.clients,
            args.targets.len(),
            args.duration
        );
    }
    let runs: Vec<_> = args
        .targets
        .iter()
        .enumerate()
        .map(|(slot, (name, url))| {
            let args = Arc::clone(&args);
            let (name, url) = (name.clone(), url.clone());
            let epoch = base + ((slot as i64) << 40);
            tokio::spawn(async move { run_target(&name, &url, args, Some(epoch)).await })
        })
        .collect();
    let mut results = Vec::new();
    for r in runs {
        results.push(r.await.context("a target's run panicked")??);
    }
    report(&args, &results)?;
    Ok(results)
}

/// Writes the JSON and the plots, and prints the table.
fn report(args: &RunArgs, results: &[TargetResult]) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let json_path = args.out.join(format!("run-{stamp}.json"));
    let svg_path = args.out.join(format!("run-{stamp}.svg"));
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&to_json(args, results))?,
    )?;
    plot::svg(&svg_path, results, args.duration.as_secs_f64())?;
    let png_path = svg_path.with_extension("png");
    plot::png(&png_path, results, args.duration.as_secs_f64())?;
    print!("{}", table(results));
    println!(
        "results: {}\nplot:    {}",
        json_path.display(),
        svg_path.display()
    );
    println!("         {}", png_path.display());
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod rootcert_tests {
    use super::split_rootcert;

    #[test]
    fn sslrootcert_is_taken_out_of_the_url() {
        assert_eq!(
            split_rootcert("postgres://u@h:1/db?sslmode=require&sslrootcert=/tmp/ca.pem"),
            Some((
                "postgres://u@h:1/db?sslmode=require".to_string(),
                "/tmp/ca.pem".to_string()
            ))
        );
        assert_eq!(
            split_rootcert("postgres://u@h:1/db?sslrootcert=/c.pem&sslmode=require"),
            Some((
                "postgres://u@h:1/db?sslmode=require".to_string(),
                "/c.pem".to_string()
            ))
        );
        assert_eq!(split_rootcert("postgres://u@h:1/db"), None);
    }
}
