//! Takeover: a new handoff process takes a running one's place on the same host without
//! a client noticing — to upgrade the binary or change any setting.
//!
//! The running process listens on `HANDOFF_TAKEOVER_SOCKET` (a Unix socket, mode 0600).
//! A process started with `--takeover` has already loaded and checked its own
//! configuration when it connects; then:
//!
//! 1. both say `Hello` with the hand-over format they speak, and stop unless it is the
//!    same ([`FORMAT`]);
//! 2. the running process waits (up to `HANDOFF_SHUTDOWN_TIMEOUT`) until every shard
//!    serves — a shard held, buffering or switching over is not handed over mid-change
//!    — and sends its two listening sockets (`SCM_RIGHTS`);
//! 3. the successor starts on them (its shards, pools, coordination under the same
//!    proxy id) and says `Ready`. Until then the running process has not stopped
//!    accepting: a successor that fails or dies before this point changes nothing;
//! 4. the running process stops accepting (the successor accepts on the same sockets)
//!    and hands over each client at its next transaction boundary, with its socket and
//!    its session's state (a session-mode client with its server connection too); the
//!    session here ends only once the successor says it has taken the client. Cancel
//!    requests the successor receives for clients still here are passed back;
//! 5. when no client is left — or `HANDOFF_SHUTDOWN_TIMEOUT` has passed, leaving the
//!    ones that cannot move (TLS sessions, the console) — it sends its statistics and
//!    `Done`, and shuts down as on SIGTERM: what is left gets `57P01` at its next
//!    transaction boundary.
//!
//! A successor lost before it says `Done` was needed (its socket closes) sends this
//! process back to serving: it accepts again and keeps every client it still has.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::api::takeover::{self as wire, Message, FORMAT};
use crate::metrics as m;
use crate::net::passfd::{self, Receiver, Sender};
use crate::relay::handover::Outgoing;
use crate::shutdown::{Phase, Signal, Trigger};

/// How long either side waits for the other's next step of the hand-shake.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the successor may take to start (discovery, its pools, etcd).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the running process looks whether it still has clients.
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Why a takeover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(
        "HANDOFF_TAKEOVER_SOCKET is off: there is no socket to take a running handoff over from"
    )]
    NoSocket,
    #[error("no running handoff answers at {path} (HANDOFF_TAKEOVER_SOCKET): {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the running handoff refused the takeover: {0}")]
    Refused(String),
    #[error("the running handoff speaks hand-over format {theirs} (version {version}) and this one {FORMAT}: stop it and start this one instead")]
    Format { theirs: u32, version: String },
    #[error("{var} is {ours} here but the running handoff listens on {theirs}: a takeover keeps the listening sockets, so changing it needs a restart")]
    Address {
        var: &'static str,
        ours: std::net::SocketAddr,
        theirs: std::net::SocketAddr,
    },
    #[error("the takeover channel failed: {0}")]
    Channel(String),
    /// The successor could not start on the listeners (`crate::StartError`'s words).
    #[error("{0}")]
    Start(String),
}

fn channel_error(e: impl std::fmt::Display) -> TakeoverError {
    TakeoverError::Channel(e.to_string())
}

