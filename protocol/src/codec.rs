//! The ground floor of the crate: the error every decoder reports, the size of a
//! message header, and small helpers shared by the decoders and encoders (C strings,
//! length back-filling).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A tagged message's header on the wire: the type byte and the 4-byte length.
pub const HEADER_LEN: usize = 5;

/// Why a byte stream could not be framed or a message body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is below its minimum (4, or 8 for startup packets) or negative.
    #[error("invalid message length {0}")]
    BadLength(i32),
    /// The length field is over the limit the caller allows.
    #[error("message length {len} exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// A startup packet asks for a protocol version we do not speak.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    /// The message's contents do not match its type.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// A tag that is not valid at this point of the conversation.
    #[error("unexpected message type 0x{0:02x}")]
    UnexpectedTag(u8),
}

/// Reads a NUL-terminated string from the front of `buf`, returning it without the NUL.
pub(crate) fn take_cstr(buf: &mut Bytes) -> Result<Bytes, FrameError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(FrameError::Malformed("missing string terminator"))?;
    let s = buf.split_to(end);
    buf.advance(1);
    Ok(s)
}

/// Like [`take_cstr`] but also requires valid UTF-8.
pub(crate) fn take_str(buf: &mut Bytes) -> Result<String, FrameError> {
    let raw = take_cstr(buf)?;
    String::from_utf8(raw.to_vec()).map_err(|_| FrameError::Malformed("string is not UTF-8"))
}

pub(crate) fn take_i16(buf: &mut Bytes) -> Result<i16, FrameError> {
    if buf.remaining() < 2 {
        return Err(FrameError::Malformed("message truncated"));
    }
    Ok(buf.get_i16())
}

pub(crate) fn take_i32(buf: &mut Bytes) -> Result<i32, FrameError> {
    if buf.remaining() < 4 {
        return Err(FrameError::Malformed("message truncated"));
    }
    Ok(buf.get_i32())
}

pub(crate) fn take_u8(buf: &mut Bytes) -> Result<u8, FrameError> {
    if buf.remaining() < 1 {
        return Err(FrameError::Malformed("message truncated"));
    }
    Ok(buf.get_u8())
}

pub(crate) fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// Writes a tagged message: the tag, a placeholder length, the body from `body`, then
/// back-fills the length (which counts itself but not the tag).
pub(crate) fn put_tagged(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Writes an untagged (startup-phase) packet, back-filling its length.
pub(crate) fn put_untagged(buf: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}
