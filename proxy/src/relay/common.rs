//! What both relays share: why a relay ended, the greeting a logged-in client gets,
//! the limits on the messages relayed, writing to the client, and the session's metering.

use bytes::BytesMut;
use handoff_protocol::backend::{
    encode_backend_key_data, encode_parameter_status, Authentication, BackendMessage,
    TransactionStatus,
};
use handoff_protocol::FrameError;

use tokio::io::AsyncWriteExt;

use std::sync::Arc;

use tokio::time::Instant;

use crate::clients::ClientInfo;
use crate::metrics::RelayMeters;
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
    /// Transaction mode: the client has been quiet with nothing held for a while; its
    /// relay's state is set aside until it sends again (the session goes on).
    Parked,
    /// A takeover is under way and the session is between transactions, with nothing
    /// half-read: it may be handed to the successor.
    HandOver,
}

/// Resolves when `signal` reaches `phase`.
pub(crate) async fn reach(signal: Signal, phase: Phase) {
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

/// What a client receives once logged in: AuthenticationOk, the server's parameters
/// (sorted by name, whatever order the map holding them has), the key data handoff
/// registered for it, ReadyForQuery. Written from borrowed text: one allocation, the
/// message itself, at every login.
pub(crate) fn hello<'a>(
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
    pid: i32,
    key: &[u8],
) -> BytesMut {
    // A server reports about 14 parameters: on the stack.
    let mut params: smallvec::SmallVec<[(&str, &str); 16]> = params.into_iter().collect();
    params.sort_unstable();
    let mut hello = BytesMut::with_capacity(512);
    BackendMessage::Authentication(Authentication::Ok).encode(&mut hello);
    for (name, value) in params {
        encode_parameter_status(name, value, &mut hello);
    }
    encode_backend_key_data(pid, key, &mut hello);
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

/// A session's metering, the same for both relays: bytes relayed each way, and the
/// duration of each request (to its ReadyForQuery) and of each transaction (to
/// ReadyForQuery `I`). Recorded once per ReadyForQuery, not per message; the metric
/// handles are the proxy's, shared by every session.
#[derive(Debug)]
pub(crate) struct Meter {
    series: Arc<RelayMeters>,
    /// When the oldest request not yet answered by ReadyForQuery was sent.
    request_started: Option<Instant>,
    /// When the current transaction's first request was sent.
    txn_started: Option<Instant>,
    /// Bytes relayed since they were last added to the counters.
    up: u64,
    down: u64,
    /// The client's entry, whose database's statistics (`SHOW STATS`) count here too.
    client: Arc<ClientInfo>,
}

impl Meter {
    pub fn new(series: Arc<RelayMeters>, client: Arc<ClientInfo>) -> Self {
        Self {
            client,
            series,
            request_started: None,
            txn_started: None,
            up: 0,
            down: 0,
        }
    }

    /// A client message that asks for an answer was sent.
    pub fn on_request(&mut self, now: Instant) {
        self.request_started.get_or_insert(now);
        self.txn_started.get_or_insert(now);
    }

    /// True while a request waits for its ReadyForQuery.
    pub fn request_pending(&self) -> bool {
        self.request_started.is_some()
    }

    /// A ReadyForQuery: `answered` when no request is left outstanding, `idle` when it
    /// says `I` (the transaction is over).
    pub fn on_ready(&mut self, now: Instant, answered: bool, idle: bool) {
        let stats = self.client.stats();
        if answered {
            if let Some(t) = self.request_started.take() {
                self.series.query.record(now - t);
                if let Some(s) = stats {
                    s.add_query(now - t);
                }
            }
        }
        if idle {
            if let Some(t) = self.txn_started.take() {
                self.series.transaction.record(now - t);
                if let Some(s) = stats {
                    s.add_xact(now - t);
                }
            }
        }
        self.flush_bytes();
    }

    /// Bytes relayed towards the server and towards the client.
    pub fn add(&mut self, up: u64, down: u64) {
        self.up += up;
        self.down += down;
    }

    /// Adds the bytes counted so far to the metrics.
    pub fn flush_bytes(&mut self) {
        if let Some(s) = self.client.stats() {
            s.add_bytes(self.up, self.down);
        }
        if self.up > 0 {
            self.series.up_total.increment(std::mem::take(&mut self.up));
        }
        if self.down > 0 {
            self.series
                .down_total
                .increment(std::mem::take(&mut self.down));
        }
    }

    /// No request or transaction being timed: nothing but the handles to keep.
    pub fn at_rest(&self) -> bool {
        self.request_started.is_none() && self.txn_started.is_none()
    }

    /// The handles a meter at rest is made of, its byte counts added to the metrics
    /// ([`Meter::new`] makes it again).
    pub fn into_parts(mut self) -> (Arc<RelayMeters>, Arc<ClientInfo>) {
        self.flush_bytes();
        (self.series, self.client)
    }

    /// The client's entry.
    pub fn client(&self) -> &Arc<ClientInfo> {
        &self.client
    }

    /// The metric handles the relay shares with every other session.
    pub fn series(&self) -> &RelayMeters {
        &self.series
    }
}

#[cfg(test)]
mod tests {
    use handoff_protocol::backend::{Authentication, BackendMessage, TransactionStatus};
    use handoff_protocol::framing::decode_frame;

    #[test]
    fn the_greeting_carries_the_parameters_sorted_then_the_key_then_ready() {
        // In a map's order, not sorted.
        let params = [
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO, MDY"),
            ("application_name", ""),
        ];
        let mut buf = super::hello(params, 4242, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut got = Vec::new();
        while let Some(frame) = decode_frame(&mut buf, 1 << 20).unwrap() {
            got.push(BackendMessage::parse(frame).unwrap());
        }
        assert!(buf.is_empty());
        let status = |name: &str, value: &str| BackendMessage::ParameterStatus {
            name: name.into(),
            value: value.into(),
        };
        assert_eq!(
            got,
            vec![
                BackendMessage::Authentication(Authentication::Ok),
                status("DateStyle", "ISO, MDY"),
                status("TimeZone", "UTC"),
                status("application_name", ""),
                BackendMessage::BackendKeyData {
                    pid: 4242,
                    key: bytes::Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]),
                },
                BackendMessage::ReadyForQuery(TransactionStatus::Idle),
            ]
        );
    }
}
