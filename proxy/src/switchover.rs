//! A planned switchover run by handoff (DESIGN.md steps 1–7), over SQL on the old
//! primary and the target standby: pre-check, buffer, lameduck, revoke (read-only and
//! fence LSN), catch up, promote, flush. Any failure before the promotion rolls back to
//! the old primary; clients see a pause either way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::config::{HostPort, SwitchoverSettings};
use crate::control;
use crate::shard::{metric, Shard, StateKind};
use crate::Shared;

/// How a switchover ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The target is the primary.
    Completed,
    /// Refused before anything changed.
    Refused,
    /// Something failed before the promotion: the old primary serves again.
    RolledBack,
    /// The target was promoted but could not be confirmed; the shard stays buffering
    /// until an operator establishes a primary (or the buffer's time runs out).
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Refused => "refused",
            Outcome::RolledBack => "rolled_back",
            Outcome::Failed => "failed",
        }
    }
}

/// One step's record.
#[derive(Debug, Clone)]
struct Step {
    name: &'static str,
    duration: Duration,
    error: Option<String>,
}

/// What the switchover did, step by step.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    shard: String,
    from: String,
    to: String,
    pub outcome: Outcome,
    steps: Vec<Step>,
    fence_lsn: Option<String>,
    epoch: u64,
    lameduck_cancelled: usize,
    prewarmed: usize,
    error: Option<String>,
}

impl Report {
    pub fn to_json(&self) -> Value {
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                json!({
                    "step": s.name,
                    "ms": (s.duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
                    "ok": s.error.is_none(),
                    "error": s.error,
                })
            })
            .collect();
        json!({
            "shard": self.shard,
            "from": self.from,
            "to": self.to,
            "outcome": self.outcome.as_str(),
            "epoch": self.epoch,
            "fence_lsn": self.fence_lsn,
            "lameduck_cancelled": self.lameduck_cancelled,
            "prewarmed_connections": self.prewarmed,
            "total_ms": (self.steps.iter().map(|s| s.duration.as_secs_f64()).sum::<f64>() * 1000.0 * 1000.0).round() / 1000.0,
            "steps": steps,
            "error": self.error,
        })
    }
}

struct Run<'a> {
    shared: &'a Shared,
    shard: &'a Shard,
    cfg: &'a SwitchoverSettings,
    report: Report,
}

async fn connect(
    cfg: &SwitchoverSettings,
    addr: &HostPort,
    timeout: Duration,
) -> Result<Client, String> {
    let mut c = cfg.pg_config(addr, "handoff-switchover", timeout);
    match tokio::time::timeout(timeout, cfg.tls.pg_connect(&mut c)).await {
        Ok(Ok((client, _task))) => Ok(client),
        Ok(Err(e)) => Err(format!("cannot connect to {addr} as {}: {e}", cfg.user)),
        Err(_) => Err(format!(
            "cannot connect to {addr}: timed out after {timeout:?}"
        )),
    }
}

fn sql_error(addr: &HostPort, e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{addr}: {} ({})", db.message(), db.code().code()),
        None => format!("{addr}: {e}"),
    }
}

impl Run<'_> {
    fn step(&mut self, name: &'static str, started: Instant, error: Option<String>) {
        let duration = started.elapsed();
        metrics::histogram!(metric::SWITCHOVER_STEP, "shard" => self.shard.name.clone(), "step" => name)
            .record(duration);
        match &error {
            None => {
                tracing::info!(shard = %self.shard.name, step = name, ms = duration.as_millis() as u64, "switchover step done")
            }
            Some(e) => {
                tracing::warn!(shard = %self.shard.name, step = name, ms = duration.as_millis() as u64, error = %e, "switchover step failed")
            }
        }
        self.report.steps.push(Step {
            name,
            duration,
            error,
        });
    }

    fn finish(mut self, outcome: Outcome, error: Option<String>) -> Report {
        self.report.outcome = outcome;
        self.report.error = error;
        metrics::counter!(metric::SWITCHOVERS, "shard" => self.shard.name.clone(), "outcome" => outcome.as_str())
            .increment(1);
        tracing::info!(shard = %self.shard.name, outcome = outcome.as_str(), from = %self.report.from, to = %self.report.to, "switchover finished");
        self.report
    }
}

