//! A hold asked for from outside (`POST /v1/shards/{s}/hold`, `handoff hold`): an HA
//! manager about to stop a shard's primary — Patroni's `before_stop` hook, or handoff
//! itself when pg_auto_failover's monitor tells the primary to stop — tells handoff
//! first. New transactions are held, those running finish (lameduck, up to
//! `HANDOFF_DRAIN_TIMEOUT`), and discovery (the manager's leader on a managed shard)
//! ends the hold with the next writable primary. For `HANDOFF_HOLD_TIMEOUT` only
//! another primary may end it; after that the old one is taken back if it is writable
//! again (and, on a managed shard, still the manager's leader): the stop may have been
//! called off.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use crate::api::ShardChange;
use tokio::time::Instant;

use crate::config::HostPort;
use crate::shard::failure::Hold;
use crate::shard::health::{self, Probe};
use crate::shard::{control, Ctx, Revoked, Shard, StateKind};
use crate::sync::Locked;

/// What a hold request did.
#[derive(Debug)]
pub(crate) enum Held {
    /// This request revoked the primary; lameduck is done (or timed out).
    Now {
        revoked: Revoked,
        lameduck: control::Lameduck,
    },
    /// The shard was already held (a switchover, another hold, a failure).
    Already { state: &'static str, epoch: u64 },
    /// A switchover through handoff waited for this hold and did it; its answer.
    ForSwitchover(Box<ShardChange>),
}

impl Held {
    /// The answer to the hold's caller (and the metric of its result).
    pub(crate) fn answer(self, shard: &str) -> ShardChange {
        let result = match self {
            Held::Now { .. } | Held::ForSwitchover(_) => "held",
            Held::Already { .. } => "already_held",
        };
        metrics::counter!(crate::metrics::HOLDS, "shard" => shard.to_string(), "result" => result)
            .increment(1);
        match self {
            Held::Now { revoked, lameduck } => ShardChange {
                shard: shard.to_string(),
                held: Some(true),
                state: Some("buffering".into()),
                epoch: Some(revoked.gen.epoch),
                old_primary: Some(revoked.gen.primary.to_string()),
                lameduck_ms: Some(lameduck.waited.as_millis() as u64),
                lameduck_cancelled: Some(lameduck.cancelled),
                ..Default::default()
            },
            Held::ForSwitchover(v) => *v,
            Held::Already { state, epoch } => ShardChange {
                shard: shard.to_string(),
                held: Some(false),
                already: true,
                state: Some(state.to_string()),
                epoch: Some(epoch),
                ..Default::default()
            },
        }
    }
}

/// Holds `shard` and hands the hold to discovery (on this proxy alone).
pub(crate) async fn hold(
    ctx: &Ctx,
    shard: &Shard,
    reason: &str,
) -> Result<Held, crate::shard::EventError> {
    let snap = shard.snapshot(ctx.buffer_idle(&shard.name));
    // A switchover through handoff waits for this very call (the manager's hold hook): it
    // holds, and answers once the old primary's transactions are done.
    let waiting = shard.health.hook.locked().take();
    if let Some(switchover) = waiting {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if switchover.send(tx).is_ok() {
            if let Ok(v) = rx.await {
                return Ok(Held::ForSwitchover(Box::new(v)));
            }
        }
    }
    // Held already, or a switchover (which holds it) is under way: nothing to add but
    // the wait for what still runs on the revoked primary.
    let Ok(_op) = shard.op.try_lock() else {
        running_done(ctx, shard).await;
        return Ok(Held::Already {
            state: "switchover",
            epoch: snap.epoch,
        });
    };
    if snap.state != StateKind::Serving && snap.state != StateKind::Draining {
        drop(_op);
        running_done(ctx, shard).await;
        return Ok(Held::Already {
            state: snap.state.as_str(),
            epoch: snap.epoch,
        });
    }
    let revoked = control::revoke(ctx, shard, Some(snap.epoch), reason)?;
    mark(shard, revoked.cycle, revoked.gen.primary.clone());
    shard.health.discover_cycle.store(revoked.cycle, SeqCst);
    shard.health.wake.notify_one();
    let lameduck = control::lameduck(&revoked.gen, ctx.settings.drain_timeout).await;
    Ok(Held::Now { revoked, lameduck })
}

/// A hold that finds the shard held already (by another hold, a switchover, a
/// failure) answers only once no transaction runs on the revoked primary: its caller
/// stops that server next. The hold that revoked it cancels what outlives
/// `HANDOFF_DRAIN_TIMEOUT`; this one only waits, a little longer. A shard still serving
/// (a switchover that has not held yet) is not waited for.
pub(crate) async fn running_done(ctx: &Ctx, shard: &Shard) {
    if shard.serving().is_some() {
        return;
    }
    let gen = shard.current();
    let _ = gen
        .wait_idle(ctx.settings.drain_timeout + std::time::Duration::from_secs(1))
        .await;
}

/// Records the hold, so discovery passes over the old primary for a while.
pub(crate) fn mark(shard: &Shard, cycle: u64, old: HostPort) {
    *shard.health.hold.locked() = Some(Hold {
        cycle,
        old,
        at: Instant::now(),
    });
}

/// One look for the primary that may end `cycle`'s hold: the manager's leader on a
/// managed shard, else the writable configured host on the highest timeline (the held-back old
/// primary and watched hosts excluded).
pub(crate) async fn next_primary(
    ctx: &Arc<Ctx>,
    shard: &Arc<Shard>,
    cycle: u64,
) -> Option<(HostPort, u32)> {
    if let Some(manager) = ctx.manager(&shard.name) {
        return crate::shard::managed::leader(ctx, shard, manager.as_ref(), cycle).await;
    }
    let hosts = &shard.hosts;
    let mut probes = tokio::task::JoinSet::new();
    for (i, h) in hosts.iter().enumerate() {
        let (admin, h, timeout) = (ctx.admin.clone(), h.clone(), ctx.settings.health.timeout);
        probes.spawn(async move { (i, health::probe(&admin, &h, timeout).await) });
    }
    let mut results = vec![Probe::Unreachable("not probed".into()); hosts.len()];
    for (i, p) in probes.join_all().await {
        if let Probe::Primary { timeline } = p {
            shard.health.saw_timeline(timeline);
        }
        results[i] = p;
    }
    let eligible: Vec<bool> = hosts
        .iter()
        .map(|h| {
            !shard.watch.is_watched(h)
                && !shard.health.held_back(cycle, h, ctx.settings.hold_timeout)
        })
        .collect();
    let min = shard.health.max_timeline.load(SeqCst);
    health::choose(hosts, &results, min, &eligible)
}
