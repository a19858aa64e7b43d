//! Frames to and from an upstream: our id appended to a call's frame, and replies
//! read back by that id.

use super::{first_byte, present};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Closes a frame started by [`Call::encode_prefix`](super::Call::encode_prefix) with the connection's id,
/// or with no id for a notification.
pub fn finish_frame(out: &mut String, id: Option<u64>) {
    if let Some(id) = id {
        out.push_str(r#","id":"#);
        out.push_str(itoa::Buffer::new().format(id));
    }
    out.push('}');
}

/// Fields read from an upstream message.
#[derive(Deserialize)]
struct WireReply<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    result: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<&'a RawValue>,
    /// rpc-websockets' events (`{"notification": "name", "params": ...}`): not JSON-RPC,
    /// but a push all the same, not garbage.
    #[serde(borrow, default)]
    notification: Option<&'a RawValue>,
}

/// A reply's payload inside an upstream frame.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    Result(&'a RawValue),
    Error(&'a RawValue),
    /// A reply to one of our ids with neither a `result` nor a well-formed `error`
    /// object: its caller is told at once rather than left to time out.
    Invalid,
}

/// What an `error` member must hold: an integer code and a string message.
#[derive(Deserialize)]
struct WireError<'a> {
    #[allow(dead_code)] // Read only to check it is an integer.
    code: i64,
    #[serde(borrow)]
    message: &'a RawValue,
}

fn well_formed_error(error: &RawValue) -> bool {
    serde_json::from_str::<WireError<'_>>(error.get())
        .is_ok_and(|e| e.message.get().starts_with('"'))
}

/// What an upstream frame held, for counting what could not be matched.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    /// Replies handed to the callback.
    pub replies: usize,
    /// Notifications and server requests, handed to the callback.
    pub pushed: usize,
    /// Replies to ids that are not ours.
    pub unsolicited: usize,
    /// Not JSON, or JSON that is no JSON-RPC message.
    pub garbage: usize,
}

/// A message the upstream sent on its own: a notification (no `id`) or a request to
/// the client (`id` and `method`), as the upstream wrote it.
#[derive(Debug, Clone, Copy)]
pub struct Pushed<'a> {
    /// The whole message's text.
    pub text: &'a str,
    pub method: &'a RawValue,
    pub id: Option<&'a RawValue>,
}

/// One message of an upstream frame.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    /// A reply to one of our numeric ids.
    Reply(u64, Outcome<'a>),
    Pushed(Pushed<'a>),
}

/// Reads an upstream frame (one message or a batch of them) and calls `on_message` with
/// each reply's numeric id and payload, and each message the upstream pushed. Never
/// fails: what it can't use is counted.
pub fn read_upstream<'a>(frame: &'a str, mut on_message: impl FnMut(Message<'a>)) -> Inbound {
    let mut seen = Inbound::default();
    if first_byte(frame.as_bytes()) == Some(b'[') {
        match serde_json::from_str::<Vec<&'a RawValue>>(frame) {
            Ok(items) => {
                for item in items {
                    read_one(item.get(), &mut on_message, &mut seen);
                }
            }
            Err(_) => seen.garbage += 1,
        }
    } else {
        read_one(frame, &mut on_message, &mut seen);
    }
    seen
}

fn read_one<'a>(text: &'a str, on_message: &mut impl FnMut(Message<'a>), seen: &mut Inbound) {
    let Ok(wire) = serde_json::from_str::<WireReply<'a>>(text) else {
        seen.garbage += 1;
        return;
    };
    if let Some(method) = wire
        .method
        .or(wire.notification.filter(|_| wire.id.is_none()))
    {
        if !method.get().starts_with('"') {
            seen.garbage += 1;
            return;
        }
        seen.pushed += 1;
        on_message(Message::Pushed(Pushed {
            text: text.trim(),
            method,
            id: wire.id,
        }));
        return;
    }
    let outcome = match (wire.error, wire.result) {
        (Some(e), _) if e.get() != "null" => match well_formed_error(e) {
            true => Outcome::Error(e),
            false => Outcome::Invalid,
        },
        (_, Some(r)) => Outcome::Result(r),
        _ => Outcome::Invalid,
    };
    match wire.id.and_then(|id| parse_our_id(id.get())) {
        Some(id) => {
            seen.replies += 1;
            on_message(Message::Reply(id, outcome));
        }
        // Answers nobody, and is not JSON-RPC either.
        None if matches!(outcome, Outcome::Invalid) => seen.garbage += 1,
        None => seen.unsolicited += 1,
    }
}

