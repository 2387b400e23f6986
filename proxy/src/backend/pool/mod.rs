//! Server connection pools for transaction mode, one per (user, server database, shard
//! primary): bounded size, FIFO-fair waiting with a timeout, idle connections checked so
//! that any byte or EOF from the server evicts them, idle timeout, lifetime, min idle.
//!
//! A waiting client keeps no timer of its own: the pool's one expiry task sleeps until
//! the oldest waiter's deadline (the queue is in arrival order and every waiter has the
//! same timeout, so the oldest is always the first due) and ends the waits that are
//! due. A wait that is served in time costs no timer at all.
//!
//! `conn.rs` holds one pooled connection, `registry.rs` every pool of the process.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::oneshot;

use crate::backend::login::{self, Credentials};
use crate::config::{HostPort, PoolSettings};
use crate::error::{PoolError, ServerError};
use crate::metrics as m;
use crate::sync::Locked;

mod conn;
mod registry;

use conn::ServerList;
pub use conn::{Backend, PoolKey, ServerMeta};
pub use registry::Pools;

/// What a waiting client is handed.
#[derive(Debug)]
enum Grant {
    /// An idle connection.
    Conn(Box<Backend>),
    /// Permission to open a new connection (a slot freed up).
    Slot,
}

#[derive(Debug)]
struct Idle {
    backend: Box<Backend>,
    since: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Idle connections; the most recently used at the back.
    idle: Vec<Idle>,
    /// Connections open or being opened, idle or not.
    total: usize,
    /// Clients waiting, oldest first, with when each began to wait.
    waiters: VecDeque<(Instant, oneshot::Sender<Grant>)>,
    /// No idle connections are opened to keep `HANDOFF_POOL_MIN_IDLE` before this: a
    /// client is dropping, renaming or copying the database.
    no_refill_until: Option<Instant>,
}

/// The metric handles of one pool.
#[derive(Debug)]
struct Gauges {
    active: metrics::Gauge,
    idle: metrics::Gauge,
    waiting: metrics::Gauge,
    wait: Arc<m::Counted>,
}

/// A pool as the admin console shows it.
#[derive(Debug, Clone)]
pub struct PoolSnapshot {
    pub user: String,
    pub database: String,
    pub addr: HostPort,
    pub shard: String,
    /// Connections in use by a client.
    pub active: usize,
    pub idle: usize,
    /// Connections being opened.
    pub login: usize,
    /// Clients waiting for a connection, and the longest wait.
    pub waiting: usize,
    pub max_wait: Duration,
    /// Its server is no longer the shard's primary.
    pub retired: bool,
    /// A read pool: its server is a standby.
    pub reads: bool,
    /// Every open connection and whether it is idle, oldest first.
    pub servers: Vec<(ServerMeta, bool)>,
}

/// One pool.
#[derive(Debug)]
pub struct Pool {
    key: PoolKey,
    /// What its connections log in with: the last client's (a password changed on the
    /// server reaches new connections with the next client that proves the new one).
    credentials: Mutex<Credentials>,
    settings: PoolSettings,
    connect_timeout: Duration,
    tls: crate::net::tls::ServerTls,
    state: Mutex<State>,
    /// `user@database/shard`, the `pool` label of its series.
    label: String,
    /// The shard it serves.
    shard: String,
    /// Every connection open now, idle or in use.
    servers: ServerList,
    /// Bumped by `RECONNECT`: connections opened before are closed when they come back.
    generation: std::sync::atomic::AtomicU64,
    /// Its series, created when its first server connection opens: a pool for a
    /// database or user the server refuses never shows in `/metrics`.
    gauges: std::sync::OnceLock<Gauges>,
    /// Its server is no longer the primary: connections are closed, not returned.
    retired: std::sync::atomic::AtomicBool,
    /// The last login was refused because the database does not exist (`3D000`).
    missing_database: std::sync::atomic::AtomicBool,
    /// A read pool: its server is a standby.
    reads: bool,
    /// Wakes the expiry task (see [`expire_waits`]) when the first client begins to
    /// wait in an empty queue, and when the pool is dropped.
    waits_begun: Arc<tokio::sync::Notify>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The expiry task sees the pool gone and ends.
        self.waits_begun.notify_one();
    }
}

