//! The transaction-mode relay: a client holds a pooled server connection only from the
//! first message of a transaction until ReadyForQuery `I` with nothing more owed, and
//! named prepared statements and startup parameters follow it from one server
//! connection to the next.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use handoff_protocol::backend::{tag as btag, BackendMessage, TransactionStatus};
use handoff_protocol::error::{ErrorFields, ProxyError};
use handoff_protocol::frontend::{tag as ftag, FrontendMessage, Target};
use handoff_protocol::scan::{Scanner, Step};
use handoff_protocol::{sqlstate, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::cancel::{Registration, ServerKey};
use crate::backend::pool::{Backend, Pool, PoolKey};
use crate::error::{send_error, AttachError, PoolError};
use crate::metrics as m;
use crate::net::buffers;
use crate::net::stream::{Conn, MAX_STARTUP_MESSAGE};
use crate::relay::session_mode::{protocol_error, End, MAX_CLIENT_MESSAGE};
use crate::shard::health::Report;
use crate::shard::{Generation, Shard};
use crate::shutdown::{Phase, Signal};
use crate::Shared;
use handoff_buffer::Release;
use prepared::{Reply, StmtDef, NOOP_NAME};

pub(crate) mod prepared;

const MAX_INSPECT: usize = 64 * 1024;

/// Parameters the server reports with ParameterStatus: a client's own SET of one of
/// these is remembered and follows the client to its next server connection.
pub const TRACKED_PARAMS: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "search_path",
];

/// Requests the proxy answers itself instead of relaying.
#[derive(Debug, Default)]
pub(crate) enum Local {
    #[default]
    None,
    /// The request that was starting a transaction is refused with this error: skip
    /// it up to its Query or Sync, answer the error and ReadyForQuery `I`.
    Refuse(ProxyError),
    /// The client's transaction was lost with its server connection (lameduck, or a
    /// failed primary): answer ROLLBACK, and everything else with an error, until the
    /// transaction ends.
    Aborted(Aborted),
}

/// A transaction the proxy answers for after losing its server connection.
#[derive(Debug, Default)]
pub(crate) struct Aborted {
    /// The error that ended the transaction, not yet delivered.
    first: Option<ProxyError>,
    /// This extended-protocol batch already got its error (the rest is skipped to Sync).
    errored: bool,
    /// This batch runs a transaction-control statement: `Some(true)` COMMIT/END,
    /// `Some(false)` ROLLBACK/ABORT.
    ending: Option<bool>,
    /// It ran: the Sync ends the transaction.
    ended: bool,
}

impl Aborted {
    fn new(first: Option<ProxyError>) -> Self {
        Self {
            first,
            ..Self::default()
        }
    }

    /// Answers a statement in the failed transaction: the cancellation the first time,
    /// then 25P02 as PostgreSQL does; once per extended-protocol batch.
    fn fail(&mut self, out: &mut BytesMut) {
        if self.errored {
            return;
        }
        let err = self.first.take().unwrap_or_else(aborted_error);
        err.encode(out);
        m::count_error("proxy", err.code);
        self.errored = true;
    }
}

/// The SQL text of a Parse message's body.
fn parse_sql(body: &[u8]) -> Option<&[u8]> {
    let name_end = body.iter().position(|&c| c == 0)?;
    let rest = &body[name_end + 1..];
    let sql_end = rest.iter().position(|&c| c == 0)?;
    Some(&rest[..sql_end])
}

/// The statement name of a Bind message's body.
fn bind_statement(body: &[u8]) -> Option<&[u8]> {
    let portal_end = body.iter().position(|&c| c == 0)?;
    let rest = &body[portal_end + 1..];
    let end = rest.iter().position(|&c| c == 0)?;
    Some(&rest[..end])
}

/// How often one request may be re-sent after a retriable refusal.
const MAX_RETRIES: u8 = 3;

/// A request kept for retry larger than this is not kept (it is relayed as usual).
const MAX_RETRY_BYTES: usize = 256 * 1024;

/// Retry rules (DESIGN.md): the first request of a transaction, while it is not known
/// whether anything of it ran. Its bytes are kept as the client sent them, and the
/// server's side-effect-free answers (ParseComplete, BindComplete, RowDescription, …)
/// are held back until a CommandComplete, DataRow, COPY response or any other answer
/// shows that the request ran — or until a `25006`/`57P03` error shows that its first
/// statement was refused, in which case it may go to the next primary.
#[derive(Debug, Default)]
struct Probation {
    /// Holding: the outcome is not known yet.
    active: bool,
    /// The request's bytes, as the client sent them.
    raw: BytesMut,
    /// The request's last message (Query, Sync) has been sent: no more client bytes are
    /// read until the outcome is known.
    complete: bool,
    /// Server bytes held back from the client.
    held: BytesMut,
    /// The first statement was refused with this retriable reason.
    refused: Option<&'static str>,
    /// ReadyForQuery arrived after the refusal: the request may be re-sent.
    ready: bool,
}

impl Probation {
    fn begin(&mut self) {
        self.active = true;
        self.raw.clear();
        self.held.clear();
        self.complete = false;
        self.refused = None;
        self.ready = false;
    }

    /// Sending the request, message by message (or part by part, up to the end of its
    /// last message).
    fn record(&mut self, bytes: &[u8]) {
        if self.active {
            if self.raw.len() + bytes.len() > MAX_RETRY_BYTES {
                self.active = false;
            } else {
                self.raw.extend_from_slice(bytes);
            }
        }
    }

    /// Waiting for the outcome once the request's last message is through
    /// (`at_boundary`): the client's further bytes stay unread.
    fn waiting(&self, at_boundary: bool) -> bool {
        self.active && self.complete && at_boundary
    }

    /// Stops holding; returns what was held (to go to the client first).
    fn release(&mut self) -> BytesMut {
        self.active = false;
        self.refused = None;
        self.ready = false;
        std::mem::take(&mut self.held)
    }
}

/// Server messages that show a request ran (or began to).
fn shows_execution(tag: u8) -> bool {
    matches!(
        tag,
        b'C' | b'D' | b'G' | b'H' | b'W' | b'I' | b's' | b'V' | b'A'
    )
}

/// The retry reason for a refusal of a first statement, if it is retriable.
fn retriable(code: &str) -> Option<&'static str> {
    match code {
        sqlstate::READ_ONLY_SQL_TRANSACTION => Some("read_only"),
        sqlstate::CANNOT_CONNECT_NOW => Some("cannot_connect_now"),
        _ => None,
    }
}

/// Which pool a client's transactions use: the user and server database are fixed,
/// the address follows the shard's primary.
pub(crate) struct PoolTarget {
    pub user: String,
    pub database: String,
    pub password: Option<String>,
}

