//! One client session, as an explicit sequence of phases:
//! Startup (SSL/GSS negotiation, cancel requests, the StartupMessage) → Auth → Connect
//! (the shard primary, session pooling) → Relay → Terminating.

use std::sync::Arc;

use futures_core::future::BoxFuture;
use handoff_protocol::backend::BackendMessage;
use handoff_protocol::error::ProxyError;
use handoff_protocol::framing::{StartupPacket, ENCRYPTION_ACCEPTED, ENCRYPTION_DECLINED};
use handoff_protocol::sqlstate;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::clients::{ClientInfo, LoginInfo};
use crate::frontend::client_auth::{self, Failure};
use std::collections::HashMap;

use crate::backend::login::Credentials;
use crate::config::{Config, PoolMode, Target};
use crate::error::send_error;
use crate::error::ConnError;
use crate::frontend::Ctx;
use crate::metrics::{self as m, ClientConnected};
use crate::net::stream::Conn;
use crate::relay::common::hello;
use crate::relay::session_mode;
use crate::relay::txn;
use crate::shutdown::Signal;

/// An info line or warning of the login with its client's address: from the login's
/// span when it runs in one (debug lines on), as a field of the line otherwise. (Its
/// user and database are not known yet, or not yet admitted, where this is used.)
macro_rules! login_log {
    ($level:ident, $addr:expr, $($rest:tt)+) => {{
        if txn::client_span_on() {
            tracing::$level!($($rest)+)
        } else {
            tracing::$level!(client.addr = %$addr, $($rest)+)
        }
    }};
}

/// What the client asked for in its StartupMessage.
#[derive(Debug)]
struct Startup {
    user: String,
    database: String,
    /// The protocol's minor version agreed with the client: 0 or 2 (3.1 is read as 3.0,
    /// as PostgreSQL 18 does).
    minor: u16,
    /// Everything else (application_name, options, …), passed on to the server.
    params: Vec<(String, String)>,
}

/// A logged-in session's relay, run until the session ends.
type Relay<'a> = BoxFuture<'a, ()>;

/// What a login leads to: a relay that runs in the session's task until the session
/// ends (the console, session mode), or a transaction-mode session, which owns what
/// it works with and keeps what the task held, as it may outlive the task (see
/// [`crate::relay::lot`]).
enum Started<'a> {
    Relay(crate::limits::Slot, Relay<'a>),
    Txn(crate::limits::Slot, Conn, Box<txn::Txn>, Signal),
}

/// Runs a client session to its end; `held` (the listener's connection permit and
/// drain tracker) is dropped when it ends.
///
/// Logging in needs far more state than relaying, and an idle client keeps its task
/// for as long as it stays connected: the login runs in a box of its own, freed once
/// it hands over the relay (a box of its own too), so the task keeps two pointers.
/// A plain function returning the session's future, not an `async fn`: an `async fn`
/// keeps each argument twice (as its argument and as the local it is moved into), and
/// the task keeps the future for the session's whole life. For the same reason the
/// socket comes in a box: the future keeps room for what it captured even after the
/// login has taken it, and a pointer is a quarter of a socket.
pub(crate) fn run<H: Send + Sync + 'static>(
    stream: TcpStream,
    ctx: Arc<Ctx>,
    shutdown: Signal,
    info: Arc<ClientInfo>,
    held: H,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let stream = Box::new(stream);
    async move {
        // Captured, not bound (a binding would be a second copy in the future): dropped
        // with the future's other captures once the session has ended.
        let _ = &held;
        let gauge = ClientConnected::new();
        let listed = ctx.clients.guard(&info);
        metrics::counter!(m::CLIENT_CONNECTIONS_TOTAL).increment(1);
        // The login's log context (its user and database are recorded once known),
        // only when debug lines are on, as for the transaction-mode relay: a span is
        // formatted and allocated when it is made and again when a field is recorded
        // (a tenth of the proxy's own CPU per login in a storm of logins). The login's
        // own info lines and warnings name the client otherwise (`login_log!`), and
        // the session and console relays make their own span once routed.
        let span = if txn::client_span_on() {
            info.span()
        } else {
            tracing::Span::none()
        };
        match Box::pin(start(*stream, &ctx, shutdown, info))
            .instrument(span)
            .await
        {
            None => {}
            Some(Started::Relay(_slot, relay)) => relay.await,
            Some(Started::Txn(slot, client, mut session, shutdown)) => {
                session.keep(Box::new((slot, listed, gauge, held)));
                txn::start(client, session, shutdown).await;
            }
        }
    }
}

