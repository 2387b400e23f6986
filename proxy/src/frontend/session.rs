//! One client session, as an explicit sequence of phases:
//! Startup (SSL/GSS negotiation, cancel requests, the StartupMessage) → Auth → Connect
//! (the shard primary, session pooling) → Relay → Terminating.

use std::sync::Arc;

use bytes::BytesMut;
use handoff_protocol::backend::{Authentication, BackendMessage, TransactionStatus};
use handoff_protocol::error::ProxyError;
use handoff_protocol::framing::StartupPacket;
use handoff_protocol::sqlstate;
use tokio::net::TcpStream;

use crate::frontend::client_auth::{self, Failure};
use std::collections::HashMap;

use crate::backend::login;
use crate::config::{Config, PoolMode, UserSecret};
use crate::error::send_error;
use crate::error::ConnError;
use crate::metrics as m;
use crate::net::stream::Conn;
use crate::relay::session_mode as relay;
use crate::relay::txn;
use crate::shutdown::Signal;
use crate::Shared;

/// What the client asked for in its StartupMessage.
#[derive(Debug)]
struct Startup {
    user: String,
    database: String,
    /// Everything else (application_name, options, …), passed on to the server.
    params: Vec<(String, String)>,
}

/// Keeps a gauge up while alive.
struct GaugeGuard(&'static str);

impl GaugeGuard {
    fn new(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

/// Runs a client session to its end.
pub(crate) async fn run(stream: TcpStream, shared: Arc<Shared>, shutdown: Signal) {
    let _gauge = GaugeGuard::new(m::CLIENT_CONNECTIONS);
    metrics::counter!(m::CLIENT_CONNECTIONS_TOTAL).increment(1);
    let _ = stream.set_nodelay(true);
    let mut client = Conn::new(stream);
    let cfg = &shared.config;

    // Boxed: the login's state is large and only needed once, so the session's own
    // future (which an idle client keeps alive) stays small.
    let login = tokio::time::timeout(
        cfg.client_login_timeout,
        Box::pin(login(&mut client, &shared)),
    );
    let (startup, secret) = match login.await {
        Ok(Ok(Some(ok))) => ok,
        Ok(Ok(None)) | Ok(Err(Failure::Gone)) => return,
        Ok(Err(Failure::Refuse(err))) => {
            if err.code == sqlstate::INVALID_PASSWORD {
                metrics::counter!(m::AUTH_FAILURES_TOTAL).increment(1);
                tracing::info!(code = err.code, "client login refused");
            } else {
                tracing::info!(code = err.code, error = %err.message, "client login refused");
            }
            send_error(&mut client.stream, &err).await;
            return;
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
            return;
        }
    };
    let _slot = match shared.limits.admit(
        &startup.user,
        &startup.database,
        cfg.max_user_client_conn,
        cfg.max_db_client_conn,
    ) {
        Ok(s) => s,
        Err(err) => {
            tracing::info!(error = %err.message, "client refused");
            send_error(&mut client.stream, &err).await;
            return;
        }
    };
    tracing::Span::current().record("user", startup.user.as_str());
    tracing::Span::current().record("database", startup.database.as_str());
    match cfg.pool_mode {
        PoolMode::Session => {
            Box::pin(connect_and_relay(
                client, &shared, startup, secret, shutdown,
            ))
            .await
        }
        PoolMode::Transaction => transaction_mode(client, &shared, startup, secret, shutdown).await,
    }
}

/// Transaction mode: a pooled server connection per transaction.
async fn transaction_mode(
    mut client: Conn,
    shared: &Shared,
    startup: Startup,
    secret: Option<&UserSecret>,
    shutdown: Signal,
) {
    let cfg: &Config = &shared.config;
    let (shard, server_db) = route(cfg, &startup);
    let mut desired = HashMap::new();
    for (k, v) in &startup.params {
        if k == "options" {
            tracing::debug!("startup parameter 'options' is ignored in transaction mode");
            continue;
        }
        if !txn::valid_param_name(k) {
            let err = ProxyError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid startup parameter name \"{k}\""),
            );
            send_error(&mut client.stream, &err).await;
            return;
        }
        desired.insert(k.clone(), v.clone());
    }
    let target = txn::PoolTarget {
        user: startup.user.clone(),
        database: server_db.to_string(),
        password: secret.and_then(|s| s.password.clone()),
    };
    let state = &shared.shards[shard_index(cfg, &startup)];
    let registration = shared.cancels.register(None);
    let (pid, key) = (registration.pid, registration.key);
    // Boxed, as is the relay below (built in a plain function): an async fn keeps room
    // for every local it ever held, and an idle client keeps this future alive.
    let mut session = Box::new(txn::Txn::new(shared, state, target, registration, desired));
    // Log in on a real server connection now, so that a bad database, role or parameter
    // is reported at connect time and the client sees the server's parameters.
    if let Err(e) = Box::pin(session.attach(0)).await {
        let err = e.to_client(&shard.name);
        tracing::warn!(shard = %shard.name, error = %err, "server login failed");
        send_error(&mut client.stream, &err).await;
        session.detach(true, true);
        return;
    }
    let hello = hello(session.startup_params(), pid, key);
    session.detach(false, true);
    if client.send_raw(&hello).await.is_err() {
        return;
    }
    // Boxed so that the task's own allocation does not also reserve room for the
    // login phase's locals: an idle client's footprint is this future plus its socket.
    let end = txn::run_boxed(client, session, shutdown).await;
    tracing::debug!(?end, "session ended");
}

/// Startup and authentication. `Ok(None)`: the connection ended normally (a cancel
/// request, or a client that closed before logging in).
async fn login<'a>(
    client: &mut Conn,
    shared: &'a Shared,
) -> Result<Option<(Startup, Option<&'a UserSecret>)>, Failure> {
    let Some(startup) = read_startup(client, shared).await? else {
        return Ok(None);
    };
    let cfg = &shared.config;
    let secret = match &cfg.users {
        None => None,
        Some(users) => {
            let secret = users.get(&startup.user);
            client_auth::scram(client, &startup.user, secret, &shared.decoy).await?;
            secret
        }
    };
    if cfg.route(&startup.database).is_none() {
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
    }
    Ok(Some((startup, secret)))
}

