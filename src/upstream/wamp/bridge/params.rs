//! The params of the PubSub methods, and the JSON-RPC frames the bridge writes for the
//! multiplexer: small pure helpers of `bridge.rs`.

use super::super as codec;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt::Write as _;

/// `{"topic": .., "options": {..}, "args": [..], "kwargs": {..}}`: the object form of
/// subscribe and publish params.
#[derive(Deserialize)]
pub(super) struct Named<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow, default)]
    options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
    #[serde(borrow, default)]
    kwargs: Option<&'a RawValue>,
    #[serde(default)]
    subscription: Option<u64>,
}

pub(super) fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

pub(super) fn reply(id: u64, key: &str, value: &str) -> Bytes {
    let mut text = String::with_capacity(40 + value.len());
    let _ = write!(text, r#"{{"jsonrpc":"2.0","id":{id},"{key}":{value}}}"#);
    Bytes::from(text)
}

pub(super) fn result_reply(id: u64, result: &str) -> Bytes {
    reply(id, "result", result)
}

pub(super) fn error_reply(id: u64, code: i32, message: &str) -> Bytes {
    let text = format!(r#"{{"code":{code},"message":{}}}"#, quoted(message));
    reply(id, "error", &text)
}

/// `reason: message` from an ABORT or GOODBYE.
pub(super) fn explain(reason: &str, details: &RawValue) -> String {
    match codec::details_message(details) {
        Some(m) if !m.is_empty() => format!("{reason}: {m}"),
        _ => reason.to_string(),
    }
}

/// The topic an EVENT's details name (pattern subscriptions), as a JSON string.
pub(super) fn event_topic(details: &RawValue) -> Option<String> {
    if !details.get().contains("\"topic\"") {
        return None;
    }
    #[derive(Deserialize)]
    struct Details<'a> {
        #[serde(borrow)]
        topic: Option<Cow<'a, str>>,
    }
    let d: Details<'_> = serde_json::from_str(details.get()).ok()?;
    d.topic.map(|t| quoted(&t))
}

/// Subscribe params: `[topic]`, `[topic, options]` or `{"topic", "options"}`.
pub(super) fn topic_and_options(
    params: Option<&RawValue>,
) -> Option<(Cow<'_, str>, Option<&RawValue>)> {
    let p = params?;
    let (topic, options) = if p.get().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(p.get()).ok()?;
        if items.is_empty() || items.len() > 2 {
            return None;
        }
        (codec::json_str(items[0])?, items.get(1).copied())
    } else {
        let named: Named<'_> = serde_json::from_str(p.get()).ok()?;
        (named.topic, named.options)
    };
    if topic.is_empty() || options.is_some_and(|o| !o.get().starts_with('{')) {
        return None;
    }
    Some((topic, options))
}

/// Unsubscribe params: `[id]` or `{"subscription": id}`; the id a number or a string
/// of digits (the push hub keeps ids as the client saw them).
pub(super) fn subscription_param(params: Option<&RawValue>) -> Option<u64> {
    let p = params?;
    if p.get().starts_with('{') {
        return serde_json::from_str::<Named<'_>>(p.get())
            .ok()?
            .subscription;
    }
    let items: Vec<&RawValue> = serde_json::from_str(p.get()).ok()?;
    let first = items.first()?;
    first
        .get()
        .parse::<u64>()
        .ok()
        .or_else(|| codec::json_str(first)?.parse().ok())
}

/// Publish params: `[topic, args..]` or `{"topic", "args", "kwargs"}`. The args of the
/// array form are rebuilt as an array of the elements after the topic.
pub(super) type Publication<'a> = (
    Cow<'a, str>,
    (Option<Cow<'a, RawValue>>, Option<&'a RawValue>),
);

pub(super) fn publication(params: Option<&RawValue>) -> Option<Publication<'_>> {
    let p = params?;
    if p.get().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(p.get()).ok()?;
        let (topic, rest) = items.split_first()?;
        let topic = codec::json_str(topic)?;
        let args = match rest.is_empty() {
            true => None,
            false => {
                let mut text = String::from("[");
                for (i, item) in rest.iter().enumerate() {
                    if i > 0 {
                        text.push(',');
                    }
                    text.push_str(item.get());
                }
                text.push(']');
                Some(Cow::Owned(RawValue::from_string(text).ok()?))
            }
        };
        return (!topic.is_empty()).then_some((topic, (args, None)));
    }
    let named: Named<'_> = serde_json::from_str(p.get()).ok()?;
    if named.topic.is_empty()
        || named.args.is_some_and(|a| !a.get().starts_with('['))
        || named.kwargs.is_some_and(|k| !k.get().starts_with('{'))
    {
        return None;
    }
    Some((named.topic, (named.args.map(Cow::Borrowed), named.kwargs)))
}