/// Ends the waits of `pool` that reach `HANDOFF_QUERY_WAIT_TIMEOUT`, for as long as the
/// pool lives: one timer for the pool, set to the oldest waiter's deadline, instead of
/// one for each waiting client.
async fn expire_waits(pool: std::sync::Weak<Pool>, begun: Arc<tokio::sync::Notify>) {
    loop {
        let next = match pool.upgrade() {
            Some(p) => p.end_due_waits(Instant::now()),
            None => return,
        };
        match next {
            Some(due) => {
                // A wait that begins meanwhile is due later than this one.
                tokio::time::sleep_until(due).await;
            }
            None => begun.notified().await,
        }
    }
}

impl Pool {
    /// A pool and its expiry task (see [`expire_waits`]); called within the runtime.
    fn start(
        key: PoolKey,
        credentials: Credentials,
        settings: PoolSettings,
        connect_timeout: Duration,
        tls: crate::net::tls::ServerTls,
        shard: &str,
        reads: bool,
    ) -> Arc<Self> {
        let mut label = format!("{}@{}/{}", key.user, key.database, shard);
        if reads {
            // One read pool per standby: told apart by the standby.
            label = format!("{label} standby {}", key.addr);
        }
        let pool = Arc::new(Self {
            key,
            credentials: Mutex::new(credentials),
            settings,
            connect_timeout,
            tls,
            state: Mutex::new(State::default()),
            label,
            shard: shard.to_string(),
            servers: Default::default(),
            generation: Default::default(),
            gauges: std::sync::OnceLock::new(),
            retired: std::sync::atomic::AtomicBool::new(false),
            missing_database: std::sync::atomic::AtomicBool::new(false),
            reads,
            waits_begun: Arc::new(tokio::sync::Notify::new()),
        });
        tokio::spawn(expire_waits(
            Arc::downgrade(&pool),
            Arc::clone(&pool.waits_begun),
        ));
        pool
    }

    /// Drops the waiters whose wait reached the timeout at `now` (their checkout fails
    /// with [`PoolError::WaitTimeout`]) and those that gave up; returns when the oldest
    /// remaining one is due.
    fn end_due_waits(&self, now: Instant) -> Option<Instant> {
        let timeout = self.settings.query_wait_timeout;
        let mut st = self.lock();
        let before = st.waiters.len();
        while let Some((since, w)) = st.waiters.front() {
            if *since + timeout > now && !w.is_closed() {
                break;
            }
            // Dropping the sender ends the wait.
            st.waiters.pop_front();
        }
        if st.waiters.len() != before {
            self.publish(&st);
        }
        st.waiters.front().map(|(since, _)| *since + timeout)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves consistent counts (no awaits inside).
        self.state.locked()
    }

    fn publish(&self, st: &State) {
        if let Some(g) = self.gauges.get() {
            g.active.set((st.total - st.idle.len()) as f64);
            g.idle.set(st.idle.len() as f64);
            g.waiting.set(st.waiters.len() as f64);
        }
    }

    /// The pool's series, created on first use (see [`Pool::gauges`]).
    fn series(&self) -> &Gauges {
        self.gauges.get_or_init(|| {
            let label = self.label.clone();
            Gauges {
                active: metrics::gauge!(m::POOL_ACTIVE, "pool" => label.clone()),
                idle: metrics::gauge!(m::POOL_IDLE, "pool" => label.clone()),
                waiting: metrics::gauge!(m::POOL_WAITING, "pool" => label.clone()),
                wait: m::Counted::series(m::POOL_WAIT, &[("pool", &label)]),
            }
        })
    }