/// Startup, authentication, the client's admission and, in transaction mode, the first
/// server login: the relay to run next, with the admission slot it holds.
async fn start(
    stream: TcpStream,
    ctx: &Ctx,
    shutdown: Signal,
    info: Arc<ClientInfo>,
) -> Option<Started<'_>> {
    let _ = stream.set_nodelay(true);
    let mut client = Conn::new(stream);
    let cfg = &ctx.config;

    // Boxed: the login's state is large and only needed once, so the session's own
    // future (which an idle client keeps alive) stays small.
    let login = tokio::time::timeout(
        cfg.client_login_timeout,
        Box::pin(login(&mut client, ctx, info.addr)),
    );
    let (startup, credentials, dest) = match login.await {
        Ok(Ok(Some(ok))) => ok,
        Ok(Ok(None)) | Ok(Err(Failure::Gone)) => return None,
        Ok(Err(Failure::Refuse(err))) => {
            if err.code == sqlstate::INVALID_PASSWORD {
                metrics::counter!(m::AUTH_FAILURES_TOTAL).increment(1);
                login_log!(info, info.addr, code = err.code, "client login refused");
            } else {
                login_log!(info, info.addr, code = err.code, error = %err.message, "client login refused");
            }
            send_error(&mut client.stream, &err).await;
            return None;
        }
        Err(_) => {
            let err = ProxyError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "client did not complete the login within HANDOFF_CLIENT_LOGIN_TIMEOUT ({:?})",
                    cfg.client_login_timeout
                ),
            );
            send_error(&mut client.stream, &err).await;
            return None;
        }
    };
    let slot = match ctx.limits.admit(
        &startup.user,
        &startup.database,
        cfg.limits.max_user_client_conn,
        cfg.limits.max_db_client_conn,
    ) {
        Ok(s) => s,
        Err(err) => {
            login_log!(info, info.addr, error = %err.message, "client refused");
            send_error(&mut client.stream, &err).await;
            return None;
        }
    };
    // Displayed as the relay's own spans show them (unquoted); there is a span only
    // when debug lines are on (see `run`).
    if txn::client_span_on() {
        let span = tracing::Span::current();
        span.record("user", tracing::field::display(&startup.user));
        span.record("database", tracing::field::display(&startup.database));
    }
    let application_name = startup
        .params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.as_str().into())
        .unwrap_or_default();
    info.logged_in(LoginInfo {
        user: slot.user(),
        database: slot.database(),
        route: match &dest {
            Destination::Console => None,
            Destination::Shard(r) => Some((r.shard, r.server_db.as_str().into())),
        },
        application_name,
        tls: client.stream.is_tls(),
        stats: ctx.clients.stats_for(&startup.database),
    });
    let routed = match dest {
        Destination::Console => {
            let relay: Relay<'_> = Box::pin(
                crate::console::serve(client, &ctx.console, startup.user, startup.minor, shutdown)
                    .instrument(info.span()),
            );
            return Some(Started::Relay(slot, relay));
        }
        Destination::Shard(routed) => routed,
    };
    match cfg.pool_mode {
        PoolMode::Session => {
            let shard = &ctx.shards[routed.shard];
            // The session's log context, kept for its whole life.
            let span = info.span();
            let login = session_mode::ServerLogin {
                user: startup.user.clone(),
                database: routed.server_db,
                params: startup.params.clone(),
                credentials,
                minor: startup.minor,
                client: info,
            };
            let relay: Relay<'_> = match routed.target {
                Target::Primary => Box::pin(
                    session_mode::serve(client, &ctx.relay, shard, login, shutdown)
                        .instrument(span),
                ),
                target => Box::pin(
                    session_mode::serve_reads(client, &ctx.relay, shard, login, target, shutdown)
                        .instrument(span),
                ),
            };
            Some(Started::Relay(slot, relay))
        }
        // Boxed: the greeting's state (a first server login, if the pool has no
        // connection yet) is not held while the client authenticates.
        PoolMode::Transaction => Box::pin(transaction_mode(
            client,
            ctx,
            startup,
            routed,
            credentials,
            info,
        ))
        .await
        .map(|(client, session)| Started::Txn(slot, client, session, shutdown)),
    }
}

