//! What both relays share: why a relay ended, the greeting a logged-in client gets,
//! the limits on the messages relayed, and the per-session metric handles.

use bytes::BytesMut;
use handoff_protocol::backend::{Authentication, BackendMessage, TransactionStatus};
use handoff_protocol::FrameError;

use tokio::io::AsyncWriteExt;

use crate::metrics as m;
use crate::net::stream::Conn;
use crate::shutdown::{Phase, Signal};

/// Bytes read per socket read.
pub(crate) const READ_CHUNK: usize = 32 * 1024;
/// Largest server message buffered whole for inspection (ErrorResponse, ReadyForQuery).
pub(crate) const MAX_INSPECT: usize = 64 * 1024;
/// Largest message accepted from a client (PostgreSQL's own limit is 1 GB).
pub const MAX_CLIENT_MESSAGE: usize = 1 << 30;
/// Largest message accepted from a server.
pub(crate) const MAX_SERVER_MESSAGE: usize = i32::MAX as usize;

/// Why a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client sent Terminate.
    Terminated,
    /// The client's socket closed or failed.
    ClientGone,
    /// The server closed (after sending a FATAL, or unexpectedly).
    ServerGone,
    /// The client broke the protocol; it was told so.
    ClientProtocol,
    /// The server broke the protocol; the client was told so.
    ServerProtocol,
    /// The proxy is shutting down; the client was told so.
    Shutdown,
    /// The primary was revoked and the session is between transactions: it may move.
    Revoked,
    /// The client was idle longer than a configured timeout; it was told so.
    Timeout,
    /// The client sent a message larger than the proxy parses; it was told so.
    TooLarge,
}

/// The session's metric handles.
#[derive(Debug)]
pub(crate) struct Handles {
    pub query: metrics::Histogram,
    pub transaction: metrics::Histogram,
    pub up: metrics::Counter,
    pub down: metrics::Counter,
}

impl Handles {
    pub(crate) fn new() -> Self {
        Self {
            query: metrics::histogram!(m::QUERY_DURATION),
            transaction: metrics::histogram!(m::TRANSACTION_DURATION),
            up: metrics::counter!(m::BYTES_TOTAL, "direction" => "client_to_server"),
            down: metrics::counter!(m::BYTES_TOTAL, "direction" => "server_to_client"),
        }
    }
}

/// Resolves when `signal` reaches `phase`.
pub(crate) async fn reach(mut signal: Signal, phase: Phase) {
    signal.reached(phase).await
}

/// Tells a client its message broke the protocol (the session then ends). Shared by
/// both pool modes.
pub(crate) async fn protocol_error<W: tokio::io::AsyncWrite + Unpin>(
    client: &mut W,
    e: &FrameError,
) {
    let err = crate::error::client_protocol_error(e);
    crate::error::send_error(client, &err).await;
}

/// What a client receives once logged in: AuthenticationOk, the server's parameters,
/// handoff's own backend key data, ReadyForQuery.
pub(crate) fn hello(
    params: impl IntoIterator<Item = (String, String)>,
    pid: i32,
    key: i32,
) -> BytesMut {
    let mut hello = BytesMut::with_capacity(512);
    BackendMessage::Authentication(Authentication::Ok).encode(&mut hello);
    for (name, value) in params {
        BackendMessage::ParameterStatus { name, value }.encode(&mut hello);
    }
    BackendMessage::BackendKeyData { pid, key }.encode(&mut hello);
    BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut hello);
    hello
}

/// Writes `bytes` to the client; a failure ends the session.
pub(crate) async fn write_client(client: &mut Conn, bytes: &[u8]) -> Result<(), End> {
    if bytes.is_empty() {
        return Ok(());
    }
    client
        .stream
        .write_all(bytes)
        .await
        .map_err(|_| End::ClientGone)
}
