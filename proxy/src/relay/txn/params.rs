//! Startup parameters in transaction mode: what a client asked for at startup (or set
//! with SET on a parameter the server reports) is applied with SET/RESET to whichever
//! server connection serves its next transaction, together with the client's SQL-level
//! prepared statements the connection does not hold yet.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use handoff_protocol::backend::BackendMessage;
use handoff_protocol::frontend::FrontendMessage;
use handoff_protocol::sql;

use super::prepared::StmtDef;
use crate::backend::pool::Backend;
use crate::error::AttachError;
use crate::net::stream::MAX_STARTUP_MESSAGE;

/// Parameters the server reports with ParameterStatus: a client's own SET of one of
/// these is remembered and follows the client to its next server connection.
pub const TRACKED_PARAMS: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "search_path",
];

/// True for a parameter name that can be written into SET unquoted.
pub fn valid_param_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Runs SET/RESET so the connection's startup parameters match the client's, and
/// PREPAREs the client's SQL-level statements the connection lacks (each in a Query of
/// its own: one that fails, say for a table dropped since, leaves the others prepared,
/// and its EXECUTE fails as it would on a direct connection).
pub(super) async fn sync_params(
    b: &mut Backend,
    desired: &HashMap<String, String>,
    statements: &HashMap<String, StmtDef>,
) -> Result<(), AttachError> {
    let missing: Vec<&StmtDef> = statements
        .values()
        .filter(|d| !b.prepared.contains(&d.server_name))
        .collect();
    if !missing.is_empty() {
        prepare_sql_level(b, &missing).await?;
    }
    let mut sql = String::new();
    let mut names: Vec<&String> = desired.keys().chain(b.applied.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let want = desired.get(name);
        if want == b.applied.get(name) {
            continue;
        }
        match want {
            Some(v) => sql.push_str(&format!("SET {name} = {};", sql::quote_literal(v))),
            None => sql.push_str(&format!("RESET {name};")),
        }
    }
    if sql.is_empty() {
        return Ok(());
    }
    let mut buf = BytesMut::new();
    FrontendMessage::Query {
        sql: Bytes::from(sql),
    }
    .encode(&mut buf);
    b.conn
        .send_raw(&buf)
        .await
        .map_err(|e| AttachError::Io(e.into()))?;
    let mut error = None;
    loop {
        let frame = b
            .conn
            .read_frame(MAX_STARTUP_MESSAGE)
            .await
            .map_err(AttachError::Io)?;
        match BackendMessage::parse(frame).map_err(|e| AttachError::Io(e.into()))? {
            BackendMessage::ParameterStatus { name, value } => {
                b.params.insert(name, value);
            }
            BackendMessage::ErrorResponse(f) => error = Some(f),
            BackendMessage::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    if let Some(f) = error {
        return Err(AttachError::Rejected(f));
    }
    b.applied = desired.clone();
    Ok(())
}

async fn prepare_sql_level(b: &mut Backend, missing: &[&StmtDef]) -> Result<(), AttachError> {
    let mut buf = BytesMut::new();
    for d in missing {
        let mut sql = Vec::with_capacity(d.server_name.len() + d.sql.len() + 8);
        sql.extend_from_slice(b"PREPARE ");
        sql.extend_from_slice(&d.server_name);
        sql.extend_from_slice(&d.sql);
        FrontendMessage::Query {
            sql: Bytes::from(sql),
        }
        .encode(&mut buf);
    }
    b.conn
        .send_raw(&buf)
        .await
        .map_err(|e| AttachError::Io(e.into()))?;
    for d in missing {
        let mut ok = true;
        loop {
            let frame = b
                .conn
                .read_frame(MAX_STARTUP_MESSAGE)
                .await
                .map_err(AttachError::Io)?;
            match BackendMessage::parse(frame).map_err(|e| AttachError::Io(e.into()))? {
                BackendMessage::ErrorResponse(f) => {
                    ok = false;
                    tracing::info!(statement = %String::from_utf8_lossy(&d.server_name), error = ?f.message(), "a SQL-level prepared statement could not be prepared on this connection");
                }
                BackendMessage::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        if ok {
            if let Some((victim, ())) = b.prepared.push(d.server_name.clone(), ()) {
                if victim != d.server_name {
                    b.to_close.push(victim);
                }
            }
        }
    }
    Ok(())
}
