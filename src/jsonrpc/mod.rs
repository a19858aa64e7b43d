//! JSON-RPC 2.0 on the wire: client requests in, upstream frames out, replies back.
//!
//! Everything here borrows from the buffer it was parsed from. `params`, `result`,
//! `error` and the client's `id` are `&RawValue`: their bytes are spliced into the
//! outgoing text and never re-parsed or re-serialized, which is both the fast path and
//! what makes the client's id come back byte for byte (`1.5`, `12345678901234567890123`,
//! `"\u00e9"` all survive because nobody ever turns them into numbers or strings).
//!
//! - `request.rs`: a client's body in ([`parse_body`]), and a call's upstream frame
//!   without its id ([`Call::encode_prefix`]).
//! - `upstream.rs`: **ids rewritten** ([`finish_frame`] appends the connection's id
//!   last) and upstream frames read ([`read_upstream`]).
//! - `reply.rs`: **ids restored**: the client's answer with its own id bytes
//!   ([`write_reply`]), and gateway failures as error objects ([`write_error`]).

mod reply;
mod request;
mod upstream;

pub use reply::{write_error, write_reply};
pub use request::{Body, Call, Entry, Invalid, parse_body};
pub use upstream::{Inbound, Outcome, finish_frame, read_upstream};

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// Deserializes a member that is present, even as `null`, to `Some`: a plain
/// `Option<&RawValue>` would turn `"id": null` into "no id" and a call into a notification.
pub(crate) fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

pub(crate) fn first_byte(bytes: &[u8]) -> Option<u8> {
    bytes.iter().copied().find(|b| !b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(body: &str) -> Entry<'_> {
        match parse_body(body.as_bytes(), 100).expect("parses") {
            Body::Single(e) => e,
            Body::Batch(_) => panic!("expected a single call"),
        }
    }

    #[test]
    fn id_shapes_survive_byte_for_byte() {
        for id in [
            r#""abc""#,
            "1.5",
            "12345678901234567890123",
            "null",
            r#""\u00e9\n""#,
            "-0",
            "1e400",
        ] {
            let body = format!(r#"{{"jsonrpc":"2.0","method":"echo","params":[1],"id":{id}}}"#);
            let call = single(&body).unwrap();
            let mut frame = String::new();
            call.encode_prefix(&mut frame);
            finish_frame(&mut frame, Some(7));
            let upstream_reply = r#"{"jsonrpc":"2.0","id":7,"result":[1]}"#;
            let mut out = Vec::new();
            read_upstream(upstream_reply, |our, outcome| {
                assert_eq!(our, 7);
                write_reply(
                    &mut out,
                    call.id.unwrap(),
                    outcome.is_error(),
                    outcome.payload().get(),
                );
            });
            let expected = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":[1]}}"#);
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
