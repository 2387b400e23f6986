//! A switchover of a shard an HA manager runs (docs/ha-managers.md): the manager
//! promotes and demotes, handoff holds, lameducks and flushes around it.
//!
//! 1. **precheck**: the manager's leader is the primary handoff serves, the target
//!    another member it would promote, the manager not paused; **checkpoint** on the
//!    leader (a demote starts with one; done first, that one is short).
//! 2. **buffer** and **lameduck**: new transactions held, running ones finish (every
//!    proxy, with coordination). Where the manager calls `handoff hold` right before it
//!    stops the leader (Patroni's `before_stop` with `HANDOFF_PATRONI_HOOK`, one proxy)
//!    this happens on that call instead of before asking: the manager's own
//!    preparation (its checks, its loop) then passes unheld.
//! 3. **`<manager>_switchover`**: the manager is asked (Patroni: `POST /switchover` to
//!    the leader's REST API; pg_auto_failover: `perform_promotion` on the monitor);
//!    handoff goes on the moment the candidate leaves recovery (the manager promotes
//!    only the member it was asked to) and handoff's probe finds it writable.
//! 4. **flush**: the candidate serves at the next epoch.
//!
//! The manager's refusal rolls back (the old leader serves again at the same epoch)
//! unless the old leader is no longer its writable leader; then the shard stays held
//! until discovery finds the manager's next leader.

use std::sync::Arc;

use crate::api::ShardChange;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::HostPort;
use crate::manager::{Manager, ManagerError, Member};
use crate::shard::failure::HookCall;
use crate::shard::health::{self, Probe};
use crate::shard::switchover::{Hooks, Outcome, Run};
use crate::shard::{control, Ctx, Revoked, Snapshot, StateKind};
use crate::sync::Locked;

/// Why a managed switchover stopped before the candidate served.
enum Ended {
    /// The manager refused or failed, or never produced a writable leader in time.
    Refused(String),
}

type Post = tokio::task::JoinHandle<Result<String, ManagerError>>;

/// How often the switchover asks the candidate whether it left recovery.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

