//! JSON-RPC on the wire: reading one request object and writing replies, borrowing
//! ids, params and results as raw text so they go back out byte for byte.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny};
use serde_json::value::RawValue;

pub(crate) const PARSE_ERROR: i32 = -32700;
pub(crate) const INVALID_REQUEST: i32 = -32600;
pub(crate) const METHOD_NOT_FOUND: i32 = -32601;
pub(crate) const INVALID_PARAMS: i32 = -32602;
pub(crate) const REQUESTED_FAILURE: i32 = -32000;
/// A per-connection limit (subscriptions, waiting `ask`s) is reached.
pub(crate) const LIMIT_REACHED: i32 = -32000;
/// The client answered our `confirm` request with an error object.
pub(crate) const CLIENT_REFUSED: i32 = -32001;
/// The client did not answer our `confirm` request in time.
pub(crate) const NO_ANSWER: i32 = -32002;

/// The reply to one call, borrowing from the request (and from the `Backend`).
pub(crate) struct Reply<'a> {
    /// Raw JSON text of the request's id, or `null` when it could not be read.
    pub(crate) id: &'a str,
    pub(crate) outcome: Outcome<'a>,
}

pub(crate) enum Outcome<'a> {
    /// Raw JSON text of the result.
    Raw(&'a str),
    /// Raw JSON text made for this reply, such as a new subscription id.
    Owned(String),
    Int(i64),
    Float(f64),
    Error {
        code: i32,
        /// Written without escaping, so it must be plain ASCII without quotes.
        message: &'static str,
        /// Raw JSON text.
        data: Option<&'a str>,
    },
    /// An error whose message comes from a peer, so it is escaped when written.
    Relayed {
        code: i32,
        message: String,
        /// Raw JSON text.
        data: Option<&'a str>,
    },
}

impl Outcome<'_> {
    pub(crate) fn error(code: i32, message: &'static str) -> Self {
        Outcome::Error {
            code,
            message,
            data: None,
        }
    }
}

/// The members of a request object that we read; others are ignored.
#[derive(Deserialize)]
pub(crate) struct Request<'a> {
    #[serde(borrow)]
    pub(crate) jsonrpc: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) method: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub(crate) params: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub(crate) id: Option<&'a RawValue>,
}

/// What is left to read of a request that is not valid: its id, so the error can carry it.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// A member that is present, even as `null`, becomes `Some`: a plain
/// `Option<&RawValue>` would read `"id": null` as a notification.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// The spec allows a string, a number or null as an id.
pub(crate) fn valid_id(id: &RawValue) -> bool {
    matches!(
        id.get().as_bytes().first(),
        Some(b'"' | b'-' | b'0'..=b'9' | b'n')
    )
}

/// The reply to text that did not parse as a request object.
pub(crate) fn invalid<'a>(text: &'a str, error: &serde_json::Error) -> Reply<'a> {
    // serde stops at the first member of the wrong type, so a data error does not
    // prove that the rest of the text is JSON; only a full parse tells.
    if !error.is_data() || serde_json::from_str::<IgnoredAny>(text).is_err() {
        return Reply {
            id: "null",
            outcome: Outcome::error(PARSE_ERROR, "parse error"),
        };
    }
    // Answering with the id when it can still be read lets a multiplexing client
    // route the error back to whoever sent the request.
    let id = serde_json::from_str::<IdOnly<'_>>(text)
        .ok()
        .and_then(|r| r.id)
        .filter(|id| valid_id(id))
        .map_or("null", RawValue::get);
    Reply {
        id,
        outcome: Outcome::error(
            INVALID_REQUEST,
            "invalid request: expected an object with jsonrpc, method and optional params and id",
        ),
    }
}

pub(crate) fn single(reply: &Reply<'_>) -> String {
    let payload = match &reply.outcome {
        Outcome::Raw(raw) => raw.len(),
        Outcome::Owned(raw) => raw.len(),
        Outcome::Error { data, .. } => data.map_or(0, str::len),
        Outcome::Relayed { message, data, .. } => message.len() + data.map_or(0, str::len),
        Outcome::Int(_) | Outcome::Float(_) => 0,
    };
    // Envelope, message and number fit in the 96; sized up front so a large echo is one allocation.
    let mut buf = String::with_capacity(96 + reply.id.len() + payload);
    write_reply(&mut buf, reply);
    buf
}

