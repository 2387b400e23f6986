//! The session state machine: a logged-in client of a running proxy (transaction mode)
//! sends arbitrary bytes; the proxy talks to a scripted server that answers every
//! message the way PostgreSQL's protocol says. A panic anywhere aborts (libfuzzer's
//! hook); a proxy that stops answering new clients is a finding too.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::BytesMut;
use handoff_protocol::backend::{BackendMessage, TransactionStatus};
use handoff_protocol::error::ProxyError;
use handoff_protocol::framing::{decode_frame, decode_startup, StartupPacket};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct World {
    rt: tokio::runtime::Runtime,
    proxy: SocketAddr,
}

fn put(out: &mut BytesMut, m: BackendMessage) {
    m.encode(out);
}

/// One scripted server connection.
async fn serve(mut s: TcpStream) {
    let mut buf = BytesMut::new();
    // Startup (SSLRequest answered N).
    loop {
        match decode_startup(&mut buf) {
            Ok(Some(StartupPacket::Startup { params, .. })) => {
                let mut out = BytesMut::new();
                if params.iter().any(|(_, v)| v == "handoff-probe") {
                    // Health probes are refused: the shard keeps its configured primary.
                    ProxyError::fatal("28000", "no probes here").encode(&mut out);
                    let _ = s.write_all(&out).await;
                    return;
                }
                put(
                    &mut out,
                    BackendMessage::Authentication(handoff_protocol::backend::Authentication::Ok),
                );
                put(
                    &mut out,
                    BackendMessage::ParameterStatus {
                        name: "server_version".into(),
                        value: "15.0".into(),
                    },
                );
                put(
                    &mut out,
                    BackendMessage::ParameterStatus {
                        name: "client_encoding".into(),
                        value: "UTF8".into(),
                    },
                );
                put(&mut out, BackendMessage::BackendKeyData { pid: 1, key: 2 });
                put(
                    &mut out,
                    BackendMessage::ReadyForQuery(TransactionStatus::Idle),
                );
                if s.write_all(&out).await.is_err() {
                    return;
                }
                break;
            }
            Ok(Some(_)) => {
                if s.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let mut status = TransactionStatus::Idle;
    let mut failed = false;
    loop {
        let frame = loop {
            match decode_frame(&mut buf, 1 << 30) {
                Ok(Some(f)) => break f,
                Ok(None) => {
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                Err(_) => return,
            }
        };
        let mut out = BytesMut::new();
        let body = frame.body.clone();
        match frame.tag {
            b'Q' => {
                let sql = String::from_utf8_lossy(&body).to_ascii_uppercase();
                if sql.starts_with("BEGIN") {
                    status = TransactionStatus::InTransaction;
                } else if sql.starts_with("COMMIT") || sql.starts_with("ROLLBACK") {
                    status = TransactionStatus::Idle;
                }
                put(
                    &mut out,
                    BackendMessage::CommandComplete {
                        tag: "SELECT 0".into(),
                    },
                );
                put(&mut out, BackendMessage::ReadyForQuery(status));
            }
            b'P' if !failed => put(&mut out, BackendMessage::ParseComplete),
            b'B' if !failed => put(&mut out, BackendMessage::BindComplete),
            b'D' if !failed => put(&mut out, BackendMessage::NoData),
            b'E' if !failed => put(
                &mut out,
                BackendMessage::CommandComplete {
                    tag: "SELECT 0".into(),
                },
            ),
            b'C' if !failed => put(&mut out, BackendMessage::CloseComplete),
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {}
            b'S' => {
                failed = false;
                put(&mut out, BackendMessage::ReadyForQuery(status));
            }
            b'd' | b'c' | b'f' => {}
            b'X' => return,
            _ => {
                // What PostgreSQL does with an unknown message: FATAL and close.
                ProxyError::fatal("08P01", "invalid frontend message type").encode(&mut out);
                let _ = s.write_all(&out).await;
                return;
            }
        }
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let proxy = rt.block_on(async {
            let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = server.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((s, _)) = server.accept().await {
                    tokio::spawn(serve(s));
                }
            });
            let config = handoff::Config::from_vars([
                ("HANDOFF_LISTEN", "127.0.0.1:0".to_string()),
                ("HANDOFF_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
                ("HANDOFF_SHARDS", format!("main={addr}")),
                ("HANDOFF_HEALTH_CHECK_INTERVAL", "1h".to_string()),
                ("HANDOFF_LOG", "off".to_string()),
                ("HANDOFF_POOL_SIZE", "4".to_string()),
                ("HANDOFF_QUERY_WAIT_TIMEOUT", "2s".to_string()),
            ])
            .unwrap();
            let proxy = handoff::Proxy::start(config).await.unwrap();
            let a = proxy.listen_addr();
            std::mem::forget(proxy);
            a
        });
        World { rt, proxy }
    })
}

async fn login(addr: SocketAddr) -> Option<(TcpStream, BytesMut)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let mut out = BytesMut::new();
    StartupPacket::Startup {
        minor: 0,
        params: vec![
            ("user".into(), "fuzz".into()),
            ("database".into(), "db".into()),
        ],
    }
    .encode(&mut out);
    s.write_all(&out).await.ok()?;
    let mut buf = BytesMut::new();
    loop {
        while let Ok(Some(f)) = decode_frame(&mut buf, 1 << 20) {
            if f.tag == b'Z' {
                return Some((s, buf));
            }
            if f.tag == b'E' {
                return None;
            }
        }
        if s.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(async {
        let (mut s, _) = login(w.proxy).await.expect("a well-behaved client logs in");
        let _ = s.write_all(data).await;
        let _ = s.shutdown().await;
        // Whatever comes back, until the proxy closes or goes quiet.
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(100), async {
            while let Ok(n) = s.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        drop(s);
        // The proxy still serves a new client.
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), login(w.proxy))
            .await
            .expect("the proxy answers a new client")
            .expect("a well-behaved client logs in");
        s.write_all(&[
            b'Q', 0, 0, 0, 13, b's', b'e', b'l', b'e', b'c', b't', b' ', b'1', 0,
        ])
        .await
        .unwrap();
        let mut buf = BytesMut::new();
        let ok = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                while let Ok(Some(f)) = decode_frame(&mut buf, 1 << 20) {
                    if f.tag == b'Z' {
                        return true;
                    }
                }
                if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return false;
                }
            }
        })
        .await;
        assert_eq!(
            ok,
            Ok(true),
            "a query after the fuzz input was not answered"
        );
    });
});
