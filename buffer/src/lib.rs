//! The per-shard failover buffer (`../shared/BUFFER_SPEC.md`).
//!
//! Only the crate skeleton exists for now: the buffer itself is the subject of a later
//! issue. The type below names the states so the proxy and docs can refer to them.

/// The states one shard's buffer moves through, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferState {
    /// Requests pass through.
    Idle,
    /// New requests are held.
    Buffering,
    /// Held requests are being released in FIFO order.
    Draining,
}
