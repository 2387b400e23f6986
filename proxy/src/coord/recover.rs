//! Finishing an operation whose coordinator is gone. The coordinator holds the shard's
//! lock under its membership lease; when the lease expires (the coordinator died, or
//! etcd has not heard from it for `HANDOFF_ETCD_LEASE_TTL`) the lock disappears, and
//! the first proxy to take it over finishes the operation from its last published
//! phase:
//!
//! - `hold`: nothing was done to any server — roll back (every proxy serves the old
//!   primary again);
//! - `fencing`: the fence may be partly on — lift it (open the published databases
//!   again, through the admin session this proxy kept on the old primary, since a
//!   fenced server takes no new login) and roll back;
//! - `promoting`: the fence is on and the target has replayed up to it — roll forward:
//!   promote the target (unless it already is), open its databases, record it as the
//!   primary at the next epoch.
//!
//! Whatever cannot be done ends the operation as `failed`: every proxy keeps holding
//! until an operator calls `/primary` or `/resume`, bounded by the failover buffer's
//! maximum duration.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::admin::AdminSession;
use crate::config::HostPort;
use crate::coord::records::{now_ms, Lock, Op, Phase, Primary, Record};
use crate::coord::Coord;
use crate::shard::health::{self, Probe};
use crate::shard::{fence, switchover, Shard};
use crate::sync::Locked;

impl Coord {
    /// Takes over `op` if no one holds the shard's lock, and finishes it in a task.
    pub(super) async fn try_recover(self: &Arc<Self>, shard: &Arc<Shard>, op: &Op) {
        let lease = self.lease();
        if lease == 0 {
            return;
        }
        let holder = Lock {
            proxy: self.me.id.clone(),
            op: op.id.clone(),
            recovering: true,
        }
        .encode();
        match self
            .store
            .create(&self.keys.lock(&shard.name), holder, Some(lease))
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.failed(&e);
                return;
            }
        }
        self.running.locked().insert(op.id.clone());
        tracing::warn!(shard = %shard.name, op = %op.id, coordinator = %op.coordinator, phase = op.phase.as_str(), "the coordinator of an operation is gone (its lease expired): this proxy finishes it");
        let (coord, shard, op) = (Arc::clone(self), Arc::clone(shard), op.clone());
        tokio::spawn(async move {
            coord.recover(&shard, op, lease).await;
        });
    }

    async fn recover(&self, shard: &Arc<Shard>, mut op: Op, lease: i64) {
        let (old, target) = {
            let mut joined = self.joined.locked();
            match joined.get_mut(&shard.name) {
                Some(j) if j.op == op.id => (j.old.take(), j.target.take()),
                _ => (None, None),
            }
        };
        let result = match op.phase {
            Phase::Hold => Ok(Phase::RolledBack),
            Phase::Fencing => self.lift(&op, old).await.map(|()| Phase::RolledBack),
            Phase::Promoting => self
                .roll_forward(shard, &op, target)
                .await
                .map(|()| Phase::Done),
            ended => Ok(ended),
        };
        let (phase, label, note) = match result {
            Ok(Phase::Done) => (
                Phase::Done,
                "rolled_forward",
                format!(
                    "finished by proxy {} after coordinator {} was lost",
                    self.me.id, op.coordinator
                ),
            ),
            Ok(p) => (
                p,
                "rolled_back",
                format!(
                    "rolled back by proxy {} after coordinator {} was lost in phase {}",
                    self.me.id,
                    op.coordinator,
                    op.phase.as_str()
                ),
            ),
            Err(e) => (
                Phase::Failed,
                "failed",
                format!(
                    "proxy {} could not finish it after coordinator {} was lost in phase {}: {e}",
                    self.me.id,
                    op.coordinator,
                    op.phase.as_str()
                ),
            ),
        };
        metrics::counter!(crate::metrics::COORD_RECOVERIES, "shard" => shard.name.clone(), "result" => label).increment(1);
        if phase == Phase::Failed {
            tracing::error!(shard = %shard.name, op = %op.id, "{note}");
        } else {
            tracing::warn!(shard = %shard.name, op = %op.id, "{note}");
        }
        op.phase = phase;
        op.error = Some(note);
        op.updated_ms = now_ms();
        let lock_key = self.keys.lock(&shard.name);
        for _ in 0..50 {
            match self
                .store
                .put_holding(&lock_key, lease, &self.keys.op(&shard.name), op.encode())
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    self.failed(&e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        self.release(&shard.name, lease).await;
        self.running.locked().remove(&op.id);
    }

    /// Opens the databases the fence was closing, through the kept session (or a new
    /// one, if the fence had not reached the admin database), and checks that a new
    /// login gets in.
    async fn lift(&self, op: &Op, kept: Option<AdminSession>) -> Result<(), String> {
        let admin = &self.ctx.admin;
        let timeout = self.ctx.settings.switchover.timeout;
        let session = match kept.filter(|s| !s.is_closed()) {
            Some(s) => s,
            None => admin
                .open(&op.from, admin.database(), "handoff-coordination", timeout)
                .await
                .map_err(|e| format!("no admin session on {} to lift the fence: {e}", op.from))?,
        };
        fence::restore(&session.client, &op.from, &op.databases)
            .await
            .map_err(|e| e.to_string())?;
        match health::probe(admin, &op.from, timeout).await {
            Probe::Primary { .. } => Ok(()),
            other => Err(format!("{} after lifting the fence: {other:?}", op.from)),
        }
    }

    /// Promotes the target (the fence is on and it has replayed up to it) and records
    /// it as the shard's primary.
    async fn roll_forward(
        &self,
        shard: &Shard,
        op: &Op,
        kept: Option<AdminSession>,
    ) -> Result<(), String> {
        let to: &HostPort = op.to.as_ref().ok_or("the operation names no target")?;
        let lsn = op
            .fence_lsn
            .as_deref()
            .ok_or("the operation has no fence LSN")?;
        let admin = &self.ctx.admin;
        let timeout = self.ctx.settings.switchover.timeout;
        let session = match kept.filter(|s| !s.is_closed()) {
            Some(s) => s,
            None => admin
                .open(to, admin.database(), "handoff-coordination", timeout)
                .await
                .map_err(|e| format!("no admin session on the target {to}: {e}"))?,
        };
        switchover::catch_up(&session.client, to, lsn, timeout)
            .await
            .map_err(|e| e.to_string())?;
        switchover::promote(admin, &session.client, to, timeout, &op.databases)
            .await
            .map_err(|e| match e {
                switchover::Promotion::NotPromoted(e) | switchover::Promotion::Unconfirmed(e) => {
                    e.to_string()
                }
            })?;
        let timeline = match health::probe(admin, to, timeout).await {
            Probe::Primary { timeline } => timeline,
            other => return Err(format!("{to} after promotion: {other:?}")),
        };
        let rec = Primary {
            primary: to.clone(),
            epoch: op.epoch + 1,
            timeline,
            by: self.me.id.clone(),
            reason: format!("switchover {} finished by {}", op.id, self.me.id),
            at_ms: now_ms(),
        };
        self.record_newer(&shard.name, &rec).await
    }
}
