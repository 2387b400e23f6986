//! PostgreSQL v3 wire protocol for handoff: framing, typed messages, SQLSTATE codes,
//! error builders and authentication exchanges.
//!
//! This crate does no I/O and knows nothing of tokio: every function works on byte
//! buffers, so it can be tested (and fuzzed) with byte slices alone.
//!
//! - [`framing`] splits a byte stream into startup packets and tagged messages, checking
//!   each header before allocating anything.
//! - [`frontend`] and [`backend`] hold the typed messages of each direction, their tag
//!   constants, decoders and encoders.
//! - [`scan`] walks a relayed stream message by message without copying payloads.
//! - [`tag`] names every message type byte; [`body`] reads the few bodies the proxy
//!   looks into without building a message.
//! - [`error`] builds ErrorResponse/NoticeResponse bodies; [`sqlstate`] names codes.
//! - [`sql`] holds the bits of SQL text the proxy writes or recognises.
//! - [`auth`] implements SCRAM-SHA-256 (client and server), MD5 and cleartext.

#![forbid(unsafe_code)]

pub mod auth;
pub mod backend;
pub mod body;
mod codec;
pub mod error;
pub mod framing;
pub mod frontend;
pub mod scan;
pub mod sql;
pub mod sqlstate;
pub mod tag;

pub use framing::{Frame, FrameError};
