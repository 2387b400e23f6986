//! SQL text the proxy writes or glances at: literals it builds into SET statements, the
//! first word of a statement that ends a transaction, and whether a query string holds a
//! LISTEN.

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

/// True when one of the statements in `sql` (separated by `;`, outside string literals,
/// quoted identifiers, dollar quotes and comments) starts with the word `LISTEN`.
pub fn listens(sql: &[u8]) -> bool {
    let mut i = 0;
    let mut statement_start = true;
    while i < sql.len() {
        let c = sql[i];
        match c {
            b'\'' | b'"' => {
                statement_start = false;
                i += 1;
                while i < sql.len() {
                    if sql[i] == c {
                        // A doubled quote stays inside.
                        if sql.get(i + 1) == Some(&c) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < sql.len() && !(sql[i] == b'*' && sql[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'$' => {
                statement_start = false;
                // $tag$ … $tag$ (a $1 parameter has no closing $).
                let tag_end = sql[i + 1..]
                    .iter()
                    .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end.filter(|e| sql.get(*e) == Some(&b'$')) {
                    Some(e) => {
                        let tag = &sql[i..=e];
                        let body = e + 1;
                        i = sql[body..]
                            .windows(tag.len())
                            .position(|w| w == tag)
                            .map_or(sql.len(), |p| body + p + tag.len());
                    }
                    None => i += 1,
                }
            }
            b';' => {
                statement_start = true;
                i += 1;
            }
            c if c.is_ascii_whitespace() || c == b'(' => i += 1,
            _ => {
                if statement_start {
                    let len = sql[i..]
                        .iter()
                        .position(|b| !b.is_ascii_alphabetic())
                        .unwrap_or(sql.len() - i);
                    if sql[i..i + len].eq_ignore_ascii_case(b"LISTEN") {
                        return true;
                    }
                    statement_start = false;
                    i += len.max(1);
                } else {
                    i += 1;
                }
            }
        }
    }
    false
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

    #[test]
    fn listen_is_found_in_any_statement_and_nowhere_else() {
        assert!(listens(b"LISTEN jobs"));
        assert!(listens(b"  listen \"Jobs\";"));
        assert!(listens(b"SELECT 1; LISTEN x"));
        assert!(listens(b"/* c */ -- line\nListen x"));
        assert!(listens(b"select 'a;b'; listen x"));
        assert!(!listens(b"UNLISTEN *"));
        assert!(!listens(b"SELECT 'listen x'"));
        assert!(!listens(b"select 1 -- ; listen x"));
        assert!(!listens(b"select /* ; listen x */ 1"));
        assert!(!listens(b"select $$; listen x$$"));
        assert!(!listens(b"select $q$ ; listen $q$, $1"));
        assert!(!listens(b"select \"a;\"\" listen\" from t"));
        assert!(!listens(b"SELECT listening FROM t"));
        assert!(!listens(b"NOTIFY jobs"));
        assert!(!listens(b""));
        assert!(!listens(b"'unterminated; listen x"));
    }
}