/// The client's side of a transaction-mode session.
pub(crate) struct Txn<'a> {
    pub shared: &'a Shared,
    pub pool: Arc<Pool>,
    pub shard: &'a str,
    state: &'a Arc<Shard>,
    target: PoolTarget,
    /// The generation `pool` belongs to; a transaction is registered on it while attached.
    gen: Arc<Generation>,
    /// Held while a released request's transaction runs (drain concurrency).
    release: Option<Release>,
    local: Local,
    pub registration: Registration,
    /// Startup parameters the client asked for (absent: the server default); applied
    /// with SET to whichever server connection serves it.
    pub desired: HashMap<String, String>,
    /// The client's named statements.
    stmts: HashMap<Bytes, StmtDef>,
    /// Client statements whose Parse was sent but not yet answered: a Parse the server
    /// skips after an error must not define the name.
    defining: HashMap<Bytes, StmtDef>,
    backend: Option<Box<Backend>>,
    /// Server-side names sent in a Parse whose ParseComplete has not arrived.
    preparing: HashSet<Bytes>,
    replies: VecDeque<Reply>,
    /// ReadyForQuery messages the server still owes.
    pending: usize,
    /// Extended-protocol messages sent since the last Sync.
    in_extended: bool,
    status: TransactionStatus,
    server_fatal: bool,
    /// The FATAL the server sent before closing (SQLSTATE, message), kept from the
    /// client until the connection is gone.
    fatal: Option<(String, String)>,
    /// The first request of the current transaction, while it may still be re-sent.
    probe: Probation,
    /// How many more times a refused first request may be re-sent.
    retries_left: u8,
    /// A request in flight ends the transaction block (COMMIT, ROLLBACK, …): if the
    /// server is lost under it, the client is outside a transaction afterwards.
    ending: bool,
    request_started: Option<Instant>,
    txn_started: Option<Instant>,
    out: BytesMut,
    /// Bytes relayed since the counters were last updated (once per ReadyForQuery).
    up: u64,
    down: u64,
    handles: crate::relay::session_mode::Handles,
}

impl<'a> Txn<'a> {
    pub fn new(
        shared: &'a Shared,
        state: &'a Arc<Shard>,
        target: PoolTarget,
        registration: Registration,
        desired: HashMap<String, String>,
    ) -> Self {
        let gen = state.current();
        let pool = pool_for(shared, &target, &gen, &state.name);
        Self {
            shared,
            pool,
            shard: &state.name,
            state,
            target,
            gen,
            release: None,
            local: Local::None,
            registration,
            desired,
            stmts: HashMap::new(),
            defining: HashMap::new(),
            backend: None,
            preparing: HashSet::new(),
            replies: VecDeque::new(),
            pending: 0,
            in_extended: false,
            status: TransactionStatus::Idle,
            server_fatal: false,
            fatal: None,
            probe: Probation::default(),
            retries_left: MAX_RETRIES,
            ending: false,
            request_started: None,
            txn_started: None,
            out: BytesMut::new(),
            up: 0,
            down: 0,
            handles: crate::relay::session_mode::Handles::new(),
        }
    }

    fn flush_bytes(&mut self) {
        if self.up > 0 {
            self.handles.up.increment(std::mem::take(&mut self.up));
        }
        if self.down > 0 {
            self.handles.down.increment(std::mem::take(&mut self.down));
        }
    }

