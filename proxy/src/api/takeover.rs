//! The hand-over format: what a running handoff and the process taking it over say to
//! each other on the takeover socket (`HANDOFF_TAKEOVER_SOCKET`). Each message is one
//! JSON document in a frame of its own; the sockets that move with a message (the
//! listeners, a client's socket, a session-mode client's server connection) ride on the
//! same frame as `SCM_RIGHTS` ancillary data, in the order the message lists them.
//!
//! [`FORMAT`] changes whenever a message changes meaning; the two processes hand over
//! only when their formats are equal, so an upgrade across a format change is a
//! restart, refused before anything moves.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The version of this format.
pub const FORMAT: u32 = 1;

/// The messages, in the order a takeover uses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// First thing each side sends: who it is and which format it speaks.
    Hello {
        format: u32,
        version: String,
        pid: u32,
    },
    /// The running process will not hand over (a format it does not speak, a shard
    /// switching over, another takeover under way): why, and nothing moved.
    Refused { reason: String },
    /// The running process's listening sockets: two descriptors, the clients' then the
    /// admin API's, and their addresses.
    Listeners {
        client: SocketAddr,
        admin: SocketAddr,
    },
    /// The successor is up (its configuration loaded, its shards started, accepting on
    /// the listeners): the running process stops accepting and starts moving clients.
    Ready,
    /// One client, with its socket (and a session-mode client's server connection).
    Client(Box<MovedClient>),
    /// The successor has taken the client `id`: the running process forgets it.
    Adopted { id: u64 },
    /// The successor could not take the client `id` (no such route any more, say): the
    /// running process keeps serving it.
    NotAdopted { id: u64, reason: String },
    /// A cancel request the successor received for a key it does not know: for a
    /// client still served by the running process.
    Cancel { pid: i32, key: Vec<u8> },
    /// The running process has handed over everything it could: the statistics of
    /// each client database (`SHOW STATS`), added to the successor's.
    Done { stats: Vec<DbTotals> },
}

/// One client database's `SHOW STATS` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Totals {
    pub xacts: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
}

/// A client database's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbTotals {
    pub database: String,
    pub totals: Totals,
}

/// Everything that makes a logged-in client's session its own, between two
/// transactions. Its socket travels beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedClient {
    /// The running process's number for it, for [`Message::Adopted`].
    pub id: u64,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    /// When it connected (Unix time, milliseconds).
    pub connected_ms: u64,
    pub user: String,
    /// The database the client asked for.
    pub database: String,
    pub application_name: String,
    /// The protocol 3 minor version agreed with it.
    pub minor: u16,
    /// The cancel key data it was given.
    pub cancel_pid: i32,
    pub cancel_key: Vec<u8>,
    /// What its server logins use.
    pub credentials: Credentials,
    /// Bytes read from its socket and not yet handled (they come before anything still
    /// in the socket).
    pub pending: Vec<u8>,
    pub mode: Mode,
}

/// What a server login of a moved client uses.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credentials {
    None,
    Password {
        password: String,
    },
    Scram {
        client_key: Vec<u8>,
        server_key: Vec<u8>,
    },
    Md5 {
        secret: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Credentials::None => "None",
            Credentials::Password { .. } => "Password(..)",
            Credentials::Scram { .. } => "Scram(..)",
            Credentials::Md5 { .. } => "Md5(..)",
        };
        f.write_str(kind)
    }
}

/// A statement a client named: its SQL (or, SQL-level, what followed its name in
/// `PREPARE`) and parameter types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub name: Vec<u8>,
    pub sql: Vec<u8>,
    pub param_types: Vec<u32>,
}

/// The pool mode's part of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "pool_mode", rename_all = "snake_case")]
pub enum Mode {
    /// Transaction mode: no server connection; the parameters and statements follow the
    /// client to whichever connection serves its next transaction.
    Transaction {
        /// The parameters it has now (startup parameters and `SET`s the server reported).
        desired: Vec<(String, String)>,
        /// The parameters it asked for at startup (`DISCARD ALL` goes back to them).
        startup: Vec<(String, String)>,
        /// Protocol-level named statements.
        statements: Vec<Statement>,
        /// SQL-level (`PREPARE`) statements.
        sql_statements: Vec<Statement>,
    },
    /// Session mode: its own server connection moves with it (the second descriptor).
    Session {
        shard: String,
        /// The database on the server.
        server_database: String,
        /// The other startup parameters (a later login to a new primary uses them).
        params: Vec<(String, String)>,
        /// The server backend's process id and secret key, and its address.
        server_pid: i32,
        server_key: Vec<u8>,
        server_addr: SocketAddr,
        /// Bytes read from the server and not yet handled.
        server_pending: Vec<u8>,
        /// A session on a standby (`appdb@replica`, `appdb@any`): adopted as one,
        /// outside the primary's generations (absent from older processes: false).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        on_standby: bool,
    },
}

/// A frame's JSON, decoded.
pub fn decode(bytes: &[u8]) -> Result<Message, super::DecodeError> {
    super::decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_survives_the_round_trip_and_a_bad_key_is_named() {
        let m = Message::Client(Box::new(MovedClient {
            id: 7,
            addr: "127.0.0.1:5000".parse().unwrap(),
            local: None,
            connected_ms: 1,
            user: "app".into(),
            database: "appdb".into(),
            application_name: String::new(),
            minor: 0,
            cancel_pid: 42,
            cancel_key: vec![1, 2, 3, 4],
            credentials: Credentials::Password {
                password: "pw".into(),
            },
            pending: vec![b'Q'],
            mode: Mode::Transaction {
                desired: vec![("search_path".into(), "a".into())],
                startup: vec![],
                statements: vec![Statement {
                    name: b"s1".to_vec(),
                    sql: b"select $1".to_vec(),
                    param_types: vec![23],
                }],
                sql_statements: vec![],
            },
        }));
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(decode(&json).unwrap(), m);
        let bad = br#"{"type":"adopted","id":"x"}"#;
        // (An internally tagged enum is read whole first, so the error cannot name
        // the key's path; its message says what was wrong.)
        let e = decode(bad).unwrap_err();
        assert!(e.message.contains("expected u64"), "{e}");
        assert!(!format!(
            "{:?}",
            Credentials::Md5 {
                secret: "md5x".into()
            }
        )
        .contains("md5x"));
    }
}
