//! Applying revocation and establishment events: the shard state machine, the failover
//! buffer and the pools move together here, whatever the source of the event (handoff's
//! own switchover, the admin API, the failure detector).

use std::sync::Arc;
use std::time::Duration;

use handoff_buffer::{Admission, Release, StartOutcome, StopReason};
use tokio::time::Instant;

use crate::config::HostPort;
use crate::error::AttachError;
use crate::shard::{Ctx, Entered, EventError, Generation, Revoked, Shard, StateKind};

/// A request let through the gate: registered on the serving generation (lameduck waits
/// for it) and, when it was held in the buffer, holding the buffer's release (it counts
/// against the drain concurrency). Dropping it ends both.
#[derive(Debug)]
pub(crate) struct Admitted {
    entered: Entered,
    _release: Option<Release>,
}

impl Admitted {
    /// Keeps the registration, lets the buffer's release go (session mode: a session is
    /// not a held request once it runs).
    pub fn into_entered(self) -> Entered {
        self.entered
    }
}

/// The gate at the start of a transaction, for both pool modes: waits in the failover
/// buffer while the shard has no primary, then registers the transaction on the serving
/// generation, moving `gen` to it if the primary changed. While the shard serves this is
/// the buffer's atomic load plus the shard's, with no allocation; the waiting path is
/// boxed, so a session's relay future does not keep room for it.
pub(crate) async fn admit(
    ctx: &Ctx,
    shard: &Shard,
    gen: &mut Arc<Generation>,
    bytes: usize,
) -> Result<Admitted, AttachError> {
    if let Some(admitted) = try_admit(ctx, shard, gen) {
        return Ok(admitted);
    }
    Box::pin(admit_waiting(ctx, shard, gen, bytes)).await
}

/// [`admit`] when it needs no waiting: the shard is not holding and `gen` still serves.
pub(crate) fn try_admit(ctx: &Ctx, shard: &Shard, gen: &Arc<Generation>) -> Option<Admitted> {
    if !ctx.buffer.passes(&shard.name) {
        return None;
    }
    shard.enter(gen).map(|entered| Admitted {
        entered,
        _release: None,
    })
}

/// [`admit`] when the shard is holding, or its generation moved on.
async fn admit_waiting(
    ctx: &Ctx,
    shard: &Shard,
    gen: &mut Arc<Generation>,
    bytes: usize,
) -> Result<Admitted, AttachError> {
    // A released request re-buffered by a back-to-back revocation goes round again; the
    // bound only guards against a bug turning this into a spin.
    for _ in 0..1000 {
        let admission = ctx.buffer.wait(&shard.name, bytes).await?;
        if let Some(entered) = shard.enter(gen) {
            return Ok(Admitted {
                entered,
                _release: match admission {
                    Admission::Released(r) => Some(r),
                    Admission::Passed => None,
                },
            });
        }
        match shard.serving() {
            Some(g) => *gen = g,
            // Passed the buffer just before it started holding: go round again.
            None if matches!(admission, Admission::Released(_))
                || !ctx.buffer_idle(&shard.name) => {}
            None => return Err(AttachError::NoPrimary),
        }
    }
    Err(AttachError::NoPrimary)
}

/// Revocation: new transactions of `shard` are held, idle connections to its primary
/// closed.
pub(crate) fn revoke(
    ctx: &Ctx,
    shard: &Shard,
    epoch: Option<u64>,
    reason: &str,
) -> Result<Revoked, EventError> {
    let r = shard.revoke(epoch, reason, |r| {
        match ctx.buffer.start(&shard.name, r.cycle, reason) {
            StartOutcome::Started | StartOutcome::AlreadyBuffering => {}
            other => {
                tracing::warn!(shard = %shard.name, outcome = ?other, "the buffer did not start: new transactions get an error until a primary is established")
            }
        }
    })?;
    ctx.pools.retire(&r.gen.primary);
    Ok(r)
}

/// What lameduck did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lameduck {
    pub waited: Duration,
    /// Transactions still running at the drain timeout, then cancelled.
    pub cancelled: usize,
}

impl Lameduck {
    /// The answer for a shard now buffering after `gen` was revoked and this lameduck
    /// ran (the admin API's buffer, a hold, a coordinated buffer).
    pub(crate) fn buffering(&self, shard: &str, gen: &Generation) -> crate::api::ShardChange {
        crate::api::ShardChange {
            shard: shard.to_string(),
            state: Some("buffering".into()),
            epoch: Some(gen.epoch),
            old_primary: Some(gen.primary.to_string()),
            lameduck_ms: Some(self.waited.as_millis() as u64),
            lameduck_cancelled: Some(self.cancelled),
            ..Default::default()
        }
    }
}

