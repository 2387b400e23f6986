//! Handing sessions over to a successor process (a takeover). The wiring opens the
//! outbox once the successor is up and moves the proxy to [`Phase::HandingOver`]; each
//! relay then gives its client away at its next transaction boundary through
//! [`Outbox::send`], and ends only once the successor has taken it. A client the
//! successor did not take (or a successor lost) stays here and is served on.
//!
//! [`Phase::HandingOver`]: crate::shutdown::Phase::HandingOver

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use crate::api::takeover::{self as wire, MovedClient};
use crate::backend::login::Credentials;
use crate::clients::ClientInfo;
use crate::net::stream::{Conn, Stream};
use crate::sync::Locked;

/// A client on its way out, with its descriptors (duplicates: the session keeps its
/// own until the successor answers).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub client: MovedClient,
    pub fds: Vec<OwnedFd>,
    /// Whether the successor took it.
    pub taken: oneshot::Sender<bool>,
}

/// Where sessions go during a takeover; closed otherwise.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    tx: Mutex<Option<mpsc::Sender<Outgoing>>>,
    /// Which takeover this is: a session that could not move tries again only in the
    /// next one.
    attempt: AtomicU64,
}

impl Outbox {
    /// Opens the outbox to a successor; returns the number of this attempt.
    pub fn open(&self, tx: mpsc::Sender<Outgoing>) -> u64 {
        *self.tx.locked() = Some(tx);
        self.attempt.fetch_add(1, Relaxed) + 1
    }

    pub fn close(&self) {
        *self.tx.locked() = None;
    }

    /// The current attempt's number (0: none yet).
    pub fn attempt(&self) -> u64 {
        self.attempt.load(Relaxed)
    }

    /// Gives `client` to the successor and waits for its answer: true once it has
    /// taken the client (the session then ends here without a word to the client).
    pub async fn send(&self, client: MovedClient, fds: Vec<OwnedFd>) -> bool {
        let Some(tx) = self.tx.locked().clone() else {
            return false;
        };
        let (taken, answer) = oneshot::channel();
        let out = Outgoing { client, fds, taken };
        if tx.send(out).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

/// A duplicate of a plain socket's descriptor (`None` for TLS: its cipher state cannot
/// move, so a TLS session stays in this process).
pub(crate) fn dup(conn: &Conn) -> Option<OwnedFd> {
    match &conn.stream {
        Stream::Plain(s) => s.as_fd().try_clone_to_owned().ok(),
        _ => None,
    }
}

/// The client's part of what moves, whatever its pool mode.
pub(crate) fn client_part(
    info: &ClientInfo,
    minor: u16,
    cancel: (i32, &[u8]),
    credentials: &Credentials,
    pending: &[u8],
    mode: wire::Mode,
) -> Option<MovedClient> {
    let login = info.login()?;
    Some(MovedClient {
        id: info.id,
        addr: info.addr,
        local: info.local,
        connected_ms: info
            .connected()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        user: login.user.to_string(),
        database: login.database.to_string(),
        application_name: login.application_name.to_string(),
        minor,
        cancel_pid: cancel.0,
        cancel_key: cancel.1.to_vec(),
        credentials: credentials_out(credentials),
        pending: pending.to_vec(),
        mode,
    })
}

fn credentials_out(c: &Credentials) -> wire::Credentials {
    match c {
        Credentials::None => wire::Credentials::None,
        Credentials::Password(p) => wire::Credentials::Password {
            password: p.clone(),
        },
        Credentials::Scram(k) => wire::Credentials::Scram {
            client_key: k.client_key.to_vec(),
            server_key: k.server_key.to_vec(),
        },
        Credentials::Md5(s) => wire::Credentials::Md5 { secret: s.clone() },
    }
}

/// The credentials a moved client's server logins use (`None`: malformed keys).
pub(crate) fn credentials_in(c: &wire::Credentials) -> Option<Credentials> {
    Some(match c {
        wire::Credentials::None => Credentials::None,
        wire::Credentials::Password { password } => Credentials::Password(password.clone()),
        wire::Credentials::Scram {
            client_key,
            server_key,
        } => Credentials::Scram(handoff_protocol::auth::ScramKeys {
            client_key: client_key.as_slice().try_into().ok()?,
            server_key: server_key.as_slice().try_into().ok()?,
        }),
        wire::Credentials::Md5 { secret } => Credentials::Md5(secret.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_cross_unchanged_and_bad_keys_are_refused() {
        let keys = handoff_protocol::auth::ScramKeys {
            client_key: [1; 32],
            server_key: [2; 32],
        };
        for c in [
            Credentials::None,
            Credentials::Password("pw".into()),
            Credentials::Scram(keys),
            Credentials::Md5("md5abc".into()),
        ] {
            let back = credentials_in(&credentials_out(&c)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{c:?}"));
            if let (Credentials::Scram(a), Credentials::Scram(b)) = (&back, &c) {
                assert!(a == b);
            }
        }
        let short = wire::Credentials::Scram {
            client_key: vec![1; 31],
            server_key: vec![2; 32],
        };
        assert!(credentials_in(&short).is_none());
    }
}
