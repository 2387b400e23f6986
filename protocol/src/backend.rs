//! Messages the server sends: tag constants, the typed messages the proxy inspects or
//! produces, their decoders and encoders. Everything else stays an opaque [`Frame`].

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{put_cstr, put_tagged, take_cstr, take_i32, take_str, take_u8};
use crate::error::{ErrorFields, ProxyError};
use crate::framing::{Frame, FrameError};

/// Type bytes of backend messages.
pub use crate::tag::backend as tag;

/// The transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (queries rejected until it ends).
    Failed,
}

impl TransactionStatus {
    pub fn from_byte(b: u8) -> Result<Self, FrameError> {
        match b {
            b'I' => Ok(Self::Idle),
            b'T' => Ok(Self::InTransaction),
            b'E' => Ok(Self::Failed),
            _ => Err(FrameError::Malformed("unknown transaction status")),
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}

/// The authentication request codes of an `R` message.
pub mod auth_code {
    pub const OK: i32 = 0;
    pub const KERBEROS_V5: i32 = 2;
    pub const CLEARTEXT_PASSWORD: i32 = 3;
    pub const MD5_PASSWORD: i32 = 5;
    pub const GSS: i32 = 7;
    pub const GSS_CONTINUE: i32 = 8;
    pub const SSPI: i32 = 9;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// An Authentication* message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue {
        data: Bytes,
    },
    SaslFinal {
        data: Bytes,
    },
    /// Kerberos, GSSAPI, SSPI: recognised but not supported by the proxy.
    Unsupported {
        code: i32,
    },
}

/// The backend messages the proxy inspects or produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    Authentication(Authentication),
    ParameterStatus {
        name: String,
        value: String,
    },
    /// A session's process id and secret key: 4 bytes in protocol 3.0, up to 256 in
    /// 3.2.
    BackendKeyData {
        pid: i32,
        key: Bytes,
    },
    ReadyForQuery(TransactionStatus),
    ErrorResponse(ErrorFields),
    NoticeResponse(ErrorFields),
    NotificationResponse {
        pid: i32,
        channel: String,
        payload: String,
    },
    CommandComplete {
        tag: String,
    },
    /// The newest protocol version the server speaks, as PostgreSQL sends it (the whole
    /// version, `3 << 16 | minor`), and the `_pq_.` options it does not take.
    NegotiateProtocolVersion {
        newest_version: i32,
        unrecognized: Vec<String>,
    },
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    EmptyQueryResponse,
    PortalSuspended,
    CopyDone,
    /// Any other message (rows, descriptions, copy data…), kept as bytes.
    Other(Frame),
}

impl BackendMessage {
    /// Decodes a frame's body according to its tag.
    pub fn parse(frame: Frame) -> Result<Self, FrameError> {
        let mut b = frame.body.clone();
        let msg = match frame.tag {
            tag::AUTHENTICATION => Self::Authentication(parse_auth(&mut b)?),
            tag::PARAMETER_STATUS => Self::ParameterStatus {
                name: take_str(&mut b)?,
                value: take_str(&mut b)?,
            },
            tag::BACKEND_KEY_DATA => {
                let pid = take_i32(&mut b)?;
                if b.len() < 4 || b.len() > crate::framing::MAX_CANCEL_KEY {
                    return Err(FrameError::Malformed("backend key data of a bad length"));
                }
                Self::BackendKeyData {
                    pid,
                    key: std::mem::take(&mut b),
                }
            }
            tag::READY_FOR_QUERY => {
                Self::ReadyForQuery(TransactionStatus::from_byte(take_u8(&mut b)?)?)
            }
            tag::ERROR_RESPONSE => Self::ErrorResponse(ErrorFields::parse(&mut b)?),
            tag::NOTICE_RESPONSE => Self::NoticeResponse(ErrorFields::parse(&mut b)?),
            tag::NOTIFICATION_RESPONSE => Self::NotificationResponse {
                pid: take_i32(&mut b)?,
                channel: take_str(&mut b)?,
                payload: take_str(&mut b)?,
            },
            tag::COMMAND_COMPLETE => Self::CommandComplete {
                tag: take_str(&mut b)?,
            },
            tag::NEGOTIATE_PROTOCOL_VERSION => {
                let newest_version = take_i32(&mut b)?;
                let n = take_i32(&mut b)?;
                let mut unrecognized = Vec::new();
                for _ in 0..n.max(0) {
                    unrecognized.push(take_str(&mut b)?);
                }
                Self::NegotiateProtocolVersion {
                    newest_version,
                    unrecognized,
                }
            }
            tag::PARSE_COMPLETE => Self::ParseComplete,
            tag::BIND_COMPLETE => Self::BindComplete,
            tag::CLOSE_COMPLETE => Self::CloseComplete,
            tag::NO_DATA => Self::NoData,
            tag::EMPTY_QUERY_RESPONSE => Self::EmptyQueryResponse,
            tag::PORTAL_SUSPENDED => Self::PortalSuspended,
            tag::COPY_DONE => Self::CopyDone,
            _ => return Ok(Self::Other(frame)),
        };
        if !b.is_empty() && !matches!(msg, Self::Other(_)) {
            return Err(FrameError::Malformed("message has trailing bytes"));
        }
        Ok(msg)
    }

