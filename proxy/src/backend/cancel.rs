//! Cancel requests: the proxy hands each client key data with a secret key of its own
//! (and, in session mode, the server backend's real process id) and remembers which
//! server connection serves that client, so a CancelRequest reaches the right server and
//! nothing else.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::sync::Locked;
use bytes::{Bytes, BytesMut};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use handoff_protocol::auth::secrets_equal;
use handoff_protocol::framing::StartupPacket;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server connection's cancel data.
#[derive(Debug, Clone)]
pub struct ServerKey {
    pub addr: SocketAddr,
    pub pid: i32,
    /// 4 bytes in protocol 3.0, up to 256 in 3.2.
    pub key: Bytes,
    /// The cancel requests on their way to this connection (the pool's connection
    /// carries the same one; a session-mode connection closes with its session).
    pub in_flight: Arc<InFlight>,
}

/// Cancel requests forwarded to one server connection and not yet delivered.
///
/// PostgreSQL signals the backend only once the cancel connection has been opened and
/// read, and its signal lands on whatever the backend runs by then. A pooled connection
/// whose client's query ended before its cancel landed must not serve another client
/// until the cancel has been delivered, or the signal cancels that client's query
/// instead. The pool waits for [`InFlight::delivered`] before handing such a connection
/// out again.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    done: tokio::sync::Notify,
}

impl InFlight {
    /// True while a cancel request is on its way.
    pub fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// Resolves once no cancel request is on its way (each is bounded by the connect
    /// timeout it is sent with).
    pub async fn delivered(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            // Registered before the count is read: a wake-up in between is not lost.
            done.as_mut().enable();
            if !self.any() {
                return;
            }
            done.await;
        }
    }

    /// Counts one request on its way until the returned guard is dropped.
    fn start(self: &Arc<Self>) -> Sending {
        self.count.fetch_add(1, Ordering::AcqRel);
        Sending(Arc::clone(self))
    }
}

/// One cancel request on its way (delivered, failed or abandoned when dropped).
struct Sending(Arc<InFlight>);

impl Drop for Sending {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.done.notify_waiters();
        }
    }
}

/// The longest secret key handed to a client: 32 bytes, as PostgreSQL 18 hands out in
/// protocol 3.2 (4 before).
pub const MAX_KEY: usize = 32;

/// A secret key handed to a client, kept inline: no allocation of its own.
#[derive(Clone, Copy)]
pub struct SecretKey {
    len: u8,
    bytes: [u8; MAX_KEY],
}

impl SecretKey {
    /// `None` if longer than [`MAX_KEY`].
    pub fn new(key: &[u8]) -> Option<Self> {
        let mut bytes = [0u8; MAX_KEY];
        bytes.get_mut(..key.len())?.copy_from_slice(key);
        Some(Self {
            len: key.len() as u8,
            bytes,
        })
    }

    fn random(len: usize) -> Self {
        let mut bytes = [0u8; MAX_KEY];
        let len = len.min(MAX_KEY);
        // getrandom only fails when the OS has no entropy source at all.
        getrandom::getrandom(&mut bytes[..len]).expect("OS randomness is available");
        Self {
            len: len as u8,
            bytes,
        }
    }
}

impl std::ops::Deref for SecretKey {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Not shown: it is a secret.
impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({} bytes)", self.len)
    }
}

/// One session's cancel entry: its secret key and the server connection serving it now,
/// if any (transaction mode attaches and detaches per transaction). One allocation,
/// shared between the registry and the session, which updates the server with an
/// uncontended lock instead of a map write.
#[derive(Debug)]
struct Target {
    key: SecretKey,
    server: std::sync::Mutex<Option<Arc<ServerKey>>>,
}

/// The sessions given one process id: nearly always one (session mode hands out the
/// server backend's real process id, which two servers may share), kept inline.
type Targets = smallvec::SmallVec<[Arc<Target>; 1]>;

/// Every live session's key data, by the process id the client was given, told apart by
/// the secret key where an id is shared.
#[derive(Debug, Default)]
pub struct Registry {
    map: DashMap<i32, Targets>,
    /// While a takeover moves clients here, the process they come from: a key this
    /// registry does not know may be one of the clients it still serves.
    elsewhere: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<(i32, Bytes)>>>,
}

/// Keeps a session's key registered; dropping it unregisters.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    target: Arc<Target>,
    pub pid: i32,
}