/// Transaction mode: a pooled server connection per transaction. The session, logged
/// in on a server and greeted, for its relay.
async fn transaction_mode(
    mut client: Conn,
    ctx: &Ctx,
    mut startup: Startup,
    routed: Routed,
    credentials: Credentials,
    info: Arc<ClientInfo>,
) -> Option<(Conn, Box<txn::Txn>)> {
    let shard = &ctx.config.shards[routed.shard];
    let mut desired = HashMap::new();
    for (k, v) in std::mem::take(&mut startup.params) {
        if k == "options" {
            tracing::debug!("startup parameter 'options' is ignored in transaction mode");
            continue;
        }
        if !txn::valid_param_name(&k) {
            let err = ProxyError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid startup parameter name \"{k}\""),
            );
            send_error(&mut client.stream, &err).await;
            return None;
        }
        desired.insert(k, v);
    }
    if routed.target != Target::Primary {
        // A reader stays one even on a standby promoted before the check saw it.
        desired
            .entry("default_transaction_read_only".to_string())
            .or_insert_with(|| "on".to_string());
    }
    // One copy of each for every client with the same (see `relay::shared`).
    let shared = &ctx.relay.shared;
    let target = shared.targets.share(txn::PoolTarget {
        user: startup.user.clone(),
        database: routed.server_db,
        credentials,
        target: routed.target,
    });
    let desired = shared.params(desired);
    let state = &ctx.shards[routed.shard];
    let registration = ctx
        .relay
        .cancels
        .register(None, crate::backend::cancel::key_len(startup.minor));
    let (pid, key) = (registration.pid, *registration.key());
    // Boxed, as is the relay below (built in a plain function): an async fn keeps room
    // for every local it ever held, and an idle client keeps this future alive.
    let mut session = Box::new(txn::Txn::new(
        &ctx.relay,
        state,
        target,
        registration,
        desired,
        info,
    ));
    // Log in on a real server connection now, so that a bad database, role or parameter
    // is reported at connect time and the client sees the server's parameters.
    if let Err(e) = Box::pin(session.attach(0)).await {
        let err = e.to_client(&shard.name);
        txn::client_log!(warn, session.client(), shard = %shard.name, error = %err, "server login failed");
        send_error(&mut client.stream, &err).await;
        session.detach(true, true);
        return None;
    }
    let hello = hello(session.startup_params(), pid, &key);
    session.detach(false, true);
    if client.send_raw(&hello).await.is_err() {
        return None;
    }
    Some((client, session))
}

/// Startup and authentication. `Ok(None)`: the connection ended normally (a cancel
/// request, or a client that closed before logging in).
async fn login(
    client: &mut Conn,
    ctx: &Ctx,
    addr: std::net::SocketAddr,
) -> Result<Option<(Startup, Credentials, Destination)>, Failure> {
    let Some(startup) = read_startup(client, ctx, addr).await? else {
        return Ok(None);
    };
    let cfg = &ctx.config;
    let dest = destination(cfg, &startup);
    let credentials = if crate::frontend::users::Users::required(cfg) {
        // A user the lists do not know is looked up on the primary of the shard the
        // database routes to (not for the console: its users are listed; not for a
        // database handoff does not route, which is reported after authentication so
        // that an unauthenticated client learns nothing of the configuration).
        let lookup_on = match &dest {
            Some(Destination::Shard(r)) => Some((&ctx.shards[r.shard], r.server_db.as_str())),
            _ => None,
        };
        let secret = ctx
            .users
            .find(
                &ctx.relay.shard,
                cfg.connect_timeout,
                &startup.user,
                lookup_on,
            )
            .await
            .map_err(Failure::Refuse)?;
        let result =
            client_auth::authenticate(client, &startup.user, secret.as_ref(), &ctx.decoy).await;
        if result.is_err() && secret.is_some() {
            ctx.users.forget(&startup.user);
        }
        result?
    } else {
        Credentials::None
    };
    let Some(dest) = dest else {
        if let Err(suffix) = Target::split(&startup.database) {
            return Err(Failure::Refuse(
                ProxyError::fatal(
                    sqlstate::INVALID_CATALOG_NAME,
                    format!(
                        "database \"{}\": \"{suffix}\" is not a target handoff knows",
                        startup.database
                    ),
                )
                .hint("end the database name with @primary, @replica or @any, or with nothing (the primary)"),
            ));
        }
        return Err(Failure::Refuse(
            ProxyError::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!(
                    "database \"{}\" is not configured in handoff",
                    startup.database
                ),
            )
            .hint("add it to HANDOFF_DATABASES (or a '*' entry)"),
        ));
    };
    if let Destination::Console = dest {
        // The admin console: the client authenticated like any other; only the users
        // of HANDOFF_ADMIN_USERS may use it.
        crate::console::may_use(cfg, &startup.user).map_err(Failure::Refuse)?;
    }
    Ok(Some((startup, credentials, dest)))
}

