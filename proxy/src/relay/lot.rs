//! The lot: quiet sessions kept without a task of their own.
//!
//! A transaction-mode client between transactions needs nothing but its socket and its
//! session's state, yet a session kept as a task keeps the task (its header and future),
//! the relay's own state and the socket's registration with the runtime: about 700 bytes
//! per client, most of what an idle client cost. Once the relay has found a client
//! quiet (0.5 s, or 3 s for one that sent again soon last time; and right after its
//! login: see `relay::txn::run`), it hands the socket and the state here: the socket
//! leaves the runtime's poller for the lot's own epoll set (the kernel keeps that entry, not
//! the process), the state goes into one table, and the session's task ends. One task
//! serves the whole lot: when a socket becomes readable (a request, or the client
//! closing) its session is taken out and given a new task, which reads what came.
//!
//! A session is also taken out when the proxy's phase moves (a takeover, a drain, the
//! end: each session then does what its phase asks), and when the console's `KILL`
//! names it (it is dropped: the socket closes). Nothing is set aside while the proxy is
//! not simply running; a session the lot cannot take stays with its task.
//!
//! What it costs: parking takes the socket out of the runtime's poller and arms it in
//! the lot's set (two `epoll_ctl`; the socket stays in the lot's set, disarmed, while
//! its session is busy); waking puts it back with the runtime (one `epoll_ctl`) and
//! spawns a task, after the lot's own wake-up, which serves every socket that became
//! readable together.

use std::any::Any;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use rustix::event::epoll;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

use crate::clients::{ClientInfo, Evict};
use crate::shutdown::{Phase, Signal};
use crate::sync::Locked;

/// A session's state, as the relay that set it aside made it (the lot does not look in).
pub(crate) type Payload = Box<dyn Any + Send>;

/// Gives a session taken out of the lot a task again: its socket, back with the
/// runtime, and its state.
pub(crate) type Resume = fn(TcpStream, Payload);

/// The lot of one proxy (one per relay context).
pub(crate) struct Lot {
    shutdown: Signal,
    parked: metrics::Gauge,
    resume: Resume,
    /// Started at the first session set aside; `None` if the epoll set could not be made
    /// (sessions then keep their tasks).
    table: OnceLock<Option<Arc<Table>>>,
}

impl std::fmt::Debug for Lot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lot")
            .field("started", &self.table.get().is_some())
            .finish()
    }
}

/// The table and its epoll set.
struct Table {
    epoll: AsyncFd<OwnedFd>,
    entries: Mutex<Entries>,
    parked: metrics::Gauge,
    resume: Resume,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").finish_non_exhaustive()
    }
}

/// Slots reused through a free list; a key is the slot's index and its generation, so a
/// readiness event or a `KILL` for a session that has already left finds nothing.
#[derive(Default)]
struct Entries {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// The lot's task has ended: nothing more is taken.
    closed: bool,
}

struct Slot {
    generation: u32,
    held: Option<(std::net::TcpStream, Payload)>,
}

fn key(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

impl Entries {
    fn insert(&mut self, held: (std::net::TcpStream, Payload)) -> u64 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    held: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.held = Some(held);
        key(index, slot.generation)
    }

    fn take(&mut self, key: u64) -> Option<(std::net::TcpStream, Payload)> {
        let (index, generation) = (key as u32, (key >> 32) as u32);
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        let held = slot.held.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index);
        Some(held)
    }

    fn take_all(&mut self) -> Vec<(std::net::TcpStream, Payload)> {
        let mut all = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Some(held) = slot.held.take() {
                slot.generation = slot.generation.wrapping_add(1);
                self.free.push(index as u32);
                all.push(held);
            }
        }
        all
    }
}

impl Lot {
    pub fn new(shutdown: Signal, parked: metrics::Gauge, resume: Resume) -> Self {
        Self {
            shutdown,
            parked,
            resume,
            table: OnceLock::new(),
        }
    }

    /// The proxy's phase, as the sessions it resumes read it.
    pub fn signal(&self) -> &Signal {
        &self.shutdown
    }

