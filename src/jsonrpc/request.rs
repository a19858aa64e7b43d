//! A client's JSON-RPC body: parsed into borrowed calls, validated, and each call's
//! upstream frame started (its id is the connection's to add).

use super::{first_byte, present};
use crate::error::Error;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// One well-formed request object from a client.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// `None` for a notification (no `id` member at all; `"id": null` is a call).
    pub id: Option<&'a RawValue>,
    /// The method as raw JSON text, a string literal with its quotes and escapes.
    pub method: &'a RawValue,
    pub params: Option<&'a RawValue>,
}

/// A request object that is valid JSON but not a valid JSON-RPC 2.0 request.
#[derive(Debug, Clone, Copy)]
pub struct Invalid<'a> {
    /// The request's id when it could still be read, so the error can carry it.
    pub id: Option<&'a RawValue>,
    pub reason: &'static str,
}

pub type Entry<'a> = Result<Call<'a>, Invalid<'a>>;

/// A parsed HTTP body.
#[derive(Debug)]
pub enum Body<'a> {
    Single(Entry<'a>),
    Batch(Vec<Entry<'a>>),
}

/// Fields we read from a request; others are ignored, as the spec allows extensions.
#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(borrow, default)]
    jsonrpc: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    params: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireId<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// Parses a client's HTTP body into calls.
///
/// Returns `Err` only when the body as a whole is unusable (not JSON, empty batch,
/// batch too large); a bad element inside a batch becomes that element's `Invalid`.
/// The members a client's answer to an upstream request has.
#[derive(Deserialize)]
struct WireAnswer<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    result: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<&'a RawValue>,
}

/// When `body` is a JSON-RPC response (an `id` with a `result` or an `error`, no
/// `method`): a client answering a request its upstream sent. Its id.
pub fn parse_answer(body: &[u8]) -> Option<&RawValue> {
    let wire: WireAnswer<'_> = serde_json::from_slice(body).ok()?;
    match (wire.method, wire.id, wire.result.or(wire.error)) {
        (None, Some(id), Some(_)) if id.get() != "null" => Some(id),
        _ => None,
    }
}

pub fn parse_body(body: &[u8], max_batch_size: usize) -> Result<Body<'_>, Error> {
    match first_byte(body) {
        Some(b'[') => {
            let elements: Vec<&RawValue> =
                serde_json::from_slice(body).map_err(|e| Error::Parse(e.to_string()))?;
            if elements.is_empty() {
                return Err(Error::InvalidRequest("empty batch"));
            }
            if elements.len() > max_batch_size {
                return Err(Error::BatchTooLarge {
                    size: elements.len(),
                    max: max_batch_size,
                });
            }
            Ok(Body::Batch(
                elements
                    .into_iter()
                    .map(|raw| parse_entry(raw.get().as_bytes()))
                    .collect(),
            ))
        }
        Some(_) => {
            match serde_json::from_slice::<WireRequest<'_>>(body) {
                Ok(wire) => Ok(Body::Single(validate(wire, body))),
                // A type mismatch may hide a later syntax error; only a body that is JSON
                // throughout is an invalid request rather than a parse error.
                Err(e) if e.is_data() => {
                    match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                        Ok(_) => Ok(Body::Single(Err(Invalid {
                            id: read_id(body),
                            reason: "a request must be an object with \"jsonrpc\":\"2.0\" and a string \"method\"",
                        }))),
                        Err(e) => Err(Error::Parse(e.to_string())),
                    }
                }
                Err(e) => Err(Error::Parse(e.to_string())),
            }
        }
        None => Err(Error::Parse("empty body".into())),
    }
}

/// Parses one batch element, already known to be valid JSON.
fn parse_entry(element: &[u8]) -> Entry<'_> {
    match serde_json::from_slice::<WireRequest<'_>>(element) {
        Ok(wire) => validate(wire, element),
        Err(_) => Err(Invalid {
            id: read_id(element),
            reason: "a request must be an object with \"jsonrpc\":\"2.0\" and a string \"method\"",
        }),
    }
}

fn read_id(bytes: &[u8]) -> Option<&RawValue> {
    serde_json::from_slice::<WireId<'_>>(bytes)
        .ok()
        .and_then(|w| w.id)
        .filter(|id| valid_id(id))
}

fn valid_id(id: &RawValue) -> bool {
    matches!(id.get().as_bytes()[0], b'"' | b'-' | b'0'..=b'9') || id.get() == "null"
}

fn validate<'a>(wire: WireRequest<'a>, _body: &'a [u8]) -> Entry<'a> {
    let id = wire.id;
    let invalid = |reason| {
        Err(Invalid {
            id: id.filter(|i| valid_id(i)),
            reason,
        })
    };
    match wire.jsonrpc {
        Some(v) if v.get() == "\"2.0\"" => {}
        Some(v) if serde_json::from_str::<Cow<'_, str>>(v.get()).is_ok_and(|s| s == "2.0") => {}
        _ => return invalid("\"jsonrpc\" must be exactly \"2.0\""),
    }
    let Some(method) = wire.method.filter(|m| m.get().starts_with('"')) else {
        return invalid("\"method\" must be a string");
    };
    if let Some(params) = wire.params
        && !matches!(params.get().as_bytes()[0], b'[' | b'{')
    {
        return invalid("\"params\" must be an array or an object");
    }
    if let Some(id) = id
        && !valid_id(id)
    {
        return Err(Invalid {
            id: None,
            reason: "\"id\" must be a string, a number or null",
        });
    }
    Ok(Call {
        id,
        method,
        params: wire.params,
    })
}

impl<'a> Call<'a> {
    pub fn is_notification(&self) -> bool {
        self.id.is_none()
    }