    async fn open(&self) -> Result<Box<Backend>, ServerError> {
        let credentials = self.credentials.locked().clone();
        let login = login::Login {
            addr: &self.key.addr,
            user: &self.key.user,
            database: &self.key.database,
            params: &[],
            credentials: &credentials,
            timeout: self.connect_timeout,
            tls: &self.tls,
        };
        // Boxed: a login's state is large and rare; checkout's future stays small.
        match Box::pin(login::connect(login)).await {
            Ok(s) => {
                self.missing_database
                    .store(false, std::sync::atomic::Ordering::Release);
                metrics::gauge!(m::SERVER_CONNECTIONS).increment(1.0);
                self.series();
                Ok(Box::new(Backend::new(
                    s,
                    self.settings.max_prepared,
                    &self.servers,
                    self.generation.load(std::sync::atomic::Ordering::Acquire),
                )))
            }
            Err(e) => {
                metrics::counter!(m::SERVER_CONNECT_ERRORS_TOTAL).increment(1);
                let missing = matches!(&e, ServerError::Rejected { fields, .. }
                    if fields.code() == Some(handoff_protocol::sqlstate::INVALID_CATALOG_NAME));
                // A database that does not exist gets no connections kept open for it
                // until a client's login succeeds again.
                self.missing_database
                    .store(missing, std::sync::atomic::Ordering::Release);
                Err(e)
            }
        }
    }

    /// Takes an idle connection, opens a new one if the pool has room, or waits (FIFO)
    /// up to `HANDOFF_QUERY_WAIT_TIMEOUT`.
    ///
    /// # Cancel safety
    /// Cancel-safe: a dropped wait leaves the queue; a grant sent to it is passed on.
    ///
    /// Connections live in a `Box` from when they are opened, so handing one out moves
    /// a pointer and allocates nothing.
    pub async fn checkout(&self) -> Result<Box<Backend>, PoolError> {
        let started = Instant::now();
        let wait = {
            let mut st = self.lock();
            match Self::pop_idle(&mut st).map(Grant::Conn) {
                Some(g) => Ok(g),
                None if st.total < self.settings.size => {
                    st.total += 1;
                    Ok(Grant::Slot)
                }
                None => {
                    let (tx, rx) = oneshot::channel();
                    if st.waiters.is_empty() {
                        // The expiry task sleeps with no waiter to time.
                        self.waits_begun.notify_one();
                    }
                    st.waiters.push_back((started, tx));
                    Err(rx)
                }
            }
        };
        let grant = match wait {
            Ok(g) => g,
            Err(rx) => match rx.await {
                Ok(g) => g,
                // The expiry task dropped our sender: the wait reached the timeout (or
                // the pool is gone).
                Err(_) => {
                    return Err(PoolError::WaitTimeout(
                        self.settings.query_wait_timeout,
                        self.settings.size,
                    ));
                }
            },
        };
        let backend = match grant {
            Grant::Conn(b) => b,
            Grant::Slot => match self.open().await {
                Ok(b) => {
                    // The first connection creates the series: show the counts now.
                    self.publish(&self.lock());
                    b
                }
                Err(e) => {
                    self.release_slot();
                    return Err(e.into());
                }
            },
        };
        if let Some(g) = self.gauges.get() {
            g.wait.record(started.elapsed());
        }
        Ok(backend)
    }

    /// An idle connection if one is free now: no waiting, no opening, no allocation.
    /// The checkout counts in the wait histogram with a wait of zero, as it would
    /// through [`Pool::checkout`].
    pub fn try_checkout(&self) -> Option<Box<Backend>> {
        let mut st = self.lock();
        let got = Self::pop_idle(&mut st);
        if got.is_some() {
            drop(st);
            if let Some(g) = self.gauges.get() {
                g.wait.record(Duration::ZERO);
            }
        }
        got
    }

