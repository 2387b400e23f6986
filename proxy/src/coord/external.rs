//! The external two-step API for the whole cluster: `/buffer` holds the shard on every
//! proxy, `/primary` and `/resume` end the hold on every proxy, whichever proxy each
//! call reaches. The orchestrator owns the operation: it is never finished
//! automatically.

use std::sync::Arc;

use crate::api::report::Coordinated;
use crate::api::ShardChange;

use crate::config::HostPort;
use crate::coord::lead::{op_id, Lead};
use crate::coord::records::{now_ms, Op, OpKind, Phase, Primary, Record};
use crate::coord::{Coord, Joined, Refusal};
use crate::shard::health::{self, Probe};
use crate::shard::switchover::Outcome;
use crate::shard::{control, Shard, StateKind};
use crate::sync::Locked;

impl Coord {
    /// A hold (`POST /hold`, Patroni's `before_stop`) for the whole cluster: `/buffer`
    /// on every proxy, then this proxy ends it with `/primary` as soon as the next
    /// primary is found (the HA manager's leader on a managed shard), like discovery would.
    pub async fn hold(
        self: &Arc<Self>,
        shard: &Arc<Shard>,
        reason: &str,
    ) -> Result<ShardChange, Refusal> {
        let snap = shard.snapshot(self.ctx.buffer_idle(&shard.name));
        if !matches!(snap.state, StateKind::Serving | StateKind::Draining)
            || shard.op.try_lock().is_err()
        {
            crate::shard::hold::running_done(&self.ctx, shard).await;
            metrics::counter!(crate::metrics::HOLDS, "shard" => shard.name.clone(), "result" => "already_held").increment(1);
            return Ok(ShardChange {
                shard: shard.name.clone(),
                held: Some(false),
                already: true,
                state: Some(snap.state.as_str().to_string()),
                epoch: Some(snap.epoch),
                ..Default::default()
            });
        }
        let mut v = self.buffer(shard, Some(snap.epoch), reason).await?;
        metrics::counter!(crate::metrics::HOLDS, "shard" => shard.name.clone(), "result" => "held")
            .increment(1);
        v.held = Some(true);
        let now = shard.snapshot(self.ctx.buffer_idle(&shard.name));
        crate::shard::hold::mark(shard, now.cycle, snap.primary.clone());
        let (coord, shard) = (Arc::clone(self), Arc::clone(shard));
        tokio::spawn(async move { coord.resolve_hold(shard, now.cycle).await });
        Ok(v)
    }

    /// Ends a cluster-wide hold of `cycle` with the next primary found.
    async fn resolve_hold(self: Arc<Self>, shard: Arc<Shard>, cycle: u64) {
        let every = if let Some(m) = self.ctx.manager(&shard.name) {
            m.intervals().held
        } else {
            self.ctx.settings.health.discovery_interval
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let snap = shard.snapshot(self.ctx.buffer_idle(&shard.name));
            if snap.cycle != cycle
                || !matches!(snap.state, StateKind::Buffering | StateKind::Unavailable)
            {
                return;
            }
            let Some((addr, _)) = crate::shard::hold::next_primary(&self.ctx, &shard, cycle).await
            else {
                continue;
            };
            match self.primary(&shard, addr.clone(), Some(snap.epoch)).await {
                Ok(_) => {
                    tracing::info!(shard = %shard.name, primary = %addr, "the hold ended on every proxy with the next primary");
                    return;
                }
                Err(r) => {
                    tracing::warn!(shard = %shard.name, primary = %addr, error = %r.message, "could not end the hold yet")
                }
            }
        }
    }

