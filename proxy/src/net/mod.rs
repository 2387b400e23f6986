//! Bytes on the wire: one stream type for plain and TLS connections (with the read
//! buffer of the startup phase), TLS towards clients and servers, and the relay buffers
//! recycled per thread, and a writer that counts what went through it.

pub(crate) mod buffers;
pub mod keepalive;
pub(crate) mod metered;
pub mod passfd;
pub(crate) mod stream;
pub mod tls;