impl Run<'_> {
    /// A switchover of a managed shard to `to`.
    pub(crate) async fn managed(
        &mut self,
        snap: &Snapshot,
        to: &HostPort,
        source: &Arc<dyn Manager>,
        hooks: &mut impl Hooks,
    ) -> (Outcome, Option<String>) {
        let t = Instant::now();
        let (leader, candidate) = match self.managed_precheck(snap, to, source.as_ref()).await {
            Ok(pair) => {
                self.step("precheck", t, None);
                pair
            }
            Err(e) => {
                self.step("precheck", t, Some(e.clone()));
                return (Outcome::Refused, Some(e));
            }
        };
        let t = Instant::now();
        let checkpoint = checkpoint(self.ctx, &snap.primary).await;
        self.step("checkpoint", t, checkpoint.err());
        let by_hook = source.hold_hook() && !hooks.coordinated();
        let (revoked, post) = if by_hook {
            match self
                .held_by_hook(snap, source, &leader, &candidate, hooks)
                .await
            {
                Ok(pair) => pair,
                Err(done) => return done,
            }
        } else {
            let revoked = match self.hold_first(snap, source.as_ref(), hooks).await {
                Ok(r) => r,
                Err(done) => return done,
            };
            (revoked, self.post(source, &leader, &candidate))
        };
        // The manager demotes the old leader (it stops accepting writes) before the
        // candidate promotes: its revocation comes before establishment.
        let t = Instant::now();
        let step = step_name(source.as_ref());
        match self.managed_switch(post, &candidate, source.as_ref()).await {
            Ok(()) => self.step(step, t, None),
            Err(Ended::Refused(e)) => {
                self.step(step, t, Some(e.clone()));
                return self
                    .managed_roll_back(snap.epoch, revoked.cycle, source.as_ref(), e)
                    .await;
            }
        }
        hooks.promoted(to, snap.epoch + 1).await;
        let t = Instant::now();
        match control::establish(self.ctx, self.shard, Some(snap.epoch), to.clone()).await {
            Ok(est) => {
                self.step("flush", t, est.prewarm_error.clone());
                self.report.epoch = est.epoch;
                self.report.prewarmed = est.prewarmed;
                (Outcome::Completed, None)
            }
            Err(e) => {
                self.step("flush", t, Some(e.to_string()));
                (Outcome::Failed, Some(e.to_string()))
            }
        }
    }

    /// Buffer and lameduck before the manager is asked.
    async fn hold_first(
        &mut self,
        snap: &Snapshot,
        source: &dyn Manager,
        hooks: &mut impl Hooks,
    ) -> Result<Revoked, (Outcome, Option<String>)> {
        let t = Instant::now();
        let revoked = match control::revoke(self.ctx, self.shard, Some(snap.epoch), "switchover") {
            Ok(r) => {
                self.step("buffer", t, None);
                r
            }
            Err(e) => {
                self.step("buffer", t, Some(e.to_string()));
                return Err((Outcome::Refused, Some(e.to_string())));
            }
        };
        if let Err(e) = hooks.holding().await {
            return Err(self
                .managed_roll_back(snap.epoch, revoked.cycle, source, e)
                .await);
        }
        let t = Instant::now();
        let ld = control::lameduck(&revoked.gen, self.ctx.settings.drain_timeout).await;
        self.report.lameduck_cancelled = ld.cancelled;
        self.step("lameduck", t, None);
        if let Err(e) = hooks.held(ld).await {
            return Err(self
                .managed_roll_back(snap.epoch, revoked.cycle, source, e)
                .await);
        }
        Ok(revoked)
    }

    /// The manager calls `handoff hold` before it stops the leader (Patroni's
    /// `before_stop` with `HANDOFF_PATRONI_HOOK`): it is asked first; the shard is held
    /// when the hook calls, and the hook is answered once the
    /// transactions running on the old leader are done.
    async fn held_by_hook(
        &mut self,
        snap: &Snapshot,
        source: &Arc<dyn Manager>,
        leader: &Member,
        candidate: &Member,
        hooks: &mut impl Hooks,
    ) -> Result<(Revoked, Post), (Outcome, Option<String>)> {
        let title = source.kind().title();
        let (tx, rx) = oneshot::channel::<HookCall>();
        *self.shard.health.hook.locked() = Some(tx);
        let t = Instant::now();
        let mut post = self.post(source, leader, candidate);
        let timeout = self.ctx.settings.switchover.timeout;
        let call = tokio::select! {
            call = rx => call.ok(),
            r = &mut post => {
                // The manager answered before the hook came: a refusal, or a stop
                // without it.
                self.shard.health.hook.locked().take();
                let e = match r {
                    Ok(Err(ManagerError::Refused { code, message })) => {
                        let e = format!("{title} refused the switchover ({code}): {message}");
                        self.step("hook", t, Some(e.clone()));
                        return Err((Outcome::RolledBack, Some(format!("{e}; nothing was held"))));
                    }
                    Ok(Err(e)) => format!("asking {title} for the switchover: {e}"),
                    Err(e) => format!("asking {title} for the switchover: {e}"),
                    Ok(Ok(m)) => format!("{title} switched over without calling the hold hook ({m})"),
                };
                return Err(self.unheld_stop(t, e));
            }
            _ = tokio::time::sleep(timeout) => None,
        };
        self.shard.health.hook.locked().take();
        let Some(call) = call else {
            return Err(self.unheld_stop(
                t,
                format!("{title} did not call the hold hook within HANDOFF_SWITCHOVER_TIMEOUT ({timeout:?})"),
            ));
        };
        self.step("hook", t, None);
        let t = Instant::now();
        let revoked = match control::revoke(self.ctx, self.shard, Some(snap.epoch), "switchover") {
            Ok(r) => {
                self.step("buffer", t, None);
                r
            }
            Err(e) => {
                let _ = call.send(ShardChange {
                    shard: self.shard.name.clone(),
                    held: Some(false),
                    error: Some(e.to_string()),
                    ..Default::default()
                });
                self.step("buffer", t, Some(e.to_string()));
                return Err((Outcome::Failed, Some(e.to_string())));
            }
        };
        // Not coordinated (see `Run::managed`): these only record the steps.
        let _ = hooks.holding().await;
        let t = Instant::now();
        let ld = control::lameduck(&revoked.gen, self.ctx.settings.drain_timeout).await;
        self.report.lameduck_cancelled = ld.cancelled;
        self.step("lameduck", t, None);
        let _ = hooks.held(ld).await;
        let _ = call.send(ShardChange {
            held: Some(true),
            switchover: true,
            ..ld.buffering(&self.shard.name, &revoked.gen)
        });
        Ok((revoked, post))
    }

    /// The old leader stopped (or may stop) without the hook's hold: whatever ran on it
    /// was cut. The failure detector takes it from here; the shard follows the manager.
    fn unheld_stop(&mut self, t: Instant, e: String) -> (Outcome, Option<String>) {
        self.step("hook", t, Some(e.clone()));
        if self
            .shard
            .snapshot(self.ctx.buffer_idle(&self.shard.name))
            .state
            == StateKind::Serving
        {
            self.shard.health.wake.notify_one();
        }
        (
            Outcome::Failed,
            Some(format!(
                "{e}: transactions running on the old leader may have been cut; shard \"{}\" follows the HA manager's next leader",
                self.shard.name
            )),
        )
    }

    /// The manager asked for the switchover, in its own task.
    fn post(&self, source: &Arc<dyn Manager>, leader: &Member, candidate: &Member) -> Post {
        let timeout = self.ctx.settings.switchover.timeout;
        let source = Arc::clone(source);
        let (leader, candidate) = (leader.clone(), candidate.clone());
        tokio::spawn(async move { source.switchover(&leader, &candidate, timeout).await })
    }

    /// The manager's leader is the primary handoff serves, `to` is another member it
    /// would promote, and the manager is not paused.
    async fn managed_precheck(
        &mut self,
        snap: &Snapshot,
        to: &HostPort,
        source: &dyn Manager,
    ) -> Result<(Member, Member), String> {
        let title = source.kind().title();
        if snap.state != StateKind::Serving {
            return Err(format!(
                "shard \"{}\" is {}, not serving",
                self.shard.name,
                snap.state.as_str()
            ));
        }
        let c = source
            .view()
            .await
            .map_err(|e| format!("{title} did not answer: {e}"))?;
        if let Some(why) = &c.paused {
            return Err(why.clone());
        }
        let leader = c
            .leader()
            .ok_or_else(|| format!("{title} cluster \"{}\" has no leader", c.name))?;
        if leader.addr != snap.primary {
            return Err(format!(
                "{title}'s leader is {} ({}) but handoff serves {}: retry once they agree",
                leader.name, leader.addr, snap.primary
            ));
        }
        let candidate = c.at(to).ok_or_else(|| {
            format!(
                "{to} is not a member of {title} cluster \"{}\" (members: {})",
                c.name,
                c.names()
            )
        })?;
        if let Some(why) = &candidate.not_candidate {
            return Err(format!("{} ({to}) {why}", candidate.name));
        }
        // The manager says it follows the leader: a replaced primary that rejoined.
        self.shard.watch.remove(
            &self.shard.name,
            to,
            "the HA manager lists it as a standby, and it is the switchover's target",
        );
        Ok((leader.clone(), candidate.clone()))
    }

    /// Watches for the candidate to leave recovery, without waiting for the manager's
    /// answer to `post` (Patroni's comes later). The manager promotes only the member it
    /// was asked to (Patroni: the holder of its leader lock; pg_auto_failover: the node
    /// it assigned `wait_primary`, after the old primary stopped): once it is out of
    /// recovery it is the manager's leader. handoff's own probe confirms it is writable
    /// on the highest timeline seen, asked every few milliseconds on one session kept on
    /// the candidate (a hot standby session sees the promotion). The manager, busy
    /// promoting, is not in the way.
    async fn managed_switch(
        &mut self,
        mut post: Post,
        candidate: &Member,
        source: &dyn Manager,
    ) -> Result<(), Ended> {
        let title = source.kind().title();
        let timeout = self.ctx.settings.switchover.timeout;
        let deadline = Instant::now() + timeout;
        let mut answered: Option<String> = None;
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut session: Option<crate::backend::admin::AdminSession> = None;
        loop {
            tokio::select! {
                r = &mut post, if answered.is_none() => {
                    match r {
                        Ok(Ok(msg)) => answered = Some(msg),
                        Ok(Err(ManagerError::Refused { code, message })) => {
                            return Err(Ended::Refused(format!(
                                "{title} refused the switchover ({code}): {message}"
                            )));
                        }
                        Ok(Err(e)) => return Err(Ended::Refused(format!("asking {title} for the switchover: {e}"))),
                        Err(e) => return Err(Ended::Refused(format!("asking {title} for the switchover: {e}"))),
                    }
                }
                _ = tick.tick() => {}
            }
            if Instant::now() > deadline {
                return Err(Ended::Refused(format!(
                    "{} was not promoted and writable within HANDOFF_SWITCHOVER_TIMEOUT ({timeout:?}){}",
                    candidate.name,
                    answered.map(|m| format!("; {title} said: {m}")).unwrap_or_default()
                )));
            }
            if session.as_ref().is_none_or(|s| s.client.is_closed()) {
                let health = self.ctx.settings.health.timeout;
                session = self
                    .ctx
                    .admin
                    .open(
                        &candidate.addr,
                        self.ctx.admin.database(),
                        "handoff-switchover",
                        health,
                    )
                    .await
                    .ok();
            }
            let Some(s) = &session else {
                continue;
            };
            let Some(probe) = health::probe_on(&s.client).await else {
                session = None;
                continue;
            };
            // Still in recovery, or not yet taking writes.
            let Probe::Primary { timeline } = probe else {
                continue;
            };
            let min = self
                .shard
                .health
                .max_timeline
                .load(std::sync::atomic::Ordering::SeqCst);
            self.shard.health.saw_timeline(timeline);
            if timeline < min {
                continue;
            }
            if answered.is_none() {
                // The manager's answer is only logged: the candidate already serves.
                let shard = self.shard.name.clone();
                tokio::spawn(async move {
                    match post.await {
                        Ok(Ok(m)) => {
                            tracing::info!(%shard, manager = title, answer = %m, "the HA manager's switchover answer")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%shard, manager = title, error = %e, "the HA manager's switchover answer after the candidate became writable")
                        }
                        Err(_) => {}
                    }
                });
            }
            return Ok(());
        }
    }

    /// After the manager refused or failed: if the old leader is still its leader and
    /// writable, it serves again at the same epoch (rolled back); otherwise the shard
    /// follows the manager's next leader (failed, still held).
    async fn managed_roll_back(
        &mut self,
        epoch: u64,
        cycle: u64,
        source: &dyn Manager,
        cause: String,
    ) -> (Outcome, Option<String>) {
        let title = source.kind().title();
        let t = Instant::now();
        let old = self.shard.current().primary.clone();
        let still = match source.view().await {
            Ok(c) => c.leader().is_some_and(|l| l.addr == old),
            Err(_) => false,
        };
        let writable = still
            && matches!(
                health::probe(&self.ctx.admin, &old, self.ctx.settings.health.timeout).await,
                Probe::Primary { .. }
            );
        if writable {
            match control::abort(self.ctx, self.shard, Some(epoch)) {
                Ok(_) => {
                    self.step("rollback", t, None);
                    return (Outcome::RolledBack, Some(cause));
                }
                Err(e) => self.step("rollback", t, Some(e.to_string())),
            }
        } else {
            self.step(
                "rollback",
                t,
                Some(format!(
                    "{old} is no longer {title}'s writable leader: following {title}'s next leader"
                )),
            );
        }
        self.shard
            .health
            .discover_cycle
            .store(cycle, std::sync::atomic::Ordering::SeqCst);
        self.shard.health.wake.notify_one();
        (
            Outcome::Failed,
            Some(format!(
                "{cause}; the old primary cannot serve again, so shard \"{}\" stays held until {title}'s next leader is writable",
                self.shard.name
            )),
        )
    }
}

/// The report's name of the step where the manager switches over.
fn step_name(source: &dyn Manager) -> &'static str {
    match source.kind() {
        crate::manager::Kind::Patroni => "patroni_switchover",
        crate::manager::Kind::PgAutoFailover => "pg_auto_failover_switchover",
        crate::manager::Kind::Repmgr => "repmgr_switchover",
    }
}

/// `CHECKPOINT` on `addr` as the admin role, within the switchover timeout. A failure
/// (no privilege: PostgreSQL 15 needs superuser or `pg_checkpoint`) is only reported.
async fn checkpoint(ctx: &Ctx, addr: &HostPort) -> Result<(), String> {
    let timeout = ctx.settings.switchover.timeout;
    let work = async {
        let session = ctx
            .admin
            .open(addr, ctx.admin.database(), "handoff-checkpoint", timeout)
            .await
            .map_err(|e| e.to_string())?;
        session
            .client
            .simple_query("CHECKPOINT")
            .await
            .map(|_| ())
            .map_err(|e| format!("CHECKPOINT on {addr}: {e} (the switchover goes on)"))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "CHECKPOINT on {addr}: no answer within {timeout:?}"
            ))
        })
}