    /// Passes the shard's gate (waiting in the failover buffer while the primary
    /// changes), then checks a connection out of the serving primary's pool and brings
    /// its parameters in line with the client's. `bytes`: the request's size so far.
    pub async fn attach(&mut self, bytes: usize) -> Result<(), AttachError> {
        if self.backend.is_some() {
            return Ok(());
        }
        let mut b = loop {
            self.enter(bytes).await?;
            let b = match self.pool.checkout().await {
                Ok(b) => b,
                Err(PoolError::Connect(e)) if e.primary_may_be_gone() => {
                    self.leave();
                    // Nothing was sent: if the primary is indeed gone, wait in the
                    // buffer for the next one instead of failing the request.
                    let gen = Arc::clone(&self.gen);
                    if crate::shard::health::suspect(
                        self.shared,
                        self.state,
                        &gen,
                        Report::ConnectFailed,
                    )
                    .await
                    {
                        count_retry(self.shard, "connect_failed");
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
                break b;
            }
            self.pool.checkin(b);
            self.leave();
        };
        // Boxed: rare (only when parameters differ) and not small.
        match Box::pin(sync_params(&mut b, &self.desired)).await {
            Ok(()) => {}
            Err(e) => {
                self.pool.discard(b);
                self.leave();
                return Err(e);
            }
        }
        self.registration.set_server(Some(ServerKey {
            addr: b.peer,
            pid: b.pid,
            key: b.key,
        }));
        self.backend = Some(b);
        Ok(())
    }

    /// The gate ([`crate::shard::control::admit`]); the pool follows the generation.
    async fn enter(&mut self, bytes: usize) -> Result<(), AttachError> {
        let before = self.gen.id;
        self.release =
            crate::shard::control::admit(self.shared, self.state, &mut self.gen, bytes).await?;
        if self.gen.id != before {
            self.pool = pool_for(self.shared, &self.target, &self.gen, self.shard);
        }
        Ok(())
    }

    /// Ends the transaction's registration on its generation.
    fn leave(&mut self) {
        self.gen.leave();
        self.release = None;
    }

    /// The first request's outcome is known (or it can no longer be re-sent): returns
    /// the server bytes held back, which go to the client before anything else.
    fn end_probe(&mut self) -> BytesMut {
        self.retries_left = MAX_RETRIES;
        self.probe.release()
    }

    /// The server's parameters as the client should see them at startup.
    pub fn startup_params(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .backend
            .as_ref()
            .map(|b| {
                b.params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn clean(&self) -> bool {
        self.status == TransactionStatus::Idle
            && self.pending == 0
            && !self.in_extended
            && self.replies.is_empty()
            && !self.server_fatal
    }

    /// Returns the connection to the pool if the transaction is over, else closes it
    /// when `force` (the client is gone): a dirty connection is never reused.
    /// `stream_clean`: the relay holds no unprocessed bytes read from this connection.
    pub fn detach(&mut self, force: bool, stream_clean: bool) {
        if !(self.clean() || force) {
            return;
        }
        let Some(b) = self.backend.take() else { return };
        self.leave();
        self.registration.set_server(None);
        self.preparing.clear();
        self.defining.clear();
        if self.clean() && stream_clean && b.conn.rbuf.is_empty() {
            self.pool.checkin(b);
        } else {
            self.pool.discard(b);
        }
        self.replies.clear();
        self.pending = 0;
        self.in_extended = false;
        self.status = TransactionStatus::Idle;
    }

    fn ensure_prepared(&mut self, def: &StmtDef) {
        let b = self.backend.as_mut().expect("attached");
        if b.prepared.get(&def.server_name).is_some() {
            self.shared.prepared.hit.increment(1);
            return;
        }
        if self.preparing.contains(&def.server_name) {
            return;
        }
        self.send_parse(
            def,
            Reply::Swallow {
                register: Some(def.server_name.clone()),
            },
        );
    }

    /// Prepares `def` on the connection under its server name (a cache miss), making
    /// room first; `reply` says what to do with the ParseComplete.
    fn send_parse(&mut self, def: &StmtDef, reply: Reply) {
        self.shared.prepared.miss.increment(1);
        self.evict_for_one();
        FrontendMessage::Parse {
            name: def.server_name.clone(),
            sql: def.sql.clone(),
            param_types: def.param_types.clone(),
        }
        .encode(&mut self.out);
        self.preparing.insert(def.server_name.clone());
        self.replies.push_back(reply);
    }

    /// Makes room in the connection's statement cache for one more statement.
    fn evict_for_one(&mut self) {
        let b = self.backend.as_mut().expect("attached");
        let cap = b.prepared.cap().get();
        while b.prepared.len() + self.preparing.len() >= cap {
            let Some((victim, ())) = b.prepared.pop_lru() else {
                break;
            };
            self.shared.prepared.eviction.increment(1);
            FrontendMessage::Close {
                target: Target::Statement,
                name: victim,
            }
            .encode(&mut self.out);
            self.replies.push_back(Reply::Swallow { register: None });
        }
    }

    /// Translates one whole inspected client message (Parse, Bind, Describe, Close).
    fn translate(&mut self, frame: Frame) -> Result<(), handoff_protocol::FrameError> {
        self.in_extended = true;
        let raw = frame.clone();
        match FrontendMessage::parse(frame)? {
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            } if !name.is_empty() => {
                self.ending |= ends_transaction(&sql).is_some();
                let def = StmtDef::new(sql, param_types);
                let b = self.backend.as_mut().expect("attached");
                if b.prepared.get(&def.server_name).is_some() {
                    self.shared.prepared.hit.increment(1);
                    noop_close(&mut self.out);
                    self.replies.push_back(Reply::AsParseComplete {
                        define: name.clone(),
                    });
                } else if self.preparing.contains(&def.server_name) {
                    noop_close(&mut self.out);
                    self.replies.push_back(Reply::AsParseComplete {
                        define: name.clone(),
                    });
                } else {
                    let reply = Reply::Pass {
                        register: Some(def.server_name.clone()),
                        define: Some(name.clone()),
                    };
                    self.send_parse(&def, reply);
                }
                self.defining.insert(name, def);
            }
            FrontendMessage::Parse { sql, .. } => {
                self.ending |= ends_transaction(&sql).is_some();
                raw.encode(&mut self.out);
                self.replies.push_back(Reply::Pass {
                    register: None,
                    define: None,
                });
            }
            FrontendMessage::Bind {
                portal,
                statement,
                rest,
            } => match self.lookup(&statement) {
                Some(def) => {
                    self.ending |= ends_transaction(&def.sql).is_some();
                    self.ensure_prepared(&def);
                    FrontendMessage::Bind {
                        portal,
                        statement: def.server_name,
                        rest,
                    }
                    .encode(&mut self.out);
                }
                None => raw.encode(&mut self.out),
            },
            FrontendMessage::Describe {
                target: Target::Statement,
                name,
            } if !name.is_empty() => match self.lookup(&name) {
                Some(def) => {
                    self.ensure_prepared(&def);
                    FrontendMessage::Describe {
                        target: Target::Statement,
                        name: def.server_name,
                    }
                    .encode(&mut self.out);
                }
                None => raw.encode(&mut self.out),
            },
            FrontendMessage::Close {
                target: Target::Statement,
                name,
            } if !name.is_empty() => {
                // The server copy stays cached for other clients; the client's name goes.
                self.stmts.remove(&name);
                self.defining.remove(&name);
                noop_close(&mut self.out);
                self.replies.push_back(Reply::Pass {
                    register: None,
                    define: None,
                });
            }
            FrontendMessage::Close { .. } => {
                raw.encode(&mut self.out);
                self.replies.push_back(Reply::Pass {
                    register: None,
                    define: None,
                });
            }
            _ => raw.encode(&mut self.out),
        }
        Ok(())
    }

    /// The client's statement by name: one being defined in flight wins.
    fn lookup(&self, name: &Bytes) -> Option<StmtDef> {
        self.defining
            .get(name)
            .or_else(|| self.stmts.get(name))
            .cloned()
    }

    /// A client Parse succeeded: its name is now defined.
    fn define(&mut self, name: Bytes) {
        if let Some(def) = self.defining.remove(&name) {
            self.stmts.insert(name, def);
        }
    }

    fn on_request(&mut self, now: Instant) {
        if self.request_started.is_none() {
            self.request_started = Some(now);
        }
        if self.txn_started.is_none() {
            self.txn_started = Some(now);
        }
    }

    fn on_ready(&mut self, status: TransactionStatus) {
        let now = Instant::now();
        self.pending = self.pending.saturating_sub(1);
        if self.pending == 0 {
            self.ending = false;
        }
        self.status = status;
        while let Some(r) = self.replies.pop_front() {
            if r == Reply::SyncMark {
                break;
            }
        }
        if self.pending == 0 {
            if let Some(t) = self.request_started.take() {
                self.handles.query.record(now - t);
            }
        }
        if status == TransactionStatus::Idle {
            if let Some(t) = self.txn_started.take() {
                self.handles.transaction.record(now - t);
            }
        }
        self.flush_bytes();
    }

    /// After an ErrorResponse the server skips to the next Sync: the replies promised
    /// for the skipped messages will never come.
    fn on_error(&mut self) {
        while let Some(r) = self.replies.front() {
            match r {
                Reply::SyncMark => break,
                Reply::Pass { register, define } => {
                    if let Some(n) = register {
                        self.preparing.remove(n);
                    }
                    if let Some(d) = define {
                        self.defining.remove(d);
                    }
                    self.replies.pop_front();
                }
                Reply::Swallow { register } => {
                    if let Some(n) = register {
                        self.preparing.remove(n);
                    }
                    self.replies.pop_front();
                }
                Reply::AsParseComplete { define } => {
                    self.defining.remove(define);
                    self.replies.pop_front();
                }
            }
        }
    }

    /// What to do with a ParseComplete/CloseComplete: `Some(tag)` to forward it with
    /// that tag, `None` to drop it.
    fn on_complete(&mut self, tag: u8) -> Option<u8> {
        let reply = match self.replies.front() {
            Some(Reply::SyncMark) | None => return Some(tag),
            Some(_) => self.replies.pop_front().expect("front exists"),
        };
        let confirm = |this: &mut Self, name: Option<Bytes>| {
            if let Some(n) = name {
                this.preparing.remove(&n);
                if tag == btag::PARSE_COMPLETE {
                    if let Some(b) = this.backend.as_mut() {
                        b.prepared.put(n, ());
                    }
                }
            }
        };
        match reply {
            Reply::Pass { register, define } => {
                confirm(self, register);
                if let Some(d) = define {
                    if tag == btag::PARSE_COMPLETE {
                        self.define(d);
                    }
                }
                Some(tag)
            }
            Reply::Swallow { register } => {
                confirm(self, register);
                None
            }
            Reply::AsParseComplete { define } => {
                self.define(define);
                Some(btag::PARSE_COMPLETE)
            }
            Reply::SyncMark => unreachable!("handled above"),
        }
    }
}

/// The pool of `target` on `gen`'s primary.
fn pool_for(shared: &Shared, target: &PoolTarget, gen: &Generation, shard: &str) -> Arc<Pool> {
    let key = PoolKey {
        user: target.user.clone(),
        database: target.database.clone(),
        addr: gen.primary.clone(),
    };
    shared.pools.get(&key, target.password.as_deref(), shard)
}

fn noop_close(out: &mut BytesMut) {
    FrontendMessage::Close {
        target: Target::Statement,
        name: Bytes::from_static(NOOP_NAME),
    }
    .encode(out);
}

pub(crate) fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// True for a parameter name that can be written into SET unquoted.
pub fn valid_param_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Runs SET/RESET so the connection's startup parameters match the client's.
async fn sync_params(
    b: &mut Backend,
    desired: &HashMap<String, String>,
) -> Result<(), AttachError> {
    let mut sql = String::new();
    let mut names: Vec<&String> = desired.keys().chain(b.applied.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let want = desired.get(name);
        if want == b.applied.get(name) {
            continue;
        }
        match want {
            Some(v) => sql.push_str(&format!("SET {name} = {};", quote_literal(v))),
            None => sql.push_str(&format!("RESET {name};")),
        }
    }
    if sql.is_empty() {
        return Ok(());
    }
    let mut buf = BytesMut::new();
    FrontendMessage::Query {
        sql: Bytes::from(sql),
    }
    .encode(&mut buf);
    b.conn
        .send_raw(&buf)
        .await
        .map_err(|e| AttachError::Io(e.into()))?;
    let mut error = None;
    loop {
        let frame = b
            .conn
            .read_frame(MAX_STARTUP_MESSAGE)
            .await
            .map_err(AttachError::Io)?;
        match BackendMessage::parse(frame).map_err(|e| AttachError::Io(e.into()))? {
            BackendMessage::ParameterStatus { name, value } => {
                b.params.insert(name, value);
            }
            BackendMessage::ErrorResponse(f) => error = Some(f),
            BackendMessage::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    if let Some(f) = error {
        return Err(AttachError::Rejected(f));
    }
    b.applied = desired.clone();
    Ok(())
}

/// Counts a request sent again to the next primary.
fn count_retry(shard: &str, reason: &'static str) {
    metrics::counter!(crate::shard::health::metric::RETRIES, "shard" => shard.to_string(), "reason" => reason)
        .increment(1);
}

fn inspect_client(t: u8) -> bool {
    matches!(t, ftag::PARSE | ftag::BIND | ftag::DESCRIBE | ftag::CLOSE)
}

fn inspect_server(t: u8) -> bool {
    matches!(
        t,
        btag::READY_FOR_QUERY
            | btag::ERROR_RESPONSE
            | btag::PARSE_COMPLETE
            | btag::CLOSE_COMPLETE
            | btag::PARAMETER_STATUS
    )
}

/// [`run`], boxed from a plain function so the caller's future holds only a pointer.
pub(crate) fn run_boxed<'a>(
    client: Conn,
    txn: Box<Txn<'a>>,
    shutdown: Signal,
) -> std::pin::Pin<Box<impl std::future::Future<Output = End> + 'a>> {
    Box::pin(run(client, *txn, shutdown))
}

/// Relays a logged-in transaction-mode client until it leaves.
pub(crate) async fn run(mut client: Conn, mut txn: Txn<'_>, shutdown: Signal) -> End {
    client.release_buffers();
    let mut cscan = Scanner::new(txn.shared.config.max_message_size, MAX_CLIENT_MESSAGE);
    let (client_idle_timeout, idle_transaction_timeout) = (
        txn.shared.config.client_idle_timeout,
        txn.shared.config.idle_transaction_timeout,
    );
    let mut sscan = Scanner::new(MAX_INSPECT, i32::MAX as usize);
    let mut sbuf = BytesMut::new();
    let mut watched = Phase::Draining;
    let mut phase_change = Box::pin(reach(shutdown.clone(), Phase::Draining));
    // Lameduck's cancellation of the generation this session's transaction runs on;
    // made again only when the session moves to another generation.
    let mut killed: Option<(u64, KillFuture)> = None;
    let end = loop {
        if !client.rbuf.is_empty() && !txn.probe.waiting(cscan.at_boundary()) {
            match client_bytes(&mut client, &mut cscan, &mut txn).await {
                Ok(true) => {}
                Ok(false) => break End::Terminated,
                Err(end) => break end,
            }
        }
        let phase = shutdown.phase();
        let idle = txn.backend.is_none() && cscan.at_boundary() && client.rbuf.is_empty();
        if phase == Phase::Closing || (phase == Phase::Draining && idle) {
            let err = crate::error::shutting_down();
            send_error(&mut client.stream, &err).await;
            break End::Shutdown;
        }
        let attached = txn.backend.is_some();
        if attached {
            buffers::ready(&mut sbuf);
            if killed.as_ref().map(|k| k.0) != Some(txn.gen.id) {
                killed = Some((txn.gen.id, Box::pin(txn.gen.killed())));
            }
        } else {
            // An idle client holds no buffers: they come from the pool when bytes arrive.
            buffers::release(&mut client.rbuf);
            buffers::release(&mut sbuf);
            buffers::release(&mut txn.out);
        }
        // `readable()` and `read_buf` are cancel-safe: a branch that loses the race has
        // consumed nothing.
        let reading = !txn.probe.waiting(cscan.at_boundary());
        // Idle limits (off by default: no timer on the hot path then).
        let quiet = cscan.at_boundary() && client.rbuf.is_empty();
        let in_txn_idle = quiet
            && match txn.backend {
                Some(_) => {
                    txn.pending == 0 && !txn.in_extended && txn.status != TransactionStatus::Idle
                }
                None => matches!(txn.local, Local::Aborted(_)),
            };
        let limit = if idle && matches!(txn.local, Local::None) && !client_idle_timeout.is_zero() {
            Some((client_idle_timeout, "client_idle"))
        } else if in_txn_idle && !idle_transaction_timeout.is_zero() {
            Some((idle_transaction_timeout, "idle_transaction"))
        } else {
            None
        };
        let idle_timer = async move {
            match limit {
                Some((d, _)) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = client_read(&mut client), if reading => match r {
                Some(Ok(0)) | Some(Err(_)) => break End::ClientGone,
                Some(Ok(_)) | None => {}
            },
            r = async {
                let b = txn.backend.as_mut().expect("guarded by `attached`");
                b.conn.stream.read_buf(&mut sbuf).await
            }, if attached => match r {
                Ok(0) | Err(_) if txn.server_fatal && txn.fatal.is_none() => {
                    // The server ended the connection with a FATAL the client has seen.
                    break End::ServerGone;
                }
                Ok(0) | Err(_) => {
                    // The primary went away under a request: an error for that request
                    // (it may have committed), and the session goes on.
                    let server_clean = sscan.at_boundary();
                    sbuf.clear();
                    sscan = Scanner::new(MAX_INSPECT, i32::MAX as usize);
                    let err = txn.lost_error();
                    tracing::info!(shard = txn.shard, error = %err.message, "server connection lost under a request");
                    if let Err(end) = txn.abandon(&mut client, err, false, server_clean, cscan.at_boundary()).await {
                        break end;
                    }
                }
                Ok(_) => {
                    if let Err(end) = server_bytes(&mut sbuf, &mut sscan, &mut client, &mut txn).await {
                        break end;
                    }
                    if txn.probe.ready {
                        let stream_clean = sbuf.is_empty() && sscan.at_boundary();
                        if let Err(end) = txn.settle_refusal(&mut client, stream_clean).await {
                            break end;
                        }
                    }
                    // Only between messages in both directions: a client half-way
                    // through sending a message stays on this server connection.
                    if txn.clean() && sscan.at_boundary() && sbuf.is_empty() && cscan.at_boundary() {
                        txn.detach(false, true);
                    }
                }
            },
            _ = &mut phase_change, if phase < watched => {
                watched = Phase::Closing;
                phase_change = Box::pin(reach(shutdown.clone(), Phase::Closing));
            }
            _ = idle_timer => {
                let kind = limit.map_or("", |l| l.1);
                metrics::counter!(m::CLIENT_TIMEOUTS_TOTAL, "kind" => kind).increment(1);
                let err = if kind == "client_idle" {
                    ProxyError::fatal(
                        sqlstate::IDLE_SESSION_TIMEOUT,
                        format!("terminating connection due to idle-session timeout (HANDOFF_CLIENT_IDLE_TIMEOUT is {client_idle_timeout:?})"),
                    )
                } else {
                    ProxyError::fatal(
                        sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                        format!("terminating connection due to idle-in-transaction timeout (HANDOFF_IDLE_TRANSACTION_TIMEOUT is {idle_transaction_timeout:?}); the transaction was rolled back"),
                    )
                };
                tracing::info!(kind, "client idle timeout");
                send_error(&mut client.stream, &err).await;
                break End::Timeout;
            }
            _ = async { killed.as_mut().expect("set when attached").1.as_mut().await }, if attached => {
                let server_clean = sscan.at_boundary();
                sbuf.clear();
                sscan = Scanner::new(MAX_INSPECT, i32::MAX as usize);
                if let Err(end) = txn.cancelled_by_lameduck(&mut client, server_clean, cscan.at_boundary()).await {
                    break end;
                }
            }
        }
    };
    // A message half-forwarded in either direction makes the connection unusable.
    txn.detach(
        true,
        sbuf.is_empty() && sscan.at_boundary() && cscan.at_boundary(),
    );
    txn.flush_bytes();
    end
}

type KillFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Waits for client bytes and reads them into `client.rbuf`: `None` if the socket
/// turned out to have nothing after all. A plain socket is waited on without a buffer
/// (an idle client holds none); a TLS stream is read into a buffer directly, since
/// decrypted bytes may already wait inside the TLS session. Cancel-safe.
async fn client_read(client: &mut Conn) -> Option<std::io::Result<usize>> {
    match &mut client.stream {
        crate::net::stream::Stream::Plain(s) => {
            if let Err(e) = s.readable().await {
                return Some(Err(e));
            }
            buffers::ready(&mut client.rbuf);
            read_now(s, &mut client.rbuf).await
        }
        other => {
            buffers::ready(&mut client.rbuf);
            Some(other.read_buf(&mut client.rbuf).await)
        }
    }
}

/// Reads what the socket has now without waiting: `None` if nothing is there after all.
/// Unlike `try_read_buf` this goes through `poll_read`, which marks the socket drained
/// after a short read, so the next wait does not start with a read that finds nothing.
async fn read_now(
    stream: &mut tokio::net::TcpStream,
    buf: &mut BytesMut,
) -> Option<std::io::Result<usize>> {
    use std::future::Future;
    use std::task::Poll;
    std::future::poll_fn(|cx| {
        let read = std::pin::pin!(stream.read_buf(buf));
        match read.poll(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending => Poll::Ready(None),
        }
    })
    .await
}

async fn reach(mut signal: Signal, phase: Phase) {
    signal.reached(phase).await
}

/// Forwards the client's complete messages, attaching a server connection at the start
/// of a transaction (through the shard's gate). `Ok(false)`: the client sent Terminate.
async fn client_bytes(
    client: &mut Conn,
    scan: &mut Scanner,
    txn: &mut Txn<'_>,
) -> Result<bool, End> {
    let now = Instant::now();
    let mut pos = 0;
    let mut keep_going = true;
    let mut answers = BytesMut::new();
    txn.out.clear();
    loop {
        // The transaction's first request is complete and may yet be re-sent: what the
        // client sends next waits until its outcome is known.
        if txn.probe.waiting(scan.at_boundary()) {
            break;
        }
        let local = !matches!(txn.local, Local::None);
        let step = match scan.step(&client.rbuf[pos..], |t| {
            if local {
                matches!(t, ftag::QUERY | ftag::PARSE | ftag::BIND)
            } else {
                inspect_client(t)
            }
        }) {
            Ok(s) => s,
            Err(e) => {
                flush_to_server(txn).await?;
                write_client(client, &answers).await?;
                protocol_error(&mut client.stream, &e).await;
                return Err(End::ClientProtocol);
            }
        };
        let (tag, len, whole) = match step {
            Step::NeedMore => break,
            Step::Pass { len, tag } => (tag, len, false),
            Step::Message { tag, len } => (Some(tag), len, true),
        };
        if let (Some(t), false) = (tag, whole) {
            if !local && inspect_client(t) {
                // A message the proxy must parse whole, over the limit: the stream
                // cannot be followed past it.
                metrics::counter!(m::MESSAGES_TOO_LARGE_TOTAL).increment(1);
                flush_to_server(txn).await?;
                write_client(client, &answers).await?;
                let max = txn.shared.config.max_message_size;
                let err = ProxyError::fatal(
                    sqlstate::PROGRAM_LIMIT_EXCEEDED,
                    format!(
                        "a '{}' message larger than HANDOFF_MAX_MESSAGE_SIZE ({max} bytes) cannot be relayed",
                        t as char
                    ),
                );
                send_error(&mut client.stream, &err).await;
                return Err(End::TooLarge);
            }
        }
        if let Some(t) = tag {
            if t == ftag::TERMINATE {
                pos += len;
                keep_going = false;
                break;
            }
            if txn.backend.is_none() && matches!(txn.local, Local::None) {
                match txn.attach(client.rbuf.len() - pos).await {
                    Ok(()) => {
                        if txn.retries_left > 0 {
                            txn.probe.begin();
                        }
                    }
                    Err(e) if e.is_refusal() => {
                        let err = e.to_client(txn.shard);
                        tracing::info!(shard = txn.shard, error = %err, "request refused");
                        txn.local = Local::Refuse(err);
                    }
                    Err(e) => {
                        let err = e.to_client(txn.shard);
                        tracing::warn!(error = %err, "no server connection for client");
                        write_client(client, &answers).await?;
                        send_error(&mut client.stream, &err).await;
                        return Err(End::ServerGone);
                    }
                }
            }
        }
        if !matches!(txn.local, Local::None) {
            // Answered here, never relayed.
            if whole {
                let body = &client.rbuf[pos + 5..pos + len];
                txn.answer_locally(tag.expect("a whole message has a tag"), body, &mut answers);
            } else if let Some(t) = tag {
                txn.answer_locally(t, &[], &mut answers);
            }
            pos += len;
            continue;
        }
        if txn.probe.active {
            txn.probe.record(&client.rbuf[pos..pos + len]);
            match tag {
                Some(ftag::QUERY | ftag::SYNC | ftag::FUNCTION_CALL) => txn.probe.complete = true,
                // A client that flushes waits for answers before it finishes the
                // request; COPY data means the request already ran.
                Some(ftag::FLUSH | ftag::COPY_DATA | ftag::COPY_DONE | ftag::COPY_FAIL) => {
                    txn.probe.active = false;
                }
                _ => {}
            }
            if !txn.probe.active {
                let held = txn.end_probe();
                answers.extend_from_slice(&held);
            }
        }
        if let Some(t) = tag {
            txn.on_request(now);
            if t == ftag::QUERY {
                let head = &client.rbuf[pos..pos + len];
                let head = &head[5.min(head.len())..head.len().min(5 + 32)];
                txn.ending |= ends_transaction(head).is_some();
            }
            match t {
                ftag::QUERY | ftag::FUNCTION_CALL => {
                    txn.pending += 1;
                    txn.replies.push_back(Reply::SyncMark);
                }
                ftag::SYNC => {
                    txn.pending += 1;
                    txn.in_extended = false;
                    txn.replies.push_back(Reply::SyncMark);
                }
                ftag::EXECUTE | ftag::FLUSH => txn.in_extended = true,
                _ => {}
            }
        }
        if whole {
            // Everything before it is already copied into `out`: take the message off
            // the buffer without copying it (Binds carry parameter values).
            client.rbuf.advance(pos);
            pos = 0;
            let mut msg = client.rbuf.split_to(len).freeze();
            let tag = msg[0];
            msg.advance(5);
            if let Err(e) = txn.translate(Frame { tag, body: msg }) {
                flush_to_server(txn).await?;
                protocol_error(&mut client.stream, &e).await;
                return Err(End::ClientProtocol);
            }
            continue;
        }
        txn.out.extend_from_slice(&client.rbuf[pos..pos + len]);
        pos += len;
    }
    client.rbuf.advance(pos);
    flush_to_server(txn).await?;
    write_client(client, &answers).await?;
    Ok(keep_going)
}

/// What the first word of a simple query says about ending a transaction.
fn ends_transaction(sql: &[u8]) -> Option<bool> {
    // Runs for every simple query: bytes only, no allocation.
    let start = sql.iter().position(|c| !c.is_ascii_whitespace())?;
    let rest = &sql[start..];
    let len = rest
        .iter()
        .position(|c| !c.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    let word = &rest[..len];
    let is = |w: &str| word.eq_ignore_ascii_case(w.as_bytes());
    if is("ROLLBACK") || is("ABORT") {
        Some(false)
    } else if is("COMMIT") || is("END") {
        Some(true)
    } else {
        None
    }
}

/// What PostgreSQL answers in a failed transaction block (25P02).
fn aborted_error() -> ProxyError {
    ProxyError::error(
        sqlstate::IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

fn encode_ready(out: &mut BytesMut, status: TransactionStatus) {
    BackendMessage::ReadyForQuery(status).encode(out);
}

impl Txn<'_> {
    /// Answers one client message while the proxy speaks for the server ([`Local`]).
    /// `body` is the whole message for a Query, Parse or Bind, empty otherwise.
    fn answer_locally(&mut self, tag: u8, body: &[u8], out: &mut BytesMut) {
        let ends_request = tag == ftag::QUERY || tag == ftag::SYNC;
        match std::mem::take(&mut self.local) {
            Local::None => {}
            Local::Refuse(err) => {
                if ends_request {
                    err.encode(out);
                    m::count_error("proxy", err.code);
                    encode_ready(out, TransactionStatus::Idle);
                } else {
                    self.local = Local::Refuse(err);
                }
            }
            Local::Aborted(mut a) => {
                if tag == ftag::QUERY {
                    let verdict = ends_transaction(body.strip_suffix(&[0]).unwrap_or(body));
                    match verdict {
                        // ROLLBACK, or COMMIT of a transaction that was cancelled: the
                        // transaction is over either way; COMMIT hears of the
                        // cancellation once.
                        Some(commit) => {
                            match a.first.take().filter(|_| commit) {
                                Some(err) => {
                                    err.encode(out);
                                    m::count_error("proxy", err.code);
                                }
                                None => BackendMessage::CommandComplete {
                                    tag: "ROLLBACK".into(),
                                }
                                .encode(out),
                            }
                            encode_ready(out, TransactionStatus::Idle);
                        }
                        None => {
                            a.fail(out);
                            encode_ready(out, TransactionStatus::Failed);
                            a.errored = false;
                            self.local = Local::Aborted(a);
                        }
                    }
                    return;
                }
                // The extended protocol, as PostgreSQL answers it in a failed
                // transaction: transaction control goes through, Close and Sync are
                // answered, anything else is an error (once per batch).
                match tag {
                    ftag::PARSE => match parse_sql(body).and_then(ends_transaction) {
                        Some(commit) if !a.errored => {
                            a.ending = Some(commit);
                            BackendMessage::ParseComplete.encode(out);
                        }
                        _ => a.fail(out),
                    },
                    ftag::BIND => {
                        let named = bind_statement(body)
                            .filter(|n| !n.is_empty())
                            .and_then(|n| self.stmts.get(n))
                            .and_then(|d| ends_transaction(&d.sql));
                        if let Some(commit) = named.filter(|_| !a.errored) {
                            a.ending = Some(commit);
                        }
                        if a.ending.is_some() && !a.errored {
                            BackendMessage::BindComplete.encode(out);
                        } else {
                            a.fail(out);
                        }
                    }
                    ftag::DESCRIBE if a.ending.is_some() && !a.errored => {
                        BackendMessage::NoData.encode(out)
                    }
                    ftag::EXECUTE if a.ending.is_some() && !a.errored => {
                        match a.first.take().filter(|_| a.ending == Some(true)) {
                            Some(err) => {
                                err.encode(out);
                                m::count_error("proxy", err.code);
                                a.errored = true;
                            }
                            None => BackendMessage::CommandComplete {
                                tag: "ROLLBACK".into(),
                            }
                            .encode(out),
                        }
                        a.ended = true;
                    }
                    ftag::CLOSE if !a.errored => BackendMessage::CloseComplete.encode(out),
                    ftag::CLOSE | ftag::FLUSH => {}
                    ftag::SYNC => {
                        if a.ended {
                            encode_ready(out, TransactionStatus::Idle);
                            return;
                        }
                        encode_ready(out, TransactionStatus::Failed);
                        a.errored = false;
                        a.ending = None;
                    }
                    ftag::FUNCTION_CALL => {
                        a.fail(out);
                        encode_ready(out, TransactionStatus::Failed);
                        a.errored = false;
                    }
                    _ => a.fail(out),
                }
                self.local = Local::Aborted(a);
            }
        }
    }

    /// Lameduck gave up on this transaction: cancel it on the old primary, drop that
    /// connection, and tell the client (57P01; 08006 when the primary had failed).
    /// `server_clean`: no server message was half-forwarded; `client_clean`: the client
    /// is between messages.
    async fn cancelled_by_lameduck(
        &mut self,
        client: &mut Conn,
        server_clean: bool,
        client_clean: bool,
    ) -> Result<(), End> {
        metrics::counter!(crate::shard::metric::LAMEDUCK_CANCELLED, "shard" => self.shard.to_string())
            .increment(1);
        let timeout = self.shared.config.drain_timeout;
        let err = match self.gen.lost() {
            Some(why) => ProxyError::error(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "lost the primary of shard \"{}\" ({why}) and the transaction did not finish within HANDOFF_DRAIN_TIMEOUT ({timeout:?}); it may or may not have taken effect",
                    self.shard
                ),
            )
            .hint("check whether it took effect before running it again"),
            None => ProxyError::error(
                sqlstate::ADMIN_SHUTDOWN,
                format!(
                    "transaction cancelled: the primary of shard \"{}\" is being replaced and the transaction did not finish within HANDOFF_DRAIN_TIMEOUT ({timeout:?})",
                    self.shard
                ),
            )
            .hint("the transaction was rolled back; retry it"),
        };
        tracing::info!(shard = self.shard, "lameduck cancelled a transaction");
        self.abandon(client, err, true, server_clean, client_clean)
            .await
    }

    /// The error for a server connection that closed under a request: the primary was
    /// lost, and what was running may or may not have committed.
    fn lost_error(&mut self) -> ProxyError {
        let (code, what) = match self.fatal.take() {
            Some((code, msg)) => (
                code,
                format!(
                    "the primary of shard \"{}\" ended the connection while a request ran ({msg})",
                    self.shard
                ),
            ),
            None => {
                crate::shard::health::report(self.state, Report::ConnectionLost);
                (
                    sqlstate::CONNECTION_FAILURE.to_string(),
                    format!(
                        "lost the connection to the primary of shard \"{}\" while a request ran",
                        self.shard
                    ),
                )
            }
        };
        let code: &'static str = match code.as_str() {
            "57P01" => sqlstate::ADMIN_SHUTDOWN,
            "57P02" => sqlstate::CRASH_SHUTDOWN,
            "57P03" => sqlstate::CANNOT_CONNECT_NOW,
            _ => sqlstate::CONNECTION_FAILURE,
        };
        ProxyError::error(code, format!("{what}; it may or may not have taken effect")).hint(
            "the session goes on; check whether the request took effect before running it again",
        )
    }

    /// Gives up the server connection under a running request and answers the client
    /// with `err` in its place (a CancelRequest first when `cancel`). Inside a
    /// transaction block the proxy then answers for the rolled-back transaction until
    /// the client ends it.
    async fn abandon(
        &mut self,
        client: &mut Conn,
        err: ProxyError,
        cancel: bool,
        server_clean: bool,
        client_clean: bool,
    ) -> Result<(), End> {
        // Nothing of a held-back answer reached the client.
        let server_clean = server_clean || self.probe.active;
        if let Some(b) = self.backend.take() {
            if cancel {
                let key = ServerKey {
                    addr: b.peer,
                    pid: b.pid,
                    key: b.key,
                };
                let timeout = self.shared.config.connect_timeout;
                tokio::spawn(crate::backend::cancel::cancel_server(key, timeout));
            }
            self.pool.discard(b);
            self.leave();
        }
        self.registration.set_server(None);
        drop(self.end_probe());
        self.fatal = None;
        let pending = std::mem::take(&mut self.pending);
        let status = self.status;
        self.replies.clear();
        self.preparing.clear();
        self.defining.clear();
        self.in_extended = false;
        self.status = TransactionStatus::Idle;
        self.server_fatal = false;
        if !server_clean {
            return Err(End::ServerGone);
        }
        if !client_clean {
            let fatal = ProxyError::fatal(err.code, err.message.clone());
            send_error(&mut client.stream, &fatal).await;
            return Err(End::ServerGone);
        }
        let mut out = BytesMut::new();
        if pending == 0 {
            // Idle in a transaction, or half-way through sending a request: the end of
            // the next request hears of it.
            self.local = if status == TransactionStatus::Idle {
                Local::Refuse(err)
            } else {
                Local::Aborted(Aborted::new(Some(err)))
            };
            return Ok(());
        }
        let ending = std::mem::take(&mut self.ending);
        let after = if status == TransactionStatus::Idle || ending {
            TransactionStatus::Idle
        } else {
            self.local = Local::Aborted(Aborted::new(None));
            TransactionStatus::Failed
        };
        // Every request still owed an answer was lost with the connection.
        for _ in 0..pending {
            err.encode(&mut out);
            encode_ready(&mut out, after);
        }
        m::count_error("proxy", err.code);
        write_client(client, &out).await
    }
}

impl Txn<'_> {
    /// The first statement of the transaction's first request was refused with
    /// `25006`/`57P03` and nothing of it ran. If the primary is indeed being replaced,
    /// the request goes again, through the buffer, to the next primary; otherwise the
    /// client gets the server's answer.
    async fn settle_refusal(&mut self, client: &mut Conn, stream_clean: bool) -> Result<(), End> {
        let reason = self.probe.refused.unwrap_or("read_only");
        let what = if reason == "read_only" {
            Report::ReadOnly
        } else {
            Report::CannotConnectNow
        };
        let gen = Arc::clone(&self.gen);
        let gone = crate::shard::health::suspect(self.shared, self.state, &gen, what).await;
        if gone && self.clean() && stream_clean && self.retries_left > 0 {
            self.retries_left -= 1;
            count_retry(self.shard, reason);
            tracing::info!(shard = self.shard, reason, "first statement refused by a primary being replaced: sending the request to the next one");
            let mut again = std::mem::take(&mut self.probe.raw);
            self.probe.release();
            self.detach(false, true);
            again.extend_from_slice(&client.rbuf);
            client.rbuf = again;
            return Ok(());
        }
        let held = self.end_probe();
        write_client(client, &held).await
    }
}

async fn flush_to_server(txn: &mut Txn<'_>) -> Result<(), End> {
    if txn.out.is_empty() {
        return Ok(());
    }
    let Some(b) = txn.backend.as_mut() else {
        txn.out.clear();
        return Ok(());
    };
    let r = b.conn.stream.write_all(&txn.out).await;
    txn.up += txn.out.len() as u64;
    txn.out.clear();
    r.map_err(|_| End::ServerGone)
}

/// Forwards the server's messages to the client, handling the replies to the proxy's
/// own messages and tracking ReadyForQuery, errors and parameter changes. While the
/// transaction's first request may still be re-sent ([`Probation`]) its answers are held
/// back instead.
async fn server_bytes(
    buf: &mut BytesMut,
    scan: &mut Scanner,
    client: &mut Conn,
    txn: &mut Txn<'_>,
) -> Result<(), End> {
    let mut pos = 0;
    let mut run = 0;
    loop {
        let step = match scan.step(&buf[pos..], inspect_server) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "protocol error from server");
                let err = crate::error::server_protocol_error(&e);
                send_error(&mut client.stream, &err).await;
                txn.server_fatal = true;
                return Err(End::ServerProtocol);
            }
        };
        let (tag, len, whole) = match step {
            Step::NeedMore => break,
            Step::Pass { len, tag } => (tag, len, false),
            Step::Message { tag, len } => (Some(tag), len, true),
        };
        let Some(tag) = tag else {
            pos += len;
            continue;
        };
        let fields = if tag == btag::ERROR_RESPONSE && whole {
            let mut b = Bytes::copy_from_slice(&buf[pos + 5..pos + len]);
            ErrorFields::parse(&mut b).ok()
        } else {
            None
        };
        let refusal = fields.as_ref().and_then(|f| {
            (f.severity() == Some("ERROR"))
                .then(|| f.code().and_then(retriable))
                .flatten()
        });
        if txn.probe.active && txn.probe.refused.is_none() {
            if refusal.is_some() {
                txn.probe.refused = refusal;
            } else if shows_execution(tag)
                || tag == btag::ERROR_RESPONSE
                || tag == btag::READY_FOR_QUERY
            {
                // The request ran (or nothing in it could have side effects): let
                // the held answers go, in order.
                let held = txn.end_probe();
                write_client(client, &held).await?;
            }
        }
        if !whole {
            pos += len;
            continue;
        }
        let body = &buf[pos + 5..pos + len];
        match tag {
            btag::PARSE_COMPLETE | btag::CLOSE_COMPLETE => match txn.on_complete(tag) {
                Some(t) => buf[pos] = t,
                None => {
                    emit(client, txn, &buf[run..pos]).await?;
                    run = pos + len;
                }
            },
            btag::READY_FOR_QUERY => {
                let status = handoff_protocol::backend::ready_status(body)
                    .map_err(|_| End::ServerProtocol)?;
                txn.on_ready(status);
                if txn.probe.active && txn.probe.refused.is_some() {
                    txn.probe.ready = true;
                }
            }
            btag::ERROR_RESPONSE => {
                if let Some(f) = &fields {
                    let code = f.code().unwrap_or("?????");
                    m::count_error("server", code);
                    if matches!(f.severity(), Some("FATAL" | "PANIC")) {
                        txn.server_fatal = true;
                        crate::shard::health::report(txn.state, Report::ServerFatal);
                        if code.starts_with("57P") {
                            // The server is going away (shutdown, crash, terminate):
                            // the client hears of it when the connection closes, as an
                            // error for its request, and keeps its session. Any other
                            // FATAL (e.g. the client's own protocol violation) is the
                            // client's, and ends it.
                            txn.fatal = Some((
                                code.to_string(),
                                f.message().unwrap_or("no message").to_string(),
                            ));
                            emit(client, txn, &buf[run..pos]).await?;
                            run = pos + len;
                        }
                    } else if refusal.is_some() && !txn.probe.active {
                        crate::shard::health::report(
                            txn.state,
                            if refusal == Some("read_only") {
                                Report::ReadOnly
                            } else {
                                Report::CannotConnectNow
                            },
                        );
                    }
                }
                txn.on_error();
            }
            btag::PARAMETER_STATUS => {
                let mut b = Bytes::copy_from_slice(body);
                if let (Ok(name), Ok(value)) = (take(&mut b), take(&mut b)) {
                    // A client's own SET of a tracked parameter sticks to it.
                    if TRACKED_PARAMS.contains(&name.as_str()) {
                        txn.desired.insert(name.clone(), value.clone());
                        if let Some(bk) = txn.backend.as_mut() {
                            bk.applied.insert(name.clone(), value.clone());
                        }
                    }
                    if let Some(bk) = txn.backend.as_mut() {
                        bk.params.insert(name, value);
                    }
                }
            }
            _ => {}
        }
        pos += len;
    }
    emit(client, txn, &buf[run..pos]).await?;
    txn.down += pos as u64;
    buf.advance(pos);
    Ok(())
}

/// Server bytes on their way to the client: held back while the first request's outcome
/// is unknown.
async fn emit(client: &mut Conn, txn: &mut Txn<'_>, bytes: &[u8]) -> Result<(), End> {
    if txn.probe.active {
        txn.probe.held.extend_from_slice(bytes);
        return Ok(());
    }
    write_client(client, bytes).await
}

fn take(b: &mut Bytes) -> Result<String, ()> {
    let end = b.iter().position(|&c| c == 0).ok_or(())?;
    let s = String::from_utf8(b.split_to(end).to_vec()).map_err(|_| ())?;
    b.advance(1);
    Ok(s)
}

async fn write_client(client: &mut Conn, bytes: &[u8]) -> Result<(), End> {
    if bytes.is_empty() {
        return Ok(());
    }
    client
        .stream
        .write_all(bytes)
        .await
        .map_err(|_| End::ClientGone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_control_is_recognised_by_its_first_word() {
        assert_eq!(ends_transaction(b"  rollback;"), Some(false));
        assert_eq!(ends_transaction(b"ABORT"), Some(false));
        assert_eq!(ends_transaction(b"\ncommit\0"), Some(true));
        assert_eq!(ends_transaction(b"End"), Some(true));
        assert_eq!(ends_transaction(b"COMMITTED"), None);
        assert_eq!(ends_transaction(b"select 'commit'"), None);
        assert_eq!(ends_transaction(b"   "), None);
        assert_eq!(ends_transaction(b"\xff\xfe"), None);
    }

    #[test]
    fn parse_and_bind_bodies_give_up_their_names() {
        assert_eq!(parse_sql(b"s1\0select 1\0\0\0"), Some(&b"select 1"[..]));
        assert_eq!(parse_sql(b"s1\0select 1"), None);
        assert_eq!(bind_statement(b"\0s1\0\0\0"), Some(&b"s1"[..]));
        assert_eq!(bind_statement(b"portal"), None);
    }
}