async fn send(
    tx: &Sender,
    m: &Message,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<()> {
    let body = serde_json::to_vec(m).map_err(std::io::Error::other)?;
    tx.send(&body, fds).await
}

/// The next message, within `within`.
async fn recv(rx: &mut Receiver, within: Duration) -> Result<(Message, Vec<OwnedFd>), String> {
    match tokio::time::timeout(within, rx.recv()).await {
        Err(_) => Err(format!("no answer within {within:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(None)) => Err("the other process closed the channel".into()),
        Ok(Ok(Some((body, fds)))) => wire::decode(&body)
            .map(|m| (m, fds))
            .map_err(|e| format!("a message did not decode: {e}")),
    }
}

fn hello() -> Message {
    Message::Hello {
        format: FORMAT,
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
    }
}

/// Binds the takeover socket at `path` (mode 0600). A file left there by a process
/// that is gone is replaced; a live one's is replaced only when `replace` (a successor
/// taking the path over from its predecessor), atomically, so a later takeover always
/// finds the newest process.
pub(crate) async fn bind(path: &Path, replace: bool) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if !replace && UnixStream::connect(path).await.is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another handoff listens there",
        ));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

/// What the running process's side of a takeover works with.
pub(crate) struct Handing {
    pub path: PathBuf,
    pub trigger: Arc<Trigger>,
    pub signal: Signal,
    /// Duplicates of the two listening sockets, and their addresses.
    pub client: (OwnedFd, std::net::SocketAddr),
    pub admin: (OwnedFd, std::net::SocketAddr),
    pub shards: Vec<Arc<crate::shard::Shard>>,
    pub relay: Arc<crate::relay::Ctx>,
    pub clients: Arc<crate::clients::Clients>,
    pub shutdown_timeout: Duration,
    /// Told once the clients have been handed over: the process then shuts down.
    pub handed_over: Arc<Notify>,
}

/// The running process's side: answers successors on `listener`, one at a time, until
/// one has taken everything over or the proxy shuts down.
pub(crate) async fn serve(listener: UnixListener, h: Handing) {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata(&h.path).map(|m| m.ino()).ok();
    loop {
        let conn = tokio::select! {
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "takeover socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = h.signal.reached(Phase::Draining) => {
                // Shutting down, not taken over: the path goes, unless a successor
                // has made it its own.
                if ours.is_some() && std::fs::metadata(&h.path).map(|m| m.ino()).ok() == ours {
                    let _ = std::fs::remove_file(&h.path);
                }
                return;
            }
        };
        let started = Instant::now();
        tracing::info!("takeover: a successor connected");
        match hand_over(conn, &h).await {
            Ok(moved) => {
                metrics::counter!(m::TAKEOVERS_TOTAL, "result" => "done").increment(1);
                metrics::histogram!(m::TAKEOVER_SECONDS).record(started.elapsed().as_secs_f64());
                tracing::info!(clients_moved = moved, elapsed = ?started.elapsed(), "takeover: handed over; shutting down");
                h.handed_over.notify_one();
                return;
            }
            Err(Failed::Refused(why)) => {
                metrics::counter!(m::TAKEOVERS_TOTAL, "result" => "refused").increment(1);
                tracing::warn!(reason = %why, "takeover refused: serving on");
            }
            Err(Failed::Lost(why)) => {
                metrics::counter!(m::TAKEOVERS_TOTAL, "result" => "failed").increment(1);
                tracing::warn!(reason = %why, "takeover failed: the successor is gone; serving on");
            }
        }
    }
}

enum Failed {
    /// Nothing moved, by this process's choice.
    Refused(String),
    /// The successor failed or went away.
    Lost(String),
}

/// One successor's takeover; the number of clients moved.
async fn hand_over(conn: UnixStream, h: &Handing) -> Result<usize, Failed> {
    let (tx, mut rx) = passfd::split(conn);
    let lost = Failed::Lost;
    let (msg, _) = recv(&mut rx, STEP_TIMEOUT).await.map_err(lost)?;
    let Message::Hello {
        format,
        version,
        pid,
    } = msg
    else {
        return Err(Failed::Lost(format!("expected hello, got {msg:?}")));
    };
    tracing::info!(successor.pid = pid, successor.version = %version, format, "takeover: successor says hello");
    if format != FORMAT {
        let reason = format!("hand-over format {format} asked, this process speaks {FORMAT}");
        let _ = send(&tx, &hello(), &[]).await;
        return Err(Failed::Refused(reason));
    }
    send(&tx, &hello(), &[])
        .await
        .map_err(|e| lost(e.to_string()))?;
    if let Err(why) = wait_serving(&h.shards, h.shutdown_timeout).await {
        let _ = send(
            &tx,
            &Message::Refused {
                reason: why.clone(),
            },
            &[],
        )
        .await;
        return Err(Failed::Refused(why));
    }
    let listeners = Message::Listeners {
        client: h.client.1,
        admin: h.admin.1,
    };
    send(&tx, &listeners, &[h.client.0.as_fd(), h.admin.0.as_fd()])
        .await
        .map_err(|e| lost(e.to_string()))?;
    match recv(&mut rx, READY_TIMEOUT).await.map_err(lost)? {
        (Message::Ready, _) => {}
        (other, _) => return Err(Failed::Lost(format!("expected ready, got {other:?}"))),
    }
    // From here on the successor accepts; sessions move at their boundaries.
    let (out_tx, out_rx) = mpsc::channel(64);
    h.relay.outbox.open(out_tx);
    h.trigger.advance(Phase::HandingOver);
    tracing::info!(
        clients = h.clients.count(),
        "takeover: the successor is ready; handing clients over"
    );
    let r = move_clients(&tx, &mut rx, out_rx, h).await;
    h.relay.outbox.close();
    match r {
        Ok(moved) => {
            let stats = h
                .clients
                .totals()
                .into_iter()
                .map(|(database, totals)| wire::DbTotals { database, totals })
                .collect();
            // The successor may be gone by now: it has every client it took.
            let _ = send(&tx, &Message::Done { stats }, &[]).await;
            Ok(moved)
        }
        Err(why) => {
            h.trigger.retreat();
            Err(Failed::Lost(why))
        }
    }
}

