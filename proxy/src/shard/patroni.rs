//! Shards managed by Patroni (`HANDOFF_PATRONI`, docs/patroni.md). Patroni owns
//! promotion: handoff never promotes or fences such a shard's servers. It takes the
//! leader from Patroni's `GET /cluster`, confirms it with its own probe (`/primary`
//! answers before the server takes writes), and asks Patroni for switchovers.
//!
//! - **Following.** [`follow`] reads `GET /cluster` every `HANDOFF_PATRONI_INTERVAL`
//!   while the shard serves; when Patroni names another leader than the one handoff
//!   serves, it wakes the failure detector, which probes the primary at once.
//! - **Discovery.** After a revocation (a failure, a hold, a switchover handed over)
//!   [`discover`] reads `GET /cluster` every `HANDOFF_PATRONI_HELD_INTERVAL` and
//!   establishes Patroni's leader as soon as handoff's probe finds it writable on the
//!   highest timeline seen. Only Patroni's leader qualifies, never another writable host.
//! - **Switchover.** [`Run::patroni`]: hold and lameduck (on every proxy, with
//!   coordination), `POST /switchover` to the leader, establish the candidate the moment
//!   it is Patroni's leader and writable. A refusal rolls back.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::HostPort;
use crate::patroni::{Cluster, Member, PatroniError, Source};
use crate::shard::health::{self, Cycle, Probe};
use crate::shard::switchover::{Hooks, Outcome, Run};
use crate::shard::{control, Ctx, Shard, Snapshot, StateKind};
use crate::shutdown::{Phase, Signal};