pub(crate) fn write_reply(buf: &mut String, reply: &Reply<'_>) {
    buf.push_str(r#"{"jsonrpc":"2.0","id":"#);
    buf.push_str(reply.id);
    match &reply.outcome {
        Outcome::Raw(raw) => {
            buf.push_str(r#","result":"#);
            buf.push_str(raw);
        }
        Outcome::Owned(raw) => {
            buf.push_str(r#","result":"#);
            buf.push_str(raw);
        }
        Outcome::Int(n) => {
            buf.push_str(r#","result":"#);
            buf.push_str(itoa::Buffer::new().format(*n));
        }
        Outcome::Float(f) => {
            buf.push_str(r#","result":"#);
            match serde_json::Number::from_f64(*f) {
                // Writing to a String cannot fail.
                Some(n) => {
                    let _ = write!(buf, "{n}");
                }
                // `sum` never produces a non-finite float; keep the reply valid JSON anyway.
                None => buf.push_str("null"),
            }
        }
        Outcome::Error {
            code,
            message,
            data,
        } => {
            buf.push_str(r#","error":{"code":"#);
            buf.push_str(itoa::Buffer::new().format(*code));
            buf.push_str(r#","message":""#);
            buf.push_str(message);
            buf.push('"');
            write_data(buf, *data);
        }
        Outcome::Relayed {
            code,
            message,
            data,
        } => {
            buf.push_str(r#","error":{"code":"#);
            buf.push_str(itoa::Buffer::new().format(*code));
            buf.push_str(r#","message":"#);
            // Display on a `Value` escapes and cannot fail, unlike `to_string`'s `Result`.
            let _ = write!(buf, "{}", serde_json::Value::from(message.as_str()));
            write_data(buf, *data);
        }
    }
    buf.push('}');
}

/// The optional `data` member and the end of an error object.
fn write_data(buf: &mut String, data: Option<&str>) {
    if let Some(data) = data {
        buf.push_str(r#","data":"#);
        buf.push_str(data);
    }
    buf.push('}');
}

pub(crate) fn notification(params: Option<&str>) -> String {
    let params = params.unwrap_or("null");
    let mut buf = String::with_capacity(64 + params.len());
    buf.push_str(r#"{"jsonrpc":"2.0","method":"notification","params":"#);
    buf.push_str(params);
    buf.push('}');
    buf
}

/// `notify_me`'s notice: its params, already checked to be one-element array, as sent.
pub(crate) fn notice(params: &str) -> String {
    let mut buf = String::with_capacity(48 + params.len());
    buf.push_str(r#"{"jsonrpc":"2.0","method":"notice","params":"#);
    buf.push_str(params);
    buf.push('}');
    buf
}

/// One tick of a `ticks_subscribe` subscription, in the jsonrpsee/Substrate shape
/// (`params.subscription` + `params.result`) that gateways route by.
pub(crate) fn tick(subscription: &str, n: u64) -> String {
    let mut buf = String::with_capacity(96 + subscription.len());
    buf.push_str(r#"{"jsonrpc":"2.0","method":"ticks","params":{"subscription":"#);
    buf.push_str(subscription);
    buf.push_str(r#","result":"#);
    buf.push_str(itoa::Buffer::new().format(n));
    buf.push_str("}}");
    buf
}

/// The request `ask` sends the client: `id` is a JSON string literal, `params` the
/// `ask` call's own params as sent.
pub(crate) fn confirm(id: &str, params: &str) -> String {
    let mut buf = String::with_capacity(64 + id.len() + params.len());
    buf.push_str(r#"{"jsonrpc":"2.0","id":"#);
    buf.push_str(id);
    buf.push_str(r#","method":"confirm","params":"#);
    buf.push_str(params);
    buf.push('}');
    buf
}

/// The members of a response object from the client (to our `confirm`).
#[derive(Deserialize)]
pub(crate) struct Response<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    pub(crate) id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub(crate) result: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub(crate) error: Option<&'a RawValue>,
    /// Only to tell a response from a request whose `method` has the wrong type.
    #[serde(default)]
    method: Option<IgnoredAny>,
}

impl<'a> Response<'a> {
    /// Reads `text` as a response: an object with an id and a result or an error but no
    /// method. Only tried on text that did not read as a request, so calls pay nothing.
    pub(crate) fn parse(text: &'a str) -> Option<Self> {
        let response = serde_json::from_str::<Response<'a>>(text).ok()?;
        let is_response = response.method.is_none()
            && response.id.is_some()
            && (response.result.is_some() || response.error.is_some());
        is_response.then_some(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::tests::{backend, error, reply, result, session};

    #[test]
    fn ids_come_back_exactly() {
        for id in [
            r#""abc""#,
            "1.5",
            "12345678901234567890123",
            "null",
            r#""\u00e9""#,
            "-0",
            "1e3",
        ] {
            let request = format!(r#"{{"id": {id} ,"jsonrpc":"2.0","method":"echo","params":[]}}"#);
            assert_eq!(reply(&request), result(id, "[]"), "id {id}");
        }
    }

    #[test]
    fn malformed_json_is_a_parse_error_with_null_id() {
        for request in [
            "",
            "{",
            r#"{"jsonrpc":"2.0","id":1,"method":"echo""#,
            r#"{"jsonrpc":"2.0","id":1,"method":"echo"} x"#,
            r#"{"jsonrpc":"2.0","id":1,"method":5,]"#,
            "[1,",
            "nul",
        ] {
            assert!(
                error("null", PARSE_ERROR)(&reply(request)),
                "{request:?}: {}",
                reply(request)
            );
        }
        let out = backend().dispatch_bytes(b"\xff\xfe", &mut session());
        assert!(error("null", PARSE_ERROR)(
            out.reply.as_deref().unwrap_or_default()
        ));
    }

    #[test]
    fn invalid_requests_keep_their_id_when_readable() {
        for (request, id) in [
            (r#"{"jsonrpc":"2.0","id":4,"method":5}"#, "4"),
            (r#"{"jsonrpc":"1.0","id":"x","method":"echo"}"#, r#""x""#),
            (r#"{"id":4,"method":"echo"}"#, "4"),
            (r#"{"jsonrpc":"2.0","id":{},"method":"echo"}"#, "null"),
            (r#"{"jsonrpc":"2.0","id":true,"method":"echo"}"#, "null"),
            (r#"{"jsonrpc":"2.0","methd":"echo","id":5}"#, "5"),
            ("42", "null"),
            (r#""text""#, "null"),
        ] {
            assert!(
                error(id, INVALID_REQUEST)(&reply(request)),
                "{request}: {}",
                reply(request)
            );
        }
    }
}
