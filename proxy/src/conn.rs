//! A socket with a read buffer, for the message-at-a-time startup and authentication
//! phases of both client and server connections. The relay phase does not use it: it
//! takes the socket and the buffered leftover bytes and streams from there.

use bytes::BytesMut;
use handoff_protocol::framing::{decode_frame, decode_startup, StartupPacket};
use handoff_protocol::{Frame, FrameError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest message accepted during startup and authentication.
pub const MAX_STARTUP_MESSAGE: usize = 64 * 1024;

/// Why a startup-phase read failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed by peer")]
    Eof,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A socket and what has been read from it but not consumed yet.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    /// Bytes read but not yet decoded; handed to the relay when startup ends.
    pub rbuf: BytesMut,
    /// Scratch space for encoding outgoing messages.
    wbuf: BytesMut,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        }
    }

    /// Frees both buffers if they hold nothing (an idle client costs almost nothing).
    pub fn release_buffers(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        self.wbuf = BytesMut::new();
    }

    async fn fill(&mut self) -> Result<(), ConnError> {
        self.rbuf.reserve(4096);
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            return Err(ConnError::Eof);
        }
        Ok(())
    }

    /// Reads one startup-phase packet. `Ok(None)`: the peer closed before sending a byte.
    pub async fn read_startup(&mut self) -> Result<Option<StartupPacket>, ConnError> {
        loop {
            if let Some(p) = decode_startup(&mut self.rbuf)? {
                return Ok(Some(p));
            }
            match self.fill().await {
                Err(ConnError::Eof) if self.rbuf.is_empty() => return Ok(None),
                r => r?,
            }
        }
    }

    /// Reads one tagged message of at most `max` bytes.
    pub async fn read_frame(&mut self, max: usize) -> Result<Frame, ConnError> {
        loop {
            if let Some(f) = decode_frame(&mut self.rbuf, max)? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Encodes with `encode` and writes the result out.
    pub async fn send(&mut self, encode: impl FnOnce(&mut BytesMut)) -> std::io::Result<()> {
        self.wbuf.clear();
        encode(&mut self.wbuf);
        self.stream.write_all(&self.wbuf).await
    }

    /// Writes raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }
}