    /// `POST /buffer` for the whole cluster: every proxy holds the shard and lameducks
    /// its old primary; answers once all have acknowledged (or the lameduck deadline
    /// passed). The hold ends with `/primary` or `/resume` on any proxy.
    pub async fn buffer(
        self: &Arc<Self>,
        shard: &Arc<Shard>,
        epoch: Option<u64>,
        reason: &str,
    ) -> Result<ShardChange, Refusal> {
        let lease = self.ready()?;
        let Ok(_op) = shard.op.try_lock() else {
            return Err(Refusal::conflict(
                "a switchover of this shard is in progress",
            ));
        };
        let id = op_id(&self.me.id);
        self.acquire(shard, lease, &id).await?;
        let snap = shard.snapshot(self.ctx.buffer_idle(&shard.name));
        if let Some(e) = epoch.filter(|e| *e != snap.epoch) {
            self.release(&shard.name, lease).await;
            return Err(Refusal::conflict(format!(
                "stale epoch {e} for shard \"{}\" (its epoch is {})",
                shard.name, snap.epoch
            )));
        }
        let op = Op::start(
            id.clone(),
            OpKind::External,
            &self.me.id,
            snap.epoch,
            snap.primary.clone(),
            None,
        );
        let mut lead = Lead::new(Arc::clone(self), &shard.name, op, lease);
        // This proxy takes part like the others: the operation's end resolves it here.
        // Joined before it is published, so that this proxy's own follower, seeing the
        // operation, does not hold the shard first (the revocation below would fail).
        self.joined.locked().insert(
            shard.name.clone(),
            Joined {
                op: id.clone(),
                old: None,
                target: None,
                resolved: false,
            },
        );
        if let Err(e) = lead.publish(Phase::Hold).await {
            self.joined.locked().remove(&shard.name);
            self.release(&shard.name, lease).await;
            return Err(Refusal::unavailable(e));
        }
        let revoked = match control::revoke(&self.ctx, shard, epoch, reason) {
            Ok(r) => r,
            Err(e) => {
                lead.op.error = Some(e.to_string());
                let _ = lead.publish(Phase::RolledBack).await;
                self.release(&shard.name, lease).await;
                return Err(Refusal::conflict(e.to_string()));
            }
        };
        let ld = control::lameduck(&revoked.gen, self.ctx.settings.drain_timeout).await;
        lead.own_lameduck = Some((ld.waited, ld.cancelled));
        let waited = lead.wait_for_acks().await;
        self.release(&shard.name, lease).await;
        Ok(ShardChange {
            coordination: Some(lead.report(Outcome::Completed)),
            warning: waited.err(),
            ..ld.buffering(&shard.name, &revoked.gen)
        })
    }

