//! The transaction-mode relay: a client holds a pooled server connection only from the
//! first message of a transaction until ReadyForQuery `I` with nothing more owed, and
//! named prepared statements and startup parameters follow it from one server
//! connection to the next.
//!
//! [`Txn`] is one client's side of it. Its rooms: [`run`] (the loop and its idle limits),
//! `client` (the client's bytes: the gate at a transaction's first message, forwarding),
//! `server` (the server's bytes: replies owed to the proxy, ReadyForQuery, errors,
//! parameter changes), [`prepared`] (named statements under server-side names), `params`
//! (startup parameters applied with SET), `probation` (the retry rules for a
//! transaction's first request) and `local` (answers the proxy gives itself: refused
//! requests, transactions lost with their server connection).

/// Whether the relay's stretches of work run in the client's log span: only when
/// debug lines are on. A span is formatted and allocated each time it is made, and a
/// quiet client makes one each time it wakes up — a fifth of the proxy's own CPU per
/// transaction in a crowd of clients that each send now and then. The relay's own info
/// lines and warnings name the client themselves otherwise ([`client_log!`]). The same
/// holds for a transaction-mode login (see `frontend::session::run`).
pub(crate) fn client_span_on() -> bool {
    tracing::enabled!(tracing::Level::DEBUG)
}

/// An info line or warning of the relay with its client's address, user and database:
/// from the client's span when the relay runs in one ([`client_span_on`]), as fields of
/// the line otherwise.
macro_rules! client_log {
    ($level:ident, $client:expr, $($rest:tt)+) => {{
        if $crate::relay::txn::client_span_on() {
            tracing::$level!($($rest)+)
        } else {
            let c: &$crate::clients::ClientInfo = $client;
            let (user, database) = c
                .login()
                .map_or(("", ""), |l| (&*l.user, &*l.database));
            tracing::$level!(client.addr = %c.addr, user = %user, database = %database, $($rest)+)
        }
    }};
}
pub(crate) use client_log;

mod client;
mod exchange;
mod local;
mod moved;
mod params;
pub(crate) mod prepared;
mod probation;
mod run;
mod server;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use handoff_protocol::backend::TransactionStatus;
use tokio::time::Instant;

use crate::backend::cancel::Registration;
use crate::backend::pool::{Backend, Pool, PoolKey};
use crate::clients::ClientInfo;
use crate::config::{HostPort, Target};
use crate::error::{AttachError, PoolError};
use crate::metrics::RelayMeters;
use crate::relay::common::Meter;
use crate::relay::shared::Params;
use crate::relay::Ctx;
use crate::shard::control::{self, Admitted};
use crate::shard::failure::{Report, RetryReason};
use crate::shard::health;
use crate::shard::replicas::Reading;
use crate::shard::{Generation, Shard};
use exchange::Exchange;
use local::Local;
use params::sync_params;
use prepared::{Reply, StmtDef};
use probation::{Probation, MAX_RETRIES};

pub(crate) use crate::relay::shared::PoolTarget;
pub(crate) use params::valid_param_name;
pub(crate) use run::{relay, resume, start};

/// Largest server message buffered whole for inspection.
const MAX_INSPECT: usize = 64 * 1024;

