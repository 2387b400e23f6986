//! Framing throughput on a captured-style backend stream: the replies to a mix of
//! pgbench-like point reads and a few larger result sets, as the relay sees them.

use bytes::{BufMut, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use handoff_protocol::backend::{tag, BackendMessage, TransactionStatus};
use handoff_protocol::framing::decode_frame;
use handoff_protocol::scan::{Scanner, Step};

fn message(buf: &mut BytesMut, t: u8, body: &[u8]) {
    buf.put_u8(t);
    buf.put_i32(body.len() as i32 + 4);
    buf.put_slice(body);
}

/// 1,000 replies: 9 in 10 are one-row point reads, 1 in 10 returns 100 rows of ~120 bytes.
fn stream() -> BytesMut {
    let mut buf = BytesMut::new();
    let mut row_desc = Vec::new();
    row_desc.extend_from_slice(&1i16.to_be_bytes());
    row_desc.extend_from_slice(b"abalance\0");
    row_desc.extend_from_slice(&[0; 18]);
    for i in 0..1000 {
        message(&mut buf, tag::ROW_DESCRIPTION, &row_desc);
        let rows = if i % 10 == 0 { 100 } else { 1 };
        let width = if rows == 1 { 6 } else { 120 };
        let mut row = Vec::new();
        row.extend_from_slice(&1i16.to_be_bytes());
        row.extend_from_slice(&(width as i32).to_be_bytes());
        row.extend(std::iter::repeat_n(b'7', width));
        for _ in 0..rows {
            message(&mut buf, tag::DATA_ROW, &row);
        }
        message(
            &mut buf,
            tag::COMMAND_COMPLETE,
            format!("SELECT {rows}\0").as_bytes(),
        );
        BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut buf);
    }
    buf
}

fn bench(c: &mut Criterion) {
    let data = stream();
    let mut g = c.benchmark_group("backend_stream");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("scan_relay", |b| {
        b.iter(|| {
            let mut sc = Scanner::new(64 * 1024, i32::MAX as usize);
            let mut pos = 0;
            let mut ready = 0;
            let inspect = |t: u8| t == tag::READY_FOR_QUERY || t == tag::ERROR_RESPONSE;
            while let Step::Pass { len, .. } | Step::Message { len, .. } = {
                let s = sc.step(&data[pos..], inspect).unwrap();
                if let Step::Message {
                    tag: tag::READY_FOR_QUERY,
                    ..
                } = s
                {
                    ready += 1;
                }
                s
            } {
                pos += len;
            }
            black_box(ready)
        })
    });
    g.bench_function("decode_frames", |b| {
        b.iter(|| {
            let mut buf = data.clone();
            let mut n = 0;
            while let Some(f) = decode_frame(&mut buf, 1 << 30).unwrap() {
                n += f.body.len();
            }
            black_box(n)
        })
    });
    g.bench_function("decode_and_parse", |b| {
        b.iter(|| {
            let mut buf = data.clone();
            let mut ready = 0;
            while let Some(f) = decode_frame(&mut buf, 1 << 30).unwrap() {
                if let BackendMessage::ReadyForQuery(_) = BackendMessage::parse(f).unwrap() {
                    ready += 1;
                }
            }
            black_box(ready)
        })
    });
    g.finish();
}

/// A Bind with `n` text parameters of 8 bytes each, as a driver sends it.
fn bind_with_params(n: usize) -> BytesMut {
    let mut body = Vec::new();
    body.extend_from_slice(b"\0stmt_1\0");
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&(n as i16).to_be_bytes());
    for i in 0..n {
        body.extend_from_slice(&8i32.to_be_bytes());
        body.extend_from_slice(format!("{i:08}").as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    let mut buf = BytesMut::new();
    message(&mut buf, b'B', &body);
    buf
}

fn bench_frontend(c: &mut Criterion) {
    use handoff_protocol::frontend::FrontendMessage;
    let mut g = c.benchmark_group("frontend");
    for n in [10usize, 1000] {
        let data = bind_with_params(n);
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(format!("parse_bind_{n}_params"), |b| {
            b.iter(|| {
                let mut buf = data.clone();
                let f = decode_frame(&mut buf, 1 << 30).unwrap().unwrap();
                match FrontendMessage::parse(f).unwrap() {
                    FrontendMessage::Bind { statement, .. } => black_box(statement.len()),
                    _ => unreachable!(),
                }
            })
        });
    }
    g.finish();

    // Encoding: what the proxy writes itself (rewritten Binds, errors, ReadyForQuery).
    let mut g = c.benchmark_group("encode");
    let bind = FrontendMessage::Bind {
        portal: bytes::Bytes::new(),
        statement: bytes::Bytes::from_static(b"handoff_0123456789abcdef01234567"),
        rest: bytes::Bytes::from(vec![7u8; 200]),
    };
    let mut one = BytesMut::new();
    bind.encode(&mut one);
    g.throughput(Throughput::Bytes(one.len() as u64 * 1000));
    g.bench_function("bind_x1000", |b| {
        let mut out = BytesMut::with_capacity(one.len() * 1000);
        b.iter(|| {
            out.clear();
            for _ in 0..1000 {
                bind.encode(&mut out);
            }
            black_box(out.len())
        })
    });
    g.finish();
    let mut g = c.benchmark_group("encode_error");
    let err =
        handoff_protocol::error::ProxyError::fatal("53300", "sorry, too many clients already")
            .hint("raise HANDOFF_MAX_CLIENT_CONN");
    g.bench_function("error_response", |b| {
        let mut out = BytesMut::new();
        b.iter(|| {
            out.clear();
            err.encode(&mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench, bench_frontend);
criterion_main!(benches);