/// Reads packets until a StartupMessage, answering SSL and GSS requests with `N` and
/// forwarding cancel requests.
async fn read_startup(client: &mut Conn, shared: &Shared) -> Result<Option<Startup>, Failure> {
    let mut negotiated = false;
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
                    StartupPacket::SslRequest => shared.client_tls.acceptor(),
                    _ => None,
                };
                match acceptor {
                    Some(acceptor) => {
                        client.send_raw(b"S").await.map_err(ConnError::from)?;
                        if let Err(e) = client.accept_tls(acceptor).await {
                            metrics::counter!(m::TLS_HANDSHAKE_FAILURES_TOTAL).increment(1);
                            tracing::info!(error = %e, "client TLS handshake failed");
                            return Err(Failure::Gone);
                        }
                    }
                    None => client.send_raw(b"N").await.map_err(ConnError::from)?,
                }
            }
            StartupPacket::Cancel { pid, key } => {
                let forwarded = shared
                    .cancels
                    .forward(pid, key, shared.config.connect_timeout)
                    .await;
                let result = if forwarded { "forwarded" } else { "unknown" };
                metrics::counter!(m::CANCEL_REQUESTS_TOTAL, "result" => result).increment(1);
                return Ok(None);
            }
            StartupPacket::Startup { minor, params } => {
                if shared.client_tls.mode == crate::config::ClientTlsMode::Require
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
    if minor > 0 || !unrecognized.is_empty() {
        let msg = BackendMessage::NegotiateProtocolVersion {
            newest_minor: 0,
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
        params: rest,
    })
}