/// The client's side of a transaction-mode session.
///
/// It owns what it works with (no borrow of the session's task), so a quiet client's
/// state can be set aside in the [`lot`] and taken up again by a new task.
pub(crate) struct Txn {
    pub ctx: Arc<Ctx>,
    /// The shard the client's database routes to (its name: [`Txn::shard`]).
    state: Arc<Shard>,
    target: Arc<PoolTarget>,
    /// The generation `pool` belongs to; a transaction is registered on it while attached.
    gen: Arc<Generation>,
    /// The running transaction's pass through the gate: its registration on `gen`,
    /// and the buffer's release while a held request's transaction runs.
    admitted: Option<Admitted>,
    /// The pool the session draws from and the server connection it holds (after
    /// `admitted`: a session dropped while it holds one leaves the gate, then closes it).
    pub link: Link,
    local: Local,
    pub registration: Registration,
    /// Startup parameters the client asked for (absent: the server default); applied
    /// with SET to whichever server connection serves it. Shared with the sessions
    /// that asked for the same, copied when the client's own SET changes it.
    pub desired: Params,
    /// What the client asked for at startup: `desired` again after `DISCARD ALL`.
    startup: Params,
    /// The client's named statements, made when it first names one.
    named: Option<Box<Named>>,
    /// A database this segment drops or renames: forgotten when the server confirms.
    dropping: Option<Box<str>>,
    /// `DISCARD ALL` ran in this segment: the parameters the server reports next are its
    /// defaults, not the client's choice.
    discarded: bool,
    /// Where the exchange with the server connection stands.
    ex: Exchange,
    /// The first request of the current transaction, while it may still be re-sent.
    probe: Probation,
    /// How many more times a refused first request may be re-sent.
    retries_left: u8,
    /// A request in flight ends the transaction block (COMMIT, ROLLBACK, …): if the
    /// server is lost under it, the client is outside a transaction afterwards.
    ending: bool,
    out: BytesMut,
    /// Bytes relayed, request and transaction durations.
    meter: Meter,
    /// The takeover this session could not be moved in (0: none): it is not tried
    /// again in the same one.
    stayed: u64,
    /// The standby serving the transaction, while a read holds a connection to one.
    reading: Option<Reading>,
    /// A reader's pools, by standby: looked up once per standby, not per transaction.
    read_pools: Option<Box<ReadPools>>,
    /// The session's last quiet spell was a long one: its next goes to the lot after a
    /// short one (see `run::PARK_AFTER`), not after `run::KEEP_FOR`.
    pub(super) lot_soon: bool,
    /// When the session went to the lot after `run::PARK_AFTER`: on its way out, how
    /// long it stayed there tells whether that spell was a long one.
    pub(super) set_aside_at: Option<Instant>,
    /// What the session holds until it ends (its connection permit, its registry entry,
    /// its place in the connection limits): kept with the state, so that a session set
    /// aside in the lot keeps them without a task. Dropped last.
    keep: Option<Keep>,
}

/// The pool a session draws from and the server connection it holds from it, if any.
pub(crate) struct Link {
    pub pool: Arc<Pool>,
    pub backend: Option<Box<Backend>>,
}

/// A session that ends with a server connection still attached — its task aborted by
/// the console's `KILL`, say — closes it and gives its slot back to the pool (the
/// server rolls back whatever was in progress).
impl Drop for Link {
    fn drop(&mut self) {
        if let Some(b) = self.backend.take() {
            self.pool.discard(b);
        }
    }
}

/// A quiet session's state as the lot keeps it: a [`Txn`] without what only a
/// transaction uses (its pass through the gate, the exchange with a server connection,
/// the first request kept for a retry, a local answer, the output buffer, the timings)
/// — 160 bytes instead of 392 for every client in the lot. [`Txn::into_quiet`] makes it from a
/// session holding nothing else, [`Txn::from_quiet`] makes the session again.
pub(crate) struct Quiet {
    ctx: Arc<Ctx>,
    pool: Arc<Pool>,
    state: Arc<Shard>,
    target: Arc<PoolTarget>,
    gen: Arc<Generation>,
    registration: Registration,
    desired: Params,
    startup: Params,
    named: Option<Box<Named>>,
    /// The [`Meter`]'s handles (a meter at rest times nothing).
    series: Arc<RelayMeters>,
    client: Arc<ClientInfo>,
    stayed: u64,
    read_pools: Option<Box<ReadPools>>,
    lot_soon: bool,
    set_aside_at: Option<Instant>,
    /// Dropped last, as [`Txn::keep`].
    keep: Option<Keep>,
}

/// A reader's pools, by standby.
type ReadPools = Vec<(HostPort, Arc<Pool>)>;

/// See [`Txn::keep`].
pub(crate) type Keep = Box<dyn Send + Sync>;

