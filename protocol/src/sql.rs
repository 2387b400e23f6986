//! SQL text the proxy writes or glances at: literals it builds into SET statements, the
//! first word of a statement that ends a transaction, whether a query string holds a
//! LISTEN, and statements about SQL-level prepared statements (PREPARE, EXECUTE,
//! DEALLOCATE) with the statement's name.

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

/// Where each statement in `sql` starts: the offset of its first word, for statements
/// separated by `;` outside string literals, quoted identifiers, dollar quotes and
/// comments. `visit` returns false to stop early.
fn statement_starts(sql: &[u8], mut visit: impl FnMut(usize) -> bool) {
    let mut i = 0;
    let mut statement_start = true;
    while i < sql.len() {
        let c = sql[i];
        match c {
            b'\'' | b'"' => {
                if statement_start && !visit(i) {
                    return;
                }
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
                if statement_start && !visit(i) {
                    return;
                }
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
                    if !visit(i) {
                        return;
                    }
                    statement_start = false;
                }
                i += 1;
            }
        }
    }
}

/// The word at the start of `sql` (letters only).
fn first_word(sql: &[u8]) -> &[u8] {
    let len = sql
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(sql.len());
    &sql[..len]
}

/// True when one of the statements in `sql` starts with the word `LISTEN`.
pub fn listens(sql: &[u8]) -> bool {
    let mut found = false;
    statement_starts(sql, |at| {
        found = first_word(&sql[at..]).eq_ignore_ascii_case(b"LISTEN");
        !found
    });
    found
}

/// A query string that is exactly one statement about SQL-level prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparedSql<'a> {
    /// `PREPARE name rest`: `rest` is what follows the name (`[(types)] AS statement`).
    Prepare { name: String, rest: &'a [u8] },
    /// `EXECUTE name rest`: `rest` is what follows the name (`[(arguments)]`).
    Execute { name: String, rest: &'a [u8] },
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate { name: String },
}

/// `sql` (a whole query string) as a [`PreparedSql`] statement: `None` for anything
/// else, including several statements in one string.
pub fn prepared_sql(sql: &[u8]) -> Option<PreparedSql<'_>> {
    let stmt = single_statement(sql)?;
    let word = first_word(stmt);
    let after = skip_space(stmt, word.len());
    if word.eq_ignore_ascii_case(b"DEALLOCATE") {
        let mut at = after;
        let (name, end) = identifier(stmt, at)?;
        if name == "prepare"
            && !stmt[end..]
                .iter()
                .all(|b| b.is_ascii_whitespace() || *b == b';')
        {
            at = skip_space(stmt, end);
        }
        let (name, end) = identifier(stmt, at)?;
        let quoted = stmt[at] == b'"';
        if !quoted && name == "all" {
            return None;
        }
        let tail = &stmt[end..];
        tail.iter()
            .all(|b| b.is_ascii_whitespace() || *b == b';')
            .then_some(PreparedSql::Deallocate { name })
    } else if word.eq_ignore_ascii_case(b"PREPARE") || word.eq_ignore_ascii_case(b"EXECUTE") {
        let (name, end) = identifier(stmt, after)?;
        let rest = &stmt[end..];
        // `PREPARE TRANSACTION 'gid'` is two-phase commit, not a statement.
        if word.eq_ignore_ascii_case(b"PREPARE") {
            if stmt[after] != b'"' && name == "transaction" {
                return None;
            }
            Some(PreparedSql::Prepare { name, rest })
        } else {
            Some(PreparedSql::Execute { name, rest })
        }
    } else {
        None
    }
}

/// A cheap first look for [`prepared_sql`] and [`database_in_use`]: false when the query
/// string surely is neither (its first word is none of theirs), so most queries are not
/// scanned whole.
pub fn may_concern_statements_or_databases(sql: &[u8]) -> bool {
    let at = skip_space(sql, 0);
    match sql.get(at) {
        // A comment first: only the full look can tell.
        Some(b'/' | b'-') => true,
        Some(_) => {
            let w = first_word(&sql[at..]);
            [
                "PREPARE",
                "EXECUTE",
                "DEALLOCATE",
                "DROP",
                "ALTER",
                "CREATE",
            ]
            .iter()
            .any(|k| w.eq_ignore_ascii_case(k.as_bytes()))
        }
        None => false,
    }
}

