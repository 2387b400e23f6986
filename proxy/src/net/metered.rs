//! A writer that counts the bytes written through it, for the relays' byte metrics: the
//! count is kept in the wrapper and taken (and recorded) once per transaction, not per
//! message.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project::pin_project;
use tokio::io::AsyncWrite;

/// Counts the bytes `inner` accepted.
#[pin_project]
#[derive(Debug)]
pub struct Metered<W> {
    #[pin]
    inner: W,
    written: u64,
}

impl<W> Metered<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, written: 0 }
    }

    /// The bytes written since the last call.
    pub fn take(&mut self) -> u64 {
        std::mem::take(&mut self.written)
    }
}

impl<W: AsyncWrite> AsyncWrite for Metered<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            *this.written += *n as u64;
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            *this.written += *n as u64;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_what_went_through_and_starts_again_after_take() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = Metered::new(a);
        w.write_all(b"hello").await.unwrap();
        w.write_all(b", world").await.unwrap();
        assert_eq!(w.take(), 12);
        assert_eq!(w.take(), 0);
        w.write_all(b"!").await.unwrap();
        assert_eq!(w.take(), 1);
        drop(w);
        let mut got = String::new();
        b.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello, world!");
    }
}