    /// Appends the message in wire form to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Self::Authentication(a) => put_tagged(buf, tag::AUTHENTICATION, |b| encode_auth(a, b)),
            Self::ParameterStatus { name, value } => encode_parameter_status(name, value, buf),
            Self::BackendKeyData { pid, key } => encode_backend_key_data(*pid, key, buf),
            Self::ReadyForQuery(s) => {
                put_tagged(buf, tag::READY_FOR_QUERY, |b| b.put_u8(s.as_byte()))
            }
            Self::ErrorResponse(f) => put_tagged(buf, tag::ERROR_RESPONSE, |b| f.encode(b)),
            Self::NoticeResponse(f) => put_tagged(buf, tag::NOTICE_RESPONSE, |b| f.encode(b)),
            Self::NotificationResponse {
                pid,
                channel,
                payload,
            } => put_tagged(buf, tag::NOTIFICATION_RESPONSE, |b| {
                b.put_i32(*pid);
                put_cstr(b, channel.as_bytes());
                put_cstr(b, payload.as_bytes());
            }),
            Self::CommandComplete { tag: t } => {
                put_tagged(buf, tag::COMMAND_COMPLETE, |b| put_cstr(b, t.as_bytes()))
            }
            Self::NegotiateProtocolVersion {
                newest_version,
                unrecognized,
            } => put_tagged(buf, tag::NEGOTIATE_PROTOCOL_VERSION, |b| {
                b.put_i32(*newest_version);
                b.put_i32(unrecognized.len() as i32);
                for o in unrecognized {
                    put_cstr(b, o.as_bytes());
                }
            }),
            Self::ParseComplete => put_tagged(buf, tag::PARSE_COMPLETE, |_| {}),
            Self::BindComplete => put_tagged(buf, tag::BIND_COMPLETE, |_| {}),
            Self::CloseComplete => put_tagged(buf, tag::CLOSE_COMPLETE, |_| {}),
            Self::NoData => put_tagged(buf, tag::NO_DATA, |_| {}),
            Self::EmptyQueryResponse => put_tagged(buf, tag::EMPTY_QUERY_RESPONSE, |_| {}),
            Self::PortalSuspended => put_tagged(buf, tag::PORTAL_SUSPENDED, |_| {}),
            Self::CopyDone => put_tagged(buf, tag::COPY_DONE, |_| {}),
            Self::Other(f) => f.encode(buf),
        }
    }
}

