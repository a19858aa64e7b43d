//! WAMP v2 over `wamp.2.json` (issue 14): the messages a caller, subscriber and
//! publisher exchanges with a router, and the JSON-RPC mapping, as pure functions.
//!
//! No I/O here: the bridge (`bridge.rs`) reads frames with [`parse`]; `write.rs` has
//! the writers and the JSON-RPC mapping of params, results and errors, `cra.rs`
//! WAMP-CRA.
//!
//! As in `jsonrpc/`, arguments, keyword arguments, details and options stay borrowed
//! `&RawValue`s: a call's params become its `Arguments` or `ArgumentsKw` byte for byte,
//! and a single result is handed back without being re-serialized.
//!
//! A WAMP id (session, request, subscription, publication) is an integer in 1..=2^53
//! (the spec keeps them exact in an IEEE double); [`parse`] refuses any other.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

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
    /// A type only another role receives (a callee's INVOCATION, INTERRUPT, ...): a
    /// caller's, subscriber's and publisher's session has no use for it and ignores it;
    /// it is not a syntax error.
    #[error("WAMP message type {0} is for another role than caller, subscriber or publisher")]
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

#[cfg(test)]
mod tests;
