//! A planned switchover run by handoff (docs/switchover.md), over SQL on the old
//! primary and the target standby: pre-check, buffer, lameduck, revoke (the fence, and
//! its LSN), catch up, promote, flush, and optionally the demote command. Any failure
//! before the promotion rolls back to the old primary, lifting exactly what the fence
//! changed; clients see a pause either way. After a completed switchover the old primary
//! stays fenced and is watched for split brain ([`crate::shard::watchdog`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio_postgres::Client;

use crate::backend::admin::{AdminConnectError, AdminDb, AdminSession};
use crate::config::{HostPort, SwitchoverSettings};
use crate::shard::control;
use crate::shard::fence::{self, Fence};
use crate::shard::replay;
use crate::shard::sync_target::{self, Synced};
use crate::shard::watch::Why;
use crate::shard::{Ctx, Revoked, Shard, Snapshot, StateKind};

pub(crate) use crate::api::report::Outcome;

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
    /// Databases the fence closed on the old primary.
    fenced_databases: Vec<String>,
    /// Sessions the fence terminated on the old primary.
    fence_terminated: u64,
    pub(crate) epoch: u64,
    pub(crate) lameduck_cancelled: usize,
    pub(crate) prewarmed: usize,
    demote: Option<crate::shard::demote::Outcome>,
    /// The name the target was made synchronous under, before the revocation.
    sync_target: Option<String>,
    /// How far the target's replay was behind the fence LSN when the fence took it.
    lag_at_revoke: Option<f64>,
    pub error: Option<String>,
}

impl Report {
    /// The report as the admin API answers it.
    pub fn to_report(&self) -> crate::api::report::SwitchoverReport {
        use crate::api::report as r;
        let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        r::SwitchoverReport {
            shard: self.shard.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            outcome: self.outcome,
            epoch: self.epoch,
            fence_lsn: self.fence_lsn.clone(),
            fence: r::Fence {
                lsn: self.fence_lsn.clone(),
                databases: self.fenced_databases.clone(),
                terminated_sessions: self.fence_terminated,
            },
            lameduck_cancelled: self.lameduck_cancelled,
            prewarmed_connections: self.prewarmed,
            total_ms: ms(self.steps.iter().map(|s| s.duration).sum()),
            steps: self
                .steps
                .iter()
                .map(|s| r::Step {
                    step: s.name.to_string(),
                    ms: ms(s.duration),
                    ok: s.error.is_none(),
                    error: s.error.clone(),
                })
                .collect(),
            demote: self.demote.as_ref().map(|d| d.to_report()),
            sync_target: self.sync_target.clone(),
            lag_at_revoke_bytes: self.lag_at_revoke,
            error: self.error.clone(),
            coordination: None,
        }
    }
}

pub(crate) struct Run<'a> {
    pub(crate) ctx: &'a Ctx,
    pub(crate) shard: &'a Shard,
    pub(crate) report: Report,
    /// The target made synchronous: put back when the switchover ends.
    synced: Option<Synced>,
}

