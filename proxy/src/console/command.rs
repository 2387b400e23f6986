//! The console's commands: parsing a query's text and running it.

use handoff_protocol::error::ProxyError;
use handoff_protocol::sqlstate;

use super::{show, sqlstate_of, Ctx, Out};
use crate::actions::{self, Action, Fields};

/// One console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Show(String),
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    Kill(String),
    Switchover { shard: String, to: String },
    Shutdown,
}

/// What the console answers to a command it cannot read.
fn syntax(msg: impl Into<String>) -> ProxyError {
    ProxyError::error(sqlstate::SYNTAX_ERROR, msg).hint(
        "commands: SHOW POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|STATS_AVERAGES|DATABASES|CONFIG|VERSION|LISTS|SHARDS|STANDBYS|MANAGERS|BUFFERS|HELP; \
         PAUSE [db]; RESUME [db]; RECONNECT [db]; KILL db; SWITCHOVER shard TO 'host:port'; SHUTDOWN",
    )
}

/// An identifier or literal: `name`, `"name"` or `'name'`.
fn unquote(word: &str) -> String {
    let w = word.trim();
    for q in ['"', '\''] {
        if w.len() >= 2 && w.starts_with(q) && w.ends_with(q) {
            return w[1..w.len() - 1].replace(&format!("{q}{q}"), &q.to_string());
        }
    }
    w.to_string()
}

/// Parses one statement (no `;`). `Ok(None)` for an empty one.
pub(crate) fn parse(stmt: &str) -> Result<Option<Command>, ProxyError> {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    let Some(first) = words.first() else {
        return Ok(None);
    };
    let verb = first.to_ascii_uppercase();
    let arg = |i: usize| words.get(i).map(|w| unquote(w));
    let at_most = |n: usize| {
        if words.len() > n {
            Err(syntax(format!(
                "{verb} takes at most {} argument{}",
                n - 1,
                if n == 2 { "" } else { "s" }
            )))
        } else {
            Ok(())
        }
    };
    let cmd = match verb.as_str() {
        "SHOW" => {
            at_most(2)?;
            let what = arg(1).ok_or_else(|| syntax("SHOW what?"))?;
            Command::Show(what.to_ascii_uppercase())
        }
        "PAUSE" => {
            at_most(2)?;
            Command::Pause(arg(1))
        }
        "RESUME" => {
            at_most(2)?;
            Command::Resume(arg(1))
        }
        "RECONNECT" => {
            at_most(2)?;
            Command::Reconnect(arg(1))
        }
        "KILL" => {
            at_most(2)?;
            Command::Kill(arg(1).ok_or_else(|| syntax("KILL needs a database"))?)
        }
        "SHUTDOWN" => {
            at_most(1)?;
            Command::Shutdown
        }
        "SWITCHOVER" => {
            let ok = words.len() == 4 && words[2].eq_ignore_ascii_case("TO");
            if !ok {
                return Err(syntax("usage: SWITCHOVER shard TO 'host:port'"));
            }
            Command::Switchover {
                shard: unquote(words[1]),
                to: unquote(words[3]),
            }
        }
        _ => return Err(syntax(format!("unknown command \"{first}\""))),
    };
    Ok(Some(cmd))
}

