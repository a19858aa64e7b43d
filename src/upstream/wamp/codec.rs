//! WAMP v2 over `wamp.2.json` (issue 14): the messages a caller, subscriber and
//! publisher exchanges with a router, and the JSON-RPC mapping, as pure functions.
//!
//! No I/O here: the bridge (`bridge.rs`) reads frames with [`parse`], writes them
//! with the `write_*` functions, and turns calls and answers into each other with
//! [`split_params`], [`result_json`] and [`write_error_object`].
//!
//! As in `jsonrpc/`, arguments, keyword arguments, details and options stay borrowed
//! `&RawValue`s: a call's params become its `Arguments` or `ArgumentsKw` byte for byte,
//! and a single result is handed back without being re-serialized.
//!
//! A WAMP id (session, request, subscription, publication) is an integer in 1..=2^53
//! (the spec keeps them exact in an IEEE double); [`parse`] refuses any other.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt::Write as _;

/// `Sec-WebSocket-Protocol` of WAMP with the JSON serializer.
pub const SUBPROTOCOL: &str = "wamp.2.json";

/// The largest WAMP id (2^53): request ids above it must not be sent.
pub const MAX_ID: u64 = 1 << 53;

/// Message type codes (the first element of every message).
pub mod code {
    pub const HELLO: u64 = 1;
    pub const WELCOME: u64 = 2;
    pub const ABORT: u64 = 3;
    pub const CHALLENGE: u64 = 4;
    pub const AUTHENTICATE: u64 = 5;
    pub const GOODBYE: u64 = 6;
    pub const ERROR: u64 = 8;
    pub const PUBLISH: u64 = 16;
    pub const PUBLISHED: u64 = 17;
    pub const SUBSCRIBE: u64 = 32;
    pub const SUBSCRIBED: u64 = 33;
    pub const UNSUBSCRIBE: u64 = 34;
    pub const UNSUBSCRIBED: u64 = 35;
    pub const EVENT: u64 = 36;
    pub const CALL: u64 = 48;
    pub const CANCEL: u64 = 49;
    pub const RESULT: u64 = 50;
}

/// `Arguments|list` and `ArgumentsKw|dict`, as they were on the wire: each is absent,
/// or an array (`args`) / an object (`kwargs`) checked by its first byte only.
#[derive(Debug, Default, Clone, Copy)]
pub struct Payload<'a> {
    pub args: Option<&'a RawValue>,
    pub kwargs: Option<&'a RawValue>,
}

impl PartialEq for Payload<'_> {
    fn eq(&self, other: &Self) -> bool {
        fn text(r: Option<&RawValue>) -> Option<&str> {
            r.map(RawValue::get)
        }
        text(self.args) == text(other.args) && text(self.kwargs) == text(other.kwargs)
    }
}

/// One WAMP message, borrowed from its text frame. URIs are `Cow`s: borrowed unless
/// the frame escaped a character in them.
#[derive(Debug, Clone)]
pub enum Message<'a> {
    Hello {
        realm: Cow<'a, str>,
        details: &'a RawValue,
    },
    Welcome {
        session: u64,
        details: &'a RawValue,
    },
    Abort {
        details: &'a RawValue,
        reason: Cow<'a, str>,
    },
    Challenge {
        authmethod: Cow<'a, str>,
        extra: &'a RawValue,
    },
    Authenticate {
        signature: Cow<'a, str>,
        extra: &'a RawValue,
    },
    Goodbye {
        details: &'a RawValue,
        reason: Cow<'a, str>,
    },
    /// The answer to a request of type `request_type` (CALL, SUBSCRIBE, ...) that failed.
    Error {
        request_type: u64,
        request: u64,
        details: &'a RawValue,
        error: Cow<'a, str>,
        payload: Payload<'a>,
    },
    Publish {
        request: u64,
        options: &'a RawValue,
        topic: Cow<'a, str>,
        payload: Payload<'a>,
    },
    Published {
        request: u64,
        publication: u64,
    },
    Subscribe {
        request: u64,
        options: &'a RawValue,
        topic: Cow<'a, str>,
    },
    Subscribed {
        request: u64,
        subscription: u64,
    },
    Unsubscribe {
        request: u64,
        subscription: u64,
    },
    Unsubscribed {
        request: u64,
    },
    Event {
        subscription: u64,
        publication: u64,
        details: &'a RawValue,
        payload: Payload<'a>,
    },
    Call {
        request: u64,
        options: &'a RawValue,
        procedure: Cow<'a, str>,
        payload: Payload<'a>,
    },
    Cancel {
        request: u64,
        options: &'a RawValue,
    },
    Result {
        request: u64,
        details: &'a RawValue,
        payload: Payload<'a>,
    },
}

/// Why a text frame is not a WAMP message we understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("a WAMP message is a JSON array starting with its type code")]
    NotAMessage,
    /// A type this codec does not read (a callee's REGISTER, INTERRUPT, ...). A caller's
    /// session may ignore it or close; it is not a syntax error.
    #[error("WAMP message type {0} is not supported")]
    Unsupported(u64),
    #[error("WAMP message type {code}: element {index} ({what}) is missing or malformed")]
    Element {
        code: u64,
        index: usize,
        what: &'static str,
    },
    #[error("WAMP message type {code}: {len} elements is too many")]
    TooLong { code: u64, len: usize },
}

