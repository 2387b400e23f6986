//! Membership: this proxy's key under `P/members/`, bound to a lease it renews every
//! third of `HANDOFF_ETCD_LEASE_TTL`. A proxy that stops renewing (it died, or etcd
//! cannot hear it) drops out of the cluster when the lease expires, and with it the
//! locks it held and its acknowledgements. At shutdown the lease is revoked, so the
//! others stop counting on this proxy at once.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use crate::coord::records::Record;
use crate::coord::Coord;
use crate::shutdown::{Phase, Signal};

impl Coord {
    pub(super) async fn membership(self: Arc<Self>, shutdown: Signal) {
        let ttl = self.settings.lease_ttl;
        let every = ttl / 3;
        loop {
            let lease = self.lease();
            let pause = if lease == 0 {
                match self.register().await {
                    Ok(l) => {
                        self.lease.store(l, SeqCst);
                        self.ok();
                        tracing::info!(proxy = %self.me.id, lease = l, "registered in the cluster");
                        self.wake.notify_one();
                        every
                    }
                    Err(e) => {
                        self.failed(&e);
                        every.min(Duration::from_millis(500))
                    }
                }
            } else {
                match self.store.renew(lease).await {
                    Ok(true) => {
                        self.ok();
                        every
                    }
                    Ok(false) => {
                        // Expired while etcd could not hear us: locks and acks under it
                        // are gone. Register again at once.
                        tracing::warn!(proxy = %self.me.id, "membership lease expired: registering again");
                        self.lease.store(0, SeqCst);
                        Duration::ZERO
                    }
                    Err(e) => {
                        self.failed(&e);
                        every.min(Duration::from_millis(500))
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.reached(Phase::Draining) => {
                    self.leave().await;
                    return;
                }
            }
        }
    }

    async fn register(&self) -> Result<i64, super::StoreError> {
        let lease = self.store.grant(self.settings.lease_ttl).await?;
        self.store
            .put(
                &self.keys.member(&self.me.id),
                self.me.encode(),
                Some(lease),
            )
            .await?;
        Ok(lease)
    }

    /// Leaves the cluster (shutdown): the lease, and everything under it, goes now.
    async fn leave(&self) {
        let lease = self.lease.swap(0, SeqCst);
        if lease != 0 {
            match self.store.revoke(lease).await {
                Ok(()) => tracing::info!(proxy = %self.me.id, "left the cluster"),
                Err(e) => {
                    tracing::warn!(proxy = %self.me.id, error = %e, "could not revoke the membership lease: the others see this proxy leave when it expires")
                }
            }
        }
    }
}
