//! A door in front of a server: a TCP forwarder on a free loopback port whose new
//! connections can be held back for a while, as a slow network path would hold them
//! (`tc netem` is not available here). Connections already through are not slowed.
//! It counts the PostgreSQL cancel requests that passed it, so a test can tell that a
//! cancel really went that way. Dropping the door closes it and every connection
//! through it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The first 8 bytes of a CancelRequest: its length (16) and its code.
const CANCEL_HEAD: [u8; 8] = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];

#[derive(Debug, Default)]
struct Shared {
    hold: Mutex<Duration>,
    cancels: AtomicUsize,
}

/// See the module's documentation.
#[derive(Debug)]
pub struct Door {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Door {
    /// Opens a door to `server`.
    pub async fn open(server: SocketAddr) -> Result<Door> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(serve(listener, server, Arc::clone(&shared)));
        Ok(Door { addr, shared, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds each connection opened from now on for `hold` before it reaches the
    /// server (zero: at once again).
    pub fn hold_new(&self, hold: Duration) {
        *self.shared.hold.lock().unwrap() = hold;
    }

    /// Cancel requests that reached the server through the door.
    pub fn cancels(&self) -> usize {
        self.shared.cancels.load(Ordering::SeqCst)
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        // The connections' tasks live in the accept task's set: they end with it.
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, server: SocketAddr, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        while conns.try_join_next().is_some() {}
        let hold = *shared.hold.lock().unwrap();
        conns.spawn(pass(client, server, hold, Arc::clone(&shared)));
    }
}

/// Waits `hold`, then relays both ways until either side closes.
async fn pass(mut client: TcpStream, server: SocketAddr, hold: Duration, shared: Arc<Shared>) {
    tokio::time::sleep(hold).await;
    let Ok(mut upstream) = TcpStream::connect(server).await else {
        return;
    };
    // Look at the first bytes for a cancel request; a client that sends fewer first
    // (none does: every packet starts with 8) is relayed all the same.
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match client.read(&mut head[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    if upstream.write_all(&head[..got]).await.is_err() {
        return;
    }
    if head == CANCEL_HEAD {
        shared.cancels.fetch_add(1, Ordering::SeqCst);
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
