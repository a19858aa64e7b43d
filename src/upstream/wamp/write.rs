//! Writing WAMP messages a caller, subscriber and publisher sends, and the JSON-RPC
//! mapping of params, results and errors. Each writer appends one whole message.

use super::codec::{Payload, json_str};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt::Write as _;

fn push_json_str(out: &mut String, s: &str) {
    // A &str always serializes.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

fn push_id(out: &mut String, id: u64) {
    out.push_str(itoa::Buffer::new().format(id));
}

/// How a session authenticates in its HELLO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HelloAuth<'a> {
    /// `authmethods`, in order of preference (e.g. `["wampcra"]`, `["ticket"]`); empty:
    /// anonymous, and no `authmethods` is sent.
    pub methods: &'a [&'a str],
    pub authid: Option<&'a str>,
}

/// HELLO, announcing the roles a gateway's session plays (caller, subscriber,
/// publisher) and the features it relies on: call canceling for timeouts.
pub fn write_hello(out: &mut String, realm: &str, auth: HelloAuth<'_>) {
    out.push_str("[1,");
    push_json_str(out, realm);
    out.push_str(
        r#",{"agent":"rpcgate","roles":{"caller":{"features":{"call_canceling":true}},"subscriber":{"features":{"pattern_based_subscription":true}},"publisher":{"features":{"publisher_exclusion":true}}}"#,
    );
    if !auth.methods.is_empty() {
        out.push_str(r#","authmethods":["#);
        for (i, m) in auth.methods.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_str(out, m);
        }
        out.push(']');
    }
    if let Some(authid) = auth.authid {
        out.push_str(r#","authid":"#);
        push_json_str(out, authid);
    }
    out.push_str("}]");
}

/// AUTHENTICATE: a ticket, or a WAMP-CRA signature ([`cra_sign`]).
pub fn write_authenticate(out: &mut String, signature: &str) {
    out.push_str("[5,");
    push_json_str(out, signature);
    out.push_str(",{}]");
}

/// The GOODBYE a caller starts on shutdown.
pub const CLOSE_SHUTDOWN: &str = "wamp.close.system_shutdown";
/// The reason to answer a router's GOODBYE with.
pub const CLOSE_GOODBYE_AND_OUT: &str = "wamp.close.goodbye_and_out";

pub fn write_goodbye(out: &mut String, reason: &str) {
    out.push_str("[6,{},");
    push_json_str(out, reason);
    out.push(']');
}

/// Method names to procedure URIs: identity, or behind a configured prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Procedures {
    /// The prefix, JSON-escaped once here so that a call only splices bytes.
    escaped_prefix: String,
}

impl Procedures {
    pub fn new(prefix: &str) -> Procedures {
        let quoted = serde_json::to_string(prefix).unwrap_or_default();
        Procedures {
            escaped_prefix: quoted[1..quoted.len() - 1].to_owned(),
        }
    }

    /// Appends the procedure URI for `method` (a JSON string, as parsed from the
    /// client's body) as a JSON string. `false` if `method` is not a string.
    pub fn write(&self, out: &mut String, method: &RawValue) -> bool {
        let m = method.get();
        if !(m.len() >= 2 && m.starts_with('"') && m.ends_with('"')) {
            return false;
        }
        out.push('"');
        out.push_str(&self.escaped_prefix);
        out.push_str(&m[1..]);
        true
    }
}

/// A JSON-RPC call's params as WAMP's payload: an array is `Arguments`, an object
/// `ArgumentsKw`, absent or `null` is neither.
pub fn split_params(params: Option<&RawValue>) -> Result<Payload<'_>, InvalidParams> {
    let Some(p) = params else {
        return Ok(Payload::default());
    };
    match p.get().as_bytes().first() {
        Some(b'[') => Ok(Payload {
            args: Some(p),
            kwargs: None,
        }),
        Some(b'{') => Ok(Payload {
            args: None,
            kwargs: Some(p),
        }),
        Some(b'n') => Ok(Payload::default()),
        _ => Err(InvalidParams),
    }
}

/// JSON-RPC params must be an array or an object (spec, 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("params must be an array or an object")]
pub struct InvalidParams;

/// `, Arguments[, ArgumentsKw]`: `Arguments` is written as `[]` when only keywords
/// are given, since WAMP's positions leave no other way.
fn push_payload(out: &mut String, payload: Payload<'_>) {
    match (payload.args, payload.kwargs) {
        (None, None) => {}
        (Some(a), None) => {
            out.push(',');
            out.push_str(a.get());
        }
        (a, Some(k)) => {
            out.push(',');
            out.push_str(a.map_or("[]", RawValue::get));
            out.push(',');
            out.push_str(k.get());
        }
    }
}

/// CALL. `procedure` is a JSON string (from [`Procedures::write`] into a scratch
/// buffer, or a literal); `options` a JSON object or `None` for `{}`.
pub fn write_call(
    out: &mut String,
    request: u64,
    options: Option<&str>,
    procedure: &str,
    payload: Payload<'_>,
) {
    out.push_str("[48,");
    push_id(out, request);
    out.push(',');
    out.push_str(options.unwrap_or("{}"));
    out.push(',');
    out.push_str(procedure);
    push_payload(out, payload);
    out.push(']');
}

