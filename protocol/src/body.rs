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
