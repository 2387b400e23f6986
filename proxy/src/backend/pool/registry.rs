//! Every pool of the process, created on first use, and what acts on all of a server's
//! pools at once (retire, close idle, forget a database, activate, prewarm).

use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;

use super::{Pool, PoolKey};
use crate::backend::login::Credentials;
use crate::config::{HostPort, PoolSettings};
use crate::error::ServerError;
use crate::sync::Locked;

/// Every pool, created on first use.
#[derive(Debug)]
pub struct Pools {
    map: DashMap<PoolKey, Arc<Pool>>,
    settings: PoolSettings,
    connect_timeout: Duration,
    tls: crate::net::tls::ServerTls,
    /// Read pools (standbys) rather than the primaries'.
    reads: bool,
}

impl Pools {
    pub fn new(
        settings: PoolSettings,
        connect_timeout: Duration,
        tls: crate::net::tls::ServerTls,
    ) -> Self {
        Self {
            map: DashMap::new(),
            settings,
            connect_timeout,
            tls,
            reads: false,
        }
    }

    /// The read pools: one per (user, database, standby).
    pub fn for_reads(
        settings: PoolSettings,
        connect_timeout: Duration,
        tls: crate::net::tls::ServerTls,
    ) -> Self {
        Self {
            reads: true,
            ..Self::new(settings, connect_timeout, tls)
        }
    }

    /// The pool for `key`, created (with its maintenance task) on first use.
    pub fn get(&self, key: &PoolKey, credentials: &Credentials, shard: &str) -> Arc<Pool> {
        if let Some(p) = self.map.get(key) {
            let mut c = p.credentials.locked();
            if *credentials != Credentials::None && *c != *credentials {
                *c = credentials.clone();
            }
            drop(c);
            return Arc::clone(&p);
        }
        let entry = self.map.entry(key.clone()).or_insert_with(|| {
            let pool = Pool::start(
                key.clone(),
                credentials.clone(),
                self.settings.clone(),
                self.connect_timeout,
                self.tls.clone(),
                shard,
                self.reads,
            );
            tokio::spawn(maintain_forever(Arc::downgrade(&pool)));
            pool
        });
        Arc::clone(&entry)
    }
}

impl Pools {
    /// Every pool, in no particular order.
    pub fn list(&self) -> Vec<Arc<Pool>> {
        self.map.iter().map(|p| Arc::clone(p.value())).collect()
    }

    /// `addr` is no longer a primary: its pools close their connections.
    pub fn retire(&self, addr: &HostPort) {
        for p in self.map.iter().filter(|p| &p.key().addr == addr) {
            p.retire();
        }
    }

    /// Closes the idle connections to `database` on `addr`, which would keep it from
    /// being dropped, renamed or copied. Returns how many were closed.
    pub fn close_idle(&self, addr: &HostPort, database: &str) -> usize {
        let mut closed = 0;
        for p in self.map.iter() {
            if &p.key().addr == addr && p.key().database == database {
                closed += p.close_idle();
            }
        }
        closed
    }

    /// `database` on `addr` no longer exists under that name: its pools close their
    /// connections and are forgotten (a later client of that name gets a new pool, and
    /// the server's answer).
    pub fn forget_database(&self, addr: &HostPort, database: &str) {
        self.map.retain(|key, pool| {
            let gone = &key.addr == addr && key.database == database;
            if gone {
                pool.retire();
            }
            !gone
        });
    }

    /// `addr` is the primary (again): its pools keep connections.
    pub fn activate(&self, addr: &HostPort) {
        for p in self.map.iter().filter(|p| &p.key().addr == addr) {
            p.retired.store(false, std::sync::atomic::Ordering::Release);
            // Retiring closed the idle connections and kept none idle for a while;
            // serving again, the pool keeps them at once.
            p.lock().no_refill_until = None;
        }
    }

    /// Opens up to `n` connections per (user, database) known on `from` to `to`, in
    /// parallel. Returns the connections opened and the first error.
    pub async fn prewarm(
        &self,
        from: &HostPort,
        to: &HostPort,
        n: usize,
        shard: &str,
    ) -> (usize, Option<ServerError>) {
        // Collected first: creating a pool while iterating the map would deadlock.
        let known: Vec<(PoolKey, Credentials)> = self
            .map
            .iter()
            .filter(|p| &p.key().addr == from)
            .map(|p| {
                let key = PoolKey {
                    addr: to.clone(),
                    ..p.key().clone()
                };
                let c = p.credentials.locked();
                (key, c.clone())
            })
            .collect();
        let pools: Vec<Arc<Pool>> = known
            .iter()
            .map(|(key, credentials)| self.get(key, credentials, shard))
            .collect();
        let mut total = 0;
        let mut first = None;
        for pool in pools {
            let (opened, err) = pool.prewarm(n).await;
            total += opened;
            if first.is_none() {
                first = err;
            }
        }
        (total, first)
    }
}

async fn maintain_forever(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.maintain().await;
    }
}