fn parse_auth(b: &mut Bytes) -> Result<Authentication, FrameError> {
    let code = take_i32(b)?;
    Ok(match code {
        auth_code::OK => Authentication::Ok,
        auth_code::CLEARTEXT_PASSWORD => Authentication::CleartextPassword,
        auth_code::MD5_PASSWORD => {
            if b.len() != 4 {
                return Err(FrameError::Malformed("MD5 salt must be 4 bytes"));
            }
            let mut salt = [0; 4];
            salt.copy_from_slice(b);
            *b = Bytes::new();
            Authentication::Md5Password { salt }
        }
        auth_code::SASL => {
            let mut mechanisms = Vec::new();
            loop {
                let m = take_cstr(b)?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(
                    String::from_utf8(m.to_vec())
                        .map_err(|_| FrameError::Malformed("SASL mechanism is not UTF-8"))?,
                );
            }
            Authentication::Sasl { mechanisms }
        }
        auth_code::SASL_CONTINUE => Authentication::SaslContinue {
            data: std::mem::take(b),
        },
        auth_code::SASL_FINAL => Authentication::SaslFinal {
            data: std::mem::take(b),
        },
        other => {
            *b = Bytes::new();
            Authentication::Unsupported { code: other }
        }
    })
}

fn encode_auth(a: &Authentication, b: &mut BytesMut) {
    match a {
        Authentication::Ok => b.put_i32(auth_code::OK),
        Authentication::CleartextPassword => b.put_i32(auth_code::CLEARTEXT_PASSWORD),
        Authentication::Md5Password { salt } => {
            b.put_i32(auth_code::MD5_PASSWORD);
            b.put_slice(salt);
        }
        Authentication::Sasl { mechanisms } => {
            b.put_i32(auth_code::SASL);
            for m in mechanisms {
                put_cstr(b, m.as_bytes());
            }
            b.put_u8(0);
        }
        Authentication::SaslContinue { data } => {
            b.put_i32(auth_code::SASL_CONTINUE);
            b.put_slice(data);
        }
        Authentication::SaslFinal { data } => {
            b.put_i32(auth_code::SASL_FINAL);
            b.put_slice(data);
        }
        Authentication::Unsupported { code } => b.put_i32(*code),
    }
}

/// Reads the status byte of a ReadyForQuery body without building a message.
pub fn ready_status(body: &[u8]) -> Result<TransactionStatus, FrameError> {
    match body {
        [s] => TransactionStatus::from_byte(*s),
        _ => Err(FrameError::Malformed("ReadyForQuery body must be one byte")),
    }
}

impl From<&ProxyError> for BackendMessage {
    /// The proxy's own error as a typed ErrorResponse.
    fn from(e: &ProxyError) -> Self {
        BackendMessage::ErrorResponse(e.fields())
    }
}

/// The type of a column in a result the proxy builds itself (the admin console).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// `text` (OID 25).
    Text,
    /// `int8` (OID 20), sent as its decimal text.
    Int8,
}

impl ColumnType {
    fn oid(self) -> i32 {
        match self {
            ColumnType::Text => 25,
            ColumnType::Int8 => 20,
        }
    }

    fn len(self) -> i16 {
        match self {
            ColumnType::Text => -1,
            ColumnType::Int8 => 8,
        }
    }
}

/// Appends a ParameterStatus message: what [`BackendMessage::ParameterStatus`] encodes,
/// from borrowed text (a greeting writes a dozen of them).
pub fn encode_parameter_status(name: &str, value: &str, buf: &mut BytesMut) {
    put_tagged(buf, tag::PARAMETER_STATUS, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    })
}

/// Appends a BackendKeyData message from a borrowed key.
pub fn encode_backend_key_data(pid: i32, key: &[u8], buf: &mut BytesMut) {
    put_tagged(buf, tag::BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_slice(key);
    })
}

/// Appends a RowDescription of `columns` (names and types, every one in text format).
pub fn encode_row_description(columns: &[(&str, ColumnType)], buf: &mut BytesMut) {
    put_tagged(buf, tag::ROW_DESCRIPTION, |b| {
        b.put_i16(columns.len() as i16);
        for (name, ty) in columns {
            put_cstr(b, name.as_bytes());
            b.put_i32(0); // table
            b.put_i16(0); // column number
            b.put_i32(ty.oid());
            b.put_i16(ty.len());
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// Appends a DataRow of text values (`None` is NULL).
pub fn encode_data_row<S: AsRef<str>>(values: &[Option<S>], buf: &mut BytesMut) {
    put_tagged(buf, tag::DATA_ROW, |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.as_ref().len() as i32);
                    b.put_slice(v.as_ref().as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

#[cfg(test)]
mod tests;
