//! The clients connected now, for the admin console (`SHOW CLIENTS`, `SHOW POOLS`,
//! `KILL`), and the per-database statistics (`SHOW STATS`).
//!
//! Nothing here is touched on a transaction's fast path but the statistics' counters:
//! a client's entry is written when it logs in and when it starts or stops waiting for
//! a server (the buffer, a pool at its limit), and removed when its session ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::sync::Locked;
use dashmap::DashMap;

/// Every client connection, by id.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    map: DashMap<u64, Arc<ClientInfo>>,
    next: AtomicU64,
    /// Statistics per client database, created at a client's first login to it.
    stats: DashMap<String, Arc<DbStats>>,
    /// The totals at the start and the end of the last complete statistics period.
    period: Mutex<Period>,
}

#[derive(Debug, Default)]
struct Period {
    started: Option<SystemTime>,
    at_start: HashMap<String, Totals>,
    /// The last complete period: its length and each database's totals' increase.
    last: Option<(Duration, HashMap<String, Totals>)>,
}

/// What a client is doing, as PgBouncer's `SHOW CLIENTS` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientState {
    /// Connected, not logged in yet.
    Login = 0,
    /// Logged in: running a transaction or idle between them.
    Active = 1,
    /// Sent a request and waits for a server connection (in the failover buffer, or
    /// for a pool at its limit).
    Waiting = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Login => "login",
            ClientState::Active => "active",
            ClientState::Waiting => "waiting",
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    /// When it connected, in milliseconds since the Unix epoch ([`ClientInfo::connected`]).
    connected_ms: u64,
    login: OnceLock<LoginInfo>,
    state: AtomicU8,
    /// Unix time in milliseconds of the last change of state.
    changed_ms: AtomicU64,
    /// Where `KILL` finds the session: its task, or its place in the lot of quiet
    /// clients (see [`Evict`]).
    abort: Mutex<Abort>,
}

/// Where a session is, for `KILL`.
#[derive(Debug, Default)]
enum Abort {
    /// Not started yet.
    #[default]
    None,
    /// Its task runs it.
    Task(tokio::task::AbortHandle),
    /// It has no task: it waits, set aside, under this key of the table that holds it.
    SetAside(Weak<dyn Evict>, u64),
    /// Killed: a task started for it later is ended at once.
    Killed,
}

/// A table of sessions set aside without a task (the transaction-mode relay's lot of
/// quiet clients): `KILL` takes a session out of it, which ends the session.
pub(crate) trait Evict: Send + Sync + std::fmt::Debug {
    /// Drops the session kept under `key`, if it is still there.
    fn evict(&self, key: u64);
}

/// Who a logged-in client is.
#[derive(Debug)]
pub(crate) struct LoginInfo {
    /// The user and the client database, as the connection limits keep them (one
    /// string shared by every client of the same name).
    pub user: Arc<str>,
    pub database: Arc<str>,
    /// The shard it is routed to and the server database; `None` for the console.
    pub route: Option<(usize, Box<str>)>,
    pub application_name: Box<str>,
    pub tls: bool,
    pub stats: Arc<DbStats>,
}

