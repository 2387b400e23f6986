//! A switchover of a Patroni shard (docs/patroni.md): Patroni promotes and demotes,
//! handoff holds, lameducks and flushes around it.
//!
//! 1. **precheck**: Patroni's leader is the primary handoff serves, the target another
//!    member that streams, Patroni not paused; **checkpoint** on the leader (Patroni's
//!    demote starts with one; done first, that one is short).
//! 2. **buffer** and **lameduck**: new transactions held, running ones finish (every
//!    proxy, with coordination). With `HANDOFF_PATRONI_HOOK` (one proxy, Patroni's
//!    `before_stop` calling `handoff hold` against it) this happens when Patroni calls
//!    the hook, right before it stops the server, instead of before asking Patroni:
//!    Patroni's own preparation (its checks, its loop) then passes unheld.
//! 3. **patroni_switchover**: `POST /switchover` to the leader's REST API; handoff goes
//!    on the moment the candidate leaves recovery (Patroni promotes only the member
//!    holding its leader lock) and handoff's probe finds it writable.
//! 4. **flush**: the candidate serves at the next epoch.
//!
//! Patroni's refusal rolls back (the old leader serves again at the same epoch) unless
//! the old leader is no longer Patroni's writable leader; then the shard stays held
//! until discovery finds Patroni's next leader.

use std::sync::Arc;

use crate::api::ShardChange;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::HostPort;
use crate::patroni::{Member, PatroniError, Source};
use crate::shard::failure::HookCall;
use crate::shard::health::{self, Probe};
use crate::shard::switchover::{Hooks, Outcome, Run};
use crate::shard::{control, Ctx, Revoked, Snapshot, StateKind};
use crate::sync::Locked;

/// Why a Patroni switchover stopped before the candidate served.
enum Ended {
    /// Patroni refused or failed, or never produced a writable leader in time.
    Refused(String),
}

type Post = tokio::task::JoinHandle<Result<String, PatroniError>>;

/// How often the switchover asks the candidate whether it left recovery.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