/// Our ids are u64 numbers; some servers echo them back as strings.
fn parse_our_id(text: &str) -> Option<u64> {
    let digits = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    digits.parse().ok()
}

impl<'a> Outcome<'a> {
    pub fn is_error(&self) -> bool {
        matches!(self, Outcome::Error(_))
    }

    /// The raw `result` or `error`; none for an invalid reply.
    pub fn payload(&self) -> Option<&'a RawValue> {
        match self {
            Outcome::Result(r) | Outcome::Error(r) => Some(r),
            Outcome::Invalid => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_frames() {
        let mut got = Vec::new();
        let seen = read_upstream(
            r#"[{"jsonrpc":"2.0","id":1,"result":null},{"jsonrpc":"2.0","id":"2","error":{"code":1,"message":"m","data":[1]}},{"jsonrpc":"2.0","method":"note"},{"jsonrpc":"2.0","id":"zz","result":1},{"nope":1}]"#,
            |m| match m {
                Message::Reply(id, o) => got.push((id, o)),
                Message::Pushed(p) => assert_eq!(p.method.get(), r#""note""#),
            },
        );
        assert_eq!(
            seen,
            Inbound {
                replies: 2,
                pushed: 1,
                unsolicited: 1,
                garbage: 1
            }
        );
        assert_eq!(got[0].0, 1);
        assert!(matches!(got[0].1, Outcome::Result(r) if r.get() == "null"));
        assert!(matches!(got[1].1, Outcome::Error(_)));
        assert_eq!(read_upstream("garbage", |_| {}).garbage, 1);
        assert_eq!(read_upstream("[garbage", |_| {}).garbage, 1);
    }

    #[test]
    fn a_reply_to_our_id_without_a_result_or_a_proper_error_is_invalid() {
        for reply in [
            r#"{"jsonrpc":"2.0","id":7}"#,
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":1}}"#,
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":"1","message":"m"}}"#,
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":1.5,"message":"m"}}"#,
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":1,"message":2}}"#,
            r#"{"jsonrpc":"2.0","id":7,"error":"boom"}"#,
        ] {
            let mut got = Vec::new();
            let seen = read_upstream(reply, |m| {
                if let Message::Reply(id, o) = m {
                    got.push((id, o))
                }
            });
            assert_eq!(seen.replies, 1, "{reply}");
            assert!(matches!(got[..], [(7, Outcome::Invalid)]), "{reply}");
        }
    }
}

#[cfg(test)]
mod pushed_tests {
    use super::*;

    #[test]
    fn notifications_and_server_requests_come_out_whole() {
        let frame = r#"[{"jsonrpc":"2.0","method":"eth_subscription","params":{"subscription":"0x1","result":{}}} , {"jsonrpc":"2.0","id":"q1","method":"confirm","params":[1]},{"jsonrpc":"2.0","method":5}]"#;
        let mut got = Vec::new();
        let seen = read_upstream(frame, |m| {
            if let Message::Pushed(p) = m {
                got.push((p.text, p.id.map(RawValue::get)))
            }
        });
        assert_eq!(seen.pushed, 2);
        assert_eq!(seen.garbage, 1, "a method that is not a string");
        assert_eq!(
            got[0].0,
            r#"{"jsonrpc":"2.0","method":"eth_subscription","params":{"subscription":"0x1","result":{}}}"#
        );
        assert_eq!(got[0].1, None);
        assert_eq!(got[1].1, Some(r#""q1""#));
    }

    #[test]
    fn an_rpc_websockets_event_is_a_push_not_garbage() {
        let frame = r#"{"notification":"feedUpdated","params":[1]}"#;
        let mut got = Vec::new();
        let seen = read_upstream(frame, |m| {
            if let Message::Pushed(p) = m {
                got.push(p.method.get().to_string())
            }
        });
        assert_eq!((seen.pushed, seen.garbage), (1, 0));
        assert_eq!(got, [r#""feedUpdated""#]);
    }
}
