use super::*;
use crate::frontend::{FrontendMessage, Target};
use proptest::prelude::*;

fn startup() -> StartupPacket {
    StartupPacket::Startup {
        minor: 0,
        params: vec![
            ("user".into(), "alice".into()),
            ("database".into(), "app".into()),
            ("application_name".into(), "psql".into()),
        ],
    }
}

#[test]
fn startup_packets_round_trip() {
    for p in [
        startup(),
        StartupPacket::SslRequest,
        StartupPacket::GssEncRequest,
        StartupPacket::Cancel {
            pid: 7,
            key: Bytes::from_static(&[0xff, 0xff, 0xff, 0xf7]),
        },
        // Protocol 3.2: a 32-byte key.
        StartupPacket::Cancel {
            pid: 7,
            key: Bytes::from(vec![9u8; 32]),
        },
    ] {
        let mut buf = BytesMut::new();
        p.encode(&mut buf);
        // Every prefix is incomplete, never an error.
        for cut in 0..buf.len() {
            let mut part = BytesMut::from(&buf[..cut]);
            assert_eq!(decode_startup(&mut part), Ok(None));
        }
        assert_eq!(decode_startup(&mut buf).unwrap(), Some(p));
        assert!(buf.is_empty());
    }
    assert_eq!(startup().param("database"), Some("app"));
}

#[test]
fn startup_lengths_are_checked_before_the_body_arrives() {
    for len in [0i32, 3, 7, -1, i32::MIN] {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        assert_eq!(decode_startup(&mut buf), Err(FrameError::BadLength(len)));
    }
    let mut buf = BytesMut::from(&10_001i32.to_be_bytes()[..]);
    assert_eq!(
        decode_startup(&mut buf),
        Err(FrameError::TooLarge {
            len: 10_001,
            max: MAX_STARTUP_PACKET
        })
    );
    // Nothing was reserved for the claimed length.
    assert!(buf.capacity() < 10_000);
    let mut buf = BytesMut::from(&i32::MAX.to_be_bytes()[..]);
    assert!(matches!(
        decode_startup(&mut buf),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn malformed_startup_packets() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0, 2, 0, 0, b'u', b's', b'e', b'r', 0], "protocol 2"),
        (
            vec![0, 3, 0, 0, b'u', b's', b'e', b'r', 0, b'x'],
            "unterminated",
        ),
        (vec![0, 3, 0, 0, b'a', 0, b'b', 0, 0], "no user"),
        (
            vec![0, 3, 0, 0, b'u', b's', b'e', b'r', 0, 0xff, 0, 0],
            "bad utf8",
        ),
        (vec![0x04, 0xd2, 0x16, 0x2f, 1], "ssl with trailing"),
        (vec![0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1], "short cancel"),
    ];
    for (body, what) in cases {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        buf.extend_from_slice(&body);
        assert!(decode_startup(&mut buf).is_err(), "{what}");
    }
}

#[test]
fn tagged_lengths_are_checked() {
    for len in [0i32, 3, -1, i32::MIN] {
        let mut buf = BytesMut::from(&[b'Q'][..]);
        buf.extend_from_slice(&len.to_be_bytes());
        assert_eq!(
            decode_frame(&mut buf, 1000),
            Err(FrameError::BadLength(len))
        );
    }
    let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
    assert!(matches!(
        decode_frame(&mut buf, 1000),
        Err(FrameError::TooLarge { .. })
    ));
    assert!(buf.capacity() < 1000);
}

fn frontend_messages() -> Vec<FrontendMessage> {
    use bytes::Bytes;
    vec![
        FrontendMessage::Query {
            sql: Bytes::from_static(b"select 1"),
        },
        FrontendMessage::Parse {
            name: Bytes::from_static(b"s1"),
            sql: Bytes::from_static(b"select $1::int"),
            param_types: vec![23],
        },
        FrontendMessage::Bind {
            portal: Bytes::new(),
            statement: Bytes::from_static(b"s1"),
            rest: Bytes::from_static(&[0, 0, 0, 1, 0, 0, 0, 1, b'5', 0, 0]),
        },
        FrontendMessage::Describe {
            target: Target::Portal,
            name: Bytes::new(),
        },
        FrontendMessage::Execute {
            portal: Bytes::new(),
            max_rows: 0,
        },
        FrontendMessage::Close {
            target: Target::Statement,
            name: Bytes::from_static(b"s1"),
        },
        FrontendMessage::Sync,
        FrontendMessage::Flush,
        FrontendMessage::CopyData {
            data: Bytes::from_static(b"1\t2\n"),
        },
        FrontendMessage::CopyDone,
        FrontendMessage::CopyFail {
            message: "stop".into(),
        },
        FrontendMessage::Terminate,
    ]
}

#[test]
fn frontend_messages_round_trip() {
    for m in frontend_messages() {
        let mut buf = BytesMut::new();
        m.encode(&mut buf);
        let f = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(FrontendMessage::parse(f).unwrap(), m);
    }
}

#[test]
fn malformed_frontend_messages() {
    use crate::frontend::tag;
    use bytes::Bytes;
    let cases: Vec<(u8, &[u8])> = vec![
        (tag::QUERY, b"select 1"),
        (tag::QUERY, b"a\0b"),
        (tag::PARSE, b"s\0q\0\0\x02\0\0\0\x17"),
        (tag::PARSE, b"s\0q\0\xff\xff"),
        (tag::DESCRIBE, b"Xname\0"),
        (tag::EXECUTE, b"\0\0\0"),
        (tag::SYNC, b"x"),
        (b'?', b""),
    ];
    for (t, body) in cases {
        let f = Frame {
            tag: t,
            body: Bytes::copy_from_slice(body),
        };
        assert!(
            FrontendMessage::parse(f).is_err(),
            "{} {:?}",
            t as char,
            body
        );
    }
}

fn stream() -> (Vec<u8>, Vec<FrontendMessage>) {
    let msgs = frontend_messages();
    let mut buf = BytesMut::new();
    for m in &msgs {
        m.encode(&mut buf);
    }
    (buf.to_vec(), msgs)
}

proptest! {
    #[test]
    fn any_split_parses_to_the_same_messages(cuts in proptest::collection::vec(0usize..200, 0..12)) {
        let (bytes, want) = stream();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut from = 0;
        for to in cuts {
            buf.extend_from_slice(&bytes[from..to]);
            from = to;
            while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() {
                got.push(FrontendMessage::parse(f).unwrap());
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, want);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(f)) = decode_frame(&mut buf, 4096) {
            let _ = FrontendMessage::parse(f.clone());
            let _ = crate::backend::BackendMessage::parse(f);
        }
        let mut buf = BytesMut::from(&data[..]);
        let _ = decode_startup(&mut buf);
    }
}

#[test]
fn cancel_keys_of_a_bad_length_are_refused() {
    for len in [0usize, 3, MAX_CANCEL_KEY + 1] {
        let mut buf = BytesMut::new();
        let total = 12 + len;
        buf.extend_from_slice(&(total as i32).to_be_bytes());
        buf.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        buf.extend_from_slice(&7i32.to_be_bytes());
        buf.extend_from_slice(&vec![1u8; len]);
        assert!(decode_startup(&mut buf).is_err(), "a key of {len} bytes");
    }
}