    /// The most recently used idle connection that is still quiet; the ones that are
    /// not (closed by the server, or sent something unasked) are dropped on the way.
    fn pop_idle(st: &mut State) -> Option<Box<Backend>> {
        while let Some(mut idle) = st.idle.pop() {
            if idle.backend.is_quiet(idle.since.elapsed()) {
                return Some(idle.backend);
            }
            st.total -= 1;
            drop_backend(idle.backend);
        }
        None
    }

    /// Returns a clean connection (ReadyForQuery `I`, nothing owed) to the pool.
    pub fn checkin(&self, backend: Box<Backend>) {
        if self.is_retired()
            || backend.generation < self.generation.load(std::sync::atomic::Ordering::Relaxed)
            || (!self.settings.lifetime.is_zero()
                && backend.created.elapsed() >= self.settings.lifetime)
        {
            self.discard(backend);
            return;
        }
        let mut st = self.lock();
        let mut grant = Grant::Conn(backend);
        while let Some((_, w)) = st.waiters.pop_front() {
            match w.send(grant) {
                Ok(()) => return,
                Err(g) => grant = g,
            }
        }
        if let Grant::Conn(backend) = grant {
            if st.no_refill_until.is_some_and(|t| Instant::now() < t) {
                // A client is dropping, renaming or copying the database: a connection
                // nobody waits for is closed, not kept idle.
                drop(st);
                self.discard(backend);
                return;
            }
            st.idle.push(Idle {
                backend,
                since: Instant::now(),
            });
        }
    }

    /// Sets the pool's gauges (active, idle, waiting) to what it holds now. Read at the
    /// scrape and where connections are opened or closed, not at every checkout and
    /// checkin: those run per transaction, on every worker thread, and each gauge update
    /// is a write to a cache line all of them share.
    pub fn publish_now(&self) {
        self.publish(&self.lock());
    }

