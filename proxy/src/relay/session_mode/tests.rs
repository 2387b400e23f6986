//! Session mode against stand-in sockets.

use super::*;
use crate::testing::hp;
use crate::testing::socket_pair;
use bytes::BytesMut;
use handoff_protocol::backend::BackendMessage;
use handoff_protocol::backend::{tag as btag, TransactionStatus};
use handoff_protocol::framing::decode_frame;
use handoff_protocol::frontend::tag as ftag;
use handoff_protocol::frontend::FrontendMessage;
use tokio::io::AsyncWriteExt;

async fn send(to: &mut tokio::net::TcpStream, msgs: &[BackendMessage]) {
    let mut b = BytesMut::new();
    for m in msgs {
        m.encode(&mut b);
    }
    to.write_all(&b).await.unwrap();
}

async fn query(to: &mut tokio::net::TcpStream, sql: &'static str) {
    let mut b = BytesMut::new();
    FrontendMessage::Query {
        sql: bytes::Bytes::from_static(sql.as_bytes()),
    }
    .encode(&mut b);
    to.write_all(&b).await.unwrap();
}

/// Reads whole messages from `from` until one with `tag` arrives; returns the tags.
async fn read_until(from: &mut tokio::net::TcpStream, tag: u8) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let mut tags = Vec::new();
    loop {
        while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() {
            tags.push(f.tag);
            if f.tag == tag {
                return tags;
            }
        }
        assert!(
            from.read_buf(&mut buf).await.unwrap() > 0,
            "closed: {tags:?}"
        );
    }
}

struct Setup {
    app: tokio::net::TcpStream,
    db: tokio::net::TcpStream,
    shard: Arc<Shard>,
    relay: tokio::task::JoinHandle<End>,
    _trigger: crate::shutdown::Trigger,
}

async fn setup() -> Setup {
    let (client, app) = socket_pair().await;
    let (server, db) = socket_pair().await;
    let shard = Arc::new(Shard::new("main", vec![hp(1)]));
    let gen = shard.current();
    let (trigger, signal) = crate::shutdown::channel();
    let relay = tokio::spawn(async move {
        let (mut client, mut server) = (Conn::new(client), Conn::new(server));
        let clients = crate::clients::Clients::default();
        let info = clients.register("127.0.0.1:1".parse().unwrap(), None);
        let meters = Arc::new(crate::metrics::RelayMeters::new());
        run(
            &mut client,
            &mut server,
            "main",
            signal,
            super::Leave::Primary(&gen),
            &info,
            &meters,
            None,
        )
        .await
    });
    Setup {
        app,
        db,
        shard,
        relay,
        _trigger: trigger,
    }
}

#[tokio::test]
async fn a_revoked_session_ends_at_its_next_transaction_boundary_not_before() {
    let mut s = setup().await;
    query(&mut s.app, "BEGIN").await;
    read_until(&mut s.db, ftag::QUERY).await;
    let begun = BackendMessage::CommandComplete {
        tag: "BEGIN".into(),
    };
    send(
        &mut s.db,
        &[
            begun,
            BackendMessage::ReadyForQuery(TransactionStatus::InTransaction),
        ],
    )
    .await;
    read_until(&mut s.app, btag::READY_FOR_QUERY).await;
    // Revoked inside a transaction: the relay goes on.
    s.shard.revoke(None, "test", |_| {}).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!s.relay.is_finished(), "ended inside a transaction");
    query(&mut s.app, "COMMIT").await;
    read_until(&mut s.db, ftag::QUERY).await;
    let done = BackendMessage::CommandComplete {
        tag: "COMMIT".into(),
    };
    send(
        &mut s.db,
        &[done, BackendMessage::ReadyForQuery(TransactionStatus::Idle)],
    )
    .await;
    let tags = read_until(&mut s.app, btag::READY_FOR_QUERY).await;
    assert_eq!(tags, [btag::COMMAND_COMPLETE, btag::READY_FOR_QUERY]);
    assert_eq!(s.relay.await.unwrap(), End::Revoked);
}

#[tokio::test]
async fn a_server_that_goes_away_ends_the_session_with_an_error() {
    let mut s = setup().await;
    drop(s.db);
    let tags = read_until(&mut s.app, btag::ERROR_RESPONSE).await;
    assert_eq!(tags, [btag::ERROR_RESPONSE]);
    assert_eq!(s.relay.await.unwrap(), End::ServerGone);
}

#[tokio::test]
async fn terminate_ends_the_relay() {
    let mut s = setup().await;
    let mut b = BytesMut::new();
    FrontendMessage::Terminate.encode(&mut b);
    s.app.write_all(&b).await.unwrap();
    assert_eq!(s.relay.await.unwrap(), End::Terminated);
    // The server saw the Terminate too.
    read_until(&mut s.db, ftag::TERMINATE).await;
}

#[test]
fn a_session_ends_when_the_proxy_is_torn_down_under_it() {
    // The relay waits for the next shutdown phase; once the trigger is gone that wait
    // is over at once, and a relay that still read the old phase looped without ever
    // yielding. Run on a thread of its own, so that a spinning relay fails this test
    // by its timeout instead of hanging it.
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let Setup {
                mut app,
                relay,
                _trigger: trigger,
                ..
            } = setup().await;
            drop(trigger);
            let end = relay.await.unwrap();
            let told = read_until(&mut app, btag::ERROR_RESPONSE).await;
            let _ = done.send((end, told));
        });
    });
    let (end, told) = ended
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the relay ended once the proxy was gone");
    assert!(matches!(end, End::Shutdown), "{end:?}");
    assert_eq!(told, [btag::ERROR_RESPONSE], "the client is told why");
}