impl ClientInfo {
    /// When the client connected.
    pub fn connected(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.connected_ms)
    }

    pub fn login(&self) -> Option<&LoginInfo> {
        self.login.get()
    }

    /// The log context of the client's session: its address, and once logged in its
    /// user and database. Made for the login and for each stretch of the relay's work,
    /// not kept for the whole session: a span lives in the log subscriber's registry
    /// (about 350 bytes with its formatted fields), and a parked client keeps none.
    pub fn span(&self) -> tracing::Span {
        match self.login() {
            Some(l) => tracing::info_span!(
                "client",
                client.addr = %self.addr,
                user = %l.user,
                database = %l.database
            ),
            None => tracing::info_span!(
                "client",
                client.addr = %self.addr,
                user = tracing::field::Empty,
                database = tracing::field::Empty
            ),
        }
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Relaxed) {
            0 => ClientState::Login,
            2 => ClientState::Waiting,
            _ => ClientState::Active,
        }
    }

    /// When the state last changed.
    pub fn changed(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.changed_ms.load(Relaxed))
    }

    pub fn set_state(&self, s: ClientState) {
        self.state.store(s as u8, Relaxed);
        self.changed_ms.store(now_ms(), Relaxed);
    }

    /// [`ClientInfo::set_state`] at a time the caller has read anyway.
    fn set_state_at(&self, s: ClientState, at: tokio::time::Instant) {
        self.state.store(s as u8, Relaxed);
        self.changed_ms.store(wall_ms(at), Relaxed);
    }

    /// Marks the client waiting for a server until the guard is dropped; the time
    /// counts in its database's `wait_time`.
    pub fn waiting(&self) -> Waiting<'_> {
        let since = tokio::time::Instant::now();
        self.set_state_at(ClientState::Waiting, since);
        Waiting { info: self, since }
    }

    /// Records the login and makes the client active.
    pub fn logged_in(&self, login: LoginInfo) {
        let _ = self.login.set(login);
        self.set_state(ClientState::Active);
    }

    /// The session's task (each time one takes the session up), so that `KILL` can end
    /// it; a session killed before it started is ended at once.
    pub fn set_abort(&self, h: tokio::task::AbortHandle) {
        let mut a = self.abort.locked();
        if matches!(*a, Abort::Killed) {
            h.abort();
        } else {
            *a = Abort::Task(h);
        }
    }

    /// The session waits without a task under `key` in `table`. False if it was
    /// killed: the caller drops it.
    pub fn set_aside(&self, table: Weak<dyn Evict>, key: u64) -> bool {
        let mut a = self.abort.locked();
        if matches!(*a, Abort::Killed) {
            return false;
        }
        *a = Abort::SetAside(table, key);
        true
    }

    /// Ends the session now: its task is dropped (or it is taken out of the table it
    /// waits in), which closes the client's socket and any server connection it holds
    /// (a transaction in progress is rolled back by the server).
    pub fn kill(&self) -> bool {
        let mut a = self.abort.locked();
        match std::mem::replace(&mut *a, Abort::Killed) {
            Abort::Task(h) => {
                h.abort();
                true
            }
            Abort::SetAside(table, key) => {
                // Not under the lock: the table takes its own, and takes this one
                // while it sets a session aside.
                drop(a);
                if let Some(t) = table.upgrade() {
                    t.evict(key);
                }
                true
            }
            Abort::None => {
                *a = Abort::None;
                false
            }
            Abort::Killed => false,
        }
    }

    /// The statistics its transactions count in (none before the login).
    pub fn stats(&self) -> Option<&DbStats> {
        self.login.get().map(|l| &*l.stats)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The wall clock's milliseconds at the monotonic instant `at`, from one reading of both
/// clocks taken once per process: a client's state changes at every transaction that
/// waits, and the relay has the monotonic time already. (A wall clock stepped since the
/// process started shows in `SHOW CLIENTS`' times of these changes only.)
fn wall_ms(at: tokio::time::Instant) -> u64 {
    static ANCHOR: OnceLock<(tokio::time::Instant, u64)> = OnceLock::new();
    let (then, then_ms) = *ANCHOR.get_or_init(|| (tokio::time::Instant::now(), now_ms()));
    match at.checked_duration_since(then) {
        Some(d) => then_ms + d.as_millis() as u64,
        None => then_ms.saturating_sub(then.duration_since(at).as_millis() as u64),
    }
}

/// Counters of one client database, as PgBouncer's `SHOW STATS` has them: in stripes,
/// one per thread that counts (see [`crate::sync::STRIPES`]), summed when read.
#[derive(Debug, Default)]
pub(crate) struct DbStats {
    stripes: [Stripe; crate::sync::STRIPES],
}

/// One thread's counts, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    xacts: AtomicU64,
    queries: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_us: AtomicU64,
    query_us: AtomicU64,
    wait_us: AtomicU64,
}

/// A snapshot of [`DbStats`] (the type the hand-over format carries them in).
pub(crate) use crate::api::takeover::Totals;

impl Totals {
    fn minus(self, o: Totals) -> Totals {
        Totals {
            xacts: self.xacts.saturating_sub(o.xacts),
            queries: self.queries.saturating_sub(o.queries),
            received: self.received.saturating_sub(o.received),
            sent: self.sent.saturating_sub(o.sent),
            xact_us: self.xact_us.saturating_sub(o.xact_us),
            query_us: self.query_us.saturating_sub(o.query_us),
            wait_us: self.wait_us.saturating_sub(o.wait_us),
        }
    }
}

impl DbStats {
    fn mine(&self) -> &Stripe {
        &self.stripes[crate::sync::stripe()]
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in &self.stripes {
            t.xacts += s.xacts.load(Relaxed);
            t.queries += s.queries.load(Relaxed);
            t.received += s.received.load(Relaxed);
            t.sent += s.sent.load(Relaxed);
            t.xact_us += s.xact_us.load(Relaxed);
            t.query_us += s.query_us.load(Relaxed);
            t.wait_us += s.wait_us.load(Relaxed);
        }
        t
    }

