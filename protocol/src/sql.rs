//! SQL text the proxy writes or glances at: literals it builds into SET statements, and
//! the first word of a statement that ends a transaction.

/// `value` as a SQL string literal that reads the same whatever
/// `standard_conforming_strings` says: with a backslash in it the escape-string form
/// (`E'...'`, backslashes doubled), otherwise a plain literal (quotes doubled).
pub fn quote_literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// What the first word of a statement says about ending a transaction block:
/// `Some(true)` COMMIT/END, `Some(false)` ROLLBACK/ABORT, `None` anything else. Runs for
/// every simple query: bytes only, no allocation.
pub fn ends_transaction(sql: &[u8]) -> Option<bool> {
    let start = sql.iter().position(|c| !c.is_ascii_whitespace())?;
    let rest = &sql[start..];
    let len = rest
        .iter()
        .position(|c| !c.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    let word = &rest[..len];
    let is = |w: &str| word.eq_ignore_ascii_case(w.as_bytes());
    if is("ROLLBACK") || is("ABORT") {
        Some(false)
    } else if is("COMMIT") || is("END") {
        Some(true)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_survive_both_string_settings() {
        assert_eq!(quote_literal("UTC"), "'UTC'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        // With standard_conforming_strings = off a backslash starts an escape in a plain
        // literal: the E'' form means the same under both settings.
        assert_eq!(quote_literal(r"a\b"), r"E'a\\b'");
        assert_eq!(quote_literal(r"\'"), r"E'\\'''");
    }

    #[test]
    fn transaction_control_is_recognised_by_its_first_word() {
        assert_eq!(ends_transaction(b"  rollback;"), Some(false));
        assert_eq!(ends_transaction(b"ABORT"), Some(false));
        assert_eq!(ends_transaction(b"\ncommit\0"), Some(true));
        assert_eq!(ends_transaction(b"End"), Some(true));
        assert_eq!(ends_transaction(b"COMMITTED"), None);
        assert_eq!(ends_transaction(b"select 'commit'"), None);
        assert_eq!(ends_transaction(b"   "), None);
        assert_eq!(ends_transaction(b"\xff\xfe"), None);
    }
}