    /// `POST /primary` for the whole cluster: records `addr` (checked writable here) as
    /// the shard's primary at the next epoch; every proxy follows the record.
    pub async fn primary(
        self: &Arc<Self>,
        shard: &Arc<Shard>,
        addr: HostPort,
        epoch: Option<u64>,
    ) -> Result<ShardChange, Refusal> {
        let lease = self.ready()?;
        let Ok(_op) = shard.op.try_lock() else {
            return Err(Refusal::conflict(
                "a switchover of this shard is in progress",
            ));
        };
        self.take_lock(shard, lease, &op_id(&self.me.id)).await?;
        let result = self.record_primary(shard, lease, addr, epoch).await;
        self.release(&shard.name, lease).await;
        let rec = result?;
        let est = self
            .apply_primary(shard, &rec)
            .await
            .map_err(Refusal::conflict)?;
        Ok(ShardChange {
            shard: shard.name.clone(),
            state: Some("draining".into()),
            epoch: Some(est.epoch),
            primary: Some(rec.primary.to_string()),
            prewarmed_connections: Some(est.prewarmed),
            prewarm_error: est.prewarm_error,
            coordination: Some(Coordinated {
                recorded: Some(rec),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Under the lock: checks that the shard is held and `addr` is writable, then
    /// writes the record and ends the holding operation.
    async fn record_primary(
        &self,
        shard: &Shard,
        lease: i64,
        addr: HostPort,
        epoch: Option<u64>,
    ) -> Result<Primary, Refusal> {
        let unavailable = |e: super::StoreError| Refusal::unavailable(e.to_string());
        let op_key = self.keys.op(&shard.name);
        let op = self
            .store
            .get(&op_key)
            .await
            .map_err(unavailable)?
            .and_then(|kv| Op::decode(&kv.value).ok());
        if let Some(op) = op
            .as_ref()
            .filter(|o| o.phase.active() && o.kind != OpKind::External)
        {
            return Err(Refusal::conflict(format!(
                "shard \"{}\": coordinated switchover {} is in phase {}",
                shard.name,
                op.id,
                op.phase.as_str()
            )));
        }
        let holding = op.filter(|o| o.phase == Phase::Hold || o.phase == Phase::Failed);
        let snap = shard.snapshot(self.ctx.buffer_idle(&shard.name));
        if holding.is_none() && !matches!(snap.state, StateKind::Buffering | StateKind::Unavailable)
        {
            return Err(Refusal::conflict(format!(
                "shard \"{}\" is {}, not buffering: POST /v1/shards/{}/buffer first",
                shard.name,
                snap.state.as_str(),
                shard.name
            )));
        }
        let key = self.keys.primary(&shard.name);
        let current = self.store.get(&key).await.map_err(unavailable)?;
        let (base, rev) = match &current {
            Some(kv) => (
                Primary::decode(&kv.value)
                    .ok()
                    .map(|r| r.epoch)
                    .unwrap_or(snap.epoch),
                kv.mod_revision,
            ),
            None => (snap.epoch, 0),
        };
        if let Some(e) = epoch.filter(|e| *e != base) {
            return Err(Refusal::conflict(format!(
                "stale epoch {e} for shard \"{}\" (its epoch is {base})",
                shard.name
            )));
        }
        let timeline =
            match health::probe(&self.ctx.admin, &addr, self.ctx.settings.health.timeout).await {
                Probe::Primary { timeline } => timeline,
                other => {
                    return Err(Refusal::conflict(format!(
                        "{addr} is not a writable primary: {other:?}"
                    )))
                }
            };
        let rec = Primary {
            primary: addr.clone(),
            epoch: base + 1,
            timeline,
            by: self.me.id.clone(),
            reason: "POST /primary".into(),
            at_ms: now_ms(),
        };
        match self.store.swap(&key, rec.encode(), rev).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Refusal::conflict(format!(
                    "shard \"{}\": its record changed meanwhile; read GET /v1/shards and try again",
                    shard.name
                )))
            }
            Err(e) => return Err(unavailable(e)),
        }
        if let Some(mut op) = holding {
            op.phase = Phase::Done;
            op.to = Some(addr);
            op.updated_ms = now_ms();
            let lock_key = self.keys.lock(&shard.name);
            if let Err(e) = self
                .store
                .put_holding(&lock_key, lease, &op_key, op.encode())
                .await
            {
                self.failed(&e);
            }
        }
        Ok(rec)
    }

    /// `POST /resume` for the whole cluster: ends the holding operation; every proxy
    /// serves the old primary again.
    pub async fn resume(
        self: &Arc<Self>,
        shard: &Arc<Shard>,
        epoch: Option<u64>,
    ) -> Result<ShardChange, Refusal> {
        let lease = self.ready()?;
        let Ok(_op) = shard.op.try_lock() else {
            return Err(Refusal::conflict(
                "a switchover of this shard is in progress",
            ));
        };
        self.take_lock(shard, lease, &op_id(&self.me.id)).await?;
        let ended = self.end_hold(shard, lease, epoch).await;
        self.release(&shard.name, lease).await;
        let op = ended?;
        if let Some(j) = self.joined.locked().get_mut(&shard.name) {
            if j.op == op.id {
                j.resolved = true;
            }
        }
        let epoch = match control::abort(&self.ctx, shard, None) {
            Ok(e) => e,
            Err(_) => shard.current().epoch,
        };
        Ok(ShardChange {
            shard: shard.name.clone(),
            state: Some("draining".into()),
            epoch: Some(epoch),
            primary: Some(shard.current().primary.to_string()),
            coordination: Some(Coordinated {
                operation: Some(op),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn end_hold(&self, shard: &Shard, lease: i64, epoch: Option<u64>) -> Result<Op, Refusal> {
        let op_key = self.keys.op(&shard.name);
        let op = self
            .store
            .get(&op_key)
            .await
            .map_err(|e| Refusal::unavailable(e.to_string()))?
            .and_then(|kv| Op::decode(&kv.value).ok())
            .filter(|o| {
                (o.kind == OpKind::External && o.phase == Phase::Hold) || o.phase == Phase::Failed
            });
        let Some(mut op) = op else {
            return Err(Refusal::conflict(format!(
                "shard \"{}\": no operation holds it (POST /buffer starts one)",
                shard.name
            )));
        };
        if let Some(e) = epoch.filter(|e| *e != op.epoch) {
            return Err(Refusal::conflict(format!(
                "stale epoch {e} for shard \"{}\" (its epoch is {})",
                shard.name, op.epoch
            )));
        }
        op.phase = Phase::RolledBack;
        op.error = Some(format!("resumed by POST /resume on proxy {}", self.me.id));
        op.updated_ms = now_ms();
        match self
            .store
            .put_holding(&self.keys.lock(&shard.name), lease, &op_key, op.encode())
            .await
        {
            Ok(true) => Ok(op),
            Ok(false) => Err(Refusal::conflict("lost the shard's lock in etcd")),
            Err(e) => Err(Refusal::unavailable(e.to_string())),
        }
    }
}
