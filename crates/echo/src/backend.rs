//! The pure part: one incoming WebSocket message in, what to send back out. No I/O,
//! so every method and every malformed input is unit-tested without a socket. What
//! outlives the message (a subscription, an `ask` waiting for its answer) is handed
//! back in [`Dispatched`] for the connection to run.

use std::borrow::Cow;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::ask::{self, Answer, Ask, Asks};
use crate::methods::{sleep_ms, sum};
use crate::ticks::{self, Subscriptions, Ticker};
use crate::wire::{
    INVALID_PARAMS, INVALID_REQUEST, LIMIT_REACHED, METHOD_NOT_FOUND, Outcome, PARSE_ERROR,
    REQUESTED_FAILURE, Reply, Request, Response, confirm, invalid, notice, notification, single,
    valid_id, write_reply,
};

#[derive(Debug)]
pub(crate) struct Backend {
    /// The server name as a JSON string literal, encoded once for every `whoami`.
    name_json: Box<str>,
}

/// What one connection remembers between its messages. Owned by its reader alone.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) ticks: Subscriptions,
    pub(crate) asks: Asks,
}

impl Session {
    /// `ending` is cancelled when the connection ends, which stops its tickers.
    pub(crate) fn new(ending: CancellationToken) -> Self {
        Session {
            ticks: Subscriptions::new(ending),
            asks: Asks::new(),
        }
    }
}

/// What one incoming WebSocket message asks the connection to send.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Dispatched {
    /// Sent before the reply: `notify`'s notifications and `ask`'s confirm request.
    pub(crate) before: Vec<String>,
    /// `None` when the message held only notifications (or an `ask`, replied later).
    pub(crate) reply: Option<String>,
    /// Sent right after the reply: `notify_me`'s notices.
    pub(crate) after: Vec<String>,
    /// How long to hold the reply back: the longest `sleep` the message asked for.
    /// The sleeps of a batch run side by side, so the batch waits for the longest.
    pub(crate) delay: Duration,
    /// Subscriptions to start ticking once the reply carrying their ids is queued,
    /// so that no tick can come before it.
    pub(crate) tickers: Vec<Ticker>,
    /// An `ask` whose reply waits for the client's answer.
    pub(crate) ask: Option<Ask>,
}

impl Backend {
    pub(crate) fn new(name: &str) -> Self {
        // Display on a `Value` cannot fail, unlike `to_string`'s `Result`.
        let name_json = serde_json::Value::from(name).to_string().into_boxed_str();
        Backend { name_json }
    }

    pub(crate) fn dispatch_bytes(&self, bytes: &[u8], session: &mut Session) -> Dispatched {
        match std::str::from_utf8(bytes) {
            Ok(text) => self.dispatch(text, session),
            Err(_) => Dispatched {
                reply: Some(single(&Reply {
                    id: "null",
                    outcome: Outcome::error(PARSE_ERROR, "parse error: not UTF-8"),
                })),
                ..Dispatched::default()
            },
        }
    }

    pub(crate) fn dispatch(&self, text: &str, session: &mut Session) -> Dispatched {
        let mut out = Dispatched::default();
        let is_batch = text.trim_ascii_start().starts_with('[');
        if !is_batch {
            let reply = self.call(text, false, session, &mut out);
            out.reply = reply.map(|reply| single(&reply));
            return out;
        }
        let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(text) else {
            out.reply = Some(single(&Reply {
                id: "null",
                outcome: Outcome::error(PARSE_ERROR, "parse error"),
            }));
            return out;
        };
        if items.is_empty() {
            out.reply = Some(single(&Reply {
                id: "null",
                outcome: Outcome::error(INVALID_REQUEST, "invalid request: empty batch"),
            }));
            return out;
        }
        let mut buf = String::with_capacity(text.len() + 64);
        buf.push('[');
        for item in items {
            if let Some(reply) = self.call(item.get(), true, session, &mut out) {
                if buf.len() > 1 {
                    buf.push(',');
                }
                write_reply(&mut buf, &reply);
            }
        }
        // A batch of notifications gets no reply at all, not `[]`.
        if buf.len() > 1 {
            buf.push(']');
            out.reply = Some(buf);
        }
        out
    }