/// Runs a switchover of `shard` to `to`. Holds the shard's operation lock throughout.
pub(crate) async fn run(shared: Arc<Shared>, shard: Arc<Shard>, to: HostPort) -> Report {
    let cfg = &shared.config.switchover;
    let snap = shard.snapshot(shared.buffer_idle(&shard.name));
    let mut run = Run {
        shared: &shared,
        shard: &shard,
        cfg,
        report: Report {
            shard: shard.name.clone(),
            from: snap.primary.to_string(),
            to: to.to_string(),
            outcome: Outcome::Refused,
            steps: Vec::new(),
            fence_lsn: None,
            epoch: snap.epoch,
            lameduck_cancelled: 0,
            prewarmed: 0,
            error: None,
        },
    };
    let Ok(_op) = shard.op.try_lock() else {
        return run.finish(
            Outcome::Refused,
            Some(format!(
                "shard \"{}\": another switchover or revocation is in progress",
                shard.name
            )),
        );
    };
    let timeout = shared.config.switchover.timeout;
    let old = snap.primary.clone();

    // 1. Pre-check.
    let t = Instant::now();
    let checked = precheck(cfg, &snap.state, &old, &to, timeout).await;
    let (old_db, target_db) = match checked {
        Ok(ok) => {
            run.step("precheck", t, None);
            ok
        }
        Err(e) => {
            run.step("precheck", t, Some(e.clone()));
            return run.finish(Outcome::Refused, Some(e));
        }
    };

    // 2. Buffer.
    let t = Instant::now();
    let revoked = match control::revoke(&shared, &shard, Some(snap.epoch), "switchover") {
        Ok(r) => {
            run.step("buffer", t, None);
            r
        }
        Err(e) => {
            run.step("buffer", t, Some(e.to_string()));
            return run.finish(Outcome::Refused, Some(e.to_string()));
        }
    };

    // 3. Lameduck.
    let t = Instant::now();
    let ld = control::lameduck(&revoked.gen, shared.config.drain_timeout).await;
    run.report.lameduck_cancelled = ld.cancelled;
    run.step("lameduck", t, None);

    // 4. Revoke on the old primary: read-only, its clients gone, the fence LSN.
    let t = Instant::now();
    match revoke_old(cfg, &old_db, &old).await {
        Ok(lsn) => {
            run.report.fence_lsn = Some(lsn);
            run.step("revoke", t, None);
        }
        Err(e) => {
            run.step("revoke", t, Some(e.clone()));
            return rollback(run, &old, snap.epoch, e).await;
        }
    }

    // 5. Catch up.
    let t = Instant::now();
    let fence = run
        .report
        .fence_lsn
        .clone()
        .expect("set by the revoke step");
    if let Err(e) = catch_up(&target_db, &to, &fence, timeout).await {
        run.step("catch_up", t, Some(e.clone()));
        return rollback(run, &old, snap.epoch, e).await;
    }
    run.step("catch_up", t, None);

    // 6. Establish on the target: writable, promoted, confirmed.
    let t = Instant::now();
    match promote(cfg, &target_db, &to, timeout).await {
        Ok(()) => run.step("promote", t, None),
        Err(Promotion::NotPromoted(e)) => {
            run.step("promote", t, Some(e.clone()));
            return rollback(run, &old, snap.epoch, e).await;
        }
        Err(Promotion::Unconfirmed(e)) => {
            run.step("promote", t, Some(e.clone()));
            let msg = format!(
                "{e}; the target may be promoted: shard \"{}\" stays buffering until POST /v1/shards/{}/primary or /resume",
                shard.name, shard.name
            );
            return run.finish(Outcome::Failed, Some(msg));
        }
    }

    // 7. Flush.
    let t = Instant::now();
    match control::establish(&shared, &shard, Some(snap.epoch), to.clone()).await {
        Ok(est) => {
            run.report.epoch = est.epoch;
            run.report.prewarmed = est.prewarmed;
            run.step("flush", t, est.prewarm_error);
            run.finish(Outcome::Completed, None)
        }
        Err(e) => {
            run.step("flush", t, Some(e.to_string()));
            run.finish(Outcome::Failed, Some(e.to_string()))
        }
    }
}

async fn precheck(
    cfg: &SwitchoverSettings,
    state: &StateKind,
    old: &HostPort,
    to: &HostPort,
    timeout: Duration,
) -> Result<(Client, Client), String> {
    if *state != StateKind::Serving {
        return Err(format!("the shard is {}, not serving", state.as_str()));
    }
    if old == to {
        return Err(format!("{to} is already the primary"));
    }
    let target = connect(cfg, to, timeout).await?;
    let row = target
        .query_one(
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, \
             (SELECT system_identifier FROM pg_control_system())::text",
            &[],
        )
        .await
        .map_err(|e| sql_error(to, e))?;
    let (in_recovery, replay, target_system): (bool, Option<String>, String) =
        (row.get(0), row.get(1), row.get(2));
    if !in_recovery {
        return Err(format!(
            "{to} is not a standby (pg_is_in_recovery() is false)"
        ));
    }
    let Some(replay) = replay else {
        return Err(format!("{to} has not replayed any WAL yet"));
    };
    let old_db = connect(cfg, old, timeout).await?;
    let row = old_db
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8, \
             (SELECT system_identifier FROM pg_control_system())::text",
            &[&replay],
        )
        .await
        .map_err(|e| sql_error(old, e))?;
    let (lag, old_system): (f64, String) = (row.get(0), row.get(1));
    if old_system != target_system {
        return Err(format!(
            "{to} is not a standby of {old} (system identifiers {target_system} and {old_system} differ)"
        ));
    }
    if lag > cfg.max_lag as f64 {
        return Err(format!(
            "{to} replays {lag:.0} bytes behind {old}, more than HANDOFF_SWITCHOVER_MAX_LAG ({} bytes)",
            cfg.max_lag
        ));
    }
    Ok((old_db, target))
}