/// A client's named statements and their progress through the server connection it
/// holds. Made on first use: most clients never name a statement, and an idle client
/// keeps its [`Txn`] for as long as it stays connected (five empty maps were 216 bytes
/// of it).
#[derive(Default)]
pub(super) struct Named {
    /// The client's named statements.
    stmts: HashMap<Bytes, StmtDef>,
    /// The client's SQL-level (`PREPARE`) statements, by the name PostgreSQL gives them.
    sql_stmts: HashMap<String, StmtDef>,
    /// Server names of the statements this segment binds or describes: the ones to
    /// prepare afresh if the server finds them stale.
    used: Vec<Bytes>,
    /// Client statements whose Parse was sent but not yet answered: a Parse the server
    /// skips after an error must not define the name.
    defining: HashMap<Bytes, StmtDef>,
    /// Server-side names sent in a Parse whose ParseComplete has not arrived.
    preparing: HashSet<Bytes>,
}

/// What [`Txn::attach_now`] could do without waiting.
pub(crate) enum Now {
    /// A server connection serves the transaction.
    Attached,
    /// The gate or the pool must be waited for.
    Wait,
    /// Through the gate with a connection whose parameters need a SET first.
    Sync(Box<Backend>),
}

/// What [`Txn::named`] lends a client that has named nothing.
static NO_NAMES: std::sync::LazyLock<Named> = std::sync::LazyLock::new(Named::default);

impl Txn {
    /// The name of the client's shard.
    pub fn shard(&self) -> &str {
        &self.state.name
    }

    /// The client's named statements (none yet: an empty set, without allocating).
    fn named(&self) -> &Named {
        self.named.as_deref().unwrap_or(&NO_NAMES)
    }

    /// The client's named statements, to change: made on first use.
    fn named_mut(&mut self) -> &mut Named {
        self.named.get_or_insert_with(Box::default)
    }

    pub fn new(
        ctx: &Arc<Ctx>,
        state: &Arc<Shard>,
        target: Arc<PoolTarget>,
        registration: Registration,
        desired: Params,
        client: Arc<ClientInfo>,
    ) -> Self {
        let gen = state.current();
        let pool = pool_for(ctx, &target, &gen, &state.name);
        Self {
            ctx: Arc::clone(ctx),
            link: Link {
                pool,
                backend: None,
            },
            state: Arc::clone(state),
            target,
            gen,
            admitted: None,
            local: Local::None,
            registration,
            startup: Arc::clone(&desired),
            desired,
            named: None,
            discarded: false,
            dropping: None,
            ex: Exchange::default(),
            probe: Probation::default(),
            retries_left: MAX_RETRIES,
            ending: false,
            out: BytesMut::new(),
            meter: Meter::new(Arc::clone(&ctx.meters), client),
            stayed: 0,
            reading: None,
            read_pools: None,
            lot_soon: false,
            set_aside_at: None,
            keep: None,
        }
    }

    /// Holds `keep` until the session ends (see the field).
    pub fn keep(&mut self, keep: Keep) {
        self.keep = Some(keep);
    }

    /// Passes the shard's gate (waiting in the failover buffer while the primary
    /// changes), then checks a connection out of the serving primary's pool and brings
    /// its parameters in line with the client's. `bytes`: the request's size so far.
    pub async fn attach(&mut self, bytes: usize) -> Result<(), AttachError> {
        match self.attach_now() {
            Now::Attached => Ok(()),
            now => self.attach_waiting(bytes, now).await,
        }
    }

    /// [`Txn::attach`]'s common case, which neither waits nor allocates: the shard
    /// serves, an idle connection is free and already has the client's parameters.
    /// Anything else is left to [`Txn::attach_waiting`].
    pub fn attach_now(&mut self) -> Now {
        if self.link.backend.is_some() {
            return Now::Attached;
        }
        if self.target.target != Target::Primary {
            return self.attach_read_now();
        }
        let Some(mut b) = self.checkout_now() else {
            return Now::Wait;
        };
        if params::in_sync(&mut b, &self.desired, &self.named().sql_stmts) {
            self.install(b);
            return Now::Attached;
        }
        // Its parameters need a SET: that waits for the server.
        Now::Sync(b)
    }