    /// Runs one request object and returns its reply: `None` for a notification, for
    /// a response from the client, and for an `ask` (replied to once answered).
    fn call<'a>(
        &'a self,
        text: &'a str,
        in_batch: bool,
        session: &mut Session,
        out: &mut Dispatched,
    ) -> Option<Reply<'a>> {
        let request = match serde_json::from_str::<Request<'_>>(text) {
            Ok(request) => request,
            Err(error) => {
                // Only text that is not a request can be a response, so calls never
                // pay for this second parse.
                if let Some(response) = Response::parse(text) {
                    answer(&response, session);
                    return None;
                }
                return Some(invalid(text, &error));
            }
        };
        let id = match request.id {
            Some(id) if !valid_id(id) => {
                return Some(Reply {
                    id: "null",
                    outcome: Outcome::error(INVALID_REQUEST, "invalid request: bad id"),
                });
            }
            id => id.map(RawValue::get),
        };
        if request.jsonrpc != "2.0" {
            return Some(Reply {
                id: id.unwrap_or("null"),
                outcome: Outcome::error(INVALID_REQUEST, "invalid request: jsonrpc must be 2.0"),
            });
        }
        let params = request.params.map(RawValue::get);
        let outcome = match &*request.method {
            "echo" => Outcome::Raw(params.unwrap_or("null")),
            "sum" => sum(params),
            "sleep" => match sleep_ms(params) {
                Some(ms) => {
                    // Only a call holds its reply back; a notification has none to hold.
                    if id.is_some() {
                        out.delay = out.delay.max(Duration::from_millis(ms));
                    }
                    Outcome::Int(i64::try_from(ms).unwrap_or(i64::MAX))
                }
                None => Outcome::error(
                    INVALID_PARAMS,
                    "invalid params: sleep expects [milliseconds] or [milliseconds, padding string]",
                ),
            },
            "whoami" => Outcome::Raw(&self.name_json),
            "fail" => Outcome::Error {
                code: REQUESTED_FAILURE,
                message: "requested failure",
                data: params,
            },
            "notify" => {
                out.before.push(notification(params));
                Outcome::Raw("true")
            }
            "notify_me" => match params.filter(|p| one_value(p).is_some()) {
                Some(params) => {
                    out.after.push(notice(params));
                    Outcome::Raw("true")
                }
                None => Outcome::error(INVALID_PARAMS, "invalid params: notify_me expects [value]"),
            },
            // Without an id the client could never learn the subscription's id, so
            // a notification subscribes nothing.
            "ticks_subscribe" => match (id, ticks::interval(params)) {
                (None, _) => return None,
                (Some(_), None) => Outcome::error(
                    INVALID_PARAMS,
                    "invalid params: ticks_subscribe expects [] or [interval_ms]",
                ),
                (Some(_), Some(interval)) => match session.ticks.subscribe(interval) {
                    Ok(ticker) => {
                        let outcome = Outcome::Owned(ticker.id().to_owned());
                        out.tickers.push(ticker);
                        outcome
                    }
                    Err(ticks::TooMany) => Outcome::error(
                        LIMIT_REACHED,
                        "too many subscriptions: at most 64 per connection, unsubscribe one first",
                    ),
                },
            },
            "ticks_unsubscribe" => {
                match params.and_then(|p| serde_json::from_str::<(Cow<'_, str>,)>(p).ok()) {
                    Some((subscription,)) => {
                        Outcome::Raw(if session.ticks.unsubscribe(&subscription) {
                            "true"
                        } else {
                            "false"
                        })
                    }
                    None => Outcome::error(
                        INVALID_PARAMS,
                        "invalid params: ticks_unsubscribe expects [subscription id]",
                    ),
                }
            }
            "ask" => {
                // There is no reply to carry an answer to a notification.
                let id = id?;
                match params.and_then(|p| Some((p, one_value(p)?))) {
                    _ if in_batch => Outcome::error(
                        INVALID_REQUEST,
                        "invalid request: ask cannot be in a batch, its reply waits for the client",
                    ),
                    None => {
                        Outcome::error(INVALID_PARAMS, "invalid params: ask expects [question]")
                    }
                    Some((params, question)) => match session.asks.start() {
                        Ok((ask_id, answer)) => {
                            out.before.push(confirm(&ask_id, params));
                            out.ask = Some(Ask {
                                call_id: id.into(),
                                question: question.get().into(),
                                answer,
                            });
                            return None;
                        }
                        Err(ask::TooMany) => Outcome::error(
                            LIMIT_REACHED,
                            "too many asks waiting for the client: at most 256 per connection",
                        ),
                    },
                }
            }
            _ => Outcome::error(METHOD_NOT_FOUND, "method not found"),
        };
        Some(Reply { id: id?, outcome })
    }
}

/// `[value]`: the value, raw.
fn one_value(params: &str) -> Option<&RawValue> {
    serde_json::from_str::<(&RawValue,)>(params)
        .ok()
        .map(|(value,)| value)
}