    /// The method name, unescaped (borrowed unless it contains escapes).
    pub fn method_name(&self) -> Cow<'a, str> {
        let raw = self.method.get();
        let inner = &raw[1..raw.len() - 1];
        if inner.contains('\\') {
            serde_json::from_str::<String>(raw)
                .map(Cow::Owned)
                .unwrap_or(Cow::Borrowed(inner))
        } else {
            Cow::Borrowed(inner)
        }
    }

    /// Appends the upstream frame for this call, minus its closing: the connection that
    /// sends it appends the id it chose with [`finish_frame`](super::finish_frame). Putting `id` last lets the
    /// frame be built before the connection is known, with one allocation.
    pub fn encode_prefix(&self, out: &mut String) {
        out.push_str(r#"{"jsonrpc":"2.0","method":"#);
        out.push_str(self.method.get());
        if let Some(params) = self.params {
            out.push_str(r#","params":"#);
            out.push_str(params.get());
        }
    }

    /// Bytes needed for the whole frame, so the buffer is allocated once.
    pub fn frame_len_hint(&self) -> usize {
        40 + self.method.get().len() + self.params.map_or(0, |p| p.get().len()) + 30
    }
}

/// A call with its parts owned, to outlive the request body.
pub struct OwnedCall {
    id: Option<Box<RawValue>>,
    method: Box<RawValue>,
    params: Option<Box<RawValue>>,
}

impl OwnedCall {
    pub fn of(call: &Call<'_>) -> OwnedCall {
        OwnedCall {
            id: call.id.map(ToOwned::to_owned),
            method: call.method.to_owned(),
            params: call.params.map(ToOwned::to_owned),
        }
    }

    pub fn call(&self) -> Call<'_> {
        Call {
            id: self.id.as_deref(),
            method: &self.method,
            params: self.params.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{finish_frame, read_upstream, write_reply};
    use super::*;

    fn single(body: &str) -> Entry<'_> {
        match parse_body(body.as_bytes(), 100).expect("parses") {
            Body::Single(e) => e,
            Body::Batch(_) => panic!("expected a single call"),
        }
    }

    #[test]
    fn notification_vs_null_id() {
        let n = single(r#"{"jsonrpc":"2.0","method":"m"}"#).unwrap();
        assert!(n.is_notification());
        let c = single(r#"{"jsonrpc":"2.0","method":"m","id":null}"#).unwrap();
        assert_eq!(c.id.map(|i| i.get()), Some("null"));
    }

    #[test]
    fn frame_rewrites_id_and_keeps_params_raw() {
        let call =
            single(r#"{"id":"x","params":{"a" : 1.50},"method":"a\"b","jsonrpc":"2.0"}"#).unwrap();
        let mut frame = String::new();
        call.encode_prefix(&mut frame);
        finish_frame(&mut frame, Some(42));
        assert_eq!(
            frame,
            r#"{"jsonrpc":"2.0","method":"a\"b","params":{"a" : 1.50},"id":42}"#
        );
        assert_eq!(call.method_name(), "a\"b");
        let mut note = String::new();
        call.encode_prefix(&mut note);
        finish_frame(&mut note, None);
        assert!(!note.contains("\"id\""));
    }

    #[test]
    fn malformed_json_is_a_parse_error() {
        for body in [
            "",
            "   ",
            "{",
            r#"{"jsonrpc":"2.0","method":1,"#,
            "[1,",
            "nul",
        ] {
            let err = parse_body(body.as_bytes(), 100).unwrap_err();
            assert_eq!(err.code(), -32700, "body {body:?}");
        }
    }

    #[test]
    fn invalid_objects_are_invalid_requests() {
        for body in [
            r#"{"jsonrpc":"1.0","method":"m","id":1}"#,
            r#"{"method":"m","id":1}"#,
            r#"{"jsonrpc":"2.0","method":5,"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"m","params":3,"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"m","id":{}}"#,
            r#"{"jsonrpc":"2.0","method":"m","id":true}"#,
            "5",
            r#""str""#,
        ] {
            let invalid = single(body).unwrap_err();
            assert!(!invalid.reason.is_empty(), "body {body}");
        }
        // The id is kept when it is readable.
        let inv = single(r#"{"jsonrpc":"2.0","method":5,"id":"k"}"#).unwrap_err();
        assert_eq!(inv.id.map(|i| i.get()), Some(r#""k""#));
        let inv = single(r#"{"jsonrpc":"2.0","method":"m","id":[1]}"#).unwrap_err();
        assert!(inv.id.is_none());
    }

    #[test]
    fn batches() {
        assert_eq!(parse_body(b"[]", 100).unwrap_err().code(), -32600);
        assert_eq!(
            parse_body(b"[1,2,3]", 2).unwrap_err(),
            Error::BatchTooLarge { size: 3, max: 2 }
        );
        let Body::Batch(items) = parse_body(
            br#"[{"jsonrpc":"2.0","method":"a","id":1}, 7, {"jsonrpc":"2.0","method":"n"}]"#,
            10,
        )
        .unwrap() else {
            panic!("expected batch")
        };
        assert_eq!(items.len(), 3);
        assert!(items[0].is_ok());
        assert!(items[1].is_err());
        assert!(items[2].as_ref().unwrap().is_notification());
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
            read_upstream(upstream_reply, |m| {
                let super::super::Message::Reply(our, outcome) = m else {
                    panic!("a reply, not {m:?}");
                };
                assert_eq!(our, 7);
                write_reply(
                    &mut out,
                    call.id.unwrap(),
                    outcome.is_error(),
                    outcome.payload().map_or("null", |p| p.get()),
                );
            });
            let expected = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":[1]}}"#);
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
