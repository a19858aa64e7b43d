//! A client's HTTP body: `parse_body` on single calls, notifications and batches, then
//! what the gateway does with each call it parsed (its method name, its upstream frame,
//! the reply with the client's id restored), checking what a client would notice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpcgate::jsonrpc::{self, Body, Call, Entry};
use serde_json::value::RawValue;
use within::assert_within;

mod within;

/// The batch limit the main parse runs with; a second parse with a smaller one checks
/// that the limit is what refuses a batch.
const MAX_BATCH: usize = 64;
const SMALL_BATCH: usize = 2;

fuzz_target!(|data: &[u8]| {
    let entries = match jsonrpc::parse_body(data, MAX_BATCH) {
        Ok(Body::Single(entry)) => vec![entry],
        Ok(Body::Batch(entries)) => {
            assert!(!entries.is_empty(), "an empty batch is refused");
            assert!(entries.len() <= MAX_BATCH, "a batch over the limit");
            check_limit(data, entries.len());
            entries
        }
        Err(e) => {
            // The error a client would get: its code and message must be there.
            assert!(e.code() < 0);
            assert!(!e.to_string().is_empty());
            Vec::new()
        }
    };
    for entry in &entries {
        check_entry(data, entry);
    }
    if let Some(id) = jsonrpc::parse_answer(data) {
        assert_borrowed(data, id);
        assert_ne!(id.get(), "null", "an answer to nobody");
    }
});

/// The same body with a smaller batch limit: refused exactly when it has more entries.
fn check_limit(data: &[u8], len: usize) {
    match jsonrpc::parse_body(data, SMALL_BATCH) {
        Ok(Body::Batch(entries)) => {
            assert!(len <= SMALL_BATCH);
            assert_eq!(entries.len(), len);
        }
        Err(rpcgate::Error::BatchTooLarge { size, max }) => {
            assert!(len > SMALL_BATCH);
            assert_eq!((size, max), (len, SMALL_BATCH));
        }
        other => panic!("a batch of {len} parsed as {other:?} under a smaller limit"),
    }
}

fn check_entry(data: &[u8], entry: &Entry<'_>) {
    match entry {
        Ok(call) => check_call(data, call),
        Err(invalid) => {
            assert!(!invalid.reason.is_empty());
            if let Some(id) = invalid.id {
                assert_borrowed(data, id);
            }
        }
    }
}

fn check_call(data: &[u8], call: &Call<'_>) {
    assert_borrowed(data, call.method);
    assert!(
        call.method.get().starts_with('"'),
        "a method that is not a string"
    );
    let _ = call.method_name();
    if let Some(params) = call.params {
        assert_borrowed(data, params);
        assert!(matches!(params.get().as_bytes()[0], b'[' | b'{'));
    }
    // The upstream frame, with our id appended, is a call again: same method and params.
    let mut frame = String::with_capacity(call.frame_len_hint());
    call.encode_prefix(&mut frame);
    jsonrpc::finish_frame(&mut frame, call.id.map(|_| 7));
    let again = match jsonrpc::parse_body(frame.as_bytes(), MAX_BATCH) {
        Ok(Body::Single(Ok(again))) => again,
        other => panic!("frame {frame:?} parsed as {other:?}"),
    };
    assert_eq!(again.method.get(), call.method.get());
    assert_eq!(
        again.params.map(RawValue::get),
        call.params.map(RawValue::get)
    );
    assert_eq!(again.id.map(RawValue::get), call.id.map(|_| "7"));
    // The reply carries the client's id back byte for byte.
    if let Some(id) = call.id {
        assert_borrowed(data, id);
        let mut reply = Vec::new();
        jsonrpc::write_reply(&mut reply, id, false, "[1]");
        if id.get() != "null" {
            let back = jsonrpc::parse_answer(&reply).unwrap_or_else(|| {
                panic!("reply {:?} is no answer", String::from_utf8_lossy(&reply))
            });
            assert_eq!(back.get(), id.get());
        }
    }
}

/// `raw` is borrowed from the body, byte for byte: never re-serialized.
fn assert_borrowed(data: &[u8], raw: &RawValue) {
    assert_within(data, raw.get().as_bytes());
}
