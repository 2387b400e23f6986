//! Readers for the few message bodies the proxy looks into without building a typed
//! message: each borrows from the body (no copy, no allocation) and answers `None` for
//! a body that does not have the shape its type promises.

/// Splits a NUL-terminated string off the front of `b`.
fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

/// A Parse body's statement name and SQL text.
pub fn parse_name_and_sql(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name, rest) = cstr(body)?;
    let (sql, _) = cstr(rest)?;
    Some((name, sql))
}

/// A Parse body's SQL text.
pub fn parse_sql(body: &[u8]) -> Option<&[u8]> {
    parse_name_and_sql(body).map(|(_, sql)| sql)
}

/// A Bind body's statement name.
pub fn bind_statement(body: &[u8]) -> Option<&[u8]> {
    let (_portal, rest) = cstr(body)?;
    cstr(rest).map(|(statement, _)| statement)
}

/// A Parse, Bind or Describe that names only the unnamed statement and portal (what a
/// driver sends for a one-off query), as [`unnamed`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unnamed<'a> {
    /// A Parse of the unnamed statement, with its SQL.
    Parse(&'a [u8]),
    /// A Bind of the unnamed portal to the unnamed statement, or a Describe of either.
    Other,
}

/// `Some` when the message with `tag` and `body` is a Parse, Bind or Describe of the
/// unnamed statement and portal only.
pub fn unnamed(tag: u8, body: &[u8]) -> Option<Unnamed<'_>> {
    match tag {
        crate::frontend::tag::PARSE => match parse_name_and_sql(body)? {
            (b"", sql) => Some(Unnamed::Parse(sql)),
            _ => None,
        },
        // Portal, then statement.
        crate::frontend::tag::BIND => body.starts_with(&[0, 0]).then_some(Unnamed::Other),
        // Target ('S' or 'P'), then the name.
        crate::frontend::tag::DESCRIBE => (body.get(1) == Some(&0)).then_some(Unnamed::Other),
        _ => None,
    }
}

/// A ParameterStatus body's name and value (both UTF-8).
pub fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = cstr(body)?;
    let (value, _) = cstr(rest)?;
    Some((
        std::str::from_utf8(name).ok()?,
        std::str::from_utf8(value).ok()?,
    ))
}

/// A DataRow body's columns (`None` for NULL).
pub fn data_row(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut rest = &body[2..];
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            cols.push(None);
        } else {
            let len = len as usize;
            cols.push(Some(rest.get(..len)?));
            rest = &rest[len..];
        }
    }
    Some(cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_unnamed_statement_and_portal_count_as_unnamed() {
        use crate::frontend::tag;
        assert_eq!(
            unnamed(tag::PARSE, b"\0SELECT 1\0\0\0"),
            Some(Unnamed::Parse(b"SELECT 1"))
        );
        assert_eq!(unnamed(tag::PARSE, b"s1\0SELECT 1\0\0\0"), None);
        assert_eq!(unnamed(tag::PARSE, b"\0SELECT 1"), None, "cut short");
        assert_eq!(unnamed(tag::BIND, b"\0\0\0\0"), Some(Unnamed::Other));
        assert_eq!(unnamed(tag::BIND, b"\0s1\0\0\0"), None, "a named statement");
        assert_eq!(unnamed(tag::BIND, b"p\0\0\0\0"), None, "a named portal");
        assert_eq!(unnamed(tag::DESCRIBE, b"S\0"), Some(Unnamed::Other));
        assert_eq!(unnamed(tag::DESCRIBE, b"Ss1\0"), None);
        assert_eq!(
            unnamed(tag::EXECUTE, b"\0\0\0\0\0"),
            None,
            "not one of the three"
        );
    }

    #[test]
    fn bodies_give_up_their_fields_and_bad_ones_nothing() {
        assert_eq!(parse_sql(b"s1\0select 1\0\0\0"), Some(&b"select 1"[..]));
        assert_eq!(
            parse_name_and_sql(b"s1\0select 1\0\0\0"),
            Some((&b"s1"[..], &b"select 1"[..]))
        );
        assert_eq!(parse_sql(b"s1\0select 1"), None);
        assert_eq!(bind_statement(b"\0s1\0\0\0"), Some(&b"s1"[..]));
        assert_eq!(bind_statement(b"portal"), None);
        assert_eq!(
            parameter_status(b"TimeZone\0UTC\0"),
            Some(("TimeZone", "UTC"))
        );
        assert_eq!(parameter_status(b"TimeZone\0UTC"), None);
        assert_eq!(parameter_status(b"\xff\0x\0"), None);
        let row = [0, 2, 0, 0, 0, 1, b'a', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(data_row(&row), Some(vec![Some(&b"a"[..]), None]));
        assert_eq!(data_row(&row[..6]), None);
        assert_eq!(data_row(&[0]), None);
    }
}
