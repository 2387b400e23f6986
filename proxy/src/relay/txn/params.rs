//! Startup parameters in transaction mode: what a client asked for at startup (or set
//! with SET on a parameter the server reports) is applied with SET/RESET to whichever
//! server connection serves its next transaction, together with the client's SQL-level
//! prepared statements the connection does not hold yet.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use handoff_protocol::backend::BackendMessage;
use handoff_protocol::error::ErrorFields;
use handoff_protocol::frontend::FrontendMessage;
use handoff_protocol::sql;

use super::prepared::StmtDef;
use crate::backend::pool::Backend;
use crate::error::AttachError;
use crate::net::stream::MAX_STARTUP_MESSAGE;
use crate::relay::shared::Params;

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

/// True when the connection already has the client's parameters and SQL-level
/// statements: nothing for [`sync_params`] to do (checked without allocating, on every
/// transaction). Parameters equal to the client's but held in another copy are
/// replaced by the client's own, so that the next check is a pointer comparison.
pub(super) fn in_sync(
    b: &mut Backend,
    desired: &Params,
    statements: &HashMap<String, StmtDef>,
) -> bool {
    if !Arc::ptr_eq(desired, &b.applied) {
        if **desired != *b.applied {
            return false;
        }
        b.applied = Arc::clone(desired);
    }
    statements
        .values()
        .all(|d| b.prepared.contains(&d.server_name))
}

/// Runs SET/RESET so the connection's startup parameters match the client's, and
/// PREPAREs the client's SQL-level statements the connection lacks (each in a Query of
/// its own: one that fails, say for a table dropped since, leaves the others prepared,
/// and its EXECUTE fails as it would on a direct connection).
pub(super) async fn sync_params(
    b: &mut Backend,
    desired: &Params,
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
    if let Some(f) = answer(b).await? {
        return Err(AttachError::Rejected(f));
    }
    b.applied = Arc::clone(desired);
    Ok(())
}

/// Reads the server's answer to one Query up to its ReadyForQuery, keeping the
/// parameters it reports: the error, if it sent one.
async fn answer(b: &mut Backend) -> Result<Option<ErrorFields>, AttachError> {
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
            BackendMessage::ReadyForQuery(_) => return Ok(error),
            _ => {}
        }
    }
}

async fn prepare_sql_level(b: &mut Backend, missing: &[&StmtDef]) -> Result<(), AttachError> {
    let mut buf = BytesMut::new();
    for d in missing {
        FrontendMessage::Query {
            sql: d.prepare_query(),
        }
        .encode(&mut buf);
    }
    b.conn
        .send_raw(&buf)
        .await
        .map_err(|e| AttachError::Io(e.into()))?;
    for d in missing {
        match answer(b).await? {
            Some(f) => {
                tracing::info!(statement = %String::from_utf8_lossy(&d.server_name), error = ?f.message(), "a SQL-level prepared statement could not be prepared on this connection");
            }
            None => b.keep_prepared(d.server_name.clone()),
        }
    }
    Ok(())
}