impl Registration {
    /// The secret key the client was given (its bytes: `&key[..]`).
    pub fn key(&self) -> &SecretKey {
        &self.target.key
    }

    /// Points the session's cancel requests at another server connection (or at none).
    /// Once it returns, every request forwarded to the previous one is counted in that
    /// connection's [`InFlight`].
    pub fn set_server(&self, server: Option<Arc<ServerKey>>) {
        *self.target.server.locked() = server;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Entry::Occupied(mut e) = self.registry.map.entry(self.pid) {
            e.get_mut().retain(|t| !Arc::ptr_eq(t, &self.target));
            if e.get().is_empty() {
                e.remove();
            }
        }
    }
}

fn random_i32() -> i32 {
    let mut b = [0u8; 4];
    // getrandom only fails when the OS has no entropy source at all.
    getrandom::getrandom(&mut b).expect("OS randomness is available");
    i32::from_be_bytes(b)
}

/// The secret key's length for a client speaking protocol 3.`minor`: 32 bytes from 3.2
/// on (as PostgreSQL 18 hands out), 4 before.
pub fn key_len(minor: u16) -> usize {
    if minor >= 2 {
        MAX_KEY
    } else {
        4
    }
}

impl Registry {
    /// Issues fresh key data for a session, served now by `server` (if any): a process
    /// id of handoff's own (transaction mode: the client has no one backend).
    pub fn register(self: &Arc<Self>, server: Option<ServerKey>, key_len: usize) -> Registration {
        loop {
            // Positive pids, like PostgreSQL's, so tools that print them are not confused.
            let pid = random_i32() & 0x7fff_ffff;
            if pid == 0 || self.map.contains_key(&pid) {
                continue;
            }
            return self.register_as(pid, server, key_len);
        }
    }

    /// Issues key data with process id `pid` (session mode: the server backend's own,
    /// so `pg_backend_pid()` and `pg_terminate_backend()` mean what the client expects)
    /// and a secret key of handoff's own, so cancel requests still come through handoff.
    pub fn register_as(
        self: &Arc<Self>,
        pid: i32,
        server: Option<ServerKey>,
        key_len: usize,
    ) -> Registration {
        let fresh = |list: &[Arc<Target>]| loop {
            let key = SecretKey::random(key_len);
            if !list.iter().any(|t| *t.key == *key) {
                break Some(key);
            }
        };
        self.insert(pid, server, fresh)
            .expect("a fresh key is always found")
    }

    /// Registers key data a client was given by another process (a takeover moved the
    /// client here): its cancel requests keep working. `None` if the pair is taken
    /// (nearly impossible: both processes draw random keys) or the key is longer than
    /// handoff hands out.
    pub fn adopt(
        self: &Arc<Self>,
        pid: i32,
        key: &[u8],
        server: Option<ServerKey>,
    ) -> Option<Registration> {
        let key = SecretKey::new(key)?;
        self.insert(pid, server, |list| {
            (!list.iter().any(|t| *t.key == *key)).then_some(key)
        })
    }

    /// Adds a target under `pid` with the key `key` picks from the pid's list (`None`:
    /// nothing added).
    fn insert(
        self: &Arc<Self>,
        pid: i32,
        server: Option<ServerKey>,
        key: impl FnOnce(&[Arc<Target>]) -> Option<SecretKey>,
    ) -> Option<Registration> {
        let mut list = self.map.entry(pid).or_default();
        let key = key(&list)?;
        let target = Arc::new(Target {
            key,
            server: std::sync::Mutex::new(server.map(Arc::new)),
        });
        list.push(Arc::clone(&target));
        drop(list);
        Some(Registration {
            registry: Arc::clone(self),
            target,
            pid,
        })
    }

    /// Sends the cancel requests for keys this registry does not know to `to` (a
    /// takeover's predecessor), until [`Registry::forward_elsewhere`] is given `None`.
    pub fn forward_elsewhere(&self, to: Option<tokio::sync::mpsc::UnboundedSender<(i32, Bytes)>>) {
        *self.elsewhere.locked() = to;
    }