/// Why a step of a switchover failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    #[error("cannot connect to {addr} as {user}: {source}")]
    Connect {
        addr: HostPort,
        user: String,
        source: AdminConnectError,
    },
    #[error("{addr}: {message}")]
    Sql { addr: HostPort, message: String },
    #[error("the shard is {0}, not serving")]
    NotServing(&'static str),
    #[error("{0} is already the primary")]
    AlreadyPrimary(HostPort),
    #[error("{0} is not a standby (pg_is_in_recovery() is false)")]
    NotStandby(HostPort),
    #[error("{0} has not replayed any WAL yet")]
    NoReplay(HostPort),
    #[error("{to} is not a standby of {old} (system identifiers {target_system} and {old_system} differ)")]
    OtherSystem {
        to: HostPort,
        old: HostPort,
        target_system: String,
        old_system: String,
    },
    #[error("{to} replays {lag:.0} bytes behind {old}, more than HANDOFF_SWITCHOVER_MAX_LAG ({max} bytes)")]
    Lag {
        to: HostPort,
        old: HostPort,
        lag: f64,
        max: u64,
    },
    #[error(transparent)]
    Fence(#[from] fence::FenceError),
    #[error("{addr} did not replay up to the fence LSN {lsn} within HANDOFF_SWITCHOVER_TIMEOUT ({timeout:?})")]
    CatchUp {
        addr: HostPort,
        lsn: String,
        timeout: Duration,
    },
    #[error("{0}: pg_promote() could not signal the promotion")]
    PromoteNotSignalled(HostPort),
    #[error("{addr}: still in recovery {timeout:?} after pg_promote()")]
    StillInRecovery { addr: HostPort, timeout: Duration },
    #[error("{addr}: after promotion pg_is_in_recovery() = {in_recovery}, transaction_read_only = {read_only}")]
    NotWritable {
        addr: HostPort,
        in_recovery: bool,
        read_only: String,
    },
}

async fn connect(
    admin: &AdminDb,
    addr: &HostPort,
    timeout: Duration,
) -> Result<AdminSession, StepError> {
    admin
        .open(addr, admin.database(), "handoff-switchover", timeout)
        .await
        .map_err(|source| StepError::Connect {
            addr: addr.clone(),
            user: admin.user().to_string(),
            source,
        })
}

fn sql_error(addr: &HostPort, e: tokio_postgres::Error) -> StepError {
    StepError::Sql {
        addr: addr.clone(),
        message: match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        },
    }
}

impl Run<'_> {
    pub(crate) fn step(&mut self, name: &'static str, started: Instant, error: Option<String>) {
        let duration = started.elapsed();
        metrics::histogram!(crate::metrics::SWITCHOVER_STEP, "shard" => self.shard.name.clone(), "step" => name)
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
        metrics::counter!(crate::metrics::SWITCHOVERS, "shard" => self.shard.name.clone(), "outcome" => outcome.as_str())
            .increment(1);
        tracing::info!(shard = %self.shard.name, outcome = outcome.as_str(), from = %self.report.from, to = %self.report.to, "switchover finished");
        self.report
    }
}

/// How a switchover stops short of completing.
enum Stop {
    /// Refused before anything changed.
    Refused(String),
    /// Failed before the promotion: lift the fence and serve from the old primary.
    RollBack(Box<Fence>, String),
    /// The target may be promoted but could not be confirmed.
    Failed(String),
}

/// What a completed switchover hands to the demote command.
struct Done {
    old: HostPort,
    epoch: u64,
    lsn: String,
}

