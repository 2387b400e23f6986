//! The transaction-mode relay's own work per client message, without the sockets: the
//! scanner finding each message, and the checks the relay makes on what it finds — at a
//! transaction's first message whether it is refused (LISTEN), on a simple Query whether
//! the SQL-level statement mapping or a database change concerns it and whether it ends
//! the transaction block, on a Parse/Bind/Describe whether it is of the unnamed statement
//! and can go through untouched. Regressions in any of these show here in nanoseconds.
//!
//! The requests are what pgbench sends for `-S` in each of its query modes.

use bytes::{BufMut, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use handoff_protocol::body::{self, Unnamed};
use handoff_protocol::framing::HEADER_LEN;
use handoff_protocol::frontend::tag;
use handoff_protocol::scan::{Scanner, Step};
use handoff_protocol::sql;

fn message(buf: &mut BytesMut, t: u8, body: &[u8]) {
    buf.put_u8(t);
    buf.put_i32(body.len() as i32 + 4);
    buf.put_slice(body);
}

const SELECT: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;";

/// `-M simple`: one Query with the value inlined.
fn simple() -> BytesMut {
    let mut buf = BytesMut::new();
    message(
        &mut buf,
        tag::QUERY,
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;\0",
    );
    buf
}

/// The Bind, Execute and Sync every extended request ends with; `statement`: the
/// statement's name ("" for the unnamed one).
fn bind_execute_sync(buf: &mut BytesMut, statement: &[u8]) {
    let mut bind = vec![0u8];
    bind.extend_from_slice(statement);
    bind.push(0);
    bind.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 5]);
    bind.extend_from_slice(b"48213");
    bind.extend_from_slice(&[0, 0]);
    message(buf, tag::BIND, &bind);
    message(buf, tag::EXECUTE, &[0, 0, 0, 0, 0]);
    message(buf, tag::SYNC, &[]);
}

/// `-M extended`: Parse, Bind, Describe, Execute, Sync of the unnamed statement.
fn extended() -> BytesMut {
    let mut buf = BytesMut::new();
    let mut parse = vec![0u8];
    parse.extend_from_slice(SELECT);
    parse.extend_from_slice(&[0, 0, 0]);
    message(&mut buf, tag::PARSE, &parse);
    let mut described = BytesMut::new();
    bind_execute_sync(&mut described, b"");
    // Describe of the portal goes between Bind and Execute.
    let bind_len = described.len() - (1 + 4 + 5) - (1 + 4);
    buf.extend_from_slice(&described[..bind_len]);
    message(&mut buf, tag::DESCRIBE, b"P\0");
    buf.extend_from_slice(&described[bind_len..]);
    buf
}

/// `-M prepared`: Bind, Execute, Sync of a named statement (prepared once before).
fn prepared() -> BytesMut {
    let mut buf = BytesMut::new();
    bind_execute_sync(&mut buf, b"P0_1");
    buf
}

/// What the relay does with one client request: finds each message, and makes the
/// checks of the first message and of each message it looks into. Returns something
/// of every check so none is optimised away.
fn relay_checks(data: &[u8]) -> usize {
    let mut scan = Scanner::new(1 << 30, 1 << 30);
    let mut pos = 0;
    let mut seen = 0;
    let mut first = true;
    while pos < data.len() {
        let step = scan
            .step(&data[pos..], |t| {
                matches!(
                    t,
                    tag::QUERY | tag::PARSE | tag::BIND | tag::DESCRIBE | tag::CLOSE
                )
            })
            .unwrap();
        let (t, len, whole) = match step {
            Step::NeedMore => break,
            Step::Pass { len, tag } => (tag, len, false),
            Step::Message { tag, len } => (Some(tag), len, true),
        };
        let msg = &data[pos..pos + len];
        if let (Some(t), true) = (t, whole) {
            let b = &msg[HEADER_LEN..];
            if first {
                let sql = match t {
                    tag::QUERY => Some(b.strip_suffix(&[0]).unwrap_or(b)),
                    tag::PARSE => body::parse_sql(b),
                    _ => None,
                };
                seen += usize::from(sql.is_some_and(sql::listens));
                first = false;
            }
            match t {
                tag::QUERY => {
                    let q = b.strip_suffix(&[0]).unwrap_or(b);
                    seen += usize::from(sql::may_concern_statements_or_databases(q));
                    seen += usize::from(sql::ends_transaction(&q[..q.len().min(32)]).is_some());
                }
                _ => match body::unnamed(t, b) {
                    Some(Unnamed::Parse(q)) => {
                        seen += usize::from(sql::may_concern_statements_or_databases(q));
                        seen += usize::from(sql::ends_transaction(q).is_some());
                    }
                    Some(Unnamed::Other) => seen += 1,
                    None => seen += body::bind_statement(b).map_or(0, <[u8]>::len),
                },
            }
        }
        pos += len;
    }
    seen
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("relay_request");
    for (name, data) in [
        ("simple", simple()),
        ("extended", extended()),
        ("prepared", prepared()),
    ] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| b.iter(|| relay_checks(black_box(&data))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