    /// Number of sessions that can be cancelled now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.iter().map(|e| e.value().len()).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forwards a cancel request if `(pid, key)` matches a live session. Returns whether
    /// it was forwarded. A wrong key is ignored, as PostgreSQL does, without saying so.
    pub async fn forward(&self, pid: i32, key: &[u8], timeout: Duration) -> bool {
        let target = self.map.get(&pid).and_then(|list| {
            // Every entry compared, each in constant time.
            let mut found = None;
            for t in list.iter() {
                if secrets_equal(&t.key, key) {
                    found = Some(Arc::clone(t));
                }
            }
            found
        });
        let Some(target) = target else {
            if let Some(to) = self.elsewhere.locked().as_ref() {
                return to.send((pid, Bytes::copy_from_slice(key))).is_ok();
            }
            return false;
        };
        // Between transactions nothing runs for this client: nothing to cancel. Counted
        // on its way under the lock the session detaches with, so a connection leaving
        // this client already shows it.
        let Some((server, _sending)) = target
            .server
            .locked()
            .as_ref()
            .map(|s| (Arc::clone(s), s.in_flight.start()))
        else {
            return false;
        };
        cancel_server(ServerKey::clone(&server), timeout).await
    }
}

/// Sends a CancelRequest for `server`'s current query. True if it was delivered.
///
/// Returns only once the server has closed the cancel connection, which PostgreSQL does
/// after signalling the backend: the client's own cancel connection is closed after
/// that, so a client that waits for it (asyncpg does) knows the cancel has landed and
/// its next query is not the one cancelled.
pub async fn cancel_server(server: ServerKey, timeout: Duration) -> bool {
    let mut buf = BytesMut::new();
    StartupPacket::Cancel {
        pid: server.pid,
        key: server.key.clone(),
    }
    .encode(&mut buf);
    let send = async {
        let mut s = TcpStream::connect(server.addr).await?;
        s.write_all(&buf).await?;
        s.shutdown().await?;
        let mut rest = [0u8; 64];
        while s.read(&mut rest).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(timeout, send).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(server = %server.addr, error = %e, "could not forward cancel request");
            false
        }
        Err(_) => {
            tracing::warn!(server = %server.addr, "timed out forwarding cancel request");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// `key` with its last bit flipped.
    fn flip(key: &[u8]) -> Vec<u8> {
        let mut k = key.to_vec();
        *k.last_mut().unwrap() ^= 1;
        k
    }

    /// What one cancel connection to `server` carried; the server closes it after
    /// reading, as PostgreSQL does.
    fn accept_one(server: TcpListener) -> tokio::task::JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        })
    }

    /// A server that reads one cancel request and holds its connection open until
    /// told (the backend is not signalled yet), then closes it, as PostgreSQL does.
    async fn holding_server() -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let srv = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = [0u8; 16];
            s.read_exact(&mut got).await.unwrap();
            let _ = closed.await;
        });
        (addr, close, srv)
    }

    #[tokio::test]
    async fn forwards_only_matching_keys_to_the_registered_server() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let reg = Arc::new(Registry::default());
        let key = |pid, key: &[u8]| {
            Some(ServerKey {
                addr,
                pid,
                key: Bytes::copy_from_slice(key),
                in_flight: Arc::default(),
            })
        };
        let a = reg.register(key(111, &222i32.to_be_bytes()), 4);
        // A protocol 3.2 client: a 32-byte key.
        // ... served by a protocol 3.2 server, whose key is longer too.
        let b = reg.register(key(333, &[44u8; 32]), 32);
        let c = reg.register(None, 4);
        assert_eq!((a.key().len(), b.key().len()), (4, 32));
        assert_ne!(a.pid, b.pid);
        assert!(a.pid > 0);
        assert_eq!(reg.len(), 3);
        let t = Duration::from_secs(5);
        assert!(!reg.forward(c.pid, c.key(), t).await, "no server attached");
        drop(c);
        assert!(!reg.forward(a.pid, &flip(a.key()), t).await, "wrong key");
        assert!(
            !reg.forward(b.pid, &b.key()[..4], t).await,
            "a key cut short"
        );
        let unknown = (1..).find(|p| *p != a.pid && *p != b.pid).unwrap();
        assert!(!reg.forward(unknown, a.key(), t).await, "unknown pid");
        let got = accept_one(server);
        assert!(reg.forward(b.pid, b.key(), t).await);
        let got = got.await.unwrap();
        let mut want = BytesMut::new();
        StartupPacket::Cancel {
            pid: 333,
            key: Bytes::from_static(&[44u8; 32]),
        }
        .encode(&mut want);
        assert_eq!(got, want.to_vec(), "the server's own key data is sent");
        drop(a);
        assert_eq!(reg.len(), 1);
        drop(b);
        assert!(reg.is_empty());
    }

    #[test]
    fn adopted_keys_keep_their_bytes_and_one_longer_than_handed_out_is_refused() {
        let reg = Arc::new(Registry::default());
        let a = reg.adopt(77, &[9u8; 32], None).expect("a 32-byte key");
        assert_eq!(a.key()[..], [9u8; 32]);
        assert!(
            reg.adopt(77, &[9u8; 32], None).is_none(),
            "the pair is taken"
        );
        assert!(
            reg.adopt(78, &[1u8; MAX_KEY + 1], None).is_none(),
            "longer than handoff hands out"
        );
        let b = reg
            .adopt(77, &[1, 2, 3, 4], None)
            .expect("another key, same pid");
        assert_eq!(reg.len(), 2);
        drop(a);
        assert_eq!(reg.len(), 1);
        assert_eq!(b.key()[..], [1, 2, 3, 4]);
        drop(b);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn sessions_given_the_same_server_pid_are_told_apart_by_their_keys() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let reg = Arc::new(Registry::default());
        // Two servers (two shards) whose backends happen to have the same pid.
        let a = reg.register_as(
            4242,
            Some(ServerKey {
                addr,
                pid: 4242,
                key: Bytes::copy_from_slice(&1i32.to_be_bytes()),
                in_flight: Arc::default(),
            }),
            4,
        );
        let b = reg.register_as(4242, None, 4);
        assert_eq!((a.pid, b.pid), (4242, 4242));
        assert_ne!(a.key()[..], b.key()[..]);
        assert_eq!(reg.len(), 2);
        let t = Duration::from_secs(5);
        assert!(
            !reg.forward(4242, b.key(), t).await,
            "b has no server attached"
        );
        let got = accept_one(server);
        assert!(
            reg.forward(4242, a.key(), t).await,
            "a's key reaches a's server"
        );
        let got = got.await.unwrap();
        let mut want = BytesMut::new();
        StartupPacket::Cancel {
            pid: 4242,
            key: Bytes::copy_from_slice(&1i32.to_be_bytes()),
        }
        .encode(&mut want);
        assert_eq!(got, want.to_vec());
        drop(a);
        assert_eq!(reg.len(), 1);
        assert!(!reg.forward(4242, &flip(b.key()), t).await);
        drop(b);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn a_connection_shows_a_cancel_on_its_way_until_it_is_delivered() {
        let (addr, close, srv) = holding_server().await;
        let in_flight = Arc::new(InFlight::default());
        let reg = Arc::new(Registry::default());
        let client = reg.register(
            Some(ServerKey {
                addr,
                pid: 7,
                key: Bytes::from_static(&[0, 0, 0, 8]),
                in_flight: Arc::clone(&in_flight),
            }),
            4,
        );
        assert!(!in_flight.any());
        let forwarding = {
            let (reg, pid, key) = (Arc::clone(&reg), client.pid, *client.key());
            tokio::spawn(async move { reg.forward(pid, &key, Duration::from_secs(10)).await })
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while !in_flight.any() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the forwarded cancel is counted");
        // The client's query ended: its connection leaves it, the cancel still travels.
        client.set_server(None);
        assert!(in_flight.any());
        let delivered = tokio::time::timeout(Duration::from_millis(300), in_flight.delivered());
        assert!(
            delivered.await.is_err(),
            "delivered before the server closed"
        );
        close.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), in_flight.delivered())
            .await
            .expect("delivered once the server closed");
        assert!(forwarding.await.unwrap());
        assert!(!in_flight.any());
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn a_cancel_is_done_only_when_the_server_has_closed_its_connection() {
        let (addr, close, srv) = holding_server().await;
        let key = ServerKey {
            addr,
            pid: 1,
            key: Bytes::from_static(&[0, 0, 0, 2]),
            in_flight: Arc::default(),
        };
        let mut cancel = Box::pin(cancel_server(key, Duration::from_secs(10)));
        let early = tokio::time::timeout(Duration::from_millis(300), &mut cancel).await;
        assert!(
            early.is_err(),
            "returned before the server closed: {early:?}"
        );
        close.send(()).unwrap();
        assert!(cancel.await);
        srv.await.unwrap();
    }
}