    fn table(&self) -> Option<&Arc<Table>> {
        self.table
            .get_or_init(|| match Table::start(self) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "quiet clients keep their tasks: no epoll set for the lot");
                    None
                }
            })
            .as_ref()
    }

    /// Sets a quiet session aside: its `socket` (plain TCP, nothing unread) and its
    /// `state`. `Err` gives both back when the lot does not take it (the proxy is not
    /// simply running, or the socket could not move); the caller keeps the session.
    /// A session killed meanwhile is dropped here.
    pub fn park(
        &self,
        socket: TcpStream,
        state: Payload,
        client: &ClientInfo,
    ) -> Result<(), (TcpStream, Payload)> {
        let Some(table) = self.table() else {
            return Err((socket, state));
        };
        if self.shutdown.phase() != Phase::Running {
            return Err((socket, state));
        }
        let socket = match socket.into_std() {
            Ok(s) => s,
            Err(e) => {
                // The socket is gone with the failed move; so is the session.
                tracing::info!(client.addr = %client.addr, error = %e, "a quiet client's socket could not be set aside: closed");
                return Ok(());
            }
        };
        let mut entries = table.entries.locked();
        // Under the lock, so a move of the phase either finds this session in the
        // table (and takes it out) or comes before it (and it is refused here).
        if self.shutdown.phase() != Phase::Running || entries.closed {
            drop(entries);
            return back_to_runtime(socket, state);
        }
        let key = entries.insert((socket, state));
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT;
        // A socket parked before is still in the set, disarmed (see `Table::resume`):
        // re-armed under its new key, one call; `add` the first time.
        let fd = fd_of(&entries, key);
        let data = epoll::EventData::new_u64(key);
        let registered = match epoll::modify(table.epoll.get_ref(), fd, data, flags) {
            Err(rustix::io::Errno::NOENT) => epoll::add(table.epoll.get_ref(), fd, data, flags),
            r => r,
        };
        if let Err(e) = registered {
            let (socket, state) = entries.take(key).expect("just inserted");
            drop(entries);
            tracing::debug!(error = %e, "a quiet client's socket could not join the lot");
            return back_to_runtime(socket, state);
        }
        let weak: Weak<dyn Evict> = Arc::downgrade(table) as Weak<dyn Evict>;
        if !client.set_aside(weak, key) {
            // Killed while it was being set aside: it ends here.
            let held = entries.take(key);
            drop(entries);
            drop(held);
            return Ok(());
        }
        drop(entries);
        self.parked.increment(1.0);
        Ok(())
    }
}

/// The socket of the session under `key` (just inserted).
fn fd_of(entries: &Entries, key: u64) -> std::os::fd::BorrowedFd<'_> {
    entries.slots[key as u32 as usize]
        .held
        .as_ref()
        .expect("just inserted")
        .0
        .as_fd()
}

/// A session the lot did not take, given back to its task with its socket back with
/// the runtime.
fn back_to_runtime(
    socket: std::net::TcpStream,
    state: Payload,
) -> Result<(), (TcpStream, Payload)> {
    match TcpStream::from_std(socket) {
        Ok(s) => Err((s, state)),
        Err(e) => {
            tracing::info!(error = %e, "a quiet client's socket could not return to the runtime: closed");
            Ok(())
        }
    }
}

impl Table {
    fn start(lot: &Lot) -> std::io::Result<Arc<Self>> {
        let fd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        // `AsyncFd::register_with_interest` is its replacement, but is `unsafe` (this
        // crate forbids it): its condition — the descriptor stays open and the same
        // while registered — holds, as the `OwnedFd` is moved into the `AsyncFd` and
        // closed only with it.
        #[allow(deprecated)]
        let epoll = AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
        let table = Arc::new(Table {
            epoll,
            entries: Mutex::default(),
            parked: lot.parked.clone(),
            resume: lot.resume,
        });
        tokio::spawn(serve(Arc::clone(&table), lot.shutdown.clone()));
        Ok(table)
    }

    /// Takes the session under `key` out (its socket leaves the epoll set) and gives it
    /// a task again.
    fn wake(&self, key: u64) {
        let held = self.entries.locked().take(key);
        if let Some(held) = held {
            self.resume(held);
        }
    }

    /// The socket stays in the lot's set, disarmed (its event was one-shot, or the
    /// phase moved and it is ignored by key), so parking it again is one `epoll_ctl`;
    /// the kernel drops the entry when the socket closes.
    fn resume(&self, (socket, state): (std::net::TcpStream, Payload)) {
        self.parked.decrement(1.0);
        match TcpStream::from_std(socket) {
            Ok(s) => (self.resume)(s, state),
            Err(e) => {
                tracing::info!(error = %e, "a quiet client's socket could not return to the runtime: closed");
            }
        }
    }

    /// Every session out, each to its own task (the phase moved); with `close`, the
    /// lot takes no more (its task ends).
    fn wake_all(&self, close: bool) {
        let all = {
            let mut entries = self.entries.locked();
            entries.closed |= close;
            entries.take_all()
        };
        for held in all {
            self.resume(held);
        }
    }
}

