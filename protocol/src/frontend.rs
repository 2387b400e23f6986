//! Messages the client sends after startup: tag constants, typed messages, decoders and
//! encoders. Payload-heavy parts (Bind parameters, CopyData) stay as [`Bytes`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::{put_cstr, put_tagged, take_cstr, take_i16, take_i32, take_str, take_u8};
use crate::framing::{Frame, FrameError};

/// Type bytes of frontend messages.
pub use crate::tag::frontend as tag;

/// What a Describe or Close refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    fn parse(b: u8) -> Result<Self, FrameError> {
        match b {
            b'S' => Ok(Self::Statement),
            b'P' => Ok(Self::Portal),
            _ => Err(FrameError::Malformed(
                "Describe/Close target must be 'S' or 'P'",
            )),
        }
    }

    fn as_byte(self) -> u8 {
        match self {
            Self::Statement => b'S',
            Self::Portal => b'P',
        }
    }
}

/// The frontend messages of the query phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    Query {
        sql: Bytes,
    },
    Parse {
        name: Bytes,
        sql: Bytes,
        param_types: Vec<u32>,
    },
    /// Bind: the portal and statement names are decoded; formats and values are kept as
    /// the raw remainder so they are never copied.
    Bind {
        portal: Bytes,
        statement: Bytes,
        rest: Bytes,
    },
    Describe {
        target: Target,
        name: Bytes,
    },
    Execute {
        portal: Bytes,
        max_rows: i32,
    },
    Close {
        target: Target,
        name: Bytes,
    },
    Sync,
    Flush,
    CopyData {
        data: Bytes,
    },
    CopyDone,
    CopyFail {
        message: String,
    },
    Terminate,
    /// FunctionCall and the password family, kept as bytes.
    Other(Frame),
}

impl FrontendMessage {
    /// Decodes a frame's body according to its tag.
    pub fn parse(frame: Frame) -> Result<Self, FrameError> {
        let mut b = frame.body.clone();
        let msg = match frame.tag {
            tag::QUERY => Self::Query {
                sql: take_cstr(&mut b)?,
            },
            tag::PARSE => {
                let name = take_cstr(&mut b)?;
                let sql = take_cstr(&mut b)?;
                let n = take_i16(&mut b)?;
                if n < 0 || b.remaining() < n as usize * 4 {
                    return Err(FrameError::Malformed("Parse parameter count is wrong"));
                }
                let param_types = (0..n).map(|_| b.get_u32()).collect();
                Self::Parse {
                    name,
                    sql,
                    param_types,
                }
            }
            tag::BIND => {
                let portal = take_cstr(&mut b)?;
                let statement = take_cstr(&mut b)?;
                Self::Bind {
                    portal,
                    statement,
                    rest: std::mem::take(&mut b),
                }
            }
            tag::DESCRIBE => Self::Describe {
                target: Target::parse(take_u8(&mut b)?)?,
                name: take_cstr(&mut b)?,
            },
            tag::EXECUTE => Self::Execute {
                portal: take_cstr(&mut b)?,
                max_rows: take_i32(&mut b)?,
            },
            tag::CLOSE => Self::Close {
                target: Target::parse(take_u8(&mut b)?)?,
                name: take_cstr(&mut b)?,
            },
            tag::SYNC => Self::Sync,
            tag::FLUSH => Self::Flush,
            tag::COPY_DATA => Self::CopyData {
                data: std::mem::take(&mut b),
            },
            tag::COPY_DONE => Self::CopyDone,
            tag::COPY_FAIL => Self::CopyFail {
                message: take_str(&mut b)?,
            },
            tag::TERMINATE => Self::Terminate,
            tag::FUNCTION_CALL | tag::PASSWORD => return Ok(Self::Other(frame)),
            other => return Err(FrameError::UnexpectedTag(other)),
        };
        if !b.is_empty() {
            return Err(FrameError::Malformed("message has trailing bytes"));
        }
        Ok(msg)
    }

    /// Appends the message in wire form to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Self::Query { sql } => put_tagged(buf, tag::QUERY, |b| put_cstr(b, sql)),
            Self::Parse {
                name,
                sql,
                param_types,
            } => put_tagged(buf, tag::PARSE, |b| {
                put_cstr(b, name);
                put_cstr(b, sql);
                b.put_i16(param_types.len() as i16);
                for t in param_types {
                    b.put_u32(*t);
                }
            }),
            Self::Bind {
                portal,
                statement,
                rest,
            } => put_tagged(buf, tag::BIND, |b| {
                put_cstr(b, portal);
                put_cstr(b, statement);
                b.put_slice(rest);
            }),
            Self::Describe { target, name } => put_tagged(buf, tag::DESCRIBE, |b| {
                b.put_u8(target.as_byte());
                put_cstr(b, name);
            }),
            Self::Execute { portal, max_rows } => put_tagged(buf, tag::EXECUTE, |b| {
                put_cstr(b, portal);
                b.put_i32(*max_rows);
            }),
            Self::Close { target, name } => put_tagged(buf, tag::CLOSE, |b| {
                b.put_u8(target.as_byte());
                put_cstr(b, name);
            }),
            Self::Sync => put_tagged(buf, tag::SYNC, |_| {}),
            Self::Flush => put_tagged(buf, tag::FLUSH, |_| {}),
            Self::CopyData { data } => put_tagged(buf, tag::COPY_DATA, |b| b.put_slice(data)),
            Self::CopyDone => put_tagged(buf, tag::COPY_DONE, |_| {}),
            Self::CopyFail { message } => {
                put_tagged(buf, tag::COPY_FAIL, |b| put_cstr(b, message.as_bytes()))
            }
            Self::Terminate => put_tagged(buf, tag::TERMINATE, |_| {}),
            Self::Other(f) => f.encode(buf),
        }
    }
}

/// Decodes a PasswordMessage body (cleartext or `md5…` password).
pub fn parse_password(body: &Bytes) -> Result<String, FrameError> {
    let mut b = body.clone();
    let s = take_str(&mut b)?;
    if !b.is_empty() {
        return Err(FrameError::Malformed("password message has trailing bytes"));
    }
    Ok(s)
}

/// Appends a PasswordMessage.
pub fn encode_password(password: &str, buf: &mut BytesMut) {
    put_tagged(buf, tag::PASSWORD, |b| put_cstr(b, password.as_bytes()));
}

/// Decodes a SASLInitialResponse body into the mechanism and the initial data.
pub fn parse_sasl_initial(body: &Bytes) -> Result<(String, Bytes), FrameError> {
    let mut b = body.clone();
    let mechanism = take_str(&mut b)?;
    let len = take_i32(&mut b)?;
    if len == -1 {
        return Ok((mechanism, Bytes::new()));
    }
    if len < 0 || len as usize != b.len() {
        return Err(FrameError::Malformed(
            "SASL initial response length is wrong",
        ));
    }
    Ok((mechanism, b))
}

/// Appends a SASLInitialResponse.
pub fn encode_sasl_initial(mechanism: &str, data: &[u8], buf: &mut BytesMut) {
    put_tagged(buf, tag::PASSWORD, |b| {
        put_cstr(b, mechanism.as_bytes());
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

/// Appends a SASLResponse (its body is the raw SASL data).
pub fn encode_sasl_response(data: &[u8], buf: &mut BytesMut) {
    put_tagged(buf, tag::PASSWORD, |b| b.put_slice(data));
}