    /// Adds `t` (a takeover's predecessor's counts, or a test's).
    pub fn add(&self, t: Totals) {
        let s = self.mine();
        s.xacts.fetch_add(t.xacts, Relaxed);
        s.queries.fetch_add(t.queries, Relaxed);
        s.received.fetch_add(t.received, Relaxed);
        s.sent.fetch_add(t.sent, Relaxed);
        s.xact_us.fetch_add(t.xact_us, Relaxed);
        s.query_us.fetch_add(t.query_us, Relaxed);
        s.wait_us.fetch_add(t.wait_us, Relaxed);
    }

    /// A query answered after `d`.
    pub fn add_query(&self, d: Duration) {
        let s = self.mine();
        s.queries.fetch_add(1, Relaxed);
        s.query_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// A transaction ended after `d`.
    pub fn add_xact(&self, d: Duration) {
        let s = self.mine();
        s.xacts.fetch_add(1, Relaxed);
        s.xact_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Bytes received from clients and sent to them.
    pub fn add_bytes(&self, received: u64, sent: u64) {
        let s = self.mine();
        if received > 0 {
            s.received.fetch_add(received, Relaxed);
        }
        if sent > 0 {
            s.sent.fetch_add(sent, Relaxed);
        }
    }

    pub fn add_wait(&self, d: Duration) {
        self.mine().wait_us.fetch_add(d.as_micros() as u64, Relaxed);
    }
}

/// Averages over one statistics period, as PgBouncer's `SHOW STATS` `avg_*` columns:
/// counts and bytes per second, times per transaction or query (µs).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Averages {
    pub xact_count: u64,
    pub query_count: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
}

impl Averages {
    fn of(d: Totals, period: Duration) -> Self {
        let secs = period.as_secs_f64().max(0.001);
        let per_sec = |n: u64| (n as f64 / secs).round() as u64;
        let per = |t: u64, n: u64| t.checked_div(n).unwrap_or(0);
        Averages {
            xact_count: per_sec(d.xacts),
            query_count: per_sec(d.queries),
            recv: per_sec(d.received),
            sent: per_sec(d.sent),
            xact_time: per(d.xact_us, d.xacts),
            query_time: per(d.query_us, d.queries),
            wait_time: per(d.wait_us, d.xacts.max(d.queries)),
        }
    }
}

/// A client waiting for a server (see [`ClientInfo::waiting`]).
#[derive(Debug)]
pub(crate) struct Waiting<'a> {
    info: &'a ClientInfo,
    since: tokio::time::Instant,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // One clock read for both: this runs for every transaction that waited.
        let now = tokio::time::Instant::now();
        if let Some(s) = self.info.stats() {
            s.add_wait(now.saturating_duration_since(self.since));
        }
        self.info.set_state_at(ClientState::Active, now);
    }
}

/// Removes a client's entry when its session ends.
#[derive(Debug)]
pub(crate) struct Registered {
    clients: Arc<Clients>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.clients.map.remove(&self.id);
    }
}

impl Clients {
    /// A new connection's entry (state `login`).
    pub fn register(&self, addr: SocketAddr, local: Option<SocketAddr>) -> Arc<ClientInfo> {
        self.register_since(addr, local, SystemTime::now())
    }

