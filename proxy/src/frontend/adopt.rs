//! Taking over a client another handoff handed over (a takeover's successor side): its
//! socket becomes a session here, logged in as it was, with its cancel key, parameters
//! and named statements (transaction mode), or with its own server connection
//! (session mode). Nothing is sent to the client: it does not know it moved.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::api::takeover::{Mode, MovedClient};
use crate::backend::login::ServerConn;
use crate::clients::LoginInfo;
use crate::config::PoolMode;
use crate::frontend::Ctx;
use crate::metrics::ClientConnected;
use crate::net::stream::Conn;
use crate::relay::handover::credentials_in;
use crate::relay::{session_mode, txn};
use crate::shutdown::Signal;

fn socket(fd: OwnedFd) -> Result<TcpStream, String> {
    let s = std::net::TcpStream::from(fd);
    s.set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(s))
        .map_err(|e| format!("its socket cannot be used here: {e}"))
}

/// Checks what `moved` needs of this process's configuration and makes its session,
/// which starts relaying once `go` says so — after the other process has been told the
/// client is taken, so that the two never serve one socket — and ends at once if `go`
/// is dropped. `Err`: why it was not taken (the other process keeps it). `tracker` is
/// held by the session, as the listener's sessions hold theirs.
pub(crate) fn spawn(
    moved: MovedClient,
    fds: Vec<OwnedFd>,
    ctx: &Arc<Ctx>,
    shutdown: Signal,
    tracker: mpsc::Sender<()>,
    go: oneshot::Receiver<()>,
) -> Result<(), String> {
    let cfg = &ctx.config;
    let credentials = credentials_in(&moved.credentials).ok_or("malformed SCRAM keys")?;
    let mut fds = fds.into_iter();
    let client_fd = fds.next().ok_or("no client socket came with it")?;
    // Where it goes: its database's route here (transaction mode: routes may have
    // changed), or the shard its server connection belongs to (session mode).
    let (shard, server_db) = match (&moved.mode, cfg.pool_mode) {
        (Mode::Transaction { .. }, PoolMode::Transaction) => {
            let r = crate::frontend::session::routed(cfg, &moved.database)
                .ok_or_else(|| format!("database \"{}\" is not routed here", moved.database))?;
            (r.shard, r.server_db)
        }
        (
            Mode::Session {
                shard,
                server_database,
                ..
            },
            PoolMode::Session,
        ) => {
            let i = cfg
                .shards
                .iter()
                .position(|s| &s.name == shard)
                .ok_or_else(|| format!("shard \"{shard}\" is not configured here"))?;
            (i, server_database.clone())
        }
        _ => return Err("its pool mode is not HANDOFF_POOL_MODE here".into()),
    };
    let server_fd = match &moved.mode {
        Mode::Session { .. } => Some(fds.next().ok_or("no server socket came with it")?),
        Mode::Transaction { .. } => None,
    };
    let mut client = Conn::new(socket(client_fd)?);
    client.rbuf = BytesMut::from(&moved.pending[..]);
    let server = match (server_fd, &moved.mode) {
        (
            Some(fd),
            Mode::Session {
                server_pid,
                server_key,
                server_addr,
                server_pending,
                ..
            },
        ) => {
            let mut conn = Conn::new(socket(fd)?);
            conn.rbuf = BytesMut::from(&server_pending[..]);
            Some(ServerConn {
                conn,
                params: Vec::new(),
                pid: *server_pid,
                key: Bytes::from(server_key.clone()),
                peer: *server_addr,
            })
        }
        _ => None,
    };
    let connected = UNIX_EPOCH + Duration::from_millis(moved.connected_ms);
    let info = ctx
        .clients
        .register_since(moved.addr, moved.local, connected);
    info.logged_in(LoginInfo {
        user: moved.user.as_str().into(),
        database: moved.database.as_str().into(),
        route: Some((shard, server_db.as_str().into())),
        application_name: moved.application_name.as_str().into(),
        tls: false,
        stats: ctx.clients.stats_for(&moved.database),
    });
    let permit = Arc::clone(&ctx.permits).try_acquire_owned().ok();
    let ctx = Arc::clone(ctx);
    let entry = Arc::clone(&info);
    let task = tokio::spawn(async move {
        let listed = ctx.clients.guard(&entry);
        if go.await.is_err() {
            return;
        }
        let gauge = ClientConnected::new();
        // Its limits are counted here too, though a moved client is never refused.
        let slot = ctx.limits.admit(&moved.user, &moved.database, 0, 0);
        let span = entry.span();
        let state = &ctx.shards[shard];
        match (moved.mode, server) {
            (
                Mode::Session {
                    params, on_standby, ..
                },
                Some(server),
            ) => {
                let login = session_mode::ServerLogin {
                    user: moved.user,
                    database: server_db,
                    params,
                    credentials,
                    minor: moved.minor,
                    client: entry,
                };
                let cancel = (moved.cancel_pid, Bytes::from(moved.cancel_key));
                if on_standby {
                    session_mode::adopt_reads(
                        client, &ctx.relay, state, login, server, cancel, shutdown,
                    )
                    .instrument(span)
                    .await;
                } else {
                    session_mode::adopt(client, &ctx.relay, state, login, server, cancel, shutdown)
                        .instrument(span)
                        .await;
                }
                drop((slot, gauge, listed, permit, tracker));
            }
            (
                Mode::Transaction {
                    desired,
                    startup,
                    statements,
                    sql_statements,
                },
                _,
            ) => {
                let target = ctx.relay.shared.targets.share(txn::PoolTarget {
                    user: moved.user,
                    database: server_db,
                    credentials,
                    // A moved client keeps its database name, suffix and all.
                    target: crate::config::Target::split(&moved.database)
                        .map(|(_, t)| t)
                        .unwrap_or(crate::config::Target::Primary),
                });
                let registration =
                    match ctx
                        .relay
                        .cancels
                        .adopt(moved.cancel_pid, &moved.cancel_key, None)
                    {
                        Some(r) => r,
                        None => ctx
                            .relay
                            .cancels
                            .register(None, crate::backend::cancel::key_len(moved.minor)),
                    };
                let mut session = Box::new(txn::Txn::new(
                    &ctx.relay,
                    state,
                    target,
                    registration,
                    crate::relay::shared::no_params(),
                    entry,
                ));
                if !session.restore(&desired, &startup, &statements, &sql_statements) {
                    tracing::warn!(
                        "a moved client's SQL-level statement name is not text: dropped"
                    );
                }
                // What the task held, the session holds: it may outlive the task.
                session.keep(Box::new((slot, gauge, listed, permit, tracker)));
                txn::relay(client, session, shutdown).await;
            }
            (Mode::Session { .. }, None) => drop((slot, gauge, listed, permit, tracker)),
        }
    });
    info.set_abort(task.abort_handle());
    Ok(())
}
