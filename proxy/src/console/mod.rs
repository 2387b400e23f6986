//! The admin console: PgBouncer's, over the PostgreSQL protocol.
//!
//! A client that logs in to the database `handoff` (or `pgbouncer`, so that tools
//! written for PgBouncer work unchanged) as one of `HANDOFF_ADMIN_USERS` gets this
//! session instead of a server: simple-protocol queries are read as console commands
//! (`SHOW POOLS`, `PAUSE`, `SWITCHOVER main TO '10.0.0.2:5432'`, …) and answered with
//! rows built here. The shard commands run the same actions as the admin HTTP API
//! ([`crate::actions`]) and are refused with the same messages.

mod command;
mod show;

use std::sync::Arc;

use bytes::BytesMut;
use handoff_protocol::backend::{BackendMessage, ColumnType, TransactionStatus};
use handoff_protocol::error::ProxyError;
use handoff_protocol::frontend::FrontendMessage;
use handoff_protocol::sqlstate;

use crate::config::Config;
use crate::net::stream::Conn;
use crate::relay::common::hello;
use crate::shutdown::{Phase, Signal};

/// The database names that open the console.
pub(crate) const NAMES: [&str; 2] = ["handoff", "pgbouncer"];

/// Largest console query read.
const MAX_QUERY: usize = 64 * 1024;

/// True when a login to `database` is for the console: one of [`NAMES`], unless
/// `HANDOFF_DATABASES` routes that very name to a shard (a `*` entry does not count).
pub(crate) fn wanted(cfg: &Config, database: &str) -> bool {
    NAMES.contains(&database) && !cfg.databases.contains_key(database)
}

/// Whether `user` (already authenticated like any client) may use the console.
pub(crate) fn may_use(cfg: &Config, user: &str) -> Result<(), ProxyError> {
    if cfg.admin_users.iter().any(|u| u == user) {
        return Ok(());
    }
    Err(ProxyError::fatal(
        sqlstate::INSUFFICIENT_PRIVILEGE,
        format!("user \"{user}\" may not use the admin console"),
    )
    .hint("list the user in HANDOFF_ADMIN_USERS"))
}

/// What a command answers: rows and a command tag, or an error.
pub(crate) struct Out {
    buf: BytesMut,
}

impl Out {
    fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(1024),
        }
    }

    /// A result set: RowDescription, the rows, CommandComplete `SHOW`.
    pub fn table(&mut self, columns: &[(&str, ColumnType)], rows: &[Vec<Option<String>>]) {
        self.table_tagged(columns, rows, "SHOW");
    }

    /// A result set ending with the command tag `tag`.
    pub fn table_tagged(
        &mut self,
        columns: &[(&str, ColumnType)],
        rows: &[Vec<Option<String>>],
        tag: &str,
    ) {
        handoff_protocol::backend::encode_row_description(columns, &mut self.buf);
        for r in rows {
            handoff_protocol::backend::encode_data_row(r, &mut self.buf);
        }
        self.complete(tag);
    }

    pub fn complete(&mut self, tag: &str) {
        BackendMessage::CommandComplete {
            tag: tag.to_string(),
        }
        .encode(&mut self.buf);
    }

    pub fn error(&mut self, e: &ProxyError) {
        crate::metrics::count_error("proxy", e.code);
        e.encode(&mut self.buf);
    }
}

/// What the console works with: the configuration it shows, the shard actions it runs
/// (as the HTTP API does), the client registry, the cancel registry, and the way to ask
/// the process to stop.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub config: Arc<crate::config::Config>,
    pub actions: Arc<crate::actions::Ctx>,
    pub clients: Arc<crate::clients::Clients>,
    pub cancels: Arc<crate::backend::cancel::Registry>,
    /// `SHUTDOWN` notifies it; the binary then shuts down as on SIGTERM.
    pub shutdown_requested: Arc<tokio::sync::Notify>,
}

/// Runs a console session until the client leaves or the proxy shuts down.
pub(crate) async fn serve(mut client: Conn, ctx: &Ctx, user: String, minor: u16, shutdown: Signal) {
    let registration = ctx
        .cancels
        .register(None, crate::backend::cancel::key_len(minor));
    let params = [
        (
            "server_version",
            concat!(env!("CARGO_PKG_VERSION"), "/handoff"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "handoff console"),
    ];
    let greeting = hello(params, registration.pid, registration.key());
    if client.send_raw(&greeting).await.is_err() {
        return;
    }
    tracing::info!(user, "admin console session");
    // After an extended-protocol message the console refuses, everything up to Sync
    // is skipped, as a server does after an error.
    let mut skipping = false;
    loop {
        let frame = tokio::select! {
            f = client.read_frame(MAX_QUERY) => f,
            _ = shutdown.reached(Phase::Draining) => {
                let e = ProxyError::fatal(sqlstate::ADMIN_SHUTDOWN, "handoff is shutting down");
                let mut out = Out::new();
                out.error(&e);
                let _ = client.send_raw(&out.buf).await;
                return;
            }
        };
        let Ok(frame) = frame else { return };
        let msg = match FrontendMessage::parse(frame) {
            Ok(m) => m,
            Err(e) => {
                let mut out = Out::new();
                out.error(&ProxyError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("malformed message: {e}"),
                ));
                let _ = client.send_raw(&out.buf).await;
                return;
            }
        };
        let mut out = Out::new();
        match msg {
            FrontendMessage::Terminate => return,
            FrontendMessage::Query { sql } => {
                let sql = String::from_utf8_lossy(&sql).into_owned();
                let shutdown_now = command::run(ctx, &user, &sql, &mut out).await;
                BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut out.buf);
                if client.send_raw(&out.buf).await.is_err() {
                    return;
                }
                if shutdown_now {
                    ctx.shutdown_requested.notify_one();
                }
                continue;
            }
            FrontendMessage::Sync => {
                skipping = false;
                BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut out.buf);
            }
            FrontendMessage::Flush => {}
            _ if skipping => {}
            _ => {
                skipping = true;
                out.error(&ProxyError::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the admin console takes only simple queries (no prepared statements or extended protocol)",
                ).hint("with a driver, use its simple-query call (psql, tokio-postgres simple_query, psycopg's execute without parameters)"));
            }
        }
        if !out.buf.is_empty() && client.send_raw(&out.buf).await.is_err() {
            return;
        }
    }
}

/// The SQLSTATE a shard action's HTTP status stands for.
pub(crate) fn sqlstate_of(status: u16) -> &'static str {
    match status {
        400 => sqlstate::INVALID_PARAMETER_VALUE,
        404 => sqlstate::UNDEFINED_OBJECT,
        409 => sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
        503 => sqlstate::CANNOT_CONNECT_NOW,
        502 => sqlstate::SYSTEM_ERROR,
        _ => sqlstate::INTERNAL_ERROR,
    }
}