/// What the proxies' coordination does between the steps of a switchover it runs for
/// all of them (`crate::coord`): tell the others to hold, wait for them, publish each
/// point passed. A hook's error before the promotion rolls the switchover back. The
/// `()` hooks do nothing: a switchover of this proxy alone.
pub(crate) trait Hooks: Send {
    /// After this proxy's buffer step: the others are told to hold too.
    fn holding(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// After this proxy's lameduck (what it did is given): waits for the others to
    /// hold. Returns the backend pids of their sessions on the old primary, which the
    /// fence leaves alone.
    fn held(
        &mut self,
        lameduck: control::Lameduck,
    ) -> impl Future<Output = Result<Vec<i32>, String>> + Send;
    /// Before the fence, with the databases it is about to close.
    fn fencing(&mut self, databases: &[String]) -> impl Future<Output = Result<(), String>> + Send;
    /// After the fence, once the target has replayed up to its LSN, before the
    /// promotion: past this point the switchover rolls forward, whoever finishes it.
    fn promoting(
        &mut self,
        lsn: &str,
        databases: &[String],
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// The target is a writable primary; this proxy establishes it next at `epoch`.
    fn promoted(&mut self, to: &HostPort, epoch: u64) -> impl Future<Output = ()> + Send;
    /// How the switchover ended (not called when it was refused before holding).
    fn finished(
        &mut self,
        outcome: Outcome,
        error: Option<&str>,
    ) -> impl Future<Output = ()> + Send;
    /// True when other proxies take part (they must hold before the old primary stops).
    fn coordinated(&self) -> bool {
        false
    }
}

impl Hooks for () {
    async fn holding(&mut self) -> Result<(), String> {
        Ok(())
    }
    async fn held(&mut self, _: control::Lameduck) -> Result<Vec<i32>, String> {
        Ok(Vec::new())
    }
    async fn fencing(&mut self, _: &[String]) -> Result<(), String> {
        Ok(())
    }
    async fn promoting(&mut self, _: &str, _: &[String]) -> Result<(), String> {
        Ok(())
    }
    async fn promoted(&mut self, _: &HostPort, _: u64) {}
    async fn finished(&mut self, _: Outcome, _: Option<&str>) {}
}

/// Runs a switchover of `shard` to `to`. Holds the shard's operation lock throughout.
pub(crate) async fn run(ctx: Arc<Ctx>, shard: Arc<Shard>, to: HostPort) -> Report {
    run_with(ctx, shard, to, &mut ()).await
}

/// [`run`], calling `hooks` between the steps.
pub(crate) async fn run_with(
    ctx: Arc<Ctx>,
    shard: Arc<Shard>,
    to: HostPort,
    hooks: &mut impl Hooks,
) -> Report {
    let snap = shard.snapshot(ctx.buffer_idle(&shard.name));
    let mut run = Run {
        ctx: &ctx,
        shard: &shard,
        report: Report {
            shard: shard.name.clone(),
            from: snap.primary.to_string(),
            to: to.to_string(),
            outcome: Outcome::Refused,
            steps: Vec::new(),
            fence_lsn: None,
            fenced_databases: Vec::new(),
            fence_terminated: 0,
            epoch: snap.epoch,
            lameduck_cancelled: 0,
            prewarmed: 0,
            demote: None,
            sync_target: None,
            lag_at_revoke: None,
            error: None,
        },
        synced: None,
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
    if let Some(source) = ctx.patroni(&shard.name).cloned() {
        let (outcome, error) = run.patroni(&snap, &to, &source, hooks).await;
        let report = run.finish(outcome, error);
        if outcome != Outcome::Refused {
            hooks
                .finished(report.outcome, report.error.as_deref())
                .await;
        }
        return report;
    }
    let switched = run.switch(&snap, &to, hooks).await;
    // Before a rollback lifts the fence, after a completed switchover's flush.
    run.unsync().await;
    let report = match switched {
        Ok(done) => {
            run.demote(&done, &to).await;
            run.finish(Outcome::Completed, None)
        }
        Err(Stop::Refused(e)) => return run.finish(Outcome::Refused, Some(e)),
        Err(Stop::RollBack(fence, e)) => rollback(run, *fence, snap.epoch, e).await,
        Err(Stop::Failed(e)) => run.finish(Outcome::Failed, Some(e)),
    };
    hooks
        .finished(report.outcome, report.error.as_deref())
        .await;
    report
}

impl Run<'_> {
    /// Steps 1 to 7.
    async fn switch(
        &mut self,
        snap: &Snapshot,
        to: &HostPort,
        hooks: &mut impl Hooks,
    ) -> Result<Done, Stop> {
        let old = snap.primary.clone();
        let (old_db, target_db) = self.precheck(snap, to).await?;
        self.sync_target(&old, to, &target_db.client).await?;
        let revoked = self.buffer(snap)?;
        // Nothing is fenced yet: rolling back only lets the old primary serve again.
        let mut fence = Fence::new(old.clone(), old_db);
        if let Err(e) = hooks.holding().await {
            return Err(Stop::RollBack(Box::new(fence), e));
        }
        let t = Instant::now();
        let ld = control::lameduck(&revoked.gen, self.ctx.settings.drain_timeout).await;
        self.report.lameduck_cancelled = ld.cancelled;
        self.step("lameduck", t, None);
        match hooks.held(ld).await {
            Ok(spared) => {
                fence.spared = spared;
                // The session that will put the synchronous settings back.
                fence.spared.extend(self.synced.as_ref().map(|s| s.pid));
            }
            Err(e) => return Err(Stop::RollBack(Box::new(fence), e)),
        }
        let closing = match fence.main() {
            Some(c) => fence::open_databases(c, &old)
                .await
                .map_err(|e| e.to_string()),
            None => Err(format!("handoff's session on {old} was closed")),
        };
        if let Err(e) = match closing {
            Ok(databases) => hooks.fencing(&databases).await,
            Err(e) => Err(e),
        } {
            return Err(Stop::RollBack(Box::new(fence), e));
        }
        let fence = self.fence(fence).await?;
        let lsn = fence.lsn.clone().expect("set by a successful fence");
        let fence = self.catch_up(&target_db, to, &lsn, fence).await?;
        if let Err(e) = hooks.promoting(&lsn, &fence.databases).await {
            return Err(Stop::RollBack(Box::new(fence), e));
        }
        let fence = self
            .promote(&target_db, to, &old, snap.epoch, fence)
            .await?;
        hooks.promoted(to, snap.epoch + 1).await;
        let epoch = self.flush(to, &old, snap.epoch, fence).await?;
        Ok(Done { old, epoch, lsn })
    }

    /// 1. The target is a standby of the same cluster, close enough behind.
    async fn precheck(
        &mut self,
        snap: &Snapshot,
        to: &HostPort,
    ) -> Result<(AdminSession, AdminSession), Stop> {
        let t = Instant::now();
        let cfg = &self.ctx.settings.switchover;
        match precheck(
            &self.ctx.admin,
            cfg,
            &snap.state,
            &snap.primary,
            to,
            cfg.timeout,
        )
        .await
        {
            Ok((old_db, target_db, system)) => {
                self.shard.watch.set_system(&system);
                // A standby of the same system: if it was a replaced primary, it rejoined.
                self.shard.watch.remove(
                    &self.shard.name,
                    to,
                    "it is a standby, and the switchover's target",
                );
                self.step("precheck", t, None);
                Ok((old_db, target_db))
            }
            Err(e) => {
                self.step("precheck", t, Some(e.to_string()));
                Err(Stop::Refused(e.to_string()))
            }
        }
    }

    /// 1b. While traffic still flows, the target becomes the old primary's synchronous
    /// standby with `remote_apply` ([`sync_target`](crate::shard::sync_target)). When it
    /// cannot be (no rights, no unique name), the switchover goes on without: the
    /// catch-up then waits for the lag. When it is but does not replay in time, the
    /// switchover is refused before anything is held: it would not catch up either, and
    /// clients would wait for it behind a closed gate.
    async fn sync_target(
        &mut self,
        old: &HostPort,
        to: &HostPort,
        target: &Client,
    ) -> Result<(), Stop> {
        let cfg = &self.ctx.settings.switchover;
        if !cfg.sync_target {
            return Ok(());
        }
        let t = Instant::now();
        match sync_target::sync(&self.ctx.admin, old, to, target, cfg.timeout).await {
            Ok(synced) => {
                self.report.sync_target = Some(synced.name.clone());
                self.synced = Some(synced);
                self.step("sync_target", t, None);
            }
            Err((synced, e)) => {
                self.step("sync_target", t, Some(e.to_string()));
                if let Some(s) = synced {
                    if let Err(e) = s.restore().await {
                        tracing::error!(shard = %self.shard.name, error = %e, "could not put synchronous_standby_names and synchronous_commit back on the old primary: do it by hand (docs/switchover.md)");
                    }
                }
                if matches!(e, sync_target::SyncError::Timeout { .. }) {
                    return Err(Stop::Refused(e.to_string()));
                }
                tracing::warn!(shard = %self.shard.name, error = %e, "switchover goes on without a synchronous target");
            }
        }
        Ok(())
    }

    /// The synchronous settings put back on the old primary, if they were changed.
    async fn unsync(&mut self) {
        let Some(synced) = self.synced.take() else {
            return;
        };
        let t = Instant::now();
        let restored = synced.restore().await;
        if let Err(e) = &restored {
            tracing::error!(shard = %self.shard.name, error = %e, "could not put synchronous_standby_names and synchronous_commit back on the old primary: do it by hand (docs/switchover.md)");
        }
        self.step("unsync_target", t, restored.err().map(|e| e.to_string()));
    }

    /// 2. New transactions of the shard are held.
    fn buffer(&mut self, snap: &Snapshot) -> Result<Revoked, Stop> {
        let t = Instant::now();
        match control::revoke(self.ctx, self.shard, Some(snap.epoch), "switchover") {
            Ok(r) => {
                self.step("buffer", t, None);
                Ok(r)
            }
            Err(e) => {
                self.step("buffer", t, Some(e.to_string()));
                Err(Stop::Refused(e.to_string()))
            }
        }
    }

    /// 4. The fence on the old primary, and its LSN.
    async fn fence(&mut self, mut fence: Fence) -> Result<Fence, Stop> {
        let t = Instant::now();
        let cfg = &self.ctx.settings.switchover;
        let opts = fence::Apply {
            terminate: cfg.terminate,
            timeout: cfg.timeout,
        };
        let fenced = fence.apply(&self.ctx.admin, opts).await;
        self.report.fenced_databases = fence.databases.clone();
        self.report.fence_terminated = fence.terminated;
        let result = if fenced.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::metrics::FENCES, "shard" => self.shard.name.clone(), "source" => "switchover", "result" => result)
            .increment(1);
        self.report.fence_lsn = fence.lsn.clone();
        self.step_or_roll_back("revoke", t, fenced, fence)
    }

    /// 5. The target replays up to the fence LSN.
    async fn catch_up(
        &mut self,
        target_db: &AdminSession,
        to: &HostPort,
        lsn: &str,
        fence: Fence,
    ) -> Result<Fence, Stop> {
        let t = Instant::now();
        let timeout = self.ctx.settings.switchover.timeout;
        self.report.lag_at_revoke = target_db
            .client
            .query_one(
                "SELECT pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn())::float8",
                &[&lsn],
            )
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<f64>>(0))
            .map(|lag| lag.max(0.0));
        let caught_up = catch_up(&target_db.client, to, lsn, timeout).await;
        self.step_or_roll_back("catch_up", t, caught_up, fence)
    }