/// Reads Patroni's view of the shard in the background while it serves, and wakes the
/// failure detector when Patroni's leader is not the primary handoff serves.
pub(crate) async fn follow(
    ctx: Arc<Ctx>,
    shard: Arc<Shard>,
    source: Arc<Source>,
    shutdown: Signal,
) {
    let interval = ctx.settings.patroni.interval;
    let mut warned = false;
    loop {
        if shutdown.phase() >= Phase::Draining {
            return;
        }
        match source.cluster().await {
            Ok(c) => {
                warned = false;
                let serving = shard.serving();
                if let (Some(gen), Some(leader)) = (serving, c.leader()) {
                    if leader.addr != gen.primary {
                        tracing::info!(shard = %shard.name, leader = %leader.name, addr = %leader.addr, primary = %gen.primary, "Patroni names another leader: checking the primary");
                        shard.health.wake.notify_one();
                    }
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(shard = %shard.name, error = %e, "Patroni's REST API did not answer GET /cluster");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = health::reach(shutdown.clone()) => return,
        }
    }
}

/// Patroni's leader, if handoff may serve it now for `cycle`: it holds the leader lock,
/// is not watched for split brain nor held back by a young hold, and handoff's probe
/// finds it writable on the highest timeline seen.
pub(crate) async fn leader(
    ctx: &Ctx,
    shard: &Shard,
    source: &Source,
    cycle: u64,
) -> Option<(HostPort, u32)> {
    let c = source.cluster().await.ok()?;
    let leader = c.leader()?;
    let addr = leader.addr.clone();
    if shard.watch.is_watched(&addr)
        || shard
            .health
            .held_back(cycle, &addr, ctx.settings.hold_timeout)
    {
        return None;
    }
    let probe = health::probe(&ctx.admin, &addr, ctx.settings.health.timeout).await;
    metrics::counter!(crate::metrics::DISCOVERY_PROBES, "shard" => shard.name.clone(), "result" => probe.label())
        .increment(1);
    match probe {
        Probe::Primary { timeline } => {
            shard.health.saw_timeline(timeline);
            let min = shard
                .health
                .max_timeline
                .load(std::sync::atomic::Ordering::SeqCst);
            (timeline >= min).then_some((addr, timeline))
        }
        _ => None,
    }
}

/// Discovery for a Patroni shard: Patroni's leader, once writable. Returns when it is
/// established, when another event resolved the revocation, or at shutdown.
pub(crate) async fn discover(
    ctx: &Arc<Ctx>,
    shard: &Arc<Shard>,
    source: &Arc<Source>,
    cycle: Cycle,
    shutdown: &Signal,
) {
    tracing::info!(shard = %shard.name, epoch = cycle.epoch, "following Patroni for the new leader");
    let mut tick = tokio::time::interval(ctx.settings.patroni.held_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = health::reach(shutdown.clone()) => return,
        }
        if !cycle.open(ctx, shard) {
            return;
        }
        if let Some((primary, timeline)) = leader(ctx, shard, source, cycle.id).await {
            health::found(ctx, shard, cycle, primary, timeline).await;
            return;
        }
    }
}

/// Startup: Patroni's leader if handoff's probe confirms it. `Ok(None)`: Patroni
/// answered but its leader is not writable (yet); `Err`: Patroni did not answer.
pub(crate) async fn initial(
    source: &Source,
    admin: &crate::backend::admin::AdminDb,
    timeout: Duration,
) -> Result<(Arc<Cluster>, Option<(HostPort, u32)>), PatroniError> {
    let c = source.cluster().await?;
    let Some(leader) = c.leader() else {
        return Ok((c, None));
    };
    let found = match health::probe(admin, &leader.addr, timeout).await {
        Probe::Primary { timeline } => Some((leader.addr.clone(), timeline)),
        _ => None,
    };
    Ok((c, found))
}

/// A switchover target given as a Patroni member's name or `host:port`: its address,
/// or an HTTP status and message (400: not a member; 503: Patroni did not answer).
pub(crate) async fn resolve(source: &Source, to: &str) -> Result<HostPort, (u16, String)> {
    let c = source
        .cluster()
        .await
        .map_err(|e| (503, format!("Patroni did not answer GET /cluster: {e}")))?;
    c.member(to).map(|m| m.addr.clone()).ok_or_else(|| {
        (
            400,
            format!(
                "\"to\": \"{to}\" is not a member of Patroni cluster \"{}\" (members: {})",
                c.scope,
                names(&c)
            ),
        )
    })
}

fn names(c: &Cluster) -> String {
    c.members
        .iter()
        .map(|m| format!("{} ({}, {})", m.name, m.addr, m.role))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a Patroni switchover stopped before the candidate served.
enum Ended {
    /// Patroni refused or failed, or never produced a writable leader in time.
    Refused(String),
}

impl Run<'_> {
    /// A switchover of a Patroni shard to `to`: precheck against Patroni's view, hold
    /// and lameduck, `POST /switchover`, establish the candidate once it is Patroni's
    /// leader and writable.
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
        let revoked = match control::revoke(self.ctx, self.shard, Some(snap.epoch), "switchover") {
            Ok(r) => {
                self.step("buffer", t, None);
                r
            }
            Err(e) => {
                self.step("buffer", t, Some(e.to_string()));
                return (Outcome::Refused, Some(e.to_string()));
            }
        };
        if let Err(e) = hooks.holding().await {
            return self
                .patroni_roll_back(snap.epoch, revoked.cycle, source, e)
                .await;
        }
        let t = Instant::now();
        let ld = control::lameduck(&revoked.gen, self.ctx.settings.drain_timeout).await;
        self.report.lameduck_cancelled = ld.cancelled;
        self.step("lameduck", t, None);
        if let Err(e) = hooks.held(ld).await {
            return self
                .patroni_roll_back(snap.epoch, revoked.cycle, source, e)
                .await;
        }
        // Patroni demotes the old leader (it stops accepting writes) before the
        // candidate promotes: its revocation comes before establishment.
        let t = Instant::now();
        match self.patroni_switch(source, &leader, &candidate).await {
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
                names(&c)
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

    /// Asks Patroni to switch over and watches for the candidate to become its leader
    /// and writable, without waiting for Patroni's answer (which comes later).
    async fn patroni_switch(
        &mut self,
        source: &Arc<Source>,
        leader: &Member,
        candidate: &Member,
    ) -> Result<(), Ended> {
        let timeout = self.ctx.settings.switchover.timeout;
        let deadline = Instant::now() + timeout;
        let post = {
            let (source, api) = (Arc::clone(source), leader.api.clone());
            let (leader, candidate) = (leader.name.clone(), candidate.name.clone());
            tokio::spawn(async move {
                source
                    .switchover(api.as_ref(), &leader, &candidate, timeout)
                    .await
            })
        };
        let mut post = post;
        let mut answered: Option<String> = None;
        let mut tick = tokio::time::interval(self.ctx.settings.patroni.held_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    "{} was not Patroni's writable leader within HANDOFF_SWITCHOVER_TIMEOUT ({timeout:?}){}",
                    candidate.name,
                    answered.map(|m| format!("; Patroni said: {m}")).unwrap_or_default()
                )));
            }
            let Ok(c) = source.cluster().await else {
                continue;
            };
            if c.leader().map(|l| &l.name) != Some(&candidate.name) {
                continue;
            }
            let probe = health::probe(
                &self.ctx.admin,
                &candidate.addr,
                self.ctx.settings.health.timeout,
            )
            .await;
            if let Probe::Primary { timeline } = probe {
                self.shard.health.saw_timeline(timeline);
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
