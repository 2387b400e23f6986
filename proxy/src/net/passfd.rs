//! Frames with file descriptors over a Unix socket: the takeover channel's transport.
//!
//! A frame is a 4-byte big-endian length, one byte counting the descriptors it carries,
//! then the body. The descriptors ride on the frame's first bytes as `SCM_RIGHTS`;
//! Linux delivers them with those bytes and never merges two sends' descriptors in one
//! read, so the receiver keeps the descriptors in arrival order and each frame takes
//! as many as it counts, in the order the sender gave them.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Most descriptors one frame carries (the listeners, or a client and its server).
pub const MAX_FDS: usize = 4;
/// Largest frame body accepted.
pub const MAX_FRAME: usize = 64 << 20;
const HEADER: usize = 5;

/// The sending half.
#[derive(Debug, Clone)]
pub struct Sender(Arc<UnixStream>);

/// The receiving half.
#[derive(Debug)]
pub struct Receiver {
    sock: Arc<UnixStream>,
    buf: BytesMut,
    fds: VecDeque<OwnedFd>,
}

/// Both halves of one connected socket.
pub fn split(sock: UnixStream) -> (Sender, Receiver) {
    let sock = Arc::new(sock);
    (
        Sender(Arc::clone(&sock)),
        Receiver {
            sock,
            buf: BytesMut::new(),
            fds: VecDeque::new(),
        },
    )
}

impl Sender {
    /// Sends one frame with `fds`. Not to be called from two tasks at once (their bytes
    /// could interleave): each side has one writer.
    pub async fn send(&self, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS || body.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame too large",
            ));
        }
        let mut frame = Vec::with_capacity(HEADER + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.push(fds.len() as u8);
        frame.extend_from_slice(body);
        let mut sent = 0;
        // The first write carries the descriptors; the rest is plain bytes.
        while sent == 0 {
            self.0.writable().await?;
            let r = self.0.try_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("no room for the descriptors"));
                }
                sendmsg(
                    &*self.0,
                    &[IoSlice::new(&frame)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            });
            match r {
                Ok(n) => sent = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        while sent < frame.len() {
            self.0.writable().await?;
            match self.0.try_write(&frame[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Receiver {
    /// The next frame's body and descriptors; `None` at a clean end of the stream.
    pub async fn recv(&mut self) -> io::Result<Option<(BytesMut, Vec<OwnedFd>)>> {
        loop {
            if let Some(frame) = self.take()? {
                return Ok(Some(frame));
            }
            self.sock.readable().await?;
            let r = self.sock.try_io(Interest::READABLE, || {
                let mut chunk = vec![0u8; 64 * 1024];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = recvmsg(
                    &*self.sock,
                    &mut [IoSliceMut::new(&mut chunk)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(got) = m {
                        fds.extend(got);
                    }
                }
                if msg.flags.contains(ReturnFlags::CTRUNC) {
                    return Err(io::Error::other("descriptors were cut off"));
                }
                chunk.truncate(msg.bytes);
                Ok((chunk, fds))
            });
            match r {
                Ok((chunk, fds)) => {
                    if chunk.is_empty() && fds.is_empty() {
                        if self.buf.is_empty() {
                            return Ok(None);
                        }
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the channel closed in the middle of a frame",
                        ));
                    }
                    self.buf.extend_from_slice(&chunk);
                    self.fds.extend(fds);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn take(&mut self) -> io::Result<Option<(BytesMut, Vec<OwnedFd>)>> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        let nfds = self.buf[4] as usize;
        if len > MAX_FRAME || nfds > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a frame of {len} bytes with {nfds} descriptors is over the limits"),
            ));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        if self.fds.len() < nfds {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a frame's descriptors did not arrive with it",
            ));
        }
        self.buf.advance(HEADER);
        let body = self.buf.split_to(len);
        let fds = self.fds.drain(..nfds).collect();
        Ok(Some((body, fds)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn frames_keep_their_own_descriptors_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, _) = split(a);
        let (_, mut rx) = split(b);
        // Two TCP connections whose far ends we keep: each must arrive as itself.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut far = Vec::new();
        let mut near = Vec::new();
        for _ in 0..2 {
            let c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (s, _) = listener.accept().await.unwrap();
            near.push(c);
            far.push(s);
        }
        let big = vec![b'x'; 300 * 1024];
        // More than the socket's buffer: sent while the other side reads.
        let sender = {
            let big = big.clone();
            tokio::spawn(async move {
                tx.send(b"first", &[near[0].as_fd()]).await.unwrap();
                tx.send(b"none", &[]).await.unwrap();
                tx.send(&big, &[near[1].as_fd(), near[0].as_fd()])
                    .await
                    .unwrap();
                near
            })
        };

        let (body, fds) = rx.recv().await.unwrap().unwrap();
        assert_eq!((&body[..], fds.len()), (&b"first"[..], 1));
        let mut s = tokio::net::TcpStream::from_std(std::net::TcpStream::from(
            fds.into_iter().next().unwrap(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        s.write_all(b"0").await.unwrap();
        let mut got = [0u8; 1];
        far[0].read_exact(&mut got).await.unwrap();
        assert_eq!(
            &got, b"0",
            "the first frame's descriptor is the first connection"
        );

        let (body, fds) = rx.recv().await.unwrap().unwrap();
        assert_eq!((&body[..], fds.len()), (&b"none"[..], 0));
        let (body, fds) = rx.recv().await.unwrap().unwrap();
        assert_eq!((body.len(), fds.len()), (big.len(), 2));
        let mut s = std::net::TcpStream::from(fds.into_iter().next().unwrap());
        std::io::Write::write_all(&mut s, b"1").unwrap();
        far[1].read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"1", "descriptors keep the sender's order");
        drop(sender.await.unwrap());
        assert!(rx.recv().await.unwrap().is_none(), "a clean end");
    }

    #[tokio::test]
    async fn a_frame_cut_off_is_an_error_not_an_end() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_, mut rx) = split(b);
        let mut a = a;
        a.write_all(&[0, 0, 0, 10, 0, b'x']).await.unwrap();
        drop(a);
        assert!(rx.recv().await.is_err());
    }
}
