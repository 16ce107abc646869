//! Fuzzes the client-frame decoder with arbitrary bytes.
//!
//! Invariants, for every input:
//! - `decode` never panics (on any `&str`; non-UTF-8 bytes are decoded lossily, the way a
//!   caller that repaired them would see them);
//! - only a JSON object decodes (serde's internally tagged enums would also take an array with
//!   the tag first, `["ping"]`; the decoder refuses those);
//! - a frame that decodes re-serializes, and the JSON decodes again to the same frame;
//! - a decoded `send` carries no `id`, or one of 1 to `MAX_CLIENT_ID` characters;
//! - an error's `message` is not empty and an echoed `id` is at most `MAX_CLIENT_ID` characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_protocol::client::{decode, ClientFrame, MAX_CLIENT_ID};

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(text) => check(text),
        Err(_) => check(&String::from_utf8_lossy(data)),
    }
});

fn check(text: &str) {
    match decode(text) {
        Ok(frame) => {
            let value: serde_json::Value =
                serde_json::from_str(text).expect("a decoded frame is valid JSON");
            assert!(value.is_object(), "decoded a non-object: {text:?}");
            if let ClientFrame::Send { id: Some(id), .. } = &frame {
                let chars = id.chars().count();
                assert!(
                    (1..=MAX_CLIENT_ID).contains(&chars),
                    "accepted a send id of {chars} characters: {text:?}"
                );
            }
            let json = serde_json::to_string(&frame).expect("a decoded frame serializes");
            let again = decode(&json).unwrap_or_else(|err| {
                panic!("re-encoded frame {json} does not decode: {err:?} (input {text:?})")
            });
            assert_eq!(
                again, frame,
                "round trip changed the frame (input {text:?})"
            );
        }
        Err(err) => {
            assert!(!err.message.is_empty(), "empty error message for {text:?}");
            if let Some(id) = &err.id {
                assert!(
                    id.chars().count() <= MAX_CLIENT_ID,
                    "echoed an id over the limit for {text:?}"
                );
            }
        }
    }
}