/// How long cancelled sessions get to let go of a revoked generation.
const LET_GO: Duration = Duration::from_secs(2);

/// Waits for the transactions running on `gen` to end, up to `timeout`; then cancels
/// the rest and waits (briefly) for their sessions to let go.
pub(crate) async fn lameduck(gen: &Generation, timeout: Duration) -> Lameduck {
    let started = Instant::now();
    if gen.wait_idle(timeout).await {
        return Lameduck {
            waited: started.elapsed(),
            cancelled: 0,
        };
    }
    let cancelled = gen.inflight();
    gen.kill();
    if !gen.wait_idle(LET_GO).await {
        tracing::warn!(
            remaining = gen.inflight(),
            "sessions did not let go of the revoked primary after cancellation"
        );
    }
    Lameduck {
        waited: started.elapsed(),
        cancelled,
    }
}

/// What an establishment did.
#[derive(Debug)]
pub(crate) struct Established {
    pub epoch: u64,
    pub prewarmed: usize,
    /// Why a pre-warmed connection could not be opened (the flush goes on).
    pub prewarm_error: Option<String>,
}

/// Establishment: `primary` serves `shard` from the next epoch. Its pools are opened
/// first, then held transactions are released to it in FIFO order. The replaced
/// primary, if another host, is then watched for split brain ([`crate::shard::watchdog`]).
pub(crate) async fn establish(
    ctx: &Ctx,
    shard: &Shard,
    epoch: Option<u64>,
    primary: HostPort,
) -> Result<Established, EventError> {
    establish_at(ctx, shard, epoch, primary, None).await
}

/// [`establish`], at epoch `at` instead of the next one when given (a proxy following
/// the epoch its coordination recorded).
pub(crate) async fn establish_at(
    ctx: &Ctx,
    shard: &Shard,
    epoch: Option<u64>,
    primary: HostPort,
    at: Option<u64>,
) -> Result<Established, EventError> {
    let snap = shard.snapshot(ctx.buffer_idle(&shard.name));
    if !matches!(snap.state, StateKind::Buffering | StateKind::Unavailable) {
        return Err(EventError::WrongState {
            shard: shard.name.clone(),
            state: snap.state.as_str(),
            expected: "buffering",
        });
    }
    if let Some(e) = epoch.filter(|e| *e != snap.epoch) {
        return Err(EventError::StaleEpoch {
            shard: shard.name.clone(),
            given: e,
            current: snap.epoch,
        });
    }
    let old = shard.current();
    ctx.pools.activate(&primary);
    let (prewarmed, err) = ctx
        .pools
        .prewarm(&snap.primary, &primary, ctx.settings.prewarm, &shard.name)
        .await;
    let (gen, cycle) = match at {
        Some(at) => shard.establish_at(epoch, primary, at)?,
        None => shard.establish(epoch, primary)?,
    };
    ctx.buffer.stop(&shard.name, cycle, StopReason::NewPrimary);
    // Another host: what still waits on the lost one ends now. The same host back
    // (restarted in place, or reachable again after this proxy was cut off): what
    // runs there may still finish, within lameduck.
    if old.primary != gen.primary && old.supersede() {
        tracing::warn!(
            shard = %shard.name,
            cancelled = old.inflight(),
            "transactions still waiting on the lost primary cancelled: another primary is established"
        );
    }
    if old.primary != gen.primary {
        let why = if old.lost().is_some() {
            crate::shard::watch::Why::Failed
        } else {
            crate::shard::watch::Why::Replaced
        };
        shard
            .watch
            .add(&shard.name, old.primary.clone(), why, old.epoch, None);
    }
    Ok(Established {
        epoch: gen.epoch,
        prewarmed,
        prewarm_error: err.map(|e| e.to_string()),
    })
}