    /// Records a step that runs behind the fence: done, or the switchover rolls back.
    fn step_or_roll_back<E: std::fmt::Display>(
        &mut self,
        name: &'static str,
        t: Instant,
        result: Result<(), E>,
        fence: Fence,
    ) -> Result<Fence, Stop> {
        match result {
            Ok(()) => {
                self.step(name, t, None);
                Ok(fence)
            }
            Err(e) => {
                self.step(name, t, Some(e.to_string()));
                Err(Stop::RollBack(Box::new(fence), e.to_string()))
            }
        }
    }

    /// 6. The target promoted, its databases open, confirmed writable.
    async fn promote(
        &mut self,
        target_db: &AdminSession,
        to: &HostPort,
        old: &HostPort,
        epoch: u64,
        fence: Fence,
    ) -> Result<Fence, Stop> {
        let t = Instant::now();
        let timeout = self.ctx.settings.switchover.timeout;
        let promoted = promote(
            &self.ctx.admin,
            &target_db.client,
            to,
            timeout,
            &fence.databases,
        )
        .await;
        match promoted {
            Ok(()) => {
                self.step("promote", t, None);
                Ok(fence)
            }
            Err(Promotion::NotPromoted(e)) => self.step_or_roll_back("promote", t, Err(e), fence),
            Err(Promotion::Unconfirmed(e)) => {
                self.step("promote", t, Some(e.to_string()));
                // The old primary stays fenced; the watchdog keeps its sessions.
                keep_fenced(self.shard, old, epoch, fence);
                Err(Stop::Failed(format!(
                    "{e}; the target may be promoted: shard \"{0}\" stays buffering until POST /v1/shards/{0}/primary or /resume",
                    self.shard.name
                )))
            }
        }
    }