/// Splits a query into statements at the `;` outside quotes.
fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quote) = (0, None);
    for (i, c) in sql.char_indices() {
        match (c, quote) {
            ('\'' | '"', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            (';', None) => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&sql[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// Runs every statement of a query, answering into `out`; stops at the first error.
/// Returns true when `SHUTDOWN` was asked.
pub(crate) async fn run(ctx: &Ctx, user: &str, sql: &str, out: &mut Out) -> bool {
    let stmts = statements(sql);
    if stmts.is_empty() {
        handoff_protocol::backend::BackendMessage::EmptyQueryResponse.encode(&mut out.buf);
        return false;
    }
    for stmt in stmts {
        let cmd = match parse(stmt) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                out.error(&e);
                return false;
            }
        };
        tracing::info!(user, command = stmt.trim(), "admin console");
        match execute(ctx, cmd, out).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => {
                out.error(&e);
                return false;
            }
        }
    }
    false
}

/// Runs one command. `Ok(true)`: shut down once the answer is sent.
async fn execute(ctx: &Ctx, cmd: Command, out: &mut Out) -> Result<bool, ProxyError> {
    match cmd {
        Command::Show(what) => show::show(ctx, &what, out)?,
        Command::Pause(db) => {
            let reason = serde_json::json!({"reason": "PAUSE (admin console)"});
            for shard in shards_of(ctx, db.as_deref())? {
                act(ctx, &shard, Action::Buffer, reason.clone()).await?;
            }
            out.complete("PAUSE");
        }
        Command::Resume(db) => {
            for shard in shards_of(ctx, db.as_deref())? {
                act(ctx, &shard, Action::Resume, serde_json::json!({})).await?;
            }
            out.complete("RESUME");
        }
        Command::Reconnect(db) => {
            reconnect(ctx, db.as_deref())?;
            out.complete("RECONNECT");
        }
        Command::Kill(db) => {
            shards_of(ctx, Some(&db))?;
            let mut killed = 0;
            for c in ctx.clients.list() {
                let Some(l) = c.login() else { continue };
                if l.route.is_some() && *l.database == *db && c.kill() {
                    killed += 1;
                }
            }
            let closed = reconnect(ctx, Some(&db))?;
            tracing::warn!(
                database = db,
                clients = killed,
                idle_servers = closed,
                "KILL (admin console)"
            );
            out.complete("KILL");
        }
        Command::Switchover { shard, to } => {
            let body = act(
                ctx,
                &shard,
                Action::Switchover,
                serde_json::json!({ "to": to }),
            )
            .await?;
            let report = crate::api::from_value(body).map_err(|e| {
                ProxyError::error(
                    sqlstate::INTERNAL_ERROR,
                    format!("the switchover's report does not decode: {e}"),
                )
            })?;
            show::switchover_report(&report, out);
        }
        Command::Shutdown => {
            out.complete("SHUTDOWN");
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs a shard action as the HTTP API does; its refusal becomes the error.
async fn act(
    ctx: &Ctx,
    shard: &str,
    action: Action,
    body: serde_json::Value,
) -> Result<serde_json::Value, ProxyError> {
    let fields: Fields = match body {
        serde_json::Value::Object(m) => m,
        _ => Fields::new(),
    };
    let a = actions::shard_action(&ctx.actions, shard, action, fields).await;
    if a.is_ok() {
        return Ok(a.body);
    }
    let message = a.error().unwrap_or("refused").to_string();
    Err(ProxyError::error(sqlstate_of(a.status), message))
}

/// The shards a database names (every shard without one).
fn shards_of(ctx: &Ctx, db: Option<&str>) -> Result<Vec<String>, ProxyError> {
    let Some(db) = db else {
        return Ok(ctx.actions.shards.iter().map(|s| s.name.clone()).collect());
    };
    match ctx.config.route(db) {
        Some(r) => Ok(vec![ctx.actions.shards[r.shard].name.clone()]),
        None => Err(ProxyError::error(
            sqlstate::INVALID_CATALOG_NAME,
            format!("no such database: {db}"),
        )),
    }
}

/// `RECONNECT [db]`: the pools of that database's server database on its shard, or
/// every pool. Returns how many idle connections were closed now.
fn reconnect(ctx: &Ctx, db: Option<&str>) -> Result<usize, ProxyError> {
    let wanted = match db {
        None => None,
        Some(db) => {
            let route = ctx.config.route(db).ok_or_else(|| {
                ProxyError::error(
                    sqlstate::INVALID_CATALOG_NAME,
                    format!("no such database: {db}"),
                )
            })?;
            let server_db = route.server_db.clone().unwrap_or_else(|| db.to_string());
            Some((ctx.actions.shards[route.shard].name.clone(), server_db))
        }
    };
    let mut closed = 0;
    for pool in ctx.actions.shard.pools.list() {
        let snap = pool.snapshot();
        let matches = match &wanted {
            None => true,
            Some((shard, server_db)) => &snap.shard == shard && &snap.database == server_db,
        };
        if matches {
            closed += pool.reconnect();
        }
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_like_pgbouncers() {
        assert_eq!(
            parse("show pools").unwrap(),
            Some(Command::Show("POOLS".into()))
        );
        assert_eq!(parse("PAUSE").unwrap(), Some(Command::Pause(None)));
        assert_eq!(
            parse("pause \"app\"").unwrap(),
            Some(Command::Pause(Some("app".into())))
        );
        assert_eq!(
            parse("SWITCHOVER main TO '127.0.0.1:5433'").unwrap(),
            Some(Command::Switchover {
                shard: "main".into(),
                to: "127.0.0.1:5433".into()
            })
        );
        assert_eq!(parse("  ").unwrap(), None);
        for bad in [
            "KILL",
            "SHOW",
            "SWITCHOVER main",
            "DROP TABLE x",
            "PAUSE a b",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, sqlstate::SYNTAX_ERROR, "{bad}");
        }
        assert_eq!(
            statements("show pools; show 'a;b';"),
            vec!["show pools", " show 'a;b'"]
        );
    }
}