impl Evict for Table {
    fn evict(&self, key: u64) {
        let held = self.entries.locked().take(key);
        if let Some((socket, state)) = held {
            self.parked.decrement(1.0);
            let _ = epoll::delete(self.epoll.get_ref(), &socket);
            drop(state);
            drop(socket);
        }
    }
}

/// The lot's task: wakes the sessions whose sockets became readable, and all of them
/// when the phase moves; ends (after waking all) when the proxy closes.
async fn serve(table: Arc<Table>, shutdown: Signal) {
    let mut keys: Vec<u64> = Vec::with_capacity(READY_AT_ONCE);
    loop {
        let moved = shutdown.next_move();
        let mut moved = std::pin::pin!(moved);
        moved.as_mut().enable();
        let phase = shutdown.phase();
        if phase != Phase::Running {
            table.wake_all(phase == Phase::Closing);
            if phase == Phase::Closing {
                return;
            }
        }
        tokio::select! {
            ready = table.epoll.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(error = %e, "the lot's epoll set failed: waking every quiet client, and none goes there again");
                        table.wake_all(true);
                        return;
                    }
                };
                loop {
                    match ready_keys(table.epoll.get_ref(), &mut keys) {
                        Ok(0) => {
                            guard.clear_ready();
                            break;
                        }
                        Ok(_) => {
                            for key in keys.drain(..) {
                                table.wake(key);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the lot's epoll wait failed");
                            break;
                        }
                    }
                }
            }
            _ = moved => {}
        }
    }
}

/// Most readiness events read with one `epoll_wait`.
const READY_AT_ONCE: usize = 256;

/// The keys of the sessions whose sockets are ready now (without waiting), into `keys`.
fn ready_keys(epoll: &OwnedFd, keys: &mut Vec<u64>) -> std::io::Result<usize> {
    let mut events = [std::mem::MaybeUninit::<epoll::Event>::uninit(); READY_AT_ONCE];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match epoll::wait(epoll, &mut events, Some(&now)) {
            Ok((ready, _)) => {
                keys.extend(ready.iter().map(|ev| ev.data.u64()));
                return Ok(ready.len());
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> (std::net::TcpStream, Payload) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (s, Box::new(()))
    }

    #[tokio::test]
    async fn a_parked_session_is_resumed_by_its_request_and_a_closed_lot_takes_no_more() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static RESUMED: AtomicUsize = AtomicUsize::new(0);
        fn resume(_: TcpStream, _: Payload) {
            RESUMED.fetch_add(1, Ordering::SeqCst);
        }
        let (_trigger, signal) = crate::shutdown::channel();
        let lot = Lot::new(signal, metrics::gauge!("test_lot_parked"), resume);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = Arc::new(crate::clients::Clients::default());
        let info = clients.register(addr, None);
        let pair = || async {
            let ours = TcpStream::connect(addr).await.unwrap();
            let (theirs, _) = listener.accept().await.unwrap();
            (ours, theirs)
        };
        let (ours, theirs) = pair().await;
        assert!(lot.park(ours, Box::new(()), &info).is_ok());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(RESUMED.load(Ordering::SeqCst), 0, "resumed while quiet");
        // Its peer sends: the lot's task gives it back.
        tokio::io::AsyncWriteExt::write_all(&mut { theirs }, b"x")
            .await
            .unwrap();
        for _ in 0..100 {
            if RESUMED.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            RESUMED.load(Ordering::SeqCst),
            1,
            "not resumed by its request"
        );
        // Closed (its task ended): a session is refused and stays with its caller.
        lot.table().expect("started").wake_all(true);
        let (ours, _theirs) = pair().await;
        assert!(lot.park(ours, Box::new(()), &info).is_err());
    }

    #[test]
    fn a_key_finds_its_own_session_once_and_a_reused_slot_is_not_the_old_key() {
        let mut e = Entries::default();
        let a = e.insert(held());
        assert!(e.take(a).is_some());
        assert!(e.take(a).is_none(), "taken once");
        let b = e.insert(held());
        assert_eq!(b as u32, a as u32, "the slot is reused");
        assert_ne!(a, b, "under another generation");
        assert!(e.take(a).is_none(), "the old key finds nothing");
        let c = e.insert(held());
        assert_eq!(e.take_all().len(), 2);
        assert!(e.take(b).is_none() && e.take(c).is_none());
    }
}
