//! The proxy's error types that can reach a client, and the one place where each becomes
//! the ErrorResponse the client sees (SQLSTATE, message naming the shard and the cause,
//! hint). Ground floor: every layer may use it; it uses no other module of the proxy
//! but the metric names.
//!
//! - [`ConnError`]: a message-at-a-time read failed (startup, login).
//! - [`ServerError`]: a server connection could not be made.
//! - [`PoolError`]: no pooled connection could be had.
//! - [`AttachError`]: a client's transaction could not be given a server connection.

use std::time::Duration;

use bytes::BytesMut;
use handoff_buffer::BufferError;
use handoff_protocol::error::{ErrorFields, ProxyError, Severity};
use handoff_protocol::{sqlstate, FrameError};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::metrics as m;

/// Why a startup-phase read failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed by peer")]
    Eof,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Why a server connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not connect to server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("server {addr} did not complete the login within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("server {addr} refused the login: {}", .fields.message().unwrap_or("no message"))]
    Rejected { addr: String, fields: ErrorFields },
    #[error("server {addr} asks user \"{user}\" for a password, but HANDOFF_USERS has none for that user")]
    NoPassword { addr: String, user: String },
    #[error("server {addr} asks for an authentication method handoff does not support ({what})")]
    Unsupported { addr: String, what: String },
    #[error("SCRAM authentication with server {addr} failed: {source}")]
    Scram {
        addr: String,
        source: handoff_protocol::auth::AuthError,
    },
    #[error("protocol error from server {addr}: {source}")]
    Protocol { addr: String, source: ConnError },
    #[error("TLS with server {addr} failed: {message}")]
    Tls { addr: String, message: String },
}

impl ServerError {
    /// True when the failure says the server may be down or changing role (refused,
    /// reset, timed out, or `57P01`/`57P02`/`57P03` at login) rather than that this
    /// login is wrong (password, database, role).
    pub fn primary_may_be_gone(&self) -> bool {
        match self {
            ServerError::Connect { .. } | ServerError::Timeout { .. } => true,
            ServerError::Rejected { fields, .. } => fields
                .code()
                .is_some_and(sqlstate::is_operator_intervention),
            ServerError::Protocol { source, .. } => {
                matches!(source, ConnError::Io(_) | ConnError::Eof)
            }
            _ => false,
        }
    }

    /// True if a standby cannot serve a reader now though the login was right: it is
    /// gone (as [`ServerError::primary_may_be_gone`]), or its databases refuse
    /// connections because a switchover's fence on its primary reached it by
    /// replication (until it follows the new primary, where they are open again).
    pub fn standby_unusable(&self) -> bool {
        self.primary_may_be_gone()
            || matches!(self, ServerError::Rejected { fields, .. }
            if is_fence_refusal(
                fields.code().unwrap_or_default(),
                fields.message().unwrap_or_default(),
            ))
    }

    /// What a client whose server connection could not be made is told (FATAL).
    pub fn to_client(&self, shard: &str) -> ProxyError {
        match self {
            ServerError::Rejected { fields, .. } => {
                // Keep the server's SQLSTATE when the proxy knows it, so clients see the
                // real cause (3D000, 28P01, …).
                let code = match fields.code().and_then(sqlstate::known) {
                    Some(
                        c @ (sqlstate::INVALID_CATALOG_NAME
                        | sqlstate::INVALID_PASSWORD
                        | sqlstate::INVALID_AUTHORIZATION_SPECIFICATION
                        | sqlstate::TOO_MANY_CONNECTIONS
                        | sqlstate::CANNOT_CONNECT_NOW),
                    ) => c,
                    _ => sqlstate::CONNECTION_FAILURE,
                };
                let msg = fields.message().unwrap_or("login refused").to_string();
                ProxyError::fatal(code, msg)
                    .detail(format!("reported by the primary of shard \"{shard}\""))
            }
            ServerError::NoPassword { .. }
            | ServerError::Unsupported { .. }
            | ServerError::Scram { .. } => ProxyError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("shard \"{shard}\": {self}"),
            ),
            ServerError::Connect { .. }
            | ServerError::Timeout { .. }
            | ServerError::Protocol { .. }
            | ServerError::Tls { .. } => ProxyError::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("shard \"{shard}\": {self}"),
            ),
        }
    }
}

/// True for the server's answer to a login into a database with `datallowconn` off.
pub fn is_fence_refusal(code: &str, message: &str) -> bool {
    code == sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE
        && message.contains("not currently accepting connections")
}

/// Why no pooled server connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection became free within HANDOFF_QUERY_WAIT_TIMEOUT ({0:?}); HANDOFF_POOL_SIZE is {1}")]
    WaitTimeout(Duration, usize),
    #[error(transparent)]
    Connect(#[from] ServerError),
}

/// Why a server connection could not be prepared for a client's transaction (or a
/// session-mode session).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The server refused a parameter the client asked for.
    #[error("the server refused a startup parameter: {}", .0.message().unwrap_or("no message"))]
    Rejected(ErrorFields),
    /// The connection failed while its parameters were being set.
    #[error("lost the server connection while setting the client's parameters: {0}")]
    Io(#[source] ConnError),
    /// The failover buffer gave up on the request (its own SQLSTATE).
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The shard has no primary to take new transactions and the buffer did not hold
    /// the request (buffering disabled or dry run, or the cycle already timed out).
    #[error("the shard has no primary taking new transactions")]
    NoPrimary,
    /// A read (`@replica`) found no standby in the read rotation within its wait.
    #[error("no standby of the shard serves reads")]
    NoStandby(std::time::Duration),
}

