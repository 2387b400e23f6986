//! Server bytes: the frame decoder, the typed backend messages and ErrorResponse fields.
#![no_main]

use bytes::BytesMut;
use handoff_protocol::backend::{ready_status, BackendMessage};
use handoff_protocol::error::ErrorFields;
use handoff_protocol::framing::decode_frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode_frame(&mut buf, 1 << 20) {
        if frame.tag == b'E' || frame.tag == b'N' {
            let mut body = frame.body.clone();
            if let Ok(f) = ErrorFields::parse(&mut body) {
                let _ = (f.code(), f.message(), f.severity());
            }
        }
        if frame.tag == b'Z' {
            let _ = ready_status(&frame.body);
        }
        if let Ok(msg) = BackendMessage::parse(frame) {
            let mut out = BytesMut::new();
            msg.encode(&mut out);
            let again = decode_frame(&mut out, usize::MAX / 2)
                .expect("re-encoded frame decodes")
                .expect("re-encoded frame is whole");
            BackendMessage::parse(again).expect("re-encoded message parses");
        }
    }
});
