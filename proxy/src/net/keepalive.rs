//! TCP options on every socket handoff opens to a PostgreSQL server (pooled and
//! session-mode connections, logins, probes and admin sessions).
//!
//! A server that is cut off silently — a network partition, a dead switch, a host
//! that lost power — sends no reset: without these options a connection waiting on it
//! waits as long as the kernel keeps retransmitting (about fifteen minutes on Linux),
//! and an idle pooled connection to it never finds out at all.
//!
//! - `TCP_USER_TIMEOUT` (`HANDOFF_SERVER_TCP_USER_TIMEOUT`): data sent and not
//!   acknowledged for this long ends the connection with an error. A slow query does
//!   not trip it (the server's kernel acknowledges what it receives whether or not
//!   PostgreSQL is busy); only a peer that no longer answers at all does.
//! - Keepalives (`HANDOFF_SERVER_TCP_KEEPALIVE`): after this long without traffic the
//!   kernel probes the peer, three probes a third of that apart, so an idle connection
//!   to a vanished server is closed instead of handed to the next transaction.
//!
//! Failover itself does not wait for either: the health check finds a silent primary
//! within `HANDOFF_HEALTH_CHECK_INTERVAL` + `HANDOFF_HEALTH_CHECK_TIMEOUT`, and once
//! another primary is established the requests still waiting on the lost one are failed
//! at once (`shard::control::establish_at`). These options bound what nothing else
//! does: a request on a primary nobody replaces, and idle sockets.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::ServerTcp;

/// Probes sent before an idle connection is given up.
const KEEPALIVE_PROBES: u32 = 3;

impl ServerTcp {
    /// Time between keepalive probes: a third of the idle time, at least a second.
    fn interval(idle: Duration) -> Duration {
        (idle / 3).max(Duration::from_secs(1))
    }

    /// Applies the options to a connected socket. A failure is logged, not returned:
    /// the connection still works, it only finds a dead peer later.
    pub fn apply(&self, stream: &TcpStream) {
        let sock = socket2::SockRef::from(stream);
        if let Some(idle) = self.keepalive {
            let params = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(Self::interval(idle))
                .with_retries(KEEPALIVE_PROBES);
            if let Err(e) = sock.set_tcp_keepalive(&params) {
                tracing::debug!(error = %e, "could not set TCP keepalive on a server socket");
            }
        }
        if let Some(t) = self.user_timeout {
            if let Err(e) = sock.set_tcp_user_timeout(Some(t)) {
                tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT on a server socket");
            }
        }
    }

    /// The same options for a tokio-postgres connection (admin sessions and probes).
    pub fn configure(&self, cfg: &mut tokio_postgres::Config) {
        if let Some(idle) = self.keepalive {
            cfg.keepalives(true)
                .keepalives_idle(idle)
                .keepalives_interval(Self::interval(idle))
                .keepalives_retries(KEEPALIVE_PROBES);
        } else {
            cfg.keepalives(false);
        }
        if let Some(t) = self.user_timeout {
            cfg.tcp_user_timeout(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_options_reach_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let tcp = ServerTcp {
            user_timeout: Some(Duration::from_millis(2500)),
            keepalive: Some(Duration::from_secs(6)),
        };
        tcp.apply(&stream);
        let sock = socket2::SockRef::from(&stream);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(2500))
        );
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(6));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 3);
        // None leaves the kernel's defaults alone.
        let other = TcpStream::connect(addr).await.unwrap();
        ServerTcp::NONE.apply(&other);
        let sock = socket2::SockRef::from(&other);
        assert_eq!(sock.tcp_user_timeout().unwrap(), None);
        assert!(!sock.keepalive().unwrap());
    }
}