/// Waits until every shard serves, up to `within`.
async fn wait_serving(shards: &[Arc<crate::shard::Shard>], within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut told = false;
    loop {
        // Serving, and no switchover (or outside hold) running on it.
        let busy = shards
            .iter()
            .find(|s| s.serving().is_none() || s.op.try_lock().is_err());
        let Some(busy) = busy else { return Ok(()) };
        if !told {
            tracing::info!(shard = %busy.name, "takeover: waiting for the shard to serve (a switchover or hold is under way)");
            told = true;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "shard \"{}\" has no serving primary (held, buffering or switching over) and did not serve again within HANDOFF_SHUTDOWN_TIMEOUT ({within:?}): try again once it serves",
                busy.name
            ));
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// Sends each client the relays give up and settles each answer, until none is left
/// here or the shutdown timeout has passed. `Err`: the successor was lost.
async fn move_clients(
    tx: &Sender,
    rx: &mut Receiver,
    mut out: mpsc::Receiver<Outgoing>,
    h: &Handing,
) -> Result<usize, String> {
    let started = Instant::now();
    let mut waiting: HashMap<u64, oneshot::Sender<bool>> = HashMap::new();
    let mut moved = 0;
    let mut check = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            Some(o) = out.recv() => {
                let fds: Vec<_> = o.fds.iter().map(|f| f.as_fd()).collect();
                let id = o.client.id;
                let msg = Message::Client(Box::new(o.client));
                if let Err(e) = send(tx, &msg, &fds).await {
                    let _ = o.taken.send(false);
                    fail_all(&mut waiting);
                    return Err(format!("sending a client: {e}"));
                }
                waiting.insert(id, o.taken);
            }
            r = rx.recv() => {
                let msg = match r {
                    Ok(Some((body, _))) => wire::decode(&body).map_err(|e| e.to_string()),
                    Ok(None) => Err("the successor closed the channel".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match msg {
                    Ok(Message::Adopted { id }) => {
                        if let Some(w) = waiting.remove(&id) {
                            moved += 1;
                            metrics::counter!(m::TAKEOVER_CLIENTS_MOVED_TOTAL).increment(1);
                            let _ = w.send(true);
                        }
                    }
                    Ok(Message::NotAdopted { id, reason }) => {
                        tracing::warn!(client = id, %reason, "takeover: the successor did not take a client: it stays here");
                        if let Some(w) = waiting.remove(&id) {
                            let _ = w.send(false);
                        }
                    }
                    Ok(Message::Cancel { pid, key }) => {
                        let cancels = Arc::clone(&h.relay.cancels);
                        let timeout = h.relay.settings.connect_timeout;
                        tokio::spawn(async move { cancels.forward(pid, &key, timeout).await });
                    }
                    Ok(other) => tracing::warn!(message = ?other, "takeover: unexpected message ignored"),
                    Err(why) => {
                        fail_all(&mut waiting);
                        return Err(why);
                    }
                }
            }
            _ = check.tick() => {
                let left = h.clients.count();
                if waiting.is_empty() && (left == 0 || started.elapsed() >= h.shutdown_timeout) {
                    if left > 0 {
                        tracing::info!(clients = left, "takeover: clients that cannot move (TLS, console) or did not reach a transaction boundary in time stay; they get 57P01 at their next boundary");
                    }
                    return Ok(moved);
                }
            }
        }
    }
}

fn fail_all(waiting: &mut HashMap<u64, oneshot::Sender<bool>>) {
    for (_, w) in waiting.drain() {
        let _ = w.send(false);
    }
}

/// The running handoff as its successor sees it: the channel, and the two listening
/// sockets it handed over with their addresses.
pub(crate) struct Predecessor {
    pub tx: Sender,
    pub rx: Receiver,
    pub client: (tokio::net::TcpListener, std::net::SocketAddr),
    pub admin: (tokio::net::TcpListener, std::net::SocketAddr),
}

/// The successor's first steps: connects to the running handoff, checks the format and
/// takes its listeners ([`ready`] once started on them).
pub(crate) async fn connect(config: &crate::config::Config) -> Result<Predecessor, TakeoverError> {
    let path = config
        .takeover_socket
        .clone()
        .ok_or(TakeoverError::NoSocket)?;
    let conn = UnixStream::connect(&path)
        .await
        .map_err(|source| TakeoverError::Connect {
            path: path.clone(),
            source,
        })?;
    let (tx, mut rx) = passfd::split(conn);
    send(&tx, &hello(), &[]).await.map_err(channel_error)?;
    match recv(&mut rx, STEP_TIMEOUT)
        .await
        .map_err(TakeoverError::Channel)?
    {
        (
            Message::Hello {
                format,
                version,
                pid,
            },
            _,
        ) => {
            if format != FORMAT {
                return Err(TakeoverError::Format {
                    theirs: format,
                    version,
                });
            }
            tracing::info!(predecessor.pid = pid, predecessor.version = %version, "takeover: the running handoff answered");
        }
        (Message::Refused { reason }, _) => return Err(TakeoverError::Refused(reason)),
        (other, _) => return Err(channel_error(format!("expected hello, got {other:?}"))),
    }
    let within = config.shutdown_timeout + STEP_TIMEOUT;
    let (client, admin, fds) = match recv(&mut rx, within)
        .await
        .map_err(TakeoverError::Channel)?
    {
        (Message::Listeners { client, admin }, fds) if fds.len() == 2 => (client, admin, fds),
        (Message::Refused { reason }, _) => return Err(TakeoverError::Refused(reason)),
        (other, _) => {
            return Err(channel_error(format!(
                "expected the listeners, got {other:?}"
            )))
        }
    };
    for (var, ours, theirs) in [
        ("HANDOFF_LISTEN", config.listen, client),
        ("HANDOFF_ADMIN_LISTEN", config.admin_listen, admin),
    ] {
        let same = ours == theirs || (ours.port() == 0 && ours.ip() == theirs.ip());
        if !same {
            return Err(TakeoverError::Address { var, ours, theirs });
        }
    }
    let mut fds = fds.into_iter();
    let listener = |fd: OwnedFd| {
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    };
    Ok(Predecessor {
        client: (
            listener(fds.next().expect("two")).map_err(channel_error)?,
            client,
        ),
        admin: (
            listener(fds.next().expect("two")).map_err(channel_error)?,
            admin,
        ),
        tx,
        rx,
    })
}

/// Tells the predecessor the successor serves on its listeners: it stops accepting and
/// starts handing clients over.
pub(crate) async fn ready(tx: &Sender) -> Result<(), TakeoverError> {
    send(tx, &Message::Ready, &[])
        .await
        .map_err(channel_error)?;
    tracing::info!("takeover: started on the running handoff's sockets; taking its clients over");
    Ok(())
}

/// The successor's receiving end: adopts each client, answers for it, passes back
/// cancel requests for clients still there, and adds the predecessor's statistics at
/// the end.
pub(crate) async fn receive(
    tx: Sender,
    mut rx: Receiver,
    ctx: Arc<crate::frontend::Ctx>,
    signal: Signal,
    tracker: mpsc::Sender<()>,
) {
    let (cancel_tx, mut cancel_rx) = mpsc::unbounded_channel();
    ctx.relay.cancels.forward_elsewhere(Some(cancel_tx));
    let started = Instant::now();
    let mut adopted = 0usize;
    loop {
        tokio::select! {
            r = rx.recv() => {
                let (body, fds) = match r {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        tracing::warn!("takeover: the predecessor closed the channel before it was done");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "takeover: the channel failed");
                        break;
                    }
                };
                match wire::decode(&body) {
                    Ok(Message::Client(c)) => {
                        let id = c.id;
                        let (go, start) = oneshot::channel();
                        let answer = match crate::frontend::adopt::spawn(*c, fds, &ctx, signal.clone(), tracker.clone(), start) {
                            Ok(()) => Message::Adopted { id },
                            Err(reason) => {
                                tracing::warn!(%reason, "takeover: a client could not be taken: it stays with the predecessor");
                                Message::NotAdopted { id, reason }
                            }
                        };
                        // The session relays only once the predecessor has been told
                        // (else it could serve the client too).
                        if send(&tx, &answer, &[]).await.is_err() {
                            break;
                        }
                        if go.send(()).is_ok() {
                            adopted += 1;
                        }
                    }
                    Ok(Message::Done { stats }) => {
                        for s in stats {
                            ctx.clients.add_totals(&s.database, s.totals);
                        }
                        tracing::info!(clients = adopted, elapsed = ?started.elapsed(), "takeover: done; the predecessor is shutting down");
                        break;
                    }
                    Ok(other) => tracing::warn!(message = ?other, "takeover: unexpected message ignored"),
                    Err(e) => {
                        tracing::warn!(error = %e, "takeover: a message did not decode");
                        break;
                    }
                }
            }
            Some((pid, key)) = cancel_rx.recv() => {
                let _ = send(&tx, &Message::Cancel { pid, key: key.to_vec() }, &[]).await;
            }
        }
    }
    ctx.relay.cancels.forward_elsewhere(None);
}
