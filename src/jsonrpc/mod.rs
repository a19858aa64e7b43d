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

pub use reply::{reply_len, write_error, write_reply};
pub use request::{Body, Call, Entry, Invalid, OwnedCall, parse_answer, parse_body};
pub use upstream::{Inbound, Message, Outcome, Pushed, finish_frame, read_upstream};

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
