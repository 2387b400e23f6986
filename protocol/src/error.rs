//! ErrorResponse / NoticeResponse bodies: parsing the fields and building the proxy's own
//! errors.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{put_cstr, put_tagged, take_cstr, take_u8};
use crate::framing::FrameError;
use crate::tag::backend as tag;

/// Field codes of an ErrorResponse/NoticeResponse.
pub mod field {
    pub const SEVERITY: u8 = b'S';
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    pub const CODE: u8 = b'C';
    pub const MESSAGE: u8 = b'M';
    pub const DETAIL: u8 = b'D';
    pub const HINT: u8 = b'H';
}

/// The severity of an error: what the proxy sends (`Error`, `Fatal`), and what it reads
/// in a server's ErrorResponse (`Panic` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session continues.
    Error,
    /// The session ends after this message.
    Fatal,
    /// The server ends every session (it is restarting).
    Panic,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Panic => "PANIC",
        }
    }

    /// The severity a field value names (`ERROR`, `FATAL`, `PANIC`); `None` for the
    /// severities of notices.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ERROR" => Some(Severity::Error),
            "FATAL" => Some(Severity::Fatal),
            "PANIC" => Some(Severity::Panic),
            _ => None,
        }
    }

    /// True when the session ends with the message.
    pub fn ends_session(self) -> bool {
        matches!(self, Severity::Fatal | Severity::Panic)
    }
}

/// The fields of an ErrorResponse or NoticeResponse, in the order received.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    /// Parses a body: `(code byte, C string)*` ended by a zero byte.
    pub fn parse(b: &mut Bytes) -> Result<Self, FrameError> {
        let mut fields = Vec::new();
        loop {
            let code = take_u8(b)?;
            if code == 0 {
                return Ok(Self { fields });
            }
            let value = take_cstr(b)?;
            fields.push((code, String::from_utf8_lossy(&value).into_owned()));
        }
    }

    /// The value of one field, if present.
    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// The SQLSTATE (`C` field), if present.
    pub fn code(&self) -> Option<&str> {
        self.get(field::CODE)
    }

    /// The primary message (`M` field), if present.
    pub fn message(&self) -> Option<&str> {
        self.get(field::MESSAGE)
    }

    /// The non-localized severity when present, else the localized one.
    pub fn severity(&self) -> Option<&str> {
        self.get(field::SEVERITY_NONLOCALIZED)
            .or_else(|| self.get(field::SEVERITY))
    }

    /// The severity, typed: `None` for a notice's (or an unknown) severity.
    pub fn level(&self) -> Option<Severity> {
        self.severity().and_then(Severity::parse)
    }

    /// True for a FATAL or PANIC: the server ends the session with it.
    pub fn ends_session(&self) -> bool {
        self.level().is_some_and(Severity::ends_session)
    }

    /// Appends the body (without tag and length) to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        for (code, value) in &self.fields {
            buf.put_u8(*code);
            put_cstr(buf, value.as_bytes());
        }
        buf.put_u8(0);
    }
}

/// Builds an error the proxy itself reports to a client.
///
/// ```
/// use handoff_protocol::error::{ProxyError, Severity};
/// use handoff_protocol::sqlstate;
/// let mut buf = bytes::BytesMut::new();
/// ProxyError::new(Severity::Fatal, sqlstate::TOO_MANY_CONNECTIONS, "too many clients")
///     .hint("raise HANDOFF_MAX_CLIENT_CONN")
///     .encode(&mut buf);
/// assert_eq!(buf[0], b'E');
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ProxyError {
    pub fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// Shorthand for a statement-level error.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    /// Shorthand for a session-ending error.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The fields, as a server would send them.
    pub fn fields(&self) -> ErrorFields {
        let sev = self.severity.as_str().to_string();
        let mut fields = vec![
            (field::SEVERITY, sev.clone()),
            (field::SEVERITY_NONLOCALIZED, sev),
            (field::CODE, self.code.to_string()),
            (field::MESSAGE, self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            fields.push((field::DETAIL, d.clone()));
        }
        if let Some(h) = &self.hint {
            fields.push((field::HINT, h.clone()));
        }
        ErrorFields { fields }
    }

    /// Appends a whole ErrorResponse message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let fields = self.fields();
        put_tagged(buf, tag::ERROR_RESPONSE, |b| fields.encode(b));
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity.as_str(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ProxyError {}
