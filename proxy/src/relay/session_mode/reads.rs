//! Session mode on a standby (`appdb@replica`, `appdb@any`): one standby serves the
//! whole session, chosen as a transaction's would be (the least busy in the shard's read
//! rotation; one that cannot be reached leaves it and the next is tried). Nothing
//! revokes a standby, so the session stays on it until either side ends; its server
//! session starts with `default_transaction_read_only` on, so it stays a reader even if
//! that standby is promoted under it. `@any` with no standby in the rotation is served
//! by the primary, as any session-mode session is (read-only by default all the same).

use std::sync::Arc;

use crate::config::{HostPort, Target};
use crate::error::{send_error, AttachError};
use crate::metrics::{self as m, GaugeGuard};
use crate::net::stream::Conn;
use crate::relay::common::End;
use crate::relay::Ctx;
use crate::shard::failure::RetryReason;
use crate::shard::replicas::Reading;
use crate::shard::Shard;
use crate::shutdown::Signal;

use super::{connect, greet, run, ServerLogin};

/// Serves a session-mode client of `appdb@replica` or `appdb@any` until it ends.
pub(crate) async fn serve(
    mut client: Conn,
    ctx: &Ctx,
    shard: &Arc<Shard>,
    login: ServerLogin,
    target: Target,
    shutdown: Signal,
) {
    let name = shard.name.as_str();
    let mut params = login.params.clone();
    if !params
        .iter()
        .any(|(k, _)| k == "default_transaction_read_only")
    {
        params.push(("default_transaction_read_only".into(), "on".into()));
    }
    let login = ServerLogin { params, ..login };
    let picked = {
        let _waiting = login.client.waiting();
        pick_and_connect(ctx, shard, &login, target).await
    };
    let (reading, mut server) = match picked {
        Ok(Some(found)) => found,
        // `@any`, no standby: the primary's session.
        Ok(None) => return super::serve(client, ctx, shard, login, shutdown).await,
        Err(err) => {
            send_error(&mut client.stream, &err.to_client_fatal(name)).await;
            return;
        }
    };
    let _server_gauge = GaugeGuard::new(m::SERVER_CONNECTIONS);
    let Some(_registration) = greet(&mut client, ctx, &server, login.minor).await else {
        return;
    };
    tracing::debug!(shard = name, standby = %reading.host(), "session relaying on a standby");
    // Not handed to a takeover's successor (it would need the standby's connection
    // moved as well): the session stays until it ends, as a TLS session does.
    let end = run(
        &mut client,
        &mut server.conn,
        name,
        shutdown,
        None,
        &login.client,
        &ctx.meters,
        None,
    )
    .await;
    if end == End::ServerGone {
        shard
            .replicas
            .set_down(reading.host(), "a session's connection to it was lost");
    }
    tracing::debug!(?end, "session on a standby ended");
}

/// A standby and a login on it; `Ok(None)` for `@any` when no standby is in the
/// rotation. `@replica` waits up to the buffer's window for one.
async fn pick_and_connect(
    ctx: &Ctx,
    shard: &Shard,
    login: &ServerLogin,
    target: Target,
) -> Result<Option<(Reading, crate::backend::login::ServerConn)>, AttachError> {
    let replicas = &shard.replicas;
    let mut except: Option<HostPort> = None;
    loop {
        let picked = match replicas.pick(except.as_ref()) {
            Some(r) => r,
            None if target == Target::Any => return Ok(None),
            None => {
                let wait = ctx.shard.settings.read_wait;
                match replicas.pick_within(wait).await {
                    Some(r) => r,
                    None => return Err(AttachError::NoStandby(wait)),
                }
            }
        };
        match connect(ctx, login, picked.host()).await {
            Ok(server) => {
                picked.served();
                return Ok(Some((picked, server)));
            }
            Err(e) if e.standby_unusable() => {
                metrics::counter!(m::SERVER_CONNECT_ERRORS_TOTAL).increment(1);
                replicas.set_down(picked.host(), &e.to_string());
                RetryReason::ConnectFailed.count(&shard.name);
                except = Some(picked.host().clone());
            }
            Err(e) => {
                return Err(AttachError::Pool(crate::error::PoolError::Connect(e)));
            }
        }
    }
}