/// Hands a response from the client to the `ask` waiting for it.
fn answer(response: &Response<'_>, session: &mut Session) {
    let Some(id) = response.id else { return };
    let answer = match (response.error, response.result) {
        // Both is against the spec; the error is the safer reading of it.
        (Some(error), _) => Answer::Error(error.get().into()),
        (None, Some(result)) => Answer::Result(result.get().into()),
        (None, None) => return,
    };
    session.asks.answer(id.get(), answer);
}

#[cfg(test)]
pub(crate) mod tests {
    //! The helpers here are shared with the tests of `methods.rs` and `wire.rs`, which
    //! also go through `dispatch`: that is where their behaviour becomes a reply.

    use super::*;
    use serde::de::IgnoredAny;

    pub(crate) fn backend() -> Backend {
        Backend::new("unit")
    }

    pub(crate) fn session() -> Session {
        Session::new(CancellationToken::new())
    }

    /// `request` as the first message of a new connection.
    pub(crate) fn dispatch(request: &str) -> Dispatched {
        backend().dispatch(request, &mut session())
    }

    /// The immediate reply text, asserting there was no delay or notification.
    pub(crate) fn reply(request: &str) -> String {
        let out = dispatch(request);
        assert!(out.before.is_empty() && out.after.is_empty(), "{out:?}");
        assert_eq!(out.delay, Duration::ZERO, "{out:?}");
        out.reply.unwrap_or_else(|| panic!("no reply to {request}"))
    }