/// Reads one text frame.
pub fn parse(frame: &str) -> Result<Message<'_>, ParseError> {
    let items: Vec<&RawValue> = serde_json::from_str(frame).map_err(|_| ParseError::NotAMessage)?;
    let code = items
        .first()
        .and_then(|t| t.get().parse::<u64>().ok())
        .ok_or(ParseError::NotAMessage)?;
    let m = Items {
        code,
        items: &items,
    };
    let max_len = match code {
        code::HELLO | code::WELCOME | code::ABORT | code::CHALLENGE | code::AUTHENTICATE => 3,
        code::GOODBYE | code::CANCEL | code::PUBLISHED | code::SUBSCRIBED => 3,
        code::UNSUBSCRIBE => 3,
        // UNSUBSCRIBED may carry Details (advanced profile: a router-side revocation).
        code::UNSUBSCRIBED => 3,
        code::SUBSCRIBE => 4,
        code::RESULT => 5,
        code::EVENT | code::PUBLISH | code::CALL => 6,
        code::ERROR => 7,
        other => return Err(ParseError::Unsupported(other)),
    };
    if items.len() > max_len {
        return Err(ParseError::TooLong {
            code,
            len: items.len(),
        });
    }
    Ok(match code {
        code::HELLO => Message::Hello {
            realm: m.uri(1, "Realm")?,
            details: m.dict(2, "Details")?,
        },
        code::WELCOME => Message::Welcome {
            session: m.id(1, "Session")?,
            details: m.dict(2, "Details")?,
        },
        code::ABORT => Message::Abort {
            details: m.dict(1, "Details")?,
            reason: m.uri(2, "Reason")?,
        },
        code::CHALLENGE => Message::Challenge {
            authmethod: m.uri(1, "AuthMethod")?,
            extra: m.dict(2, "Extra")?,
        },
        code::AUTHENTICATE => Message::Authenticate {
            signature: m.uri(1, "Signature")?,
            extra: m.dict(2, "Extra")?,
        },
        code::GOODBYE => Message::Goodbye {
            details: m.dict(1, "Details")?,
            reason: m.uri(2, "Reason")?,
        },
        code::ERROR => Message::Error {
            request_type: m.id(1, "REQUEST.Type")?,
            request: m.id(2, "REQUEST.Request")?,
            details: m.dict(3, "Details")?,
            error: m.uri(4, "Error")?,
            payload: m.payload(5)?,
        },
        code::PUBLISH => Message::Publish {
            request: m.id(1, "Request")?,
            options: m.dict(2, "Options")?,
            topic: m.uri(3, "Topic")?,
            payload: m.payload(4)?,
        },
        code::PUBLISHED => Message::Published {
            request: m.id(1, "PUBLISH.Request")?,
            publication: m.id(2, "Publication")?,
        },
        code::SUBSCRIBE => Message::Subscribe {
            request: m.id(1, "Request")?,
            options: m.dict(2, "Options")?,
            topic: m.uri(3, "Topic")?,
        },
        code::SUBSCRIBED => Message::Subscribed {
            request: m.id(1, "SUBSCRIBE.Request")?,
            subscription: m.id(2, "Subscription")?,
        },
        code::UNSUBSCRIBE => Message::Unsubscribe {
            request: m.id(1, "Request")?,
            subscription: m.id(2, "SUBSCRIBED.Subscription")?,
        },
        code::UNSUBSCRIBED => Message::Unsubscribed {
            request: m.id(1, "UNSUBSCRIBE.Request")?,
        },
        code::EVENT => Message::Event {
            subscription: m.id(1, "SUBSCRIBED.Subscription")?,
            publication: m.id(2, "PUBLISHED.Publication")?,
            details: m.dict(3, "Details")?,
            payload: m.payload(4)?,
        },
        code::CALL => Message::Call {
            request: m.id(1, "Request")?,
            options: m.dict(2, "Options")?,
            procedure: m.uri(3, "Procedure")?,
            payload: m.payload(4)?,
        },
        code::CANCEL => Message::Cancel {
            request: m.id(1, "CALL.Request")?,
            options: m.dict(2, "Options")?,
        },
        code::RESULT => Message::Result {
            request: m.id(1, "CALL.Request")?,
            details: m.dict(2, "Details")?,
            payload: m.payload(3)?,
        },
        other => return Err(ParseError::Unsupported(other)),
    })
}

/// The elements of one message, read by position.
struct Items<'a, 'f> {
    code: u64,
    items: &'f [&'a RawValue],
}