/// Abort: the revoked primary serves again and held transactions go to it.
pub(crate) fn abort(ctx: &Ctx, shard: &Shard, epoch: Option<u64>) -> Result<u64, EventError> {
    let (gen, cycle) = shard.abort(epoch)?;
    ctx.pools.activate(&gen.primary);
    ctx.buffer.stop(&shard.name, cycle, StopReason::Aborted);
    Ok(gen.epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    use crate::testing::hp;

    fn ctx() -> Ctx {
        let config =
            Config::from_vars([("HANDOFF_SHARDS", "main=127.0.0.1:1,127.0.0.1:2")]).expect("valid");
        Ctx::new(&config, Default::default()).expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn lameduck_waits_for_the_last_transaction_and_no_longer() {
        let shard = Shard::new("main", vec![hp(1), hp(2)]);
        let gen = shard.current();
        let running = shard.enter(&gen).expect("serving");
        shard.revoke(None, "test", |_| {}).unwrap();
        let ends = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(running);
        });
        let ld = lameduck(&gen, Duration::from_secs(5)).await;
        ends.await.unwrap();
        assert_eq!(ld.cancelled, 0);
        assert!(ld.waited >= Duration::from_secs(1) && ld.waited < Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn lameduck_cancels_what_outlives_the_drain_timeout() {
        let shard = Shard::new("main", vec![hp(1), hp(2)]);
        let gen = shard.current();
        let running = shard.enter(&gen).expect("serving");
        shard.revoke(None, "test", |_| {}).unwrap();
        // The session lets go once it is told to cancel.
        let killed = gen.killed();
        let session = tokio::spawn(async move {
            killed.await;
            drop(running);
        });
        let ld = lameduck(&gen, Duration::from_secs(5)).await;
        session.await.unwrap();
        assert_eq!(ld.cancelled, 1);
        assert!(ld.waited >= Duration::from_secs(5) && ld.waited < Duration::from_secs(6));
        assert_eq!(gen.inflight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_primary_s_transactions_end_when_another_is_established() {
        let ctx = ctx();
        let shard = Shard::new("main", vec![hp(1), hp(2)]);
        let mut gen = shard.current();
        // One transaction waits on a primary that stopped answering.
        let stuck = admit(&ctx, &shard, &mut gen, 10).await.unwrap();
        let revoked = revoke(&ctx, &shard, Some(1), "test").unwrap();
        revoked.gen.mark_lost("unreachable");
        let killed = revoked.gen.killed();
        let session = tokio::spawn(async move {
            killed.await;
            drop(stuck);
        });
        let started = Instant::now();
        let drain = tokio::spawn({
            let gen = Arc::clone(&revoked.gen);
            async move { lameduck(&gen, Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        establish(&ctx, &shard, Some(1), hp(2)).await.unwrap();
        session.await.unwrap();
        assert!(revoked.gen.superseded());
        assert_eq!(revoked.gen.inflight(), 0);
        // Not after HANDOFF_DRAIN_TIMEOUT: at the establishment.
        drain.await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_primary_found_again_keeps_what_runs_on_it() {
        let ctx = ctx();
        let shard = Shard::new("main", vec![hp(1), hp(2)]);
        let mut gen = shard.current();
        let running = admit(&ctx, &shard, &mut gen, 10).await.unwrap();
        let revoked = revoke(&ctx, &shard, Some(1), "test").unwrap();
        revoked.gen.mark_lost("unreachable for a while");
        // The same host comes back (this proxy was the one cut off).
        establish(&ctx, &shard, Some(1), hp(1)).await.unwrap();
        assert!(!revoked.gen.superseded());
        assert_eq!(revoked.gen.inflight(), 1, "it may still finish there");
        drop(running);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_live_primary_keeps_its_lameduck() {
        let ctx = ctx();
        let shard = Shard::new("main", vec![hp(1), hp(2)]);
        let mut gen = shard.current();
        let running = admit(&ctx, &shard, &mut gen, 10).await.unwrap();
        let revoked = revoke(&ctx, &shard, Some(1), "switchover").unwrap();
        establish(&ctx, &shard, Some(1), hp(2)).await.unwrap();
        assert!(!revoked.gen.superseded());
        assert_eq!(
            revoked.gen.inflight(),
            1,
            "still running on the old primary"
        );
        drop(running);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_held_at_the_gate_runs_on_the_next_primary() {
        let ctx = ctx();
        let shard = Shard::new("main", vec![hp(1), hp(2)]);
        // Serving: the gate lets a request through at once.
        let mut gen = shard.current();
        let a = admit(&ctx, &shard, &mut gen, 10).await.unwrap();
        assert_eq!(gen.inflight(), 1);
        drop(a);
        assert_eq!(gen.inflight(), 0);
        // Revoked: the next one waits in the buffer until a primary is established.
        let revoked = revoke(&ctx, &shard, Some(1), "test").unwrap();
        let held = {
            let shard = &shard;
            let ctx = &ctx;
            let mut gen = Arc::clone(&revoked.gen);
            async move {
                let a = admit(ctx, shard, &mut gen, 10).await;
                (a, gen)
            }
        };
        let establish_later = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            establish(&ctx, &shard, Some(1), hp(2)).await.unwrap()
        };
        let ((admitted, gen2), est) = tokio::join!(held, establish_later);
        assert_eq!(est.epoch, 2);
        let admitted = admitted.expect("released to the new primary");
        assert_eq!((gen2.epoch, gen2.primary.port), (2, 2));
        assert_eq!(gen2.inflight(), 1, "registered on the new generation");
        drop(admitted);
        assert_eq!(gen2.inflight(), 0);
        // The replaced primary is now watched for split brain.
        assert!(shard.watch.is_watched(&hp(1)));
    }
}