    /// The entry of a client connected since `connected` (one a takeover moved here
    /// keeps its connection time).
    pub fn register_since(
        &self,
        addr: SocketAddr,
        local: Option<SocketAddr>,
        connected: SystemTime,
    ) -> Arc<ClientInfo> {
        let id = self.next.fetch_add(1, Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            addr,
            local,
            connected_ms: connected
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            login: OnceLock::new(),
            state: AtomicU8::new(ClientState::Login as u8),
            changed_ms: AtomicU64::new(now_ms()),
            abort: Mutex::default(),
        });
        self.map.insert(id, Arc::clone(&info));
        info
    }

    /// The guard that removes `info` when the session ends.
    pub fn guard(self: &Arc<Self>, info: &ClientInfo) -> Registered {
        Registered {
            clients: Arc::clone(self),
            id: info.id,
        }
    }

    /// How many clients are connected now.
    pub fn count(&self) -> usize {
        self.map.len()
    }

    /// Adds another process's counters of client database `db` to this one's (a
    /// takeover's predecessor's, so `SHOW STATS` goes on from where it was).
    pub fn add_totals(&self, db: &str, t: Totals) {
        self.stats_for(db).add(t);
    }

    /// Every client now, oldest first.
    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self.map.iter().map(|e| Arc::clone(e.value())).collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// The statistics of client database `db`.
    pub fn stats_for(&self, db: &str) -> Arc<DbStats> {
        if let Some(s) = self.stats.get(db) {
            return Arc::clone(&s);
        }
        Arc::clone(&self.stats.entry(db.to_string()).or_default())
    }

    /// Every database's totals, by name.
    pub fn totals(&self) -> Vec<(String, Totals)> {
        let mut v: Vec<_> = self
            .stats
            .iter()
            .map(|e| (e.key().clone(), e.value().totals()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Ends a statistics period (called every `HANDOFF_STATS_PERIOD`).
    pub fn end_period(&self) {
        let now = SystemTime::now();
        let totals: HashMap<String, Totals> = self.totals().into_iter().collect();
        let mut p = self.period.locked();
        if let Some(started) = p.started {
            let len = now.duration_since(started).unwrap_or_default();
            let deltas = totals
                .iter()
                .map(|(db, t)| {
                    let before = p.at_start.get(db).copied().unwrap_or_default();
                    (db.clone(), t.minus(before))
                })
                .collect();
            p.last = Some((len, deltas));
        }
        p.started = Some(now);
        p.at_start = totals;
    }

    /// The averages of the last complete period for `db` (zero before one ended).
    pub fn averages(&self, db: &str) -> Averages {
        let p = self.period.locked();
        match &p.last {
            Some((len, deltas)) => deltas
                .get(db)
                .map(|d| Averages::of(*d, *len))
                .unwrap_or_default(),
            None => Averages::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_added_on_several_threads_are_summed() {
        let s = Arc::new(DbStats::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        s.add_query(Duration::from_micros(3));
                        s.add_xact(Duration::from_micros(5));
                        s.add_bytes(10, 20);
                        s.add_wait(Duration::from_micros(1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let t = s.totals();
        assert_eq!((t.queries, t.query_us), (4000, 12_000));
        assert_eq!((t.xacts, t.xact_us), (4000, 20_000));
        assert_eq!((t.received, t.sent, t.wait_us), (40_000, 80_000, 4000));
    }

    #[test]
    fn a_state_change_reads_the_wall_clock_through_the_monotonic_one() {
        let before = now_ms();
        let at = tokio::time::Instant::now();
        let after = now_ms();
        let ms = wall_ms(at);
        // The anchor's two readings are apart by less than a few ms.
        assert!(ms + 5 >= before && ms <= after + 5, "{before} {ms} {after}");
        // Whole milliseconds of each: 3 s apart, to the millisecond.
        let later = wall_ms(at + Duration::from_secs(3));
        assert!((2999..=3001).contains(&(later - ms)), "{}", later - ms);
        let earlier = wall_ms(at - Duration::from_secs(3));
        assert!((2999..=3001).contains(&(ms - earlier)), "{}", ms - earlier);
        let c = Clients::default();
        let a = c.register("127.0.0.1:1".parse().unwrap(), None);
        let w = a.waiting();
        assert_eq!(a.state(), ClientState::Waiting);
        let changed = a.changed();
        let wall = SystemTime::now();
        let off = wall
            .duration_since(changed)
            .unwrap_or_else(|e| e.duration());
        assert!(off < Duration::from_millis(50), "{off:?}");
        drop(w);
        assert_eq!(a.state(), ClientState::Active);
    }

    #[test]
    fn entries_leave_with_their_session_and_periods_average() {
        let clients = Arc::new(Clients::default());
        let a = clients.register("127.0.0.1:1".parse().unwrap(), None);
        {
            let _g = clients.guard(&a);
            assert_eq!(clients.list().len(), 1);
            assert_eq!(a.state(), ClientState::Login);
            a.logged_in(LoginInfo {
                user: "u".into(),
                database: "d".into(),
                route: Some((0, "d".into())),
                application_name: "".into(),
                tls: false,
                stats: clients.stats_for("d"),
            });
            assert_eq!(a.state(), ClientState::Active);
        }
        assert!(clients.list().is_empty());

        clients.end_period();
        let s = clients.stats_for("d");
        s.add(Totals {
            xacts: 10,
            xact_us: 5_000,
            queries: 20,
            query_us: 4_000,
            ..Totals::default()
        });
        clients.end_period();
        let avg = clients.averages("d");
        assert_eq!((avg.xact_time, avg.query_time), (500, 200));
        assert!(avg.xact_count >= 1, "{avg:?}");
        assert_eq!(clients.averages("other").xact_count, 0);
    }
}