    /// [`Txn::attach`]'s paths that wait (the buffer, a pool at its limit, a new
    /// connection, SET), after [`Txn::attach_now`] said which. The relay awaits it in a
    /// box of its own, so the future each client keeps does not reserve room for them.
    pub async fn attach_waiting(&mut self, bytes: usize, now: Now) -> Result<(), AttachError> {
        let mut b = match now {
            Now::Attached => return Ok(()),
            Now::Sync(b) => b,
            Now::Wait => self.checkout_waiting(bytes).await?,
        };
        if !params::in_sync(&mut b, &self.desired, &self.named().sql_stmts) {
            let sql_stmts = &self.named().sql_stmts;
            if let Err(e) = sync_params(&mut b, &self.desired, sql_stmts).await {
                self.link.pool.discard(b);
                self.leave();
                self.reading = None;
                return Err(e);
            }
        }
        self.install(b);
        Ok(())
    }

    /// The gate and a free idle connection, if both are there now.
    fn checkout_now(&mut self) -> Option<Box<Backend>> {
        self.admitted = Some(control::try_admit(&self.ctx.shard, &self.state, &self.gen)?);
        match self.link.pool.try_checkout() {
            Some(b) if self.state.is_serving(&self.gen) => Some(b),
            other => {
                if let Some(b) = other {
                    self.link.pool.checkin(b);
                }
                self.leave();
                None
            }
        }
    }

    /// The gate and a connection, waiting for either as long as it takes.
    async fn checkout_waiting(&mut self, bytes: usize) -> Result<Box<Backend>, AttachError> {
        // `SHOW CLIENTS` shows it waiting; the time counts in `SHOW STATS`'s wait_time.
        let client = Arc::clone(self.meter.client());
        let _waiting = client.waiting();
        if self.target.target != Target::Primary {
            if let Some(b) = self.checkout_read().await? {
                return Ok(b);
            }
            // `@any` with no standby in the rotation: the primary serves it.
            self.link.pool = pool_for(&self.ctx, &self.target, &self.gen, self.shard());
        }
        loop {
            self.enter(bytes).await?;
            let b = match self.link.pool.checkout().await {
                Ok(b) => b,
                Err(PoolError::Connect(e)) if e.primary_may_be_gone() => {
                    self.leave();
                    // Nothing was sent: if the primary is indeed gone, wait in the
                    // buffer for the next one instead of failing the request.
                    let gen = Arc::clone(&self.gen);
                    if health::suspect(&self.ctx.shard, &self.state, &gen, Report::ConnectFailed)
                        .await
                    {
                        RetryReason::ConnectFailed.count(self.shard());
                        continue;
                    }
                    return Err(AttachError::Pool(PoolError::Connect(e)));
                }
                Err(e) => {
                    self.leave();
                    return Err(AttachError::Pool(e));
                }
            };
            // Revoked while waiting for a connection: nothing was sent yet, so wait in
            // the buffer instead of starting a transaction lameduck must wait for.
            if self.state.is_serving(&self.gen) {
                return Ok(b);
            }
            self.link.pool.checkin(b);
            self.leave();
        }
    }

    /// The relay is being parked (the client is quiet, nothing is held): what the last
    /// transactions left allocated for the next one to reuse is freed. Kept while the
    /// client is busy, so a transaction does not allocate them afresh.
    pub fn park(&mut self) {
        debug_assert!(self.link.backend.is_none());
        self.ex.release();
        self.probe = Probation::default();
        if let Some(n) = self.named.as_mut() {
            n.used = Vec::new();
            n.preparing = HashSet::new();
            n.defining = HashMap::new();
        }
    }

    /// [`Txn::attach_now`] for a reader: the least busy standby in the rotation has an
    /// idle connection now.
    fn attach_read_now(&mut self) -> Now {
        let Some(picked) = self.state.replicas.pick(None) else {
            return Now::Wait;
        };
        let pool = self.read_pool(picked.host());
        let Some(mut b) = pool.try_checkout() else {
            return Now::Wait;
        };
        picked.served();
        self.link.pool = pool;
        self.reading = Some(picked);
        if params::in_sync(&mut b, &self.desired, &self.named().sql_stmts) {
            self.install(b);
            return Now::Attached;
        }
        Now::Sync(b)
    }

    /// The client's read pool on standby `host`.
    fn read_pool(&mut self, host: &HostPort) -> Arc<Pool> {
        let pools = self.read_pools.get_or_insert_with(Box::default);
        if let Some((_, p)) = pools.iter().find(|(h, _)| h == host) {
            return Arc::clone(p);
        }
        let p = read_pool_for(&self.ctx, &self.target, host, self.shard());
        self.read_pools
            .get_or_insert_with(Box::default)
            .push((host.clone(), Arc::clone(&p)));
        p
    }