/// A statement that needs a database to have no other connections: the proxy closes
/// its idle server connections to it first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseInUse {
    /// The database, as PostgreSQL names it.
    pub name: String,
    /// It will not exist under this name afterwards (dropped or renamed).
    pub gone: bool,
}

/// `sql` (a whole query string of one statement) as a [`DatabaseInUse`]: `DROP DATABASE
/// [IF EXISTS] name`, `ALTER DATABASE name RENAME TO …`, `ALTER DATABASE name SET
/// TABLESPACE …`, `CREATE DATABASE … TEMPLATE [=] name`.
pub fn database_in_use(sql: &[u8]) -> Option<DatabaseInUse> {
    let stmt = single_statement(sql)?;
    let words = words(stmt, 12);
    let is = |i: usize, w: &str| {
        words
            .get(i)
            .is_some_and(|(word, quoted)| !quoted && word == w)
    };
    let name = |i: usize| words.get(i).map(|(w, _)| w.clone());
    if is(0, "drop") && is(1, "database") {
        let at = if is(2, "if") && is(3, "exists") { 4 } else { 2 };
        return Some(DatabaseInUse {
            name: name(at)?,
            gone: true,
        });
    }
    if is(0, "alter") && is(1, "database") {
        if is(3, "rename") {
            return Some(DatabaseInUse {
                name: name(2)?,
                gone: true,
            });
        }
        if is(3, "set") && is(4, "tablespace") {
            return Some(DatabaseInUse {
                name: name(2)?,
                gone: false,
            });
        }
        return None;
    }
    if is(0, "create") && is(1, "database") {
        let at = (3..words.len()).find(|i| is(*i, "template"))?;
        let at = if words.get(at + 1).is_some_and(|(w, q)| !q && w == "=") {
            at + 2
        } else {
            at + 1
        };
        return Some(DatabaseInUse {
            name: name(at)?,
            gone: false,
        });
    }
    None
}

/// The one statement in `sql`, from its first word: `None` for none or several.
fn single_statement(sql: &[u8]) -> Option<&[u8]> {
    let mut starts = 0;
    let mut first = 0;
    statement_starts(sql, |at| {
        starts += 1;
        first = at;
        starts < 2
    });
    (starts == 1).then(|| &sql[first..])
}

/// Up to `max` words of a statement: identifiers and keywords as PostgreSQL names them
/// (with whether they were quoted), and `=`; stops at anything else.
fn words(stmt: &[u8], max: usize) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut at = 0;
    while out.len() < max {
        at = skip_space(stmt, at);
        match stmt.get(at) {
            Some(b'=') => {
                out.push(("=".to_string(), false));
                at += 1;
            }
            Some(_) => match identifier(stmt, at) {
                Some((w, end)) => {
                    out.push((w, stmt[at] == b'"'));
                    at = end;
                }
                None => break,
            },
            None => break,
        }
    }
    out
}

fn skip_space(sql: &[u8], mut at: usize) -> usize {
    while at < sql.len() && sql[at].is_ascii_whitespace() {
        at += 1;
    }
    at
}

/// The identifier at `at` as PostgreSQL names it (unquoted: ASCII letters folded to
/// lower case; quoted: as written, `""` an embedded quote) and the offset after it.
fn identifier(sql: &[u8], at: usize) -> Option<(String, usize)> {
    let first = *sql.get(at)?;
    if first == b'"' {
        let mut name = Vec::new();
        let mut i = at + 1;
        loop {
            match *sql.get(i)? {
                b'"' if sql.get(i + 1) == Some(&b'"') => {
                    name.push(b'"');
                    i += 2;
                }
                b'"' => break,
                c => {
                    name.push(c);
                    i += 1;
                }
            }
        }
        let name = String::from_utf8(name).ok().filter(|n| !n.is_empty())?;
        return Some((name, i + 1));
    }
    if !(first.is_ascii_alphabetic() || first == b'_' || first >= 0x80) {
        return None;
    }
    let len = sql[at..]
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$' || *b >= 0x80))
        .unwrap_or(sql.len() - at);
    let name = std::str::from_utf8(&sql[at..at + len])
        .ok()?
        .to_ascii_lowercase();
    Some((name, at + len))
}