async fn revoke_old(
    cfg: &SwitchoverSettings,
    db: &Client,
    addr: &HostPort,
) -> Result<String, String> {
    db.batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .map_err(|e| sql_error(addr, e))?;
    db.query_one("SELECT pg_reload_conf()", &[])
        .await
        .map_err(|e| sql_error(addr, e))?;
    if cfg.terminate {
        db.query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| sql_error(addr, e))?;
    }
    let row = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| sql_error(addr, e))?;
    Ok(row.get(0))
}

async fn catch_up(
    db: &Client,
    addr: &HostPort,
    fence: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let row = db
            .query_one(
                "SELECT coalesce(pg_wal_lsn_diff(pg_last_wal_replay_lsn(), $1::text::pg_lsn) >= 0, false)",
                &[&fence],
            )
            .await
            .map_err(|e| sql_error(addr, e))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{addr} did not replay up to the fence LSN {fence} within HANDOFF_SWITCHOVER_TIMEOUT ({timeout:?})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

enum Promotion {
    /// The target is still a standby: safe to roll back.
    NotPromoted(String),
    /// The target may be a primary now.
    Unconfirmed(String),
}

async fn promote(
    cfg: &SwitchoverSettings,
    db: &Client,
    addr: &HostPort,
    timeout: Duration,
) -> Result<(), Promotion> {
    let not = |e| Promotion::NotPromoted(sql_error(addr, e));
    db.batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
        .await
        .map_err(not)?;
    db.query_one("SELECT pg_reload_conf()", &[])
        .await
        .map_err(not)?;
    // pg_promote(wait => true) polls every 100 ms; asking without waiting and polling
    // here ends the promotion step sooner.
    let promoted: bool = match db.query_one("SELECT pg_promote(false)", &[]).await {
        Ok(row) => row.get(0),
        Err(e) => return Err(Promotion::NotPromoted(sql_error(addr, e))),
    };
    if !promoted {
        return Err(Promotion::NotPromoted(format!(
            "{addr}: pg_promote() could not signal the promotion"
        )));
    }
    let deadline = Instant::now() + timeout;
    loop {
        match db.query_one("SELECT pg_is_in_recovery()", &[]).await {
            Ok(row) if !row.get::<_, bool>(0) => break,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Ok(_) => {
                return Err(Promotion::Unconfirmed(format!(
                    "{addr}: still in recovery {timeout:?} after pg_promote()"
                )))
            }
            Err(e) => return Err(Promotion::Unconfirmed(sql_error(addr, e))),
        }
    }
    // A new session sees the reloaded configuration: confirm the target is writable.
    let deadline = Instant::now() + timeout;
    loop {
        let check = async {
            let c = connect(cfg, addr, timeout).await?;
            let row = c
                .query_one(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
                    &[],
                )
                .await
                .map_err(|e| sql_error(addr, e))?;
            Ok::<_, String>((row.get::<_, bool>(0), row.get::<_, String>(1)))
        };
        match check.await {
            Ok((false, ro)) if ro == "off" => return Ok(()),
            Ok((rec, ro)) if Instant::now() >= deadline => {
                return Err(Promotion::Unconfirmed(format!(
                    "{addr}: after promotion pg_is_in_recovery() = {rec}, transaction_read_only = {ro}"
                )))
            }
            Err(e) if Instant::now() >= deadline => return Err(Promotion::Unconfirmed(e)),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Undoes the revocation: the old primary writable again, then the shard serving from
/// it with the held transactions released to it.
async fn rollback(mut run: Run<'_>, old: &HostPort, epoch: u64, cause: String) -> Report {
    let t = Instant::now();
    let undo = async {
        let db = connect(run.cfg, old, Duration::from_secs(5)).await?;
        db.batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
            .await
            .map_err(|e| sql_error(old, e))?;
        db.query_one("SELECT pg_reload_conf()", &[])
            .await
            .map_err(|e| sql_error(old, e))?;
        // New sessions must see the reloaded setting before clients are released.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let c = connect(run.cfg, old, Duration::from_secs(5)).await?;
            let ro: String = c
                .query_one("SELECT current_setting('transaction_read_only')", &[])
                .await
                .map_err(|e| sql_error(old, e))?
                .get(0);
            if ro == "off" || Instant::now() >= deadline {
                return Ok::<_, String>(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let undo_err = undo.await.err();
    let aborted = control::abort(run.shared, run.shard, Some(epoch));
    let err = match (&undo_err, &aborted) {
        (None, Ok(_)) => None,
        (Some(u), _) => Some(format!("could not make {old} writable again: {u}")),
        (None, Err(e)) => Some(e.to_string()),
    };
    run.step("rollback", t, err.clone());
    let msg = match err {
        None => cause,
        Some(e) => format!("{cause}; rollback: {e}"),
    };
    run.finish(Outcome::RolledBack, Some(msg))
}