impl AttachError {
    /// An error that ends the request, not the session.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            AttachError::Buffer(_) | AttachError::NoPrimary | AttachError::NoStandby(_)
        )
    }

    /// What the client is told: a refusal is an ERROR for the request (the session goes
    /// on), anything else a FATAL.
    pub fn to_client(&self, shard: &str) -> ProxyError {
        match self {
            AttachError::Pool(e @ PoolError::WaitTimeout(..)) => ProxyError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("shard \"{shard}\": {e}"),
            ),
            AttachError::Pool(PoolError::Connect(se)) => se.to_client(shard),
            AttachError::Rejected(f) => {
                let msg = f.message().unwrap_or("parameter rejected").to_string();
                ProxyError::fatal(sqlstate::CONNECTION_FAILURE, msg).detail(format!(
                    "a startup parameter was refused by the primary of shard \"{shard}\""
                ))
            }
            AttachError::Io(_) => lost_connection(shard),
            AttachError::Buffer(b) => ProxyError::error(
                b.sqlstate(),
                format!("shard \"{shard}\" is changing its primary: {b}"),
            )
            .hint("the request was not run; retry it"),
            AttachError::NoPrimary => ProxyError::error(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("shard \"{shard}\" has no primary taking new transactions"),
            )
            .hint("the request was not run; retry it once a primary is established"),
            AttachError::NoStandby(waited) => ProxyError::error(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("shard \"{shard}\" has no standby in its read rotation (waited {waited:?})"),
            )
            .hint("the request was not run; its standbys are down, lagging past HANDOFF_REPLICA_MAX_LAG or not streaming from the primary (GET /v1/shards lists why); connect to @any to fall back to the primary"),
        }
    }

    /// [`AttachError::to_client`], ending the session whatever the error (session mode:
    /// a session without a server connection cannot go on).
    pub fn to_client_fatal(&self, shard: &str) -> ProxyError {
        let mut err = self.to_client(shard);
        err.severity = Severity::Fatal;
        err
    }
}

/// A client's message broke the protocol (the session then ends).
pub fn client_protocol_error(e: &FrameError) -> ProxyError {
    ProxyError::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("invalid frontend message: {e}"),
    )
}

/// A server's message broke the protocol (the session then ends).
pub fn server_protocol_error(e: &FrameError) -> ProxyError {
    ProxyError::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("invalid message from server: {e}"),
    )
}

/// handoff is shutting down: the session ends.
pub fn shutting_down() -> ProxyError {
    ProxyError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        "terminating connection because handoff is shutting down",
    )
}

/// The connection to the shard's primary closed.
pub fn lost_connection(shard: &str) -> ProxyError {
    ProxyError::fatal(
        sqlstate::CONNECTION_FAILURE,
        format!("lost the connection to the primary of shard \"{shard}\""),
    )
}

/// Sends a proxy-generated error and counts it.
pub async fn send_error<W: AsyncWrite + Unpin>(stream: &mut W, err: &ProxyError) {
    let mut buf = BytesMut::new();
    err.encode(&mut buf);
    m::count_error("proxy", err.code);
    let _ = stream.write_all(&buf).await;
    let _ = stream.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_protocol::error::field;

    fn rejected(code: &str) -> ServerError {
        ServerError::Rejected {
            addr: "db:5432".into(),
            fields: ErrorFields {
                fields: vec![(field::CODE, code.into()), (field::MESSAGE, "nope".into())],
            },
        }
    }

    #[test]
    fn server_errors_keep_the_codes_clients_act_on() {
        let e = rejected("3D000").to_client("main");
        assert_eq!((e.code, e.severity), ("3D000", Severity::Fatal));
        assert!(e.detail.unwrap().contains("shard \"main\""));
        assert_eq!(rejected("42501").to_client("main").code, "08006");
        assert!(rejected("57P03").primary_may_be_gone());
        assert!(!rejected("28P01").primary_may_be_gone());
        let e = ServerError::NoPassword {
            addr: "db:5432".into(),
            user: "app".into(),
        };
        assert_eq!(e.to_client("main").code, "28000");
    }

    #[test]
    fn refusals_end_the_request_and_the_rest_the_session() {
        let b = AttachError::Buffer(BufferError::WindowExceeded);
        assert!(b.is_refusal());
        let e = b.to_client("main");
        assert_eq!((e.code, e.severity), ("57P03", Severity::Error));
        assert_eq!(b.to_client_fatal("main").severity, Severity::Fatal);
        let w = AttachError::Pool(PoolError::WaitTimeout(Duration::from_secs(1), 20));
        assert!(!w.is_refusal());
        assert_eq!(w.to_client("main").code, "53300");
        let io = AttachError::Io(ConnError::Eof);
        assert_eq!(io.to_client("main").code, "08006");
        assert!(
            std::error::Error::source(&io).is_some(),
            "the cause is kept"
        );
    }
}
