//! A socket with a read buffer, for the message-at-a-time startup and authentication
//! phases of both client and server connections. The relay phase does not use it: it
//! takes the socket and the buffered leftover bytes and streams from there.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use handoff_protocol::framing::{decode_frame, decode_startup, StartupPacket};
use handoff_protocol::Frame;

use crate::error::ConnError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A connection's byte stream: plain TCP, or TLS over it (to a client, where handoff is
/// the TLS server, or to a PostgreSQL server, where it is the TLS client).
#[derive(Debug)]
pub enum Stream {
    /// Only while a connection is being upgraded to TLS (or after that failed).
    Closed,
    Plain(TcpStream),
    ToClient(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ToServer(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::ToClient(_) | Stream::ToServer(_))
    }

    /// The local address of the TCP connection underneath.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Stream::Closed => None,
            Stream::Plain(s) => s.local_addr().ok(),
            Stream::ToClient(t) => t.get_ref().0.local_addr().ok(),
            Stream::ToServer(t) => t.get_ref().0.local_addr().ok(),
        }
    }

    /// True when the peer has sent nothing (no bytes, no close) that is waiting to be
    /// read. Never blocks; may consume a byte that is there (the caller then discards
    /// the connection anyway).
    pub fn is_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            Stream::Plain(s) => {
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Stream::Closed => false,
            other => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                matches!(Pin::new(other).poll_read(&mut cx, &mut buf), Poll::Pending)
            }
        }
    }

    /// As [`Stream::is_quiet`], asking the kernel (one `recv` with `MSG_PEEK`) instead
    /// of the runtime's readiness, which lags behind bytes that arrived since its I/O
    /// driver last looked: a server connection terminated while it sat idle is then seen
    /// as closed before it is handed out. TLS streams answer as `is_quiet` does.
    pub fn is_quiet_now(&mut self) -> bool {
        match self {
            Stream::Plain(s) => {
                let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                matches!(socket2::SockRef::from(&*s).peek(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            other => other.is_quiet(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Closed => Poll::Ready(Ok(())),
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ToClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ToServer(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Closed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ToClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::ToServer(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Closed => Poll::Ready(Ok(())),
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ToClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::ToServer(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Closed => Poll::Ready(Ok(())),
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ToClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::ToServer(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Closed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::ToClient(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::ToServer(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Closed => false,
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ToClient(s) => s.is_write_vectored(),
            Stream::ToServer(s) => s.is_write_vectored(),
        }
    }
}

/// Largest message accepted during startup and authentication.
pub const MAX_STARTUP_MESSAGE: usize = 64 * 1024;

/// A socket and what has been read from it but not consumed yet.
#[derive(Debug)]
pub struct Conn {
    pub stream: Stream,
    /// Bytes read but not yet decoded; handed to the relay when startup ends.
    pub rbuf: BytesMut,
    /// Scratch space for encoding outgoing messages.
    wbuf: BytesMut,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        Self::with_stream(Stream::Plain(stream))
    }

    pub fn with_stream(stream: Stream) -> Self {
        Self {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        }
    }

    /// Upgrades a plain client connection to TLS (handoff is the TLS server).
    pub async fn accept_tls(&mut self, acceptor: tokio_rustls::TlsAcceptor) -> io::Result<()> {
        match std::mem::replace(&mut self.stream, Stream::Closed) {
            Stream::Plain(tcp) => {
                let tls = acceptor.accept(tcp).await?;
                self.stream = Stream::ToClient(Box::new(tls));
                Ok(())
            }
            other => {
                self.stream = other;
                Err(io::Error::other("the connection is not plain TCP"))
            }
        }
    }

    /// True when the client's first byte starts a TLS handshake (PostgreSQL 17's direct
    /// TLS, `sslnegotiation=direct`: no SSLRequest first). Looks without reading.
    pub async fn starts_with_tls(&mut self) -> io::Result<bool> {
        /// A TLS record of type handshake.
        const TLS_HANDSHAKE: u8 = 0x16;
        match &self.stream {
            Stream::Plain(tcp) if self.rbuf.is_empty() => {
                let mut first = [0u8; 1];
                Ok(tcp.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE)
            }
            _ => Ok(false),
        }
    }

    /// The application protocol the TLS client and handoff agreed on, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match &self.stream {
            Stream::ToClient(tls) => tls.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// The plain socket of a connection that holds no unread or unsent bytes (to keep it
    /// without this wrapper while it is quiet); the connection back otherwise.
    pub fn into_plain(self) -> Result<TcpStream, Self> {
        match self.stream {
            Stream::Plain(s) if self.rbuf.is_empty() && self.wbuf.is_empty() => Ok(s),
            stream => Err(Self { stream, ..self }),
        }
    }

    /// Frees both buffers if they hold nothing (an idle client costs almost nothing).
    pub fn release_buffers(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        self.wbuf = BytesMut::new();
    }

    /// Reads more bytes into `rbuf`. A plain socket is read through a buffer on the
    /// stack of each poll, `rbuf` growing by what came: between its login messages a
    /// client (working out its SCRAM proof, say) holds no buffer, and in a storm of
    /// logins 4 KiB of room each added up to 40 MB per 10,000 clients.
    async fn fill(&mut self) -> Result<(), ConnError> {
        let n = match &mut self.stream {
            Stream::Plain(tcp) => {
                let rbuf = &mut self.rbuf;
                std::future::poll_fn(|cx| read_small(tcp, rbuf, cx)).await?
            }
            other => {
                self.rbuf.reserve(4096);
                other.read_buf(&mut self.rbuf).await?
            }
        };
        if n == 0 {
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

/// Polls `tcp` for what it has (up to 4 KiB) and appends it to `rbuf`. A plain
/// function called at each poll: the buffer on its stack is never part of a future.
/// It is polled with the task's own context, whose waker a `Pending` needs: the
/// runtime's cooperative budget hands the task's turn back through it (a waker that
/// did nothing lost that, and the read spun: see the test below).
fn read_small(
    tcp: &mut TcpStream,
    rbuf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut chunk = [0u8; 4096];
    let mut read = ReadBuf::new(&mut chunk);
    std::task::ready!(Pin::new(tcp).poll_read(cx, &mut read))?;
    rbuf.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::socket_pair;
    use handoff_protocol::FrameError;

    /// A task that has spent its cooperative budget (tokio's: 128 operations per turn)
    /// and then reads: the read must hand the turn back and finish when polled again.
    /// A read polled with a waker that does nothing lost the wake-up that gives the turn
    /// back, found the socket readable again at once and spun: a login that never ended,
    /// on a worker thread held at 100 % CPU.
    #[test]
    fn a_read_with_the_task_budget_spent_waits_its_turn() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let outcome = rt.block_on(async {
            let (ours, mut theirs) = socket_pair().await;
            let mut bytes = BytesMut::new();
            StartupPacket::Startup {
                minor: 0,
                params: vec![("user".into(), "u".into())],
            }
            .encode(&mut bytes);
            theirs.write_all(&bytes).await.expect("the client's write");
            let reader = tokio::spawn(async move {
                // The runtime has seen the bytes come: a wait for them is over at once.
                ours.readable().await.expect("readable");
                crate::testing::spend_budget().await;
                let mut c = Conn::new(ours);
                c.read_startup().await.map(|p| p.is_some())
            });
            tokio::time::timeout(std::time::Duration::from_secs(10), reader).await
        });
        // A spinning task would keep its worker: leave it behind rather than wait.
        rt.shutdown_background();
        match outcome {
            Ok(Ok(read)) => assert!(matches!(read, Ok(true)), "{read:?}"),
            other => panic!("the read never finished: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_peer_that_closes_before_a_byte_is_no_error() {
        let (ours, theirs) = socket_pair().await;
        drop(theirs);
        let mut c = Conn::new(ours);
        assert!(matches!(c.read_startup().await, Ok(None)));
    }

    #[tokio::test]
    async fn packets_arriving_a_byte_at_a_time_are_put_together() {
        let (ours, mut theirs) = socket_pair().await;
        let mut bytes = BytesMut::new();
        StartupPacket::SslRequest.encode(&mut bytes);
        StartupPacket::Startup {
            minor: 0,
            params: vec![("user".into(), "app".into())],
        }
        .encode(&mut bytes);
        let writer = tokio::spawn(async move {
            for b in bytes.iter() {
                theirs.write_all(&[*b]).await.unwrap();
                theirs.flush().await.unwrap();
            }
            theirs
        });
        let mut c = Conn::new(ours);
        assert_eq!(
            c.read_startup().await.unwrap(),
            Some(StartupPacket::SslRequest)
        );
        match c.read_startup().await.unwrap() {
            Some(StartupPacket::Startup { params, .. }) => {
                assert_eq!(params, vec![("user".to_string(), "app".to_string())])
            }
            other => panic!("{other:?}"),
        }
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_from_its_header() {
        let (ours, mut theirs) = socket_pair().await;
        // A header claiming 1 GB, and no body: the read must fail at once, not wait
        // for (or allocate) the body.
        theirs.write_all(&[b'Q', 0x40, 0, 0, 0]).await.unwrap();
        let mut c = Conn::new(ours);
        let e = c.read_frame(MAX_STARTUP_MESSAGE).await.unwrap_err();
        assert!(
            matches!(e, ConnError::Frame(FrameError::TooLarge { .. })),
            "{e:?}"
        );
        assert!(c.rbuf.capacity() < 1 << 20, "nothing was reserved for it");
    }
}