impl Run<'_> {
    /// A switchover of a Patroni shard to `to`.
    pub(crate) async fn patroni(
        &mut self,
        snap: &Snapshot,
        to: &HostPort,
        source: &Arc<Source>,
        hooks: &mut impl Hooks,
    ) -> (Outcome, Option<String>) {
        let t = Instant::now();
        let (leader, candidate) = match self.patroni_precheck(snap, to, source).await {
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
        let by_hook = self.ctx.settings.patroni.hook && !hooks.coordinated();
        let (revoked, post) = if by_hook {
            match self
                .held_by_hook(snap, source, &leader, &candidate, hooks)
                .await
            {
                Ok(pair) => pair,
                Err(done) => return done,
            }
        } else {
            let revoked = match self.hold_first(snap, source, hooks).await {
                Ok(r) => r,
                Err(done) => return done,
            };
            (revoked, self.post(source, &leader, &candidate))
        };
        // Patroni demotes the old leader (it stops accepting writes) before the
        // candidate promotes: its revocation comes before establishment.
        let t = Instant::now();
        match self.patroni_switch(post, &candidate).await {
            Ok(()) => self.step("patroni_switchover", t, None),
            Err(Ended::Refused(e)) => {
                self.step("patroni_switchover", t, Some(e.clone()));
                return self
                    .patroni_roll_back(snap.epoch, revoked.cycle, source, e)
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

    /// Buffer and lameduck before Patroni is asked.
    async fn hold_first(
        &mut self,
        snap: &Snapshot,
        source: &Source,
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
                .patroni_roll_back(snap.epoch, revoked.cycle, source, e)
                .await);
        }
        let t = Instant::now();
        let ld = control::lameduck(&revoked.gen, self.ctx.settings.drain_timeout).await;
        self.report.lameduck_cancelled = ld.cancelled;
        self.step("lameduck", t, None);
        if let Err(e) = hooks.held(ld).await {
            return Err(self
                .patroni_roll_back(snap.epoch, revoked.cycle, source, e)
                .await);
        }
        Ok(revoked)
    }

    /// `HANDOFF_PATRONI_HOOK`: Patroni is asked first; the shard is held when Patroni's
    /// `before_stop` hook calls `handoff hold`, and the hook is answered once the
    /// transactions running on the old leader are done.
    async fn held_by_hook(
        &mut self,
        snap: &Snapshot,
        source: &Arc<Source>,
        leader: &Member,
        candidate: &Member,
        hooks: &mut impl Hooks,
    ) -> Result<(Revoked, Post), (Outcome, Option<String>)> {
        let (tx, rx) = oneshot::channel::<HookCall>();
        *self.shard.health.hook.locked() = Some(tx);
        let t = Instant::now();
        let mut post = self.post(source, leader, candidate);
        let timeout = self.ctx.settings.switchover.timeout;
        let call = tokio::select! {
            call = rx => call.ok(),
            r = &mut post => {
                // Patroni answered before the hook came: a refusal, or a stop without it.
                self.shard.health.hook.locked().take();
                let e = match r {
                    Ok(Err(PatroniError::Refused { status, message })) => {
                        let e = format!("Patroni refused the switchover ({status}): {message}");
                        self.step("hook", t, Some(e.clone()));
                        return Err((Outcome::RolledBack, Some(format!("{e}; nothing was held"))));
                    }
                    Ok(Err(e)) => format!("POST /switchover: {e}"),
                    Err(e) => format!("POST /switchover: {e}"),
                    Ok(Ok(m)) => format!("Patroni switched over without calling the before_stop hook ({m})"),
                };
                return Err(self.unheld_stop(t, e));
            }
            _ = tokio::time::sleep(timeout) => None,
        };
        self.shard.health.hook.locked().take();
        let Some(call) = call else {
            return Err(self.unheld_stop(
                t,
                format!("Patroni did not call the before_stop hook within HANDOFF_SWITCHOVER_TIMEOUT ({timeout:?})"),
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
        // Not coordinated (see `Run::patroni`): these only record the steps.
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
    /// was cut. The failure detector takes it from here; the shard follows Patroni.
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
                "{e}: transactions running on the old leader may have been cut; shard \"{}\" follows Patroni's next leader",
                self.shard.name
            )),
        )
    }

    /// `POST /switchover` in its own task.
    fn post(&self, source: &Arc<Source>, leader: &Member, candidate: &Member) -> Post {
        let timeout = self.ctx.settings.switchover.timeout;
        let (source, api) = (Arc::clone(source), leader.api.clone());
        let (leader, candidate) = (leader.name.clone(), candidate.name.clone());
        tokio::spawn(async move {
            source
                .switchover(api.as_ref(), &leader, &candidate, timeout)
                .await
        })
    }

    /// Patroni's leader is the primary handoff serves, `to` is another member that
    /// streams from it, and Patroni is not paused.
    async fn patroni_precheck(
        &mut self,
        snap: &Snapshot,
        to: &HostPort,
        source: &Source,
    ) -> Result<(Member, Member), String> {
        if snap.state != StateKind::Serving {
            return Err(format!(
                "shard \"{}\" is {}, not serving",
                self.shard.name,
                snap.state.as_str()
            ));
        }
        let c = source
            .cluster()
            .await
            .map_err(|e| format!("Patroni did not answer GET /cluster: {e}"))?;
        if c.paused {
            return Err(format!(
                "Patroni cluster \"{}\" is paused (maintenance mode): it does not switch over",
                c.scope
            ));
        }
        let leader = c
            .leader()
            .ok_or_else(|| format!("Patroni cluster \"{}\" has no leader", c.scope))?;
        if leader.addr != snap.primary {
            return Err(format!(
                "Patroni's leader is {} ({}) but handoff serves {}: retry once they agree",
                leader.name, leader.addr, snap.primary
            ));
        }
        let candidate = c.at(to).ok_or_else(|| {
            format!(
                "{to} is not a member of Patroni cluster \"{}\" (members: {})",
                c.scope,
                crate::shard::patroni::names(&c)
            )
        })?;
        if candidate.is_leader() {
            return Err(format!("{} ({to}) is already the leader", candidate.name));
        }
        if !matches!(candidate.state.as_str(), "streaming" | "running") {
            return Err(format!(
                "{} ({to}) is {}, not streaming from the leader",
                candidate.name, candidate.state
            ));
        }
        // Patroni says it follows the leader: a replaced primary that rejoined.
        self.shard.watch.remove(
            &self.shard.name,
            to,
            "Patroni lists it as a replica, and it is the switchover's target",
        );
        Ok((leader.clone(), candidate.clone()))
    }

    /// Watches for the candidate to leave recovery, without waiting for Patroni's answer
    /// to `post` (which comes later). Patroni promotes only the member holding its
    /// leader lock, and this is the member handoff asked it to promote: once it is out of
    /// recovery it is Patroni's leader. handoff's own probe confirms it is writable on
    /// the highest timeline seen, asked every few milliseconds on one session kept on
    /// the candidate (a hot standby session sees the promotion). Patroni's REST API,
    /// busy promoting, is not in the way.
    async fn patroni_switch(&mut self, mut post: Post, candidate: &Member) -> Result<(), Ended> {
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
                        Ok(Err(PatroniError::Refused { status, message })) => {
                            return Err(Ended::Refused(format!(
                                "Patroni refused the switchover ({status}): {message}"
                            )));
                        }
                        Ok(Err(e)) => return Err(Ended::Refused(format!("POST /switchover: {e}"))),
                        Err(e) => return Err(Ended::Refused(format!("POST /switchover: {e}"))),
                    }
                }
                _ = tick.tick() => {}
            }
            if Instant::now() > deadline {
                return Err(Ended::Refused(format!(
                    "{} was not promoted and writable within HANDOFF_SWITCHOVER_TIMEOUT ({timeout:?}){}",
                    candidate.name,
                    answered.map(|m| format!("; Patroni said: {m}")).unwrap_or_default()
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
                // Patroni's answer is only logged: the candidate already serves.
                let shard = self.shard.name.clone();
                tokio::spawn(async move {
                    match post.await {
                        Ok(Ok(m)) => {
                            tracing::info!(%shard, answer = %m, "Patroni's switchover answer")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%shard, error = %e, "Patroni's switchover answer after the candidate became writable")
                        }
                        Err(_) => {}
                    }
                });
            }
            return Ok(());
        }
    }

    /// After Patroni refused or failed: if the old leader is still Patroni's leader and
    /// writable, it serves again at the same epoch (rolled back); otherwise the shard
    /// follows Patroni's next leader (failed, still held).
    async fn patroni_roll_back(
        &mut self,
        epoch: u64,
        cycle: u64,
        source: &Source,
        cause: String,
    ) -> (Outcome, Option<String>) {
        let t = Instant::now();
        let old = self.shard.current().primary.clone();
        let still = match source.cluster().await {
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
                    "{old} is no longer Patroni's writable leader: following Patroni's next leader"
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
                "{cause}; the old primary cannot serve again, so shard \"{}\" stays held until Patroni's next leader is writable",
                self.shard.name
            )),
        )
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
