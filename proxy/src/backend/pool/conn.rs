//! One pooled server connection ([`Backend`]) and the key of the pool it belongs to.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lru::LruCache;
use tokio::time::Instant;

use crate::backend::cancel::InFlight;
use crate::backend::login::ServerConn;
use crate::config::HostPort;
use crate::net::stream::Conn;
use crate::sync::Locked;

/// Which pool a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub user: String,
    pub database: String,
    pub addr: HostPort,
}

/// A pooled server connection and what the proxy knows of its session state.
#[derive(Debug)]
pub struct Backend {
    pub conn: Conn,
    pub pid: i32,
    pub key: Bytes,
    pub peer: std::net::SocketAddr,
    /// ParameterStatus values as the server last reported them.
    pub params: HashMap<String, String>,
    /// Startup parameters the proxy SET on this connection (None: at the server default):
    /// the very set a client session holds when the connection last served one with
    /// those parameters, so the next check for that session is a pointer comparison.
    pub applied: Arc<HashMap<String, String>>,
    /// Server-side names of the prepared statements this connection holds.
    pub prepared: LruCache<Bytes, ()>,
    /// Statements the connection holds but must not use again (evicted from the cache
    /// by a SQL-level PREPARE, or found stale): closed with the next statements sent.
    pub to_close: Vec<Bytes>,
    pub(super) created: Instant,
    /// Cancel requests forwarded to it and not yet delivered: it is not handed out
    /// again until they are (see [`Pool::give_back`](super::Pool::give_back)).
    pub in_flight: Arc<InFlight>,
    /// Its cancel data, made once: a client's cancel entry points at it while the
    /// connection serves the client (a pointer set per transaction, not a copy).
    pub cancel: Arc<crate::backend::cancel::ServerKey>,
    /// The pool's reconnect generation when it was opened: `RECONNECT` closes the
    /// connections of older generations as they come back.
    pub(super) generation: u64,
    /// Its line in the pool's list of connections (`SHOW SERVERS`), removed on drop.
    _listed: Listed,
}

/// What `SHOW SERVERS` tells of one server connection.
#[derive(Debug, Clone)]
pub struct ServerMeta {
    pub pid: i32,
    pub peer: std::net::SocketAddr,
    pub local: Option<std::net::SocketAddr>,
    pub connected: std::time::SystemTime,
    pub tls: bool,
}

pub(super) type ServerList = Arc<Mutex<HashMap<i32, ServerMeta>>>;

/// Removes a connection from its pool's list when it is dropped, however it ends.
#[derive(Debug)]
struct Listed {
    list: ServerList,
    pid: i32,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.list.locked().remove(&self.pid);
    }
}

impl Backend {
    pub(super) fn new(
        s: ServerConn,
        max_prepared: usize,
        list: &ServerList,
        generation: u64,
    ) -> Self {
        let meta = ServerMeta {
            pid: s.pid,
            peer: s.peer,
            local: s.conn.stream.local_addr(),
            connected: std::time::SystemTime::now(),
            tls: s.conn.stream.is_tls(),
        };
        list.locked().insert(s.pid, meta);
        let listed = Listed {
            list: Arc::clone(list),
            pid: s.pid,
        };
        let in_flight: Arc<InFlight> = Arc::default();
        let cancel = Arc::new(crate::backend::cancel::ServerKey {
            addr: s.peer,
            pid: s.pid,
            key: s.key.clone(),
            in_flight: Arc::clone(&in_flight),
        });
        Self {
            generation,
            _listed: listed,
            cancel,
            conn: s.conn,
            pid: s.pid,
            key: s.key,
            peer: s.peer,
            params: s.params.into_iter().collect(),
            applied: Arc::default(),
            prepared: LruCache::new(NonZeroUsize::new(max_prepared.max(1)).expect("at least 1")),
            to_close: Vec::new(),
            created: Instant::now(),
            in_flight,
        }
    }

    /// Records that the connection now holds statement `name`; the cache's least
    /// recently used one, if it had to make room, is closed with the next statements
    /// sent.
    pub fn keep_prepared(&mut self, name: Bytes) {
        if let Some((victim, ())) = self.prepared.push(name.clone(), ()) {
            if victim != name {
                self.to_close.push(victim);
            }
        }
    }

    /// True if the server has said nothing since the connection went idle: any byte or
    /// EOF means it is not safe to hand out. A connection idle for [`ASK_KERNEL_AFTER`]
    /// or longer is checked with the kernel, one that was in use a moment ago with the
    /// runtime's readiness (no system call on a busy pool's hot path).
    pub(super) fn is_quiet(&mut self, idle_for: Duration) -> bool {
        if !self.conn.rbuf.is_empty() {
            return false;
        }
        if idle_for >= ASK_KERNEL_AFTER {
            self.conn.stream.is_quiet_now()
        } else {
            self.conn.stream.is_quiet()
        }
    }
}

/// How long a connection sits idle before its checkout asks the kernel whether the
/// server said anything (see [`Backend::is_quiet`]).
pub(super) const ASK_KERNEL_AFTER: Duration = Duration::from_millis(100);
