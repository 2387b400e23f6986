//! Framing: splitting a byte stream into startup-phase packets and tagged messages.
//!
//! Every decoder checks the 4-byte length before it allocates or waits for a body: a
//! length below 4, or above the caller's limit, is an error straight away, so a peer can
//! never make the proxy reserve memory by claiming a huge message.

use bytes::{Buf, Bytes, BytesMut};

use crate::codec::{put_cstr, put_untagged, take_cstr, take_i32};
pub use crate::codec::{FrameError, HEADER_LEN};

/// PostgreSQL's own limit on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// Protocol 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;
/// The request code of an SSLRequest.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// The request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// The request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// The one-byte answer to an SSLRequest (or GSSENCRequest) that accepts it: the
/// handshake follows.
pub const ENCRYPTION_ACCEPTED: u8 = b'S';
/// The one-byte answer that declines it: the connection goes on in plaintext.
pub const ENCRYPTION_DECLINED: u8 = b'N';

/// One tagged message: its type byte and its body (without tag and length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    /// Appends this frame, header included, to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        crate::codec::put_tagged(buf, self.tag, |b| b.extend_from_slice(&self.body));
    }
}

/// Looks at the header of the tagged message at the front of `buf` without consuming it.
///
/// Returns the tag and the message's total size on the wire (tag and length included), or
/// `None` when fewer than 5 bytes are buffered. A length below 4 is an error; so is one
/// above `max_len` (measured as the length field itself).
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len));
    }
    let len = len as usize;
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    Ok(Some((buf[0], len + 1)))
}

/// Takes one whole tagged message from the front of `buf`, or returns `None` (consuming
/// nothing) when it is not complete yet. The body is split off without copying.
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, FrameError> {
    let Some((tag, total)) = peek_header(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut msg = buf.split_to(total);
    msg.advance(5);
    Ok(Some(Frame {
        tag,
        body: msg.freeze(),
    }))
}

/// Longest secret key in BackendKeyData and CancelRequest (protocol 3.2 allows 256
/// bytes; 3.0 keys are 4).
pub const MAX_CANCEL_KEY: usize = 256;

/// The first packet a client sends (and the only untagged ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// A StartupMessage: protocol 3.x and its parameters in the order sent.
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
    /// Asks whether TLS is available.
    SslRequest,
    /// Asks whether GSSAPI encryption is available.
    GssEncRequest,
    /// Asks to cancel the query of the session with this backend key data (a key of 4
    /// bytes in protocol 3.0, up to 256 in 3.2).
    Cancel { pid: i32, key: Bytes },
}

impl StartupPacket {
    /// The value of a startup parameter, if the client sent it.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    /// Appends the packet in wire form to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        use bytes::BufMut;
        put_untagged(buf, |b| match self {
            StartupPacket::Startup { minor, params } => {
                b.put_i32(PROTOCOL_3_0 | i32::from(*minor));
                for (k, v) in params {
                    put_cstr(b, k.as_bytes());
                    put_cstr(b, v.as_bytes());
                }
                b.put_u8(0);
            }
            StartupPacket::SslRequest => b.put_i32(SSL_REQUEST_CODE),
            StartupPacket::GssEncRequest => b.put_i32(GSSENC_REQUEST_CODE),
            StartupPacket::Cancel { pid, key } => {
                b.put_i32(CANCEL_REQUEST_CODE);
                b.put_i32(*pid);
                b.put_slice(key);
            }
        });
    }
}

/// Takes one startup-phase packet from the front of `buf`, or returns `None` when it is
/// not complete yet. Lengths below 8 or above [`MAX_STARTUP_PACKET`] are rejected before
/// the body is awaited.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(FrameError::BadLength(len));
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_STARTUP_PACKET,
        });
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut body = buf.split_to(len).freeze();
    body.advance(4);
    parse_startup_body(body).map(Some)
}

fn parse_startup_body(mut body: Bytes) -> Result<StartupPacket, FrameError> {
    let code = take_i32(&mut body)?;
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !body.is_empty() => {
            Err(FrameError::Malformed("request packet has trailing bytes"))
        }
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            let pid = take_i32(&mut body)?;
            if body.len() < 4 || body.len() > MAX_CANCEL_KEY {
                return Err(FrameError::Malformed("cancel request key of a bad length"));
            }
            Ok(StartupPacket::Cancel { pid, key: body })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(FrameError::UnsupportedProtocol { major, minor });
            }
            let params = parse_startup_params(body)?;
            Ok(StartupPacket::Startup { minor, params })
        }
    }
}

fn parse_startup_params(mut body: Bytes) -> Result<Vec<(String, String)>, FrameError> {
    let mut params = Vec::new();
    loop {
        let key = take_cstr(&mut body)?;
        if key.is_empty() {
            break;
        }
        let value = take_cstr(&mut body)?;
        let key = String::from_utf8(key.to_vec())
            .map_err(|_| FrameError::Malformed("startup parameter name is not UTF-8"))?;
        let value = String::from_utf8(value.to_vec())
            .map_err(|_| FrameError::Malformed("startup parameter value is not UTF-8"))?;
        params.push((key, value));
    }
    if !body.is_empty() {
        return Err(FrameError::Malformed("startup packet has trailing bytes"));
    }
    if !params.iter().any(|(k, _)| k == "user") {
        return Err(FrameError::Malformed(
            "no PostgreSQL user name specified in startup packet",
        ));
    }
    Ok(params)
}

#[cfg(test)]
mod tests;
