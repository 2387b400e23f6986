//! A session-mode session in a takeover: the client's socket and its own server
//! connection go to the successor together, so everything the server backend holds
//! (temporary tables, `LISTEN`, advisory locks, session settings, prepared statements,
//! an open cursor `WITH HOLD`) is still there on the other side.

use std::sync::Arc;

use super::{gate, server_key, Attached, ServerLogin};
use crate::api::takeover::Mode;
use crate::backend::cancel::Registration;
use crate::backend::login::ServerConn;
use crate::error::send_error;
use crate::metrics::{self as m, GaugeGuard};
use crate::net::stream::Conn;
use crate::relay::handover::{client_part, dup};
use crate::relay::Ctx;
use crate::shard::Shard;
use crate::shutdown::Signal;

/// Gives the session to the successor: true once it took it (both sockets are its
/// now; this process's copies close without a word to either side). `on_standby`: a
/// session relaying on a standby.
pub(super) async fn hand_over(
    ctx: &Ctx,
    client: &Conn,
    server: &ServerConn,
    shard: &str,
    login: &ServerLogin,
    registration: &Registration,
    on_standby: bool,
) -> bool {
    let (Some(cfd), Some(sfd)) = (dup(client), dup(&server.conn)) else {
        return false;
    };
    let mode = Mode::Session {
        shard: shard.to_string(),
        server_database: login.database.clone(),
        params: login.params.clone(),
        server_pid: server.pid,
        server_key: server.key.to_vec(),
        server_addr: server.peer,
        server_pending: server.conn.rbuf.to_vec(),
        on_standby,
    };
    let Some(moved) = client_part(
        &login.client,
        login.minor,
        (registration.pid, &registration.key()[..]),
        &login.credentials,
        &client.rbuf,
        mode,
    ) else {
        return false;
    };
    ctx.outbox.send(moved, vec![cfd, sfd]).await
}

/// Takes over a session another process handed over: its server connection is
/// registered on the shard's serving generation (waiting in the buffer if the shard
/// has none now) and the relay goes on where the other process left it.
pub(crate) async fn adopt(
    mut client: Conn,
    ctx: &Ctx,
    shard: &Arc<Shard>,
    login: ServerLogin,
    server: ServerConn,
    cancel: (i32, bytes::Bytes),
    shutdown: Signal,
) {
    let entered = match gate(ctx, shard, 0).await {
        Ok(e) => e,
        Err(err) => {
            send_error(&mut client.stream, &err).await;
            return;
        }
    };
    let registration = adopt_cancel_key(ctx, &server, cancel, login.minor);
    let attached = Attached {
        entered,
        server,
        server_gauge: GaugeGuard::new(m::SERVER_CONNECTIONS),
        registration,
    };
    super::relay(client, ctx, shard, &login, shutdown, attached).await
}

/// The moved session's cancel key, registered here for its server backend (the one it
/// had, when the predecessor's registry entry came along; a new one otherwise).
pub(super) fn adopt_cancel_key(
    ctx: &Ctx,
    server: &ServerConn,
    cancel: (i32, bytes::Bytes),
    minor: u16,
) -> Registration {
    let key = server_key(server);
    match ctx.cancels.adopt(cancel.0, &cancel.1, Some(key.clone())) {
        Some(r) => r,
        None => ctx
            .cancels
            .register_as(key.pid, Some(key), crate::backend::cancel::key_len(minor)),
    }
}
