//! Client bytes: the frame decoder and the message parser, checked against the
//! zero-copy scanner the relay uses (both must agree on every message boundary).
#![no_main]

use bytes::BytesMut;
use handoff_protocol::framing::decode_frame;
use handoff_protocol::frontend::FrontendMessage;
use handoff_protocol::scan::{Scanner, Step};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // Decoder: whole frames, each parsed into a typed message and re-encoded.
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    loop {
        match decode_frame(&mut buf, MAX) {
            Ok(Some(frame)) => {
                frames.push(frame.body.len() + 5);
                if let Ok(msg) = FrontendMessage::parse(frame.clone()) {
                    let mut out = BytesMut::new();
                    msg.encode(&mut out);
                    // A parsed message re-encodes to a frame that parses again.
                    let again = decode_frame(&mut out, usize::MAX / 2)
                        .expect("re-encoded frame decodes")
                        .expect("re-encoded frame is whole");
                    FrontendMessage::parse(again).expect("re-encoded message parses");
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    // Scanner, fed in uneven pieces: the same boundaries for whole messages.
    let mut scan = Scanner::new(MAX, MAX);
    let mut pos = 0;
    let mut seen = Vec::new();
    let mut current = 0usize;
    let mut chunk = 1 + (data.first().copied().unwrap_or(0) as usize % 7);
    let mut avail = chunk.min(data.len());
    loop {
        match scan.step(&data[pos..avail], |t| t % 2 == 0) {
            Ok(Step::NeedMore) => {
                if avail == data.len() {
                    break;
                }
                chunk = chunk * 2 + 1;
                avail = (avail + chunk).min(data.len());
            }
            Ok(Step::Message { len, .. }) => {
                assert!(scan.at_boundary());
                seen.push(len);
                pos += len;
            }
            Ok(Step::Pass { len, tag }) => {
                assert!(len > 0);
                if tag.is_some() {
                    current = 0;
                }
                current += len;
                pos += len;
                if scan.at_boundary() {
                    seen.push(current);
                }
            }
            Err(_) => break,
        }
        assert!(pos <= data.len());
    }
    let n = seen.len().min(frames.len());
    assert_eq!(seen[..n], frames[..n], "scanner and decoder disagree");
});