impl<'a> Items<'a, '_> {
    fn get(&self, index: usize, what: &'static str) -> Result<&'a RawValue, ParseError> {
        self.items.get(index).copied().ok_or(self.bad(index, what))
    }

    fn bad(&self, index: usize, what: &'static str) -> ParseError {
        ParseError::Element {
            code: self.code,
            index,
            what,
        }
    }

    fn id(&self, index: usize, what: &'static str) -> Result<u64, ParseError> {
        match self.get(index, what)?.get().parse::<u64>() {
            Ok(id) if (1..=MAX_ID).contains(&id) => Ok(id),
            // Request type codes are ids too for this check's purpose: never 0.
            _ => Err(self.bad(index, what)),
        }
    }

    fn uri(&self, index: usize, what: &'static str) -> Result<Cow<'a, str>, ParseError> {
        json_str(self.get(index, what)?).ok_or(self.bad(index, what))
    }

    fn dict(&self, index: usize, what: &'static str) -> Result<&'a RawValue, ParseError> {
        let raw = self.get(index, what)?;
        if raw.get().starts_with('{') {
            Ok(raw)
        } else {
            Err(self.bad(index, what))
        }
    }

    /// `Arguments|list` at `index`, `ArgumentsKw|dict` after it, both optional.
    fn payload(&self, index: usize) -> Result<Payload<'a>, ParseError> {
        let args = match self.items.get(index) {
            None => None,
            Some(a) if a.get().starts_with('[') => Some(*a),
            Some(_) => return Err(self.bad(index, "Arguments")),
        };
        let kwargs = match self.items.get(index + 1) {
            None => None,
            Some(k) if k.get().starts_with('{') => Some(*k),
            Some(_) => return Err(self.bad(index + 1, "ArgumentsKw")),
        };
        Ok(Payload { args, kwargs })
    }
}

/// A JSON string's value, borrowed when it has no escapes.
pub fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    if let Ok(s) = serde_json::from_str::<&str>(raw.get()) {
        return Some(Cow::Borrowed(s));
    }
    serde_json::from_str::<String>(raw.get())
        .ok()
        .map(Cow::Owned)
}

/// `details.message` of an ABORT, GOODBYE or ERROR, if the router gave one: what a
/// log line or a client's error message should quote (Crossbar explains a refused
/// HELLO there, e.g. "no realm \"x\" exists on this router").
pub fn details_message(details: &RawValue) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Details<'a> {
        #[serde(borrow)]
        message: Option<&'a RawValue>,
    }
    let d: Details<'_> = serde_json::from_str(details.get()).ok()?;
    json_str(d.message?)
}

// ---------------------------------------------------------------------------------
// Writers: what a caller sends. Each appends one whole message to `out`.

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

// ---------------------------------------------------------------------------------
// WAMP-CRA (advanced profile, challenge-response authentication).

/// What a `wampcra` CHALLENGE's `extra` carries: the challenge string to sign, and,
/// when the router keeps salted secrets, how to derive the key from ours.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CraChallenge {
    pub challenge: String,
    #[serde(default)]
    pub salt: Option<String>,
    #[serde(default)]
    pub iterations: Option<u32>,
    #[serde(default)]
    pub keylen: Option<usize>,
}

impl CraChallenge {
    pub fn from_extra(extra: &RawValue) -> Result<CraChallenge, serde_json::Error> {
        serde_json::from_str(extra.get())
    }

    /// The signature for AUTHENTICATE: HMAC-SHA256 of the challenge string, keyed
    /// with the secret or, for a salted challenge, with [`derive_key`] of it.
    pub fn sign(&self, secret: &[u8]) -> Result<String, CraError> {
        match &self.salt {
            None => Ok(cra_sign(secret, self.challenge.as_bytes())),
            Some(salt) => {
                // Autobahn's defaults when a salted challenge leaves them out.
                let iterations = self.iterations.unwrap_or(1000);
                let keylen = self.keylen.unwrap_or(32);
                let key = derive_key(secret, salt.as_bytes(), iterations, keylen)?;
                Ok(cra_sign(key.as_bytes(), self.challenge.as_bytes()))
            }
        }
    }
}

/// A salted challenge this side cannot derive a key for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CraError {
    #[error("WAMP-CRA: iterations must be at least 1")]
    NoIterations,
    #[error("WAMP-CRA: keylen {0} is out of range (1..=1024)")]
    KeyLength(usize),
}

/// base64(HMAC-SHA256(key, challenge)).
pub fn cra_sign(key: &[u8], challenge: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, challenge);
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// base64(PBKDF2-HMAC-SHA256(secret, salt, iterations, keylen)): the key a salted
/// challenge is signed with, as Autobahn's `derive_key` computes it (the base64 text,
/// not the raw bytes, is the HMAC key).
pub fn derive_key(
    secret: &[u8],
    salt: &[u8],
    iterations: u32,
    keylen: usize,
) -> Result<String, CraError> {
    let iterations = std::num::NonZeroU32::new(iterations).ok_or(CraError::NoIterations)?;
    if !(1..=1024).contains(&keylen) {
        return Err(CraError::KeyLength(keylen));
    }
    let mut key = vec![0u8; keylen];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        secret,
        &mut key,
    );
    Ok(base64::engine::general_purpose::STANDARD.encode(&key))
}

#[cfg(test)]
mod tests;