/// The shard and server database a logged-in client's database routes to.
fn route<'a>(cfg: &'a Config, startup: &'a Startup) -> (&'a crate::config::ShardConfig, &'a str) {
    let route = cfg
        .route(&startup.database)
        .expect("login checked the route");
    let server_db = route.server_db.as_deref().unwrap_or(&startup.database);
    (&cfg.shards[route.shard], server_db)
}

fn shard_index(cfg: &Config, startup: &Startup) -> usize {
    cfg.route(&startup.database)
        .expect("login checked the route")
        .shard
}

/// What a client receives once logged in: AuthenticationOk, the server's parameters,
/// handoff's own backend key data, ReadyForQuery.
fn hello(params: impl IntoIterator<Item = (String, String)>, pid: i32, key: i32) -> BytesMut {
    let mut hello = BytesMut::with_capacity(512);
    BackendMessage::Authentication(Authentication::Ok).encode(&mut hello);
    for (name, value) in params {
        BackendMessage::ParameterStatus { name, value }.encode(&mut hello);
    }
    BackendMessage::BackendKeyData { pid, key }.encode(&mut hello);
    BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut hello);
    hello
}

/// Session mode's gate: waits in the failover buffer while the shard has no primary,
/// then registers the session on the serving generation (held while it has a server
/// connection there, so lameduck waits for it to move).
async fn session_gate(
    shared: &Shared,
    state: &crate::shard::Shard,
    bytes: usize,
) -> Result<Arc<crate::shard::Generation>, ProxyError> {
    let mut gen = state.current();
    crate::shard::control::admit(shared, state, &mut gen, bytes)
        .await
        .map_err(|e| e.to_client_fatal(&state.name))?;
    Ok(gen)
}