    /// What `SHOW POOLS` and `SHOW SERVERS` show of the pool now.
    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.lock();
        let idle: Vec<i32> = st.idle.iter().map(|i| i.backend.pid).collect();
        let max_wait = st
            .waiters
            .iter()
            .filter(|(_, w)| !w.is_closed())
            .map(|(since, _)| since.elapsed())
            .max()
            .unwrap_or_default();
        let waiting = st.waiters.iter().filter(|(_, w)| !w.is_closed()).count();
        let total = st.total;
        drop(st);
        let mut servers: Vec<(ServerMeta, bool)> = self
            .servers
            .locked()
            .values()
            .map(|m| (m.clone(), idle.contains(&m.pid)))
            .collect();
        servers.sort_by_key(|(m, _)| m.connected);
        let open = servers.len();
        PoolSnapshot {
            user: self.key.user.clone(),
            database: self.key.database.clone(),
            addr: self.key.addr.clone(),
            shard: self.shard.clone(),
            active: open.saturating_sub(idle.len()),
            idle: idle.len(),
            login: total.saturating_sub(open),
            waiting,
            max_wait,
            retired: self.is_retired(),
            reads: self.reads,
            servers,
        }
    }

    /// `RECONNECT`: closes the idle connections now and the others when their
    /// transaction ends; new ones are opened as clients need them. Returns how many
    /// were closed now.
    pub fn reconnect(&self) -> usize {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.drop_idle(None)
    }

    fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The server stopped being the primary: close the idle connections now, and the
    /// others as they come back.
    fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Release);
        self.close_idle();
    }

    /// Closes the idle connections now, and for a while keeps none idle (PostgreSQL
    /// waits up to 5 s for other sessions to leave a database): none is opened to keep
    /// the minimum, and one returned while nobody waits is closed.
    /// Returns how many were closed.
    fn close_idle(&self) -> usize {
        self.drop_idle(Some(Instant::now() + Duration::from_secs(10)))
    }

    /// Closes every idle connection now; with `no_refill_until`, keeps none idle until
    /// then. Returns how many were closed.
    fn drop_idle(&self, no_refill_until: Option<Instant>) -> usize {
        let idle = {
            let mut st = self.lock();
            if no_refill_until.is_some() {
                st.no_refill_until = no_refill_until;
            }
            let idle = std::mem::take(&mut st.idle);
            st.total -= idle.len();
            self.publish(&st);
            idle
        };
        let n = idle.len();
        for i in idle {
            drop_backend(i.backend);
        }
        n
    }

    /// Opens up to `n` connections at once (within the pool's size) and keeps them idle.
    /// Returns how many were opened, and the first error.
    pub async fn prewarm(self: &Arc<Self>, n: usize) -> (usize, Option<ServerError>) {
        let n = {
            let mut st = self.lock();
            let n = n.min(self.settings.size - st.total);
            st.total += n;
            self.publish(&st);
            n
        };
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let pool = Arc::clone(self);
            set.spawn(async move { pool.open().await });
        }
        let (mut opened, mut first_err) = (0, None);
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(b)) => {
                    opened += 1;
                    self.checkin(b);
                }
                Ok(Err(e)) => {
                    self.release_slot();
                    first_err.get_or_insert(e);
                }
                Err(_) => self.release_slot(),
            }
        }
        (opened, first_err)
    }

    /// Closes a connection that must not be reused (dirty, broken or too old).
    /// Returns a connection a client is done with: at once, or, if a cancel request
    /// for that client's query is still on its way to it, once it has been delivered
    /// (PgBouncer's `being_canceled` state). The connection keeps its place in the pool
    /// meanwhile; a client waiting for one gets it afterwards.
    pub fn give_back(self: &Arc<Self>, backend: Box<Backend>) {
        if !backend.in_flight.any() {
            self.checkin(backend);
            return;
        }
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            let in_flight = Arc::clone(&backend.in_flight);
            in_flight.delivered().await;
            pool.checkin(backend);
        });
    }

    pub fn discard(&self, backend: Box<Backend>) {
        drop_backend(backend);
        self.release_slot();
    }

    /// Gives a freed slot to the first live waiter, or shrinks the pool.
    fn release_slot(&self) {
        let mut st = self.lock();
        while let Some((_, w)) = st.waiters.pop_front() {
            if w.send(Grant::Slot).is_ok() {
                self.publish(&st);
                return;
            }
        }
        st.total -= 1;
        self.publish(&st);
    }

    /// Evicts idle connections that spoke, closed, idled or lived too long, and tops the
    /// pool up to `HANDOFF_POOL_MIN_IDLE`.
    async fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let missing = {
            let mut st = self.lock();
            let (idle_timeout, lifetime) = (self.settings.idle_timeout, self.settings.lifetime);
            let before = st.idle.len();
            // Dropping a `Box<Backend>` closes its socket.
            st.idle.retain_mut(|i| {
                let stale = (!idle_timeout.is_zero() && now - i.since >= idle_timeout)
                    || (!lifetime.is_zero() && i.backend.created.elapsed() >= lifetime);
                !stale && i.backend.is_quiet(now - i.since)
            });
            let gone = before - st.idle.len();
            if gone > 0 {
                st.total -= gone;
                metrics::gauge!(m::SERVER_CONNECTIONS).decrement(gone as f64);
                tracing::debug!(count = gone, "evicted idle server connections");
            }
            let paused = st.no_refill_until.is_some_and(|t| now < t)
                || self
                    .missing_database
                    .load(std::sync::atomic::Ordering::Acquire);
            let missing = if self.is_retired() || paused {
                0
            } else {
                self.settings.min_idle.saturating_sub(st.idle.len())
            };
            let room = self.settings.size - st.total;
            let n = missing.min(room);
            st.total += n;
            self.publish(&st);
            n
        };
        for _ in 0..missing {
            match self.open().await {
                Ok(b) => self.checkin(b),
                Err(e) => {
                    tracing::warn!(error = %e, "could not open a min-idle server connection");
                    self.release_slot();
                }
            }
        }
    }
}

fn drop_backend(b: Box<Backend>) {
    metrics::gauge!(m::SERVER_CONNECTIONS).decrement(1.0);
    drop(b);
}

#[cfg(test)]
mod tests;
