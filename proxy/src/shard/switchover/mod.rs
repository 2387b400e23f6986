//! A planned switchover run by handoff (docs/switchover.md), over SQL on the old
//! primary and the target standby: pre-check, buffer, lameduck, revoke (the fence, and
//! its LSN), catch up, promote, flush, and optionally the demote command. Any failure
//! before the promotion rolls back to the old primary, lifting exactly what the fence
//! changed; clients see a pause either way. After a completed switchover the old primary
//! stays fenced and is watched for split brain ([`crate::shard::watchdog`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio_postgres::Client;

use crate::backend::admin::AdminSession;
use crate::config::HostPort;
use crate::shard::control;
use crate::shard::fence::{self, Fence};
use crate::shard::sync_target::{self, Synced};
use crate::shard::watch::Why;
use crate::shard::{Ctx, Revoked, Shard, Snapshot};

pub(crate) use crate::api::report::Outcome;

mod hooks;
mod report;
mod sql;

pub(crate) use hooks::Hooks;
pub(crate) use report::Report;
mod repoint;
use sql::precheck;
pub(crate) use sql::{catch_up, promote, Promotion};

pub(crate) struct Run<'a> {
    pub(crate) ctx: &'a Ctx,
    pub(crate) shard: &'a Shard,
    pub(crate) report: Report,
    /// The target made synchronous: put back when the switchover ends.
    synced: Option<Synced>,
    /// Sessions on the shard's other standbys, to point them at the target (and back
    /// if the switchover does not happen).
    others: Vec<(HostPort, Result<AdminSession, String>)>,
    /// Keeps them in the read rotation while their WAL receivers reconnect.
    repointing: Vec<crate::shard::replicas::Repointing>,
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
            repointed: Vec::new(),
            error: None,
        },
        synced: None,
        others: Vec::new(),
        repointing: Vec::new(),
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
    // Reads leave the target before it is promoted.
    let _withheld = shard.replicas.withhold(&to);
    if let Some(source) = ctx.manager(&shard.name).cloned() {
        let (outcome, error) = run.managed(&snap, &to, &source, hooks).await;
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
        Err(Stop::Refused(e)) => {
            run.repoint_back(&snap.primary).await;
            return run.finish(Outcome::Refused, Some(e));
        }
        Err(Stop::RollBack(fence, e)) => {
            run.repoint_back(&snap.primary).await;
            rollback(run, *fence, snap.epoch, e).await
        }
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
        self.repoint(&old, to).await;
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

    /// The shard's hosts but the old primary and the target.
    fn other_standbys(&self, old: &HostPort, to: &HostPort) -> Vec<HostPort> {
        self.shard
            .hosts
            .iter()
            .filter(|h| *h != to && *h != old)
            .cloned()
            .collect()
    }

    /// 1c. The shard's other standbys stream from the target from now on
    /// ([`repoint`]), so they follow it when it is promoted.
    async fn repoint(&mut self, old: &HostPort, to: &HostPort) {
        let others = self.other_standbys(old, to);
        if others.is_empty() {
            return;
        }
        let t = Instant::now();
        let timeout = self.ctx.settings.switchover.timeout;
        self.repointing = others
            .iter()
            .map(|h| self.shard.replicas.repointing(h))
            .collect();
        self.others = repoint::open(&self.ctx.admin, others, timeout).await;
        let results = repoint::repoint(&self.others, to, timeout).await;
        for (h, r) in &results {
            tracing::info!(shard = %self.shard.name, standby = %h, result = ?r, "standby pointed at the switchover's target");
        }
        self.report.repointed = results
            .iter()
            .filter(|(_, r)| matches!(r, repoint::Repointed::Done | repoint::Repointed::Already))
            .map(|(h, _)| h.to_string())
            .collect();
        // A standby repointed has a new upstream: check it now.
        self.shard.replicas.wake.notify_one();
        self.step("repoint", t, repoint::failures(&results));
    }

    /// The switchover did not happen: the standbys repointed at its target go back to
    /// the primary that stays.
    async fn repoint_back(&mut self, old: &HostPort) {
        if self.report.repointed.is_empty() {
            return;
        }
        let t = Instant::now();
        let timeout = self.ctx.settings.switchover.timeout;
        let results = repoint::repoint(&self.others, old, timeout).await;
        self.report.repointed.clear();
        self.shard.replicas.wake.notify_one();
        self.step("repoint_back", t, repoint::failures(&results));
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