    /// 7. The target serves; held transactions are released to it. Returns the new epoch.
    async fn flush(
        &mut self,
        to: &HostPort,
        old: &HostPort,
        epoch: u64,
        fence: Fence,
    ) -> Result<u64, Stop> {
        let t = Instant::now();
        let established = control::establish(self.ctx, self.shard, Some(epoch), to.clone()).await;
        match &established {
            Ok(est) => self.step("flush", t, est.prewarm_error.clone()),
            Err(e) => self.step("flush", t, Some(e.to_string())),
        }
        // The old primary stays fenced, and watched, until it rejoins as a standby.
        keep_fenced(self.shard, old, epoch, fence);
        let est = established.map_err(|e| Stop::Failed(e.to_string()))?;
        self.report.epoch = est.epoch;
        self.report.prewarmed = est.prewarmed;
        Ok(est.epoch)
    }

    /// 8. The demote command, if any: its outcome is reported, never undone.
    async fn demote(&mut self, done: &Done, to: &HostPort) {
        let cfg = &self.ctx.settings.switchover;
        let Some(command) = &cfg.demote_command else {
            return;
        };
        let old = &done.old;
        let env = [
            ("HANDOFF_SHARD", self.shard.name.clone()),
            ("HANDOFF_OLD_PRIMARY", old.to_string()),
            ("HANDOFF_OLD_PRIMARY_HOST", old.host.clone()),
            ("HANDOFF_OLD_PRIMARY_PORT", old.port.to_string()),
            ("HANDOFF_NEW_PRIMARY", to.to_string()),
            ("HANDOFF_NEW_PRIMARY_HOST", to.host.clone()),
            ("HANDOFF_NEW_PRIMARY_PORT", to.port.to_string()),
            ("HANDOFF_EPOCH", done.epoch.to_string()),
            ("HANDOFF_FENCE_LSN", done.lsn.clone()),
        ];
        self.report.demote = Some(
            crate::shard::demote::run(command, &env, cfg.demote_timeout, &self.shard.name).await,
        );
    }
}
/// Hands the fenced old primary, with the sessions the fence kept, to the watchdog.
fn keep_fenced(shard: &Shard, old: &HostPort, epoch: u64, fence: Fence) {
    shard.watch.add(
        &shard.name,
        old.clone(),
        Why::Switchover,
        epoch,
        Some(fence),
    );
}