/// How a router treats a canceled call (advanced profile, call canceling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelMode {
    /// The caller gets its ERROR at once; the callee is not told.
    Skip,
    /// The callee is interrupted; the caller's ERROR waits for the callee's.
    Kill,
    /// The callee is interrupted and the caller gets its ERROR at once.
    KillNoWait,
}

pub fn write_cancel(out: &mut String, request: u64, mode: CancelMode) {
    out.push_str("[49,");
    push_id(out, request);
    out.push_str(match mode {
        CancelMode::Skip => r#",{"mode":"skip"}]"#,
        CancelMode::Kill => r#",{"mode":"kill"}]"#,
        CancelMode::KillNoWait => r#",{"mode":"killnowait"}]"#,
    });
}

/// SUBSCRIBE. `topic` is a JSON string; `options` a JSON object (`{"match":"prefix"}`)
/// or `None` for `{}`.
pub fn write_subscribe(out: &mut String, request: u64, options: Option<&str>, topic: &str) {
    out.push_str("[32,");
    push_id(out, request);
    out.push(',');
    out.push_str(options.unwrap_or("{}"));
    out.push(',');
    out.push_str(topic);
    out.push(']');
}

pub fn write_unsubscribe(out: &mut String, request: u64, subscription: u64) {
    out.push_str("[34,");
    push_id(out, request);
    out.push(',');
    push_id(out, subscription);
    out.push(']');
}

/// PUBLISH; with `acknowledge` the router answers PUBLISHED (or ERROR), without it
/// nothing at all. Always with `exclude_me: false`: WAMP's default leaves the
/// publishing session out, but a gateway's session carries many clients, and one of
/// them may be subscribed to what another publishes.
pub fn write_publish(
    out: &mut String,
    request: u64,
    acknowledge: bool,
    topic: &str,
    payload: Payload<'_>,
) {
    out.push_str("[16,");
    push_id(out, request);
    out.push_str(if acknowledge {
        r#",{"acknowledge":true,"exclude_me":false},"#
    } else {
        r#",{"exclude_me":false},"#
    });
    out.push_str(topic);
    push_payload(out, payload);
    out.push(']');
}

// ---------------------------------------------------------------------------------
// Answers as JSON-RPC.

/// A RESULT's (or EVENT's) payload as a JSON-RPC `result`: one positional argument
/// is that argument, several are the array, keyword results alone are the object,
/// nothing is `null`. Both positional and keyword results (rare: Autobahn's
/// `CallResult(1, 2, a=3)`) become `{"args":[...],"kwargs":{...}}`, losing neither.
/// Borrowed from the frame in every case but that last one.
pub fn result_json<'a>(payload: Payload<'a>) -> Cow<'a, str> {
    let args = payload.args.filter(|a| !is_empty_container(a));
    let kwargs = payload.kwargs.filter(|k| !is_empty_container(k));
    match (args, kwargs) {
        (None, None) => Cow::Borrowed("null"),
        (Some(a), None) => match serde_json::from_str::<Vec<&RawValue>>(a.get()) {
            Ok(items) if items.len() == 1 => Cow::Borrowed(items[0].get()),
            _ => Cow::Borrowed(a.get()),
        },
        (None, Some(k)) => Cow::Borrowed(k.get()),
        (Some(a), Some(k)) => Cow::Owned(format!(r#"{{"args":{},"kwargs":{}}}"#, a.get(), k.get())),
    }
}

fn is_empty_container(raw: &RawValue) -> bool {
    let inner = raw
        .get()
        .get(1..raw.get().len().saturating_sub(1))
        .unwrap_or("");
    inner.trim().is_empty()
}

/// The JSON-RPC code for a WAMP error URI: the router's "no such procedure" and
/// "invalid argument" have JSON-RPC equivalents; anything else is the callee's own
/// failure, -32000 as most services use for theirs.
pub fn error_code(error: &str) -> i32 {
    match error {
        "wamp.error.no_such_procedure" => -32601,
        "wamp.error.invalid_argument" => -32602,
        _ => -32000,
    }
}

/// Appends a JSON-RPC error object for a WAMP ERROR: its `message` is the error URI,
/// followed by the first argument when that is a string (Autobahn's
/// `ApplicationError(uri, "what happened")`), and its `data` is
/// `{"uri": ..., "args": [...], "kwargs": {...}}` with whichever of the two were sent.
pub fn write_error_object(out: &mut String, error: &str, payload: Payload<'_>) {
    let first = payload
        .args
        .and_then(|a| serde_json::from_str::<Vec<&RawValue>>(a.get()).ok())
        .and_then(|items| {
            items
                .first()
                .copied()
                .and_then(json_str)
                .map(Cow::into_owned)
        });
    out.push_str(r#"{"code":"#);
    let _ = write!(out, "{}", error_code(error));
    out.push_str(r#","message":"#);
    match first {
        Some(text) => push_json_str(out, &format!("{error}: {text}")),
        None => push_json_str(out, error),
    }
    out.push_str(r#","data":{"uri":"#);
    push_json_str(out, error);
    if let Some(a) = payload.args {
        out.push_str(r#","args":"#);
        out.push_str(a.get());
    }
    if let Some(k) = payload.kwargs {
        out.push_str(r#","kwargs":"#);
        out.push_str(k.get());
    }
    out.push_str("}}");
}
