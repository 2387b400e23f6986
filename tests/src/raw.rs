//! A raw protocol client for tests that must send exactly the bytes they want
//! (malformed packets, huge streamed values) and an HTTP/1.1 one-shot client for the
//! admin API.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use handoff_protocol::backend::{BackendMessage, TransactionStatus};
use handoff_protocol::error::ErrorFields;
use handoff_protocol::framing::{decode_frame, StartupPacket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A socket speaking the PostgreSQL protocol by hand.
#[derive(Debug)]
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
    /// The process id and secret key BackendKeyData gave at login.
    pub key_data: Option<(i32, bytes::Bytes)>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        Ok(Self {
            stream: TcpStream::connect(addr).await?,
            buf: BytesMut::new(),
            key_data: None,
        })
    }

    /// Connects from `source` (a loopback address of its own: one source address has
    /// only ~28,000 ephemeral ports towards one server address).
    pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Result<Self> {
        let socket = match source {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        Ok(Self {
            stream: socket.connect(addr).await?,
            buf: BytesMut::new(),
            key_data: None,
        })
    }

    /// Connects and logs in without a password (proxy with `HANDOFF_USERS` unset).
    pub async fn login_trust(addr: SocketAddr, user: &str, db: &str) -> Result<Self> {
        let c = Self::connect(addr).await?;
        c.login_as(user, db).await
    }

    /// [`RawClient::login_trust`] from `source` ([`RawClient::connect_from`]), sending
    /// `params` too (as drivers send `client_encoding`, `application_name`, …).
    pub async fn login_trust_with(
        addr: SocketAddr,
        source: std::net::IpAddr,
        user: &str,
        db: &str,
        params: Vec<(String, String)>,
    ) -> Result<Self> {
        let c = Self::connect_from(addr, source).await?;
        c.login_with(user, db, params).await
    }

    async fn login_as(self, user: &str, db: &str) -> Result<Self> {
        self.login_with(user, db, Vec::new()).await
    }

    async fn login_with(
        mut self,
        user: &str,
        db: &str,
        extra: Vec<(String, String)>,
    ) -> Result<Self> {
        let c = &mut self;
        let mut out = BytesMut::new();
        let mut params = vec![("user".into(), user.into()), ("database".into(), db.into())];
        params.extend(extra);
        StartupPacket::Startup { minor: 0, params }.encode(&mut out);
        c.stream.write_all(&out).await?;
        loop {
            match c.read_message().await? {
                Some(BackendMessage::ReadyForQuery(_)) => return Ok(self),
                Some(BackendMessage::BackendKeyData { pid, key }) => c.key_data = Some((pid, key)),
                Some(BackendMessage::ErrorResponse(f)) => bail!("login failed: {:?}", f.message()),
                Some(_) => {}
                None => bail!("connection closed during login"),
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(64 * 1024);
        self.stream.read_buf(&mut self.buf).await
    }

    /// Reads one message; `None` at end of stream.
    pub async fn read_message(&mut self) -> Result<Option<BackendMessage>> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, 1 << 30)? {
                return Ok(Some(BackendMessage::parse(f)?));
            }
            if self.fill().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("connection closed inside a message");
            }
        }
    }

    /// Reads until an ErrorResponse and then end of stream; returns the error's fields.
    pub async fn expect_error_then_close(&mut self) -> Result<ErrorFields> {
        let mut error = None;
        loop {
            match self.read_message().await {
                Ok(Some(BackendMessage::ErrorResponse(f))) => error = Some(f),
                Ok(Some(_)) => {}
                Ok(None) => break,
                // A reset after the error still means the connection was closed.
                Err(_) if error.is_some() => break,
                Err(e) => return Err(e),
            }
        }
        error.context("connection closed without an ErrorResponse")
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Reads messages until ReadyForQuery, skipping DataRow bodies chunk by chunk
    /// without ever holding a whole row; returns total DataRow bytes seen and the status.
    pub async fn drain_until_ready(&mut self) -> Result<(u64, TransactionStatus)> {
        let mut row_bytes = 0u64;
        loop {
            while self.buf.len() < 5 {
                if self.fill().await? == 0 {
                    bail!("closed before ReadyForQuery");
                }
            }
            if self.buf[0] != b'D' {
                match self.read_message().await? {
                    Some(BackendMessage::ReadyForQuery(s)) => return Ok((row_bytes, s)),
                    Some(BackendMessage::ErrorResponse(f)) => {
                        bail!("query failed: {:?}", f.message())
                    }
                    Some(_) => continue,
                    None => bail!("closed before ReadyForQuery"),
                }
            }
            let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
            row_bytes += u64::from(len) - 4;
            let mut remaining = u64::from(len) + 1;
            while remaining > 0 {
                if self.buf.is_empty() && self.fill().await? == 0 {
                    bail!("closed inside a row");
                }
                let n = remaining.min(self.buf.len() as u64) as usize;
                let _ = self.buf.split_to(n);
                remaining -= n as u64;
            }
        }
    }
}

/// One HTTP/1.1 request; returns the status code and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String)> {
    http_body(addr, method, path, token, "").await
}

/// Like [`http`], with a request body.
pub async fn http_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .context("no status line")?
        .parse()
        .context("bad status code")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
