//! An upstream's WebSocket text frame: `read_upstream` on replies, notifications,
//! requests to the client and batches of them; every message it hands out is used
//! the way the multiplexer and the push sessions use it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpcgate::jsonrpc::{self, Message, Outcome};
use serde_json::value::RawValue;

mod within;

fuzz_target!(|data: &[u8]| {
    // A WebSocket text frame is UTF-8; tungstenite refuses anything else before us.
    let Ok(frame) = std::str::from_utf8(data) else {
        return;
    };
    let (mut replies, mut pushed) = (0, 0);
    let seen = jsonrpc::read_upstream(frame, |message| match message {
        Message::Reply(_, outcome) => {
            replies += 1;
            if let Outcome::Error(e) | Outcome::Result(e) = outcome {
                assert_within(frame, e.get());
            }
            // What a caller gets back: the payload spliced after its own id.
            let mut out = Vec::new();
            let id = RawValue::from_string("1".into()).expect("a number is JSON");
            jsonrpc::write_reply(
                &mut out,
                &id,
                outcome.is_error(),
                outcome.payload().map_or("null", RawValue::get),
            );
            assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok());
        }
        Message::Pushed(p) => {
            pushed += 1;
            assert_within(frame, p.text);
            assert_within(frame, p.method.get());
            assert!(
                p.method.get().starts_with('"'),
                "a method that is not a string"
            );
            if let Some(id) = p.id {
                assert_within(frame, id.get());
            }
            // Pushed text goes to clients as it is: it must be one JSON value.
            assert!(serde_json::from_str::<serde::de::IgnoredAny>(p.text).is_ok());
        }
    });
    assert_eq!(
        (seen.replies, seen.pushed),
        (replies, pushed),
        "counted as handed out"
    );
    // Every message of the frame is counted once, as one thing or another.
    let total = seen.replies + seen.pushed + seen.unsolicited + seen.garbage;
    let expected = match serde_json::from_str::<Vec<&RawValue>>(frame) {
        Ok(items) => items.len(),
        _ => 1,
    };
    assert_eq!(total, expected, "{seen:?}");
});

/// `part` is borrowed from the frame, not a copy.
fn assert_within(frame: &str, part: &str) {
    within::assert_within(frame.as_bytes(), part.as_bytes());
}