    /// A connection to a standby in the read rotation, the least busy; one that cannot
    /// be reached leaves the rotation and the next is tried (nothing was sent). With
    /// none in the rotation `@replica` waits up to the buffer's window for one, and
    /// `@any` gets `None` (the primary serves it).
    async fn checkout_read(&mut self) -> Result<Option<Box<Backend>>, AttachError> {
        let state = Arc::clone(&self.state);
        let replicas = &state.replicas;
        let mut except: Option<HostPort> = None;
        loop {
            let picked = match replicas.pick(except.as_ref()) {
                Some(r) => r,
                None if self.target.target == Target::Any => return Ok(None),
                None => {
                    let wait = self.ctx.shard.settings.read_wait;
                    match replicas.pick_within(wait).await {
                        Some(r) => r,
                        None => return Err(AttachError::NoStandby(wait)),
                    }
                }
            };
            let pool = self.read_pool(picked.host());
            match pool.checkout().await {
                Ok(b) => {
                    picked.served();
                    self.link.pool = pool;
                    self.reading = Some(picked);
                    return Ok(Some(b));
                }
                Err(PoolError::Connect(e)) if e.standby_unusable() => {
                    replicas.set_down(picked.host(), &e.to_string());
                    RetryReason::ConnectFailed.count(self.shard());
                    except = Some(picked.host().clone());
                }
                Err(e) => return Err(AttachError::Pool(e)),
            }
        }
    }

    /// The standby serving the current transaction, if it reads from one.
    pub(super) fn standby(&self) -> Option<&HostPort> {
        self.reading.as_ref().map(|r| r.host())
    }

    /// The standby serving the current transaction failed it: out of the rotation
    /// until its next check.
    fn standby_failed(&self, why: &str) {
        if let Some(r) = &self.reading {
            self.state.replicas.set_down(r.host(), why);
        }
    }

    /// The connection serves this client's transaction from now on.
    fn install(&mut self, b: Box<Backend>) {
        self.registration.set_server(Some(Arc::clone(&b.cancel)));
        self.link.backend = Some(b);
    }

    /// The gate ([`control::admit`]); the pool follows the generation.
    async fn enter(&mut self, bytes: usize) -> Result<(), AttachError> {
        let before = self.gen.id;
        self.admitted =
            Some(control::admit(&self.ctx.shard, &self.state, &mut self.gen, bytes).await?);
        if self.gen.id != before {
            self.link.pool = pool_for(&self.ctx, &self.target, &self.gen, self.shard());
        }
        Ok(())
    }

    /// Ends the transaction's registration on its generation (and its buffer release).
    fn leave(&mut self) {
        self.admitted = None;
    }

    /// The first request's outcome is known (or it can no longer be re-sent): returns
    /// the server bytes held back, which go to the client before anything else.
    fn end_probe(&mut self) -> BytesMut {
        self.retries_left = MAX_RETRIES;
        self.probe.release()
    }

