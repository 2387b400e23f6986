//! Stand-ins for unit tests: a minimal server that answers a login and then holds the
//! connection, and connected socket pairs. The integration tests (`tests/`) run real
//! PostgreSQL; these only cover what a unit test needs without one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use handoff_protocol::backend::{Authentication, BackendMessage, TransactionStatus};
use handoff_protocol::error::ProxyError;
use handoff_protocol::framing::decode_startup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::HostPort;
use crate::sync::Locked;

/// How the stand-in answers a login.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// AuthenticationOk, a ParameterStatus, BackendKeyData (pid 1, 2, … per connection),
    /// ReadyForQuery.
    Ok,
    /// An ErrorResponse with this error.
    Refuse(ProxyError),
    /// AuthenticationCleartextPassword.
    AskPassword,
    /// Nothing at all.
    Silent,
}

/// A stand-in server; the sockets it accepted are held until [`StandIn::close_all`].
#[derive(Debug)]
pub(crate) struct StandIn {
    pub addr: HostPort,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl StandIn {
    pub async fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let pids = Arc::new(AtomicI32::new(1));
        let keep = Arc::clone(&held);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = BytesMut::new();
                loop {
                    match decode_startup(&mut buf) {
                        Ok(Some(_)) => break,
                        Ok(None) => {}
                        Err(_) => return,
                    }
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                let mut out = BytesMut::new();
                match &answer {
                    Answer::Ok => {
                        BackendMessage::Authentication(Authentication::Ok).encode(&mut out);
                        BackendMessage::ParameterStatus {
                            name: "server_version".into(),
                            value: "15.0".into(),
                        }
                        .encode(&mut out);
                        let pid = pids.fetch_add(1, Ordering::SeqCst);
                        BackendMessage::BackendKeyData {
                            pid,
                            key: bytes::Bytes::from_static(&[0, 0, 0, 7]),
                        }
                        .encode(&mut out);
                        BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut out);
                    }
                    Answer::Refuse(e) => e.encode(&mut out),
                    Answer::AskPassword => {
                        BackendMessage::Authentication(Authentication::CleartextPassword)
                            .encode(&mut out)
                    }
                    Answer::Silent => {}
                }
                let _ = s.write_all(&out).await;
                keep.locked().push(s);
            }
        });
        Self {
            addr: HostPort {
                host: "127.0.0.1".into(),
                port,
            },
            held,
        }
    }

    /// Closes every accepted connection from the server's side.
    pub fn close_all(&self) {
        self.held.locked().clear();
    }
}

/// Two connected sockets: `(ours, theirs)`.
pub(crate) async fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("address");
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (a.expect("connect"), b.expect("accept").0)
}

/// Spends the running task's cooperative budget (tokio's operations per turn) without
/// handing its turn back: messages received at once, one unit each, until none is left.
/// Returns how many it took.
pub(crate) async fn spend_budget() -> usize {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..1000 {
        tx.send(i).expect("the channel is open");
    }
    let mut spent = 0;
    while tokio::task::coop::has_budget_remaining() {
        rx.recv().await;
        spent += 1;
    }
    assert!(spent > 0 && spent < 1000, "the budget was spent: {spent}");
    spent
}

/// `127.0.0.1:port`, as the unit tests name their servers.
pub fn hp(port: u16) -> crate::config::HostPort {
    crate::config::HostPort {
        host: "127.0.0.1".into(),
        port,
    }
}