/// Reads packets until a StartupMessage, answering SSL and GSS requests (TLS when it is
/// on, else `N`), accepting direct TLS, and forwarding cancel requests.
/// `addr`: the client's, for the log.
async fn read_startup(
    client: &mut Conn,
    ctx: &Ctx,
    addr: std::net::SocketAddr,
) -> Result<Option<Startup>, Failure> {
    let mut negotiated = false;
    if client.starts_with_tls().await.map_err(ConnError::from)? {
        // Boxed, as the other rare paths below: TLS and a cancel's forwarding are
        // futures of kilobytes that every plain login would otherwise carry.
        Box::pin(direct_tls(client, ctx, addr)).await?;
        negotiated = true;
    }
    loop {
        let packet = match client.read_startup().await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match packet {
            p @ (StartupPacket::SslRequest | StartupPacket::GssEncRequest) => {
                // One negotiation only, and nothing may be pipelined behind it: bytes sent
                // before our answer would be read as if they had been encrypted.
                if negotiated || !client.rbuf.is_empty() {
                    return Err(Failure::Refuse(ProxyError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "unexpected data or repeated encryption request during negotiation",
                    )));
                }
                negotiated = true;
                let acceptor = match p {
                    StartupPacket::SslRequest => ctx.client_tls.acceptor(),
                    _ => None,
                };
                match acceptor {
                    Some(acceptor) => {
                        client
                            .send_raw(&[ENCRYPTION_ACCEPTED])
                            .await
                            .map_err(ConnError::from)?;
                        if let Err(e) = Box::pin(client.accept_tls(acceptor)).await {
                            metrics::counter!(m::TLS_HANDSHAKE_FAILURES_TOTAL).increment(1);
                            login_log!(info, addr, error = %e, "client TLS handshake failed");
                            return Err(Failure::Gone);
                        }
                    }
                    None => client
                        .send_raw(&[ENCRYPTION_DECLINED])
                        .await
                        .map_err(ConnError::from)?,
                }
            }
            StartupPacket::Cancel { pid, key } => {
                let forwarded = Box::pin(ctx.relay.cancels.forward(
                    pid,
                    &key,
                    ctx.config.connect_timeout,
                ))
                .await;
                let result = if forwarded { "forwarded" } else { "unknown" };
                metrics::counter!(m::CANCEL_REQUESTS_TOTAL, "result" => result).increment(1);
                return Ok(None);
            }
            StartupPacket::Startup { minor, params } => {
                if ctx.client_tls.mode == crate::config::ClientTlsMode::Require
                    && !client.stream.is_tls()
                {
                    metrics::counter!(m::CLIENT_REJECTED_TOTAL, "reason" => "tls_required")
                        .increment(1);
                    return Err(Failure::Refuse(
                        ProxyError::fatal(
                            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                            "handoff accepts only TLS connections (HANDOFF_TLS_MODE=require)",
                        )
                        .hint("connect with sslmode=require (or verify-ca, verify-full)"),
                    ));
                }
                return startup_from_params(client, minor, params).await.map(Some);
            }
        }
    }
}

/// The newest protocol 3 minor version handoff speaks with clients.
const LATEST_MINOR: u16 = 2;

/// PostgreSQL 17's direct TLS: the client starts with its TLS handshake instead of an
/// SSLRequest, and must agree on the ALPN protocol `postgresql` (as PostgreSQL requires,
/// so that a TLS connection meant for another service is not taken for this one).
async fn direct_tls(
    client: &mut Conn,
    ctx: &Ctx,
    addr: std::net::SocketAddr,
) -> Result<(), Failure> {
    let Some(acceptor) = ctx.client_tls.acceptor() else {
        // A plaintext error would be read as TLS: the connection is closed.
        login_log!(
            info,
            addr,
            "a client began with a TLS handshake, but HANDOFF_TLS_MODE is disable: closed"
        );
        return Err(Failure::Gone);
    };
    if let Err(e) = client.accept_tls(acceptor).await {
        metrics::counter!(m::TLS_HANDSHAKE_FAILURES_TOTAL).increment(1);
        login_log!(info, addr, error = %e, "client direct TLS handshake failed");
        return Err(Failure::Gone);
    }
    if client.alpn() != Some(crate::net::tls::POSTGRESQL_ALPN) {
        metrics::counter!(m::TLS_HANDSHAKE_FAILURES_TOTAL).increment(1);
        return Err(Failure::Refuse(ProxyError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "direct TLS connection without the ALPN protocol \"postgresql\"",
        )));
    }
    Ok(())
}