    pub(crate) fn result(id: &str, result: &str) -> String {
        format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)
    }

    pub(crate) fn error(id: &str, code: i32) -> impl Fn(&str) -> bool {
        let prefix = format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":{code},"message":""#);
        move |reply: &str| {
            reply.starts_with(&prefix) && serde_json::from_str::<IgnoredAny>(reply).is_ok()
        }
    }

    #[test]
    fn echo_returns_params_byte_for_byte() {
        let params = r#"{"b": [1, 2.50, "\u00e9", null],  "a":{}}"#;
        let request = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"echo","params":{params}}}"#);
        assert_eq!(reply(&request), result("1", params));
        assert_eq!(
            reply(r#"{"jsonrpc":"2.0","id":2,"method":"echo"}"#),
            result("2", "null")
        );
    }

    #[test]
    fn whoami_returns_the_name_as_a_json_string() {
        let backend = Backend::new("up \"1\"");
        let out = backend.dispatch(
            r#"{"jsonrpc":"2.0","id":1,"method":"whoami"}"#,
            &mut session(),
        );
        assert_eq!(out.reply, Some(result("1", r#""up \"1\"""#)));
    }

    #[test]
    fn fail_returns_params_as_error_data() {
        assert_eq!(
            reply(r#"{"jsonrpc":"2.0","id":1,"method":"fail","params":{"x":[1]}}"#),
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"requested failure","data":{"x":[1]}}}"#
        );
        assert_eq!(
            reply(r#"{"jsonrpc":"2.0","id":1,"method":"fail"}"#),
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"requested failure"}}"#
        );
    }

    #[test]
    fn notify_pushes_a_notification_before_replying() {
        let out = dispatch(r#"{"jsonrpc":"2.0","id":3,"method":"notify","params":["hi"]}"#);
        assert_eq!(
            out.before,
            [r#"{"jsonrpc":"2.0","method":"notification","params":["hi"]}"#]
        );
        assert_eq!(out.reply, Some(result("3", "true")));
    }

    #[test]
    fn notify_me_replies_then_pushes_its_params_as_sent() {
        let out =
            dispatch(r#"{"jsonrpc":"2.0","id":3,"method":"notify_me","params":[ {"a": 1.50} ]}"#);
        assert!(out.before.is_empty(), "{out:?}");
        assert_eq!(out.reply, Some(result("3", "true")));
        assert_eq!(
            out.after,
            [r#"{"jsonrpc":"2.0","method":"notice","params":[ {"a": 1.50} ]}"#]
        );
        for bad in [
            "",
            r#","params":[]"#,
            r#","params":[1,2]"#,
            r#","params":{"a":1}"#,
        ] {
            let request = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"notify_me"{bad}}}"#);
            assert!(error("1", INVALID_PARAMS)(&reply(&request)), "{request}");
        }
    }

    #[test]
    fn ticks_subscribe_replies_a_new_id_per_subscription() {
        let backend = backend();
        let mut session = session();
        let subscribe = |session: &mut Session, params: &str| {
            backend.dispatch(
                &format!(r#"{{"jsonrpc":"2.0","id":1,"method":"ticks_subscribe"{params}}}"#),
                session,
            )
        };
        let out = subscribe(&mut session, r#","params":[20]"#);
        assert_eq!(out.reply, Some(result("1", r#""tick-1""#)));
        assert_eq!(out.tickers.len(), 1);
        assert_eq!(out.tickers[0].id(), r#""tick-1""#);
        let out = subscribe(&mut session, "");
        assert_eq!(out.reply, Some(result("1", r#""tick-2""#)));

        let bad = subscribe(&mut session, r#","params":["fast"]"#);
        assert!(error("1", INVALID_PARAMS)(
            bad.reply.as_deref().unwrap_or_default()
        ));
        assert!(bad.tickers.is_empty());
        // Nobody could learn a notification's subscription id.
        let out = backend.dispatch(
            r#"{"jsonrpc":"2.0","method":"ticks_subscribe","params":[20]}"#,
            &mut session,
        );
        assert_eq!(out, Dispatched::default());

        for _ in 2..ticks::MAX_SUBSCRIPTIONS {
            assert_eq!(subscribe(&mut session, "").tickers.len(), 1);
        }
        let full = subscribe(&mut session, "");
        assert!(
            error("1", LIMIT_REACHED)(full.reply.as_deref().unwrap_or_default()),
            "{full:?}"
        );
        assert!(full.tickers.is_empty());
    }

    #[test]
    fn ticks_unsubscribe_is_true_once_and_only_on_its_connection() {
        let backend = backend();
        let (mut mine, mut other) = (session(), session());
        backend.dispatch(
            r#"{"jsonrpc":"2.0","id":1,"method":"ticks_subscribe"}"#,
            &mut mine,
        );
        let unsubscribe =
            r#"{"jsonrpc":"2.0","id":2,"method":"ticks_unsubscribe","params":["tick-1"]}"#;
        assert_eq!(
            backend.dispatch(unsubscribe, &mut other).reply,
            Some(result("2", "false"))
        );
        assert_eq!(
            backend.dispatch(unsubscribe, &mut mine).reply,
            Some(result("2", "true"))
        );
        assert_eq!(
            backend.dispatch(unsubscribe, &mut mine).reply,
            Some(result("2", "false"))
        );
        let bad = r#"{"jsonrpc":"2.0","id":2,"method":"ticks_unsubscribe","params":[1]}"#;
        assert!(error("2", INVALID_PARAMS)(
            &backend.dispatch(bad, &mut mine).reply.unwrap_or_default()
        ));
    }

    #[test]
    fn ask_sends_confirm_and_replies_only_once_answered() {
        let backend = backend();
        let mut session = session();
        let out = backend.dispatch(
            r#"{"jsonrpc":"2.0","id":"q","method":"ask","params":[ "ok?" ]}"#,
            &mut session,
        );
        assert_eq!(
            out.before,
            [r#"{"jsonrpc":"2.0","id":"ask-1","method":"confirm","params":[ "ok?" ]}"#]
        );
        assert_eq!(out.reply, None, "the reply waits for the answer");
        let ask = out.ask.expect("an ask waiting");
        assert_eq!((&*ask.call_id, &*ask.question), (r#""q""#, r#""ok?""#));

        // The client's response gets no reply of its own and reaches the ask.
        let answered = backend.dispatch(
            r#"{"jsonrpc":"2.0","id":"ask-1","result":"yes"}"#,
            &mut session,
        );
        assert_eq!(answered, Dispatched::default());
        let mut answer = ask.answer;
        assert_eq!(answer.try_recv(), Ok(Answer::Result(r#""yes""#.into())));

        let out = backend.dispatch(
            r#"{"jsonrpc":"2.0","id":1,"method":"ask","params":[2]}"#,
            &mut session,
        );
        assert!(out.before[0].contains(r#""id":"ask-2""#), "{out:?}");
        let mut answer = out.ask.expect("an ask waiting").answer;
        // A batch of responses, one of them to nobody.
        let answered = backend.dispatch(
            r#"[{"jsonrpc":"2.0","id":"ask-7","result":1},
                {"jsonrpc":"2.0","id":"ask-2","error":{"code":5,"message":"no"}}]"#,
            &mut session,
        );
        assert_eq!(answered, Dispatched::default());
        assert_eq!(
            answer.try_recv(),
            Ok(Answer::Error(r#"{"code":5,"message":"no"}"#.into()))
        );
    }

    #[test]
    fn ask_is_refused_in_a_batch_with_bad_params_and_ignored_as_a_notification() {
        let out = dispatch(r#"[{"jsonrpc":"2.0","id":1,"method":"ask","params":[1]}]"#);
        assert!(out.before.is_empty() && out.ask.is_none(), "{out:?}");
        let replies: Vec<&RawValue> =
            serde_json::from_str(out.reply.as_deref().unwrap_or_default()).expect("an array");
        assert!(error("1", INVALID_REQUEST)(replies[0].get()));
        for bad in [
            "",
            r#","params":[]"#,
            r#","params":[1,2]"#,
            r#","params":"x""#,
        ] {
            let request = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"ask"{bad}}}"#);
            assert!(error("1", INVALID_PARAMS)(&reply(&request)), "{request}");
        }
        assert_eq!(
            dispatch(r#"{"jsonrpc":"2.0","method":"ask","params":[1]}"#),
            Dispatched::default()
        );
    }

    #[test]
    fn unknown_method_is_not_found() {
        assert!(error("1", METHOD_NOT_FOUND)(&reply(
            r#"{"jsonrpc":"2.0","id":1,"method":"nope"}"#
        )));
    }

    #[test]
    fn notifications_get_no_reply_but_still_run() {
        for request in [
            r#"{"jsonrpc":"2.0","method":"echo","params":[1]}"#,
            r#"{"jsonrpc":"2.0","method":"nope"}"#,
            r#"{"jsonrpc":"2.0","method":"sum","params":"x"}"#,
            r#"{"jsonrpc":"2.0","method":"sleep","params":[1000]}"#,
        ] {
            assert_eq!(dispatch(request), Dispatched::default(), "{request}");
        }
        let out = dispatch(r#"{"jsonrpc":"2.0","method":"notify","params":{}}"#);
        assert_eq!(out.before.len(), 1);
        assert_eq!(out.reply, None);
    }

    #[test]
    fn batch_replies_in_request_order_and_skips_notifications() {
        let out = dispatch(
            r#" [{"jsonrpc":"2.0","id":1,"method":"echo","params":"a"},
                {"jsonrpc":"2.0","method":"echo","params":"n"},
                {"jsonrpc":"2.0","id":"2","method":"sum","params":[1,2]},
                {"jsonrpc":"2.0","id":3,"method":"whoami"}]"#,
        );
        assert_eq!(
            out.reply.as_deref(),
            Some(
                r#"[{"jsonrpc":"2.0","id":1,"result":"a"},{"jsonrpc":"2.0","id":"2","result":3},{"jsonrpc":"2.0","id":3,"result":"unit"}]"#
            )
        );
    }

    #[test]
    fn batch_waits_for_its_longest_sleep_and_collects_notifications() {
        let out = dispatch(
            r#"[{"jsonrpc":"2.0","id":1,"method":"sleep","params":[20]},
                {"jsonrpc":"2.0","id":2,"method":"sleep","params":[50]},
                {"jsonrpc":"2.0","method":"sleep","params":[900]},
                {"jsonrpc":"2.0","id":3,"method":"notify","params":1}]"#,
        );
        assert_eq!(out.delay, Duration::from_millis(50));
        assert_eq!(
            out.before,
            [r#"{"jsonrpc":"2.0","method":"notification","params":1}"#]
        );
        assert_eq!(
            out.reply.as_deref(),
            Some(
                r#"[{"jsonrpc":"2.0","id":1,"result":20},{"jsonrpc":"2.0","id":2,"result":50},{"jsonrpc":"2.0","id":3,"result":true}]"#
            )
        );
    }

    #[test]
    fn batch_edge_cases() {
        assert!(error("null", INVALID_REQUEST)(&reply("[]")));
        assert!(error("null", INVALID_REQUEST)(&reply(" [ ] ")));
        assert_eq!(
            dispatch(r#"[{"jsonrpc":"2.0","method":"echo"},{"jsonrpc":"2.0","method":"x"}]"#),
            Dispatched::default()
        );
        // Each bad element gets its own error, as in the spec's `[1,2,3]` example.
        let bad = reply(r#"[1, {"jsonrpc":"2.0","id":9,"method":"echo","params":[]}, {"id":8}]"#);
        let replies: Vec<&RawValue> = serde_json::from_str(&bad).expect("a JSON array");
        assert_eq!(replies.len(), 3, "{bad}");
        assert!(error("null", INVALID_REQUEST)(replies[0].get()), "{bad}");
        assert_eq!(replies[1].get(), result("9", "[]"));
        assert!(error("8", INVALID_REQUEST)(replies[2].get()), "{bad}");
        // A nested batch is not a request.
        let nested = reply("[[]]");
        let replies: Vec<&RawValue> = serde_json::from_str(&nested).expect("a JSON array");
        assert_eq!(replies.len(), 1, "{nested}");
        assert!(error("null", INVALID_REQUEST)(replies[0].get()), "{nested}");
    }
}