/// Session mode: one server connection per client, moved to the new primary at a
/// transaction boundary when the shard's primary changes.
async fn connect_and_relay(
    mut client: Conn,
    shared: &Shared,
    startup: Startup,
    secret: Option<&UserSecret>,
    shutdown: Signal,
) {
    let cfg: &Config = &shared.config;
    let (shard, server_db) = route(cfg, &startup);
    let state = &shared.shards[shard_index(cfg, &startup)];
    let password = secret.and_then(|s| s.password.as_deref());
    let connect = |addr: crate::config::HostPort| {
        let params = startup.params.clone();
        let user = startup.user.clone();
        let database = server_db.to_string();
        async move {
            let login = login::Login {
                addr: &addr,
                user: &user,
                database: &database,
                params: &params,
                password,
                timeout: cfg.connect_timeout,
                tls: &shared.server_tls,
            };
            Box::pin(login::connect(login)).await
        }
    };
    let (mut gen, mut server) = loop {
        let gen = match session_gate(shared, state, 0).await {
            Ok(g) => g,
            Err(err) => {
                send_error(&mut client.stream, &err).await;
                return;
            }
        };
        match connect(gen.primary.clone()).await {
            Ok(s) => break (gen, s),
            Err(err) => {
                gen.leave();
                metrics::counter!(m::SERVER_CONNECT_ERRORS_TOTAL).increment(1);
                // Nothing was sent: if the primary is gone, wait for the next one.
                if err.primary_may_be_gone()
                    && crate::shard::health::suspect(
                        shared,
                        state,
                        &gen,
                        crate::shard::health::Report::ConnectFailed,
                    )
                    .await
                {
                    metrics::counter!(crate::shard::health::metric::RETRIES, "shard" => shard.name.clone(), "reason" => "connect_failed")
                        .increment(1);
                    continue;
                }
                tracing::warn!(shard = %shard.name, error = %err, "server login failed");
                send_error(&mut client.stream, &err.to_client(&shard.name)).await;
                return;
            }
        }
    };
    let mut server_gauge = GaugeGuard::new(m::SERVER_CONNECTIONS);
    let registration = shared
        .cancels
        .register(Some(crate::backend::cancel::ServerKey {
            addr: server.peer,
            pid: server.pid,
            key: server.key,
        }));

    let hello = hello(server.params.clone(), registration.pid, registration.key);
    if client.send_raw(&hello).await.is_err() {
        gen.leave();
        return;
    }
    tracing::debug!(shard = %shard.name, server = %server.peer, "session relaying");
    loop {
        let end = relay::run(
            &mut client,
            &mut server.conn,
            &shard.name,
            shutdown.clone(),
            &gen,
        )
        .await;
        if end != relay::End::Revoked {
            tracing::debug!(?end, "session ended");
            if end == relay::End::ServerGone {
                crate::shard::health::report(state, crate::shard::health::Report::ConnectionLost);
            }
            break;
        }
        // Between transactions on a revoked primary: take the session's state off it,
        // let it go, and follow the shard to its next primary.
        let captured = crate::relay::session_move::capture(&mut server.conn).await;
        drop(server);
        drop(server_gauge);
        gen.leave();
        registration.set_server(None);
        let moving = match captured {
            Ok(st) if st.blockers.is_empty() => st,
            Ok(st) => {
                let err = cannot_move(
                    &shard.name,
                    format!(
                        "this session holds state that cannot move to the new primary ({})",
                        st.blockers.join(", ")
                    ),
                )
                .hint("release advisory locks, drop temporary tables, UNLISTEN and close held cursors between transactions, or use transaction mode");
                tracing::info!(shard = %shard.name, blockers = ?st.blockers, "session cannot move");
                send_error(&mut client.stream, &err).await;
                return;
            }
            Err(e) => {
                let err = cannot_move(
                    &shard.name,
                    format!("the session's state could not be read: {e}"),
                );
                send_error(&mut client.stream, &err).await;
                return;
            }
        };
        // Wait for the client's next request (or its leaving) before taking a slot in
        // the buffer: an idle session is not a request.
        if client.rbuf.is_empty() {
            tokio::select! {
                r = tokio::io::AsyncReadExt::read_buf(&mut client.stream, &mut client.rbuf) => {
                    if matches!(r, Ok(0) | Err(_)) {
                        return;
                    }
                }
                _ = wait_phase(shutdown.clone()) => {
                    let err = crate::error::shutting_down();
                    send_error(&mut client.stream, &err).await;
                    return;
                }
            }
        }
        gen = match session_gate(shared, state, client.rbuf.len()).await {
            Ok(g) => g,
            Err(err) => {
                send_error(&mut client.stream, &err).await;
                return;
            }
        };
        server = match connect(gen.primary.clone()).await {
            Ok(s) => s,
            Err(err) => {
                gen.leave();
                send_error(&mut client.stream, &err.to_client(&shard.name)).await;
                return;
            }
        };
        server_gauge = GaugeGuard::new(m::SERVER_CONNECTIONS);
        if let Err(e) = crate::relay::session_move::restore(&mut server.conn, &moving).await {
            gen.leave();
            let err = cannot_move(
                &shard.name,
                format!("the session could not be re-created on the new primary: {e}"),
            );
            send_error(&mut client.stream, &err).await;
            return;
        }
        registration.set_server(Some(crate::backend::cancel::ServerKey {
            addr: server.peer,
            pid: server.pid,
            key: server.key,
        }));
        tracing::info!(shard = %shard.name, server = %server.peer, "session moved to the new primary");
    }
    gen.leave();
    drop(server_gauge);
    drop(registration);
}

/// The FATAL a session-mode client gets when it cannot follow its shard's new primary.
fn cannot_move(shard: &str, why: String) -> ProxyError {
    ProxyError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        format!(
            "terminating connection: the primary of shard \"{shard}\" is being replaced and {why}"
        ),
    )
}

async fn wait_phase(mut s: Signal) {
    s.reached(crate::shutdown::Phase::Draining).await
}
