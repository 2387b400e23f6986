//! handoff's own `SHOW` commands: the shards, their buffers, and a switchover's report.

use handoff_protocol::backend::ColumnType::{self, Int8 as I, Text as T};

use super::{s, Row};
use crate::console::{Ctx, Out};

pub(super) fn shards(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("name", T),
        ("state", T),
        ("epoch", I),
        ("primary", T),
        ("hosts", T),
        ("source", T),
        ("in_flight", I),
        ("buffer_state", T),
        ("buffer_depth", I),
        ("since_ms", I),
        ("reason", T),
        ("split_brain", T),
        ("watched", T),
    ];
    let answer = crate::actions::shards(&ctx.actions);
    let rows: Vec<Row> = answer
        .shards
        .iter()
        .map(|sh| {
            vec![
                s(&sh.name),
                s(&sh.state),
                Some(sh.epoch.to_string()),
                s(&sh.primary),
                Some(sh.hosts.join(",")),
                s(&sh.source),
                Some(sh.in_flight.to_string()),
                s(&sh.buffer.state),
                Some(sh.buffer.depth.to_string()),
                Some(sh.since_ms.to_string()),
                s(&sh.reason),
                Some(sh.split_brain.join(",")),
                Some(
                    sh.watched
                        .iter()
                        .map(|w| w.host.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            ]
        })
        .collect();
    out.table(COLS, &rows);
}

/// Each shard's hosts as readers (`@replica`, `@any`), as the replica check last saw
/// them.
pub(super) fn standbys(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("shard", T),
        ("host", T),
        ("in_rotation", T),
        ("state", T),
        ("lag_bytes", I),
        ("lag_ms", I),
        ("upstream", T),
        ("transactions", I),
        ("chosen", I),
        ("detail", T),
    ];
    let answer = crate::actions::shards(&ctx.actions);
    let mut rows: Vec<Row> = Vec::new();
    for sh in &answer.shards {
        for st in &sh.standbys {
            rows.push(vec![
                s(&sh.name),
                s(&st.host),
                s(st.in_rotation),
                s(&st.state),
                st.lag_bytes.map(|b| b.to_string()),
                st.lag_seconds
                    .map(|t| ((t * 1000.0).round() as u64).to_string()),
                st.upstream.clone(),
                s(st.transactions),
                s(st.chosen),
                s(&st.detail),
            ]);
        }
    }
    out.table(COLS, &rows);
}

/// Every member of every shard an HA manager runs: the manager's view of it, and
/// whether handoff serves it. A manager that does not answer shows one row with its
/// error.
pub(super) fn managers(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("shard", T),
        ("manager", T),
        ("cluster", T),
        ("member", T),
        ("addr", T),
        ("role", T),
        ("state", T),
        ("timeline", I),
        ("leader", T),
        ("served", T),
        ("stopping", T),
        ("detail", T),
    ];
    let answer = crate::actions::shards(&ctx.actions);
    let mut rows: Vec<Row> = Vec::new();
    for sh in &answer.shards {
        let Some(m) = &sh.manager else { continue };
        if let Some(e) = &m.error {
            rows.push(vec![
                s(&sh.name),
                s(&m.kind),
                m.cluster.clone(),
                None,
                None,
                None,
                s("not answering"),
                None,
                None,
                None,
                None,
                s(format!("{e}; handoff serves {}", sh.primary)),
            ]);
            continue;
        }
        for mb in m.members.iter().flatten() {
            rows.push(vec![
                s(&sh.name),
                s(&m.kind),
                m.cluster.clone(),
                s(&mb.name),
                s(&mb.addr),
                s(&mb.role),
                s(&mb.state),
                mb.timeline.map(|t| t.to_string()),
                s(mb.leader),
                s(mb.addr == sh.primary && sh.state == "serving"),
                s(m.stopping.as_deref() == Some(mb.addr.as_str())),
                s(mb.not_candidate.as_deref().unwrap_or("")),
            ]);
        }
    }
    out.table(COLS, &rows);
}

pub(super) fn buffers(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("shard", T),
        ("state", T),
        ("depth", I),
        ("size", I),
        ("bytes_all_shards", I),
        ("max_bytes", I),
        ("window_ms", I),
        ("reason", T),
    ];
    let b = &ctx.actions.shard.buffer;
    let cfg = &ctx.config.buffer;
    let rows: Vec<Row> = ctx
        .actions
        .shards
        .iter()
        .map(|sh| {
            let state = match b.state(&sh.name) {
                Some(handoff_buffer::State::Idle) | None => "idle",
                Some(handoff_buffer::State::Buffering) => "buffering",
                Some(handoff_buffer::State::Draining) => "draining",
            };
            vec![
                s(&sh.name),
                s(state),
                s(b.depth(&sh.name)),
                s(cfg.size),
                s(b.bytes()),
                s(cfg.max_bytes),
                s(cfg.window.as_millis()),
                b.reason(&sh.name).filter(|r| !r.is_empty()),
            ]
        })
        .collect();
    out.table(COLS, &rows);
}

/// A switchover's report as one row.
pub(crate) fn switchover_report(report: &crate::api::report::SwitchoverReport, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("shard", T),
        ("from", T),
        ("to", T),
        ("outcome", T),
        ("epoch", I),
        ("total_ms", T),
        ("steps", T),
    ];
    let steps = report
        .steps
        .iter()
        .map(|st| format!("{} {} ms", st.step, st.ms))
        .collect::<Vec<_>>()
        .join(", ");
    let row = vec![
        s(&report.shard),
        s(&report.from),
        s(&report.to),
        s(report.outcome.as_str()),
        Some(report.epoch.to_string()),
        Some(report.total_ms.to_string()),
        Some(steps),
    ];
    out.table_tagged(COLS, &[row], "SWITCHOVER");
}