async fn precheck(
    admin: &AdminDb,
    cfg: &SwitchoverSettings,
    state: &StateKind,
    old: &HostPort,
    to: &HostPort,
    timeout: Duration,
) -> Result<(AdminSession, AdminSession, String), StepError> {
    if *state != StateKind::Serving {
        return Err(StepError::NotServing(state.as_str()));
    }
    if old == to {
        return Err(StepError::AlreadyPrimary(to.clone()));
    }
    let target = connect(admin, to, timeout).await?;
    let row = target
        .client
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
        return Err(StepError::NotStandby(to.clone()));
    }
    let Some(replay) = replay else {
        return Err(StepError::NoReplay(to.clone()));
    };
    let old_db = connect(admin, old, timeout).await?;
    let row = old_db
        .client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8, \
             (SELECT system_identifier FROM pg_control_system())::text",
            &[&replay],
        )
        .await
        .map_err(|e| sql_error(old, e))?;
    let (lag, old_system): (f64, String) = (row.get(0), row.get(1));
    if old_system != target_system {
        return Err(StepError::OtherSystem {
            to: to.clone(),
            old: old.clone(),
            target_system,
            old_system,
        });
    }
    if lag > cfg.max_lag as f64 {
        return Err(StepError::Lag {
            to: to.clone(),
            old: old.clone(),
            lag,
            max: cfg.max_lag,
        });
    }
    Ok((old_db, target, old_system))
}

/// Waits until the standby behind `db` has replayed up to `fence`.
pub(crate) async fn catch_up(
    db: &Client,
    addr: &HostPort,
    fence: &str,
    timeout: Duration,
) -> Result<(), StepError> {
    let deadline = Instant::now() + timeout;
    match replay::wait_replayed(db, fence, deadline).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(StepError::CatchUp {
            addr: addr.clone(),
            lsn: fence.to_string(),
            timeout,
        }),
        Err(e) => Err(sql_error(addr, e)),
    }
}