/// `name` written as a quoted identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
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

    #[test]
    fn prepared_statement_commands_are_recognised_with_their_names() {
        use PreparedSql::*;
        assert_eq!(
            prepared_sql(b"PREPARE foo (int) AS SELECT $1;"),
            Some(Prepare {
                name: "foo".into(),
                rest: b" (int) AS SELECT $1;"
            })
        );
        assert_eq!(
            prepared_sql(b"  /* c */ prepare \"Foo\"\"x\" as select 1"),
            Some(Prepare {
                name: "Foo\"x".into(),
                rest: b" as select 1"
            })
        );
        assert_eq!(
            prepared_sql(b"EXECUTE FooBar(1, 'a;b')"),
            Some(Execute {
                name: "foobar".into(),
                rest: b"(1, 'a;b')"
            })
        );
        assert_eq!(
            prepared_sql(b"deallocate prepare x ;"),
            Some(Deallocate { name: "x".into() })
        );
        assert_eq!(
            prepared_sql(b"DEALLOCATE prepare"),
            Some(Deallocate {
                name: "prepare".into()
            })
        );
        assert_eq!(
            prepared_sql(b"DEALLOCATE \"ALL\""),
            Some(Deallocate { name: "ALL".into() })
        );
        assert_eq!(prepared_sql(b"DEALLOCATE ALL"), None);
        assert_eq!(prepared_sql(b"DEALLOCATE PREPARE ALL"), None);
        assert_eq!(prepared_sql(b"PREPARE TRANSACTION 'x'"), None);
        assert_eq!(prepared_sql(b"PREPARE a AS SELECT 1; EXECUTE a"), None);
        assert_eq!(prepared_sql(b"SELECT 1"), None);
        assert_eq!(prepared_sql(b"DEALLOCATE x y"), None);
        assert_eq!(prepared_sql(b"EXECUTE"), None);
        assert_eq!(prepared_sql(b""), None);
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn statements_that_need_a_database_to_themselves() {
        let db = |name: &str, gone| {
            Some(DatabaseInUse {
                name: name.into(),
                gone,
            })
        };
        assert_eq!(database_in_use(b"DROP DATABASE app"), db("app", true));
        assert_eq!(
            database_in_use(b"drop database if exists \"App\" with (force);"),
            db("App", true)
        );
        assert_eq!(
            database_in_use(b"ALTER DATABASE old RENAME TO new"),
            db("old", true)
        );
        assert_eq!(
            database_in_use(b"ALTER DATABASE a SET TABLESPACE t"),
            db("a", false)
        );
        assert_eq!(database_in_use(b"ALTER DATABASE a SET work_mem = 1"), None);
        assert_eq!(
            database_in_use(b"CREATE DATABASE n TEMPLATE = tpl"),
            db("tpl", false)
        );
        assert_eq!(
            database_in_use(b"create database n owner o template Tpl encoding 'UTF8'"),
            db("tpl", false)
        );
        assert_eq!(database_in_use(b"CREATE DATABASE n"), None);
        assert_eq!(database_in_use(b"DROP TABLE app"), None);
        assert_eq!(database_in_use(b"SELECT 1; DROP DATABASE app"), None);
    }

    #[test]
    fn the_first_look_passes_only_what_may_concern_statements_or_databases() {
        for yes in [
            &b"  prepare x as select 1"[..],
            b"DROP DATABASE a",
            b"execute x",
            b"-- c\nDROP DATABASE a",
        ] {
            assert!(
                may_concern_statements_or_databases(yes),
                "{}",
                String::from_utf8_lossy(yes)
            );
        }
        for no in [&b"SELECT 1"[..], b"insert into t values (1)", b"", b"   "] {
            assert!(
                !may_concern_statements_or_databases(no),
                "{}",
                String::from_utf8_lossy(no)
            );
        }
    }
}
