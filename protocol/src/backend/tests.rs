use super::*;
use crate::error::{ProxyError, Severity};
use crate::framing::decode_frame;
use crate::sqlstate;

fn round_trip(msg: BackendMessage) {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf);
    let frame = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
    assert!(buf.is_empty());
    assert_eq!(BackendMessage::parse(frame).unwrap(), msg);
}

#[test]
fn typed_messages_round_trip() {
    round_trip(BackendMessage::Authentication(Authentication::Ok));
    round_trip(BackendMessage::Authentication(
        Authentication::CleartextPassword,
    ));
    round_trip(BackendMessage::Authentication(
        Authentication::Md5Password { salt: [9, 8, 7, 6] },
    ));
    round_trip(BackendMessage::Authentication(Authentication::Sasl {
        mechanisms: vec!["SCRAM-SHA-256".into()],
    }));
    round_trip(BackendMessage::Authentication(
        Authentication::SaslContinue {
            data: Bytes::from_static(b"r=abc,s=QUJD,i=4096"),
        },
    ));
    round_trip(BackendMessage::Authentication(Authentication::SaslFinal {
        data: Bytes::from_static(b"v=xyz"),
    }));
    round_trip(BackendMessage::ParameterStatus {
        name: "TimeZone".into(),
        value: "UTC".into(),
    });
    round_trip(BackendMessage::BackendKeyData {
        pid: 42,
        key: Bytes::from_static(&[1, 2, 3, 4]),
    });
    for s in [
        TransactionStatus::Idle,
        TransactionStatus::InTransaction,
        TransactionStatus::Failed,
    ] {
        round_trip(BackendMessage::ReadyForQuery(s));
    }
    round_trip(BackendMessage::from(&ProxyError::fatal(
        sqlstate::INVALID_PASSWORD,
        "nope",
    )));
    round_trip(BackendMessage::NotificationResponse {
        pid: 1,
        channel: "ch".into(),
        payload: "hello".into(),
    });
    round_trip(BackendMessage::CommandComplete {
        tag: "SELECT 1".into(),
    });
    round_trip(BackendMessage::NegotiateProtocolVersion {
        newest_version: 3 << 16,
        unrecognized: vec!["_pq_.x".into()],
    });
    for m in [
        BackendMessage::ParseComplete,
        BackendMessage::BindComplete,
        BackendMessage::CloseComplete,
        BackendMessage::NoData,
        BackendMessage::EmptyQueryResponse,
        BackendMessage::PortalSuspended,
        BackendMessage::CopyDone,
    ] {
        round_trip(m);
    }
    round_trip(BackendMessage::Other(Frame {
        tag: tag::DATA_ROW,
        body: Bytes::from_static(&[0, 1, 0, 0, 0, 1, b'x']),
    }));
}

#[test]
fn error_builder_fields() {
    let e = ProxyError::new(Severity::Error, sqlstate::TOO_MANY_CONNECTIONS, "full")
        .detail("d")
        .hint("h");
    let f = e.fields();
    assert_eq!(f.code(), Some("53300"));
    assert_eq!(f.message(), Some("full"));
    assert_eq!(f.severity(), Some("ERROR"));
    assert_eq!(f.get(crate::error::field::HINT), Some("h"));
    assert_eq!(f.get(crate::error::field::DETAIL), Some("d"));
    assert_eq!(sqlstate::class("28P01"), "28");
    assert_eq!(sqlstate::class("bad"), "??");
}

#[test]
fn malformed_bodies_are_errors() {
    let bad = [
        (tag::READY_FOR_QUERY, &b"X"[..]),
        (tag::READY_FOR_QUERY, &b"II"[..]),
        (tag::BACKEND_KEY_DATA, &b"\0\0\0\x01"[..]),
        (tag::PARAMETER_STATUS, &b"name\0value"[..]),
        (tag::AUTHENTICATION, &b"\0\0"[..]),
        (tag::AUTHENTICATION, &b"\0\0\0\x05\x01"[..]),
        (tag::ERROR_RESPONSE, &b"Sfoo"[..]),
    ];
    for (t, body) in bad {
        let frame = Frame {
            tag: t,
            body: Bytes::copy_from_slice(body),
        };
        assert!(
            BackendMessage::parse(frame).is_err(),
            "{} {:?}",
            t as char,
            body
        );
    }
    assert!(ready_status(b"T").is_ok());
    assert!(ready_status(b"").is_err());
}

#[test]
fn built_rows_read_back() {
    let mut buf = BytesMut::new();
    super::encode_row_description(
        &[
            ("name", super::ColumnType::Text),
            ("n", super::ColumnType::Int8),
        ],
        &mut buf,
    );
    super::encode_data_row(&[Some("a"), None], &mut buf);
    assert_eq!(buf[0], crate::tag::backend::ROW_DESCRIPTION);
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let row = &buf[1 + len..];
    assert_eq!(row[0], crate::tag::backend::DATA_ROW);
    let values = crate::body::data_row(&row[5..]).unwrap();
    assert_eq!(values, vec![Some(&b"a"[..]), None]);
}
