//! Moving a session-mode client to a new primary: at a transaction boundary, ask the old
//! server what the session holds, and re-create what can move (settings made with SET,
//! prepared statements) on a new server connection. State that cannot move — advisory
//! locks, temporary tables, LISTEN, cursors WITH HOLD — makes the move fail with a
//! clear error instead of silently losing it.

use bytes::{Bytes, BytesMut};
use handoff_protocol::backend::{tag as btag, BackendMessage};
use handoff_protocol::frontend::FrontendMessage;

use handoff_protocol::sql::quote_literal;

use crate::error::ConnError;
use crate::net::stream::{Conn, MAX_STARTUP_MESSAGE};

/// What a session holds on its server.
#[derive(Debug, Default)]
pub(crate) struct SessionState {
    /// Settings the session changed with SET.
    settings: Vec<(String, String)>,
    /// Protocol-level prepared statements: name, SQL, parameter type OIDs.
    statements: Vec<(String, String, Vec<u32>)>,
    /// `PREPARE ... AS ...` statements, re-run as written.
    sql_prepares: Vec<String>,
    /// What cannot move, described for the client.
    pub blockers: Vec<String>,
}

type Rows = Vec<Vec<Option<String>>>;

/// Why a session's state could not be read or re-created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MoveError {
    #[error("{0}")]
    Connection(#[from] ConnError),
    /// The server refused a statement (its message).
    #[error("{0}")]
    Refused(String),
    #[error("malformed DataRow from the server")]
    MalformedRow,
    #[error("re-preparing statements: {0}")]
    Prepare(Box<MoveError>),
}

/// A DataRow's columns as text (`None` for NULL).
fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    Some(
        handoff_protocol::body::data_row(body)?
            .into_iter()
            .map(|c| c.map(|v| String::from_utf8_lossy(v).into_owned()))
            .collect(),
    )
}

/// Reads the server's answers up to ReadyForQuery, handing DataRows to `row`. The
/// first error the server sent, if any, is the result.
async fn read_until_ready(
    server: &mut Conn,
    mut row: impl FnMut(&[u8]) -> Result<(), MoveError>,
) -> Result<(), MoveError> {
    let mut error = None;
    loop {
        let frame = server.read_frame(MAX_STARTUP_MESSAGE).await?;
        if frame.tag == btag::DATA_ROW {
            row(&frame.body)?;
            continue;
        }
        match BackendMessage::parse(frame).map_err(ConnError::from)? {
            BackendMessage::ErrorResponse(f) => {
                error.get_or_insert_with(|| f.message().unwrap_or("error").to_string());
            }
            BackendMessage::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    error.map_or(Ok(()), |e| Err(MoveError::Refused(e)))
}

/// Runs one simple query on a server connection at a transaction boundary.
async fn query(server: &mut Conn, sql: &str) -> Result<Rows, MoveError> {
    let mut buf = BytesMut::new();
    FrontendMessage::Query {
        sql: Bytes::from(sql.to_string()),
    }
    .encode(&mut buf);
    server.send_raw(&buf).await.map_err(ConnError::from)?;
    let mut rows = Vec::new();
    read_until_ready(server, |body| {
        rows.push(data_row(body).ok_or(MoveError::MalformedRow)?);
        Ok(())
    })
    .await?;
    Ok(rows)
}

fn count(rows: &Rows, col: usize) -> u64 {
    rows.first()
        .and_then(|r| r.get(col).cloned().flatten())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn oids(text: &str) -> Vec<u32> {
    text.trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Asks the old server what the session holds.
pub(crate) async fn capture(server: &mut Conn) -> Result<SessionState, MoveError> {
    let mut st = SessionState::default();
    let held = query(
        server,
        "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
                (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
                (SELECT count(*) FROM pg_listening_channels()), \
                (SELECT count(*) FROM pg_cursors WHERE is_holdable)",
    )
    .await?;
    for (col, what) in [
        (0, "advisory locks"),
        (1, "temporary tables"),
        (2, "LISTEN channels"),
        (3, "cursors WITH HOLD"),
    ] {
        let n = count(&held, col);
        if n > 0 {
            st.blockers.push(format!("{n} {what}"));
        }
    }
    for row in query(
        server,
        "SELECT name, setting FROM pg_settings WHERE source = 'session' ORDER BY name",
    )
    .await?
    {
        if let [Some(n), Some(v)] = row.as_slice() {
            st.settings.push((n.clone(), v.clone()));
        }
    }
    for row in query(
        server,
        "SELECT name, statement, parameter_types::oid[]::text, from_sql FROM pg_prepared_statements",
    )
    .await?
    {
        if let [Some(name), Some(sql), types, Some(from_sql)] = row.as_slice() {
            if from_sql == "t" {
                st.sql_prepares.push(sql.clone());
            } else {
                let types = types.as_deref().map(oids).unwrap_or_default();
                st.statements.push((name.clone(), sql.clone(), types));
            }
        }
    }
    Ok(st)
}

/// Re-creates the movable state on a new server connection.
pub(crate) async fn restore(server: &mut Conn, st: &SessionState) -> Result<(), MoveError> {
    let mut sql = String::new();
    for (name, value) in &st.settings {
        sql.push_str(&format!(
            "SELECT set_config({}, {}, false);",
            quote_literal(name),
            quote_literal(value)
        ));
    }
    for p in &st.sql_prepares {
        sql.push_str(p.trim_end_matches(';'));
        sql.push(';');
    }
    if !sql.is_empty() {
        query(server, &sql).await?;
    }
    if st.statements.is_empty() {
        return Ok(());
    }
    let mut buf = BytesMut::new();
    for (name, sql, types) in &st.statements {
        FrontendMessage::Parse {
            name: Bytes::from(name.clone()),
            sql: Bytes::from(sql.clone()),
            param_types: types.clone(),
        }
        .encode(&mut buf);
    }
    FrontendMessage::Sync.encode(&mut buf);
    server.send_raw(&buf).await.map_err(ConnError::from)?;
    read_until_ready(server, |_| Ok(()))
        .await
        .map_err(|e| MoveError::Prepare(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rows_and_oid_arrays() {
        let mut b = BytesMut::new();
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&2i32.to_be_bytes());
        b.extend_from_slice(b"ab");
        b.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row(&b), Some(vec![Some("ab".to_string()), None]));
        assert_eq!(data_row(&[0, 1, 0, 0, 0, 9]), None);
        assert_eq!(oids("{23,25}"), vec![23, 25]);
        assert_eq!(oids("{}"), Vec::<u32>::new());
    }
}