async fn startup_from_params(
    client: &mut Conn,
    minor: u16,
    params: Vec<(String, String)>,
) -> Result<Startup, Failure> {
    let mut user = String::new();
    let mut database = None;
    let mut rest = Vec::new();
    let mut unrecognized = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" => user = v,
            "database" => database = Some(v),
            "replication" if !matches!(v.as_str(), "false" | "off" | "no" | "0") => {
                return Err(Failure::Refuse(ProxyError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "replication connections are not supported through handoff",
                )))
            }
            _ if k.starts_with("_pq_.") => unrecognized.push(k),
            _ => rest.push((k, v)),
        }
    }
    if user.is_empty() {
        return Err(Failure::Refuse(ProxyError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        )));
    }
    // As PostgreSQL 18: protocol 3.0 and 3.2 are spoken; a client asking for a newer
    // minor version (libpq "greases" with a made-up one) or for `_pq_.` options is told
    // the newest version and the options it does not get, and goes on with those.
    let newest = minor.min(LATEST_MINOR);
    if minor > LATEST_MINOR || !unrecognized.is_empty() {
        let msg = BackendMessage::NegotiateProtocolVersion {
            newest_version: (3 << 16) | i32::from(newest),
            unrecognized,
        };
        client
            .send(|b| msg.encode(b))
            .await
            .map_err(ConnError::from)?;
    }
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    Ok(Startup {
        user,
        database,
        minor: if newest >= 2 { 2 } else { 0 },
        params: rest,
    })
}

/// Where a client goes once logged in: the admin console, or a shard.
enum Destination {
    Console,
    Shard(Routed),
}

/// The shard a client database routes to, and the database's name on its servers.
pub(crate) struct Routed {
    /// Index into the configured shards (and the proxy's shard states).
    pub shard: usize,
    pub server_db: String,
    /// The primary, a standby, or either (`appdb@replica`, `appdb@any`).
    pub target: Target,
}

/// Resolves the client's database once: the console's name, a route, or `None` (not
/// configured, refused after authentication).
fn destination(cfg: &Config, startup: &Startup) -> Option<Destination> {
    if crate::console::wanted(cfg, &startup.database) {
        return Some(Destination::Console);
    }
    routed(cfg, &startup.database).map(Destination::Shard)
}

/// Where client database `database` routes: its shard and its name on the servers.
/// A suffix naming the servers (`appdb@replica`) is taken off before routing.
pub(crate) fn routed(cfg: &Config, database: &str) -> Option<Routed> {
    let (database, target) = Target::split(database).ok()?;
    let route = cfg.route(database)?;
    Some(Routed {
        shard: route.shard,
        server_db: route
            .server_db
            .clone()
            .unwrap_or_else(|| database.to_string()),
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::socket_pair;
    use bytes::BytesMut;
    use handoff_protocol::backend::tag as btag;
    use handoff_protocol::framing::decode_frame;
    use tokio::io::AsyncReadExt;

    fn params(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn unknown_protocol_options_are_listed_back_and_the_rest_passed_on() {
        let (ours, mut theirs) = socket_pair().await;
        let mut client = Conn::new(ours);
        let startup = startup_from_params(
            &mut client,
            0,
            params(&[
                ("user", "app"),
                ("application_name", "psql"),
                ("_pq_.test_option", "1"),
            ]),
        )
        .await
        .map_err(|_| "refused")
        .unwrap();
        assert_eq!(
            (startup.user.as_str(), startup.database.as_str()),
            ("app", "app"),
            "the database defaults to the user"
        );
        assert_eq!(startup.params, params(&[("application_name", "psql")]));
        let mut buf = BytesMut::new();
        theirs.read_buf(&mut buf).await.unwrap();
        let f = decode_frame(&mut buf, 1 << 16).unwrap().unwrap();
        assert_eq!(f.tag, btag::NEGOTIATE_PROTOCOL_VERSION);
    }

    #[tokio::test]
    async fn replication_and_a_missing_user_are_refused_with_their_codes() {
        let (ours, _theirs) = socket_pair().await;
        let mut client = Conn::new(ours);
        for (p, code) in [
            (
                params(&[("user", "app"), ("replication", "true")]),
                sqlstate::FEATURE_NOT_SUPPORTED,
            ),
            (
                params(&[("database", "app")]),
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            ),
        ] {
            match startup_from_params(&mut client, 0, p).await {
                Err(Failure::Refuse(e)) => assert_eq!(e.code, code),
                Err(Failure::Gone) => panic!("gone"),
                Ok(s) => panic!("accepted {s:?}"),
            }
        }
    }
}