    /// The server's parameters as the client should see them at startup (in the map's
    /// order: the greeting sorts them).
    pub fn startup_params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.link
            .backend
            .iter()
            .flat_map(|b| b.params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    fn clean(&self) -> bool {
        self.ex.clean()
    }

    /// Returns the connection to the pool if the transaction is over, else closes it
    /// when `force` (the client is gone): a dirty connection is never reused.
    /// `stream_clean`: the relay holds no unprocessed bytes read from this connection.
    pub fn detach(&mut self, force: bool, stream_clean: bool) {
        if !(self.clean() || force) {
            return;
        }
        let Some(b) = self.link.backend.take() else {
            return;
        };
        self.leave();
        self.reading = None;
        self.registration.set_server(None);
        if let Some(n) = self.named.as_mut() {
            n.preparing.clear();
            n.defining.clear();
        }
        if self.clean() && stream_clean && b.conn.rbuf.is_empty() {
            // After `set_server(None)`: a cancel forwarded for this client shows now.
            self.link.pool.give_back(b);
        } else {
            self.link.pool.discard(b);
        }
        self.ex.reset();
    }

    fn on_ready(&mut self, status: TransactionStatus) {
        let now = Instant::now();
        let nothing_owed = self.ex.ready(status);
        if nothing_owed {
            self.ending = false;
        }
        if let Some(n) = self.named.as_mut() {
            n.used.clear();
        }
        self.discarded = false;
        self.dropping = None;
        while let Some(r) = self.ex.replies.pop_front() {
            if r == Reply::SyncMark {
                break;
            }
            self.settle(r);
        }
        self.meter
            .on_ready(now, nothing_owed, status == TransactionStatus::Idle);
    }
}

impl Quiet {
    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// The client's entry (`SHOW CLIENTS`, `KILL`).
    pub(crate) fn client(&self) -> &Arc<ClientInfo> {
        &self.client
    }
}

impl Txn {
    /// The client's entry (`SHOW CLIENTS`, `KILL`, the log's fields).
    pub(crate) fn client(&self) -> &Arc<ClientInfo> {
        self.meter.client()
    }

    /// The session's state for the lot, if it holds nothing but the session (no server
    /// connection, no pass through the gate, nothing owed or kept for a retry, no local
    /// answer pending: as a parked session is); otherwise the state as it was.
    pub(crate) fn into_quiet(self: Box<Self>) -> Result<Box<Quiet>, Box<Self>> {
        let at_rest = self.link.backend.is_none()
            && self.admitted.is_none()
            && matches!(self.local, Local::None)
            && self.ex.at_rest()
            && !self.probe.active
            && self.retries_left == MAX_RETRIES
            && !self.ending
            && self.out.is_empty()
            && self.reading.is_none()
            && self.dropping.is_none()
            && !self.discarded
            && self.meter.at_rest();
        if !at_rest {
            return Err(self);
        }
        let Txn {
            ctx,
            link,
            state,
            target,
            gen,
            registration,
            desired,
            startup,
            named,
            meter,
            stayed,
            read_pools,
            lot_soon,
            set_aside_at,
            keep,
            ..
        } = *self;
        let pool = Arc::clone(&link.pool);
        drop(link);
        let (series, client) = meter.into_parts();
        Ok(Box::new(Quiet {
            ctx,
            pool,
            state,
            target,
            gen,
            registration,
            desired,
            startup,
            named,
            series,
            client,
            stayed,
            read_pools,
            lot_soon,
            set_aside_at,
            keep,
        }))
    }

    /// The session again, from the state the lot kept.
    pub(crate) fn from_quiet(q: Quiet) -> Box<Self> {
        let Quiet {
            ctx,
            pool,
            state,
            target,
            gen,
            registration,
            desired,
            startup,
            named,
            series,
            client,
            stayed,
            read_pools,
            lot_soon,
            set_aside_at,
            keep,
        } = q;
        Box::new(Txn {
            ctx,
            link: Link {
                pool,
                backend: None,
            },
            state,
            target,
            gen,
            admitted: None,
            local: Local::None,
            registration,
            desired,
            startup,
            named,
            dropping: None,
            discarded: false,
            ex: Exchange::default(),
            probe: Probation::default(),
            retries_left: MAX_RETRIES,
            ending: false,
            out: BytesMut::new(),
            meter: Meter::new(series, client),
            stayed,
            reading: None,
            read_pools,
            lot_soon,
            set_aside_at,
            keep,
        })
    }
}

/// The read pool of `target` on standby `host`.
fn read_pool_for(ctx: &Ctx, target: &PoolTarget, host: &HostPort, shard: &str) -> Arc<Pool> {
    let key = PoolKey {
        user: target.user.clone(),
        database: target.database.clone(),
        addr: host.clone(),
    };
    ctx.shard.read_pools.get(&key, &target.credentials, shard)
}

/// The pool of `target` on `gen`'s primary.
fn pool_for(ctx: &Ctx, target: &PoolTarget, gen: &Generation, shard: &str) -> Arc<Pool> {
    let key = PoolKey {
        user: target.user.clone(),
        database: target.database.clone(),
        addr: gen.primary.clone(),
    };
    ctx.shard.pools.get(&key, &target.credentials, shard)
}