pub(crate) enum Promotion {
    /// The target is still a standby: safe to roll back.
    NotPromoted(StepError),
    /// The target may be a primary now.
    Unconfirmed(StepError),
}

/// Promotes the standby behind `db` (unless it already left recovery: whoever finishes
/// a coordinated switchover may find it promoted), opens the databases the fence closed,
/// and confirms that a new session can write.
pub(crate) async fn promote(
    admin: &AdminDb,
    db: &Client,
    addr: &HostPort,
    timeout: Duration,
    fenced: &[String],
) -> Result<(), Promotion> {
    let in_recovery: bool = match db.query_one("SELECT pg_is_in_recovery()", &[]).await {
        Ok(row) => row.get(0),
        Err(e) => return Err(Promotion::NotPromoted(sql_error(addr, e))),
    };
    // pg_promote(wait => true) polls every 100 ms; asking without waiting and polling
    // here ends the promotion step sooner.
    let promoted: bool = if !in_recovery {
        true
    } else {
        match db.query_one("SELECT pg_promote(false)", &[]).await {
            Ok(row) => row.get(0),
            Err(e) => return Err(Promotion::NotPromoted(sql_error(addr, e))),
        }
    };
    if !promoted {
        return Err(Promotion::NotPromoted(StepError::PromoteNotSignalled(
            addr.clone(),
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
                return Err(Promotion::Unconfirmed(StepError::StillInRecovery {
                    addr: addr.clone(),
                    timeout,
                }))
            }
            Err(e) => return Err(Promotion::Unconfirmed(sql_error(addr, e))),
        }
    }
    // The target replayed the fence: its databases accept connections again.
    fence::restore(db, addr, fenced)
        .await
        .map_err(|e| Promotion::Unconfirmed(e.into()))?;
    // A new session gets in and can write.
    let deadline = Instant::now() + timeout;
    loop {
        let check = async {
            let c = connect(admin, addr, timeout).await?;
            let row = c
                .client
                .query_one(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
                    &[],
                )
                .await
                .map_err(|e| sql_error(addr, e))?;
            Ok::<_, StepError>((row.get::<_, bool>(0), row.get::<_, String>(1)))
        };
        match check.await {
            Ok((false, ro)) if ro == "off" => return Ok(()),
            Ok((in_recovery, read_only)) if Instant::now() >= deadline => {
                return Err(Promotion::Unconfirmed(StepError::NotWritable {
                    addr: addr.clone(),
                    in_recovery,
                    read_only,
                }))
            }
            Err(e) if Instant::now() >= deadline => return Err(Promotion::Unconfirmed(e)),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Undoes the revocation: the fence lifted (exactly what it changed, confirmed from a
/// new session), then the shard serving from the old primary again with the held
/// transactions released to it. If the fence cannot be lifted the shard stays buffering
/// (releasing clients to a server that refuses every login would fail them all).
async fn rollback(mut run: Run<'_>, fence: Fence, epoch: u64, cause: String) -> Report {
    let t = Instant::now();
    let lifted = fence.lift(&run.ctx.admin, Duration::from_secs(5)).await;
    if let Err(e) = lifted {
        let err = format!("could not lift the fence on {}: {e}", fence.addr);
        run.step("rollback", t, Some(err.clone()));
        let msg = format!(
            "{cause}; rollback: {err}; shard \"{}\" stays buffering: open the databases {} again by hand (docs/fence.md) and POST /v1/shards/{}/resume",
            run.shard.name,
            fence.databases.join(", "),
            run.shard.name
        );
        return run.finish(Outcome::Failed, Some(msg));
    }
    let aborted = control::abort(run.ctx, run.shard, Some(epoch));
    let err = aborted.err().map(|e| e.to_string());
    run.step("rollback", t, err.clone());
    let msg = match err {
        None => cause,
        Some(e) => format!("{cause}; rollback: {e}"),
    };
    run.finish(Outcome::RolledBack, Some(msg))
}
