//! `ask`: a request from the backend to the client (`confirm`), whose answer becomes
//! the reply to the client's own call.
//!
//! [`Asks`] is the table of confirm requests waiting for an answer, plain data owned
//! by the connection's reader: the reader is also where the client's response arrives,
//! so routing it is a map lookup and a oneshot send, with no lock. The wait itself
//! runs in a task of its own ([`Ask::reply`]) so the reader keeps serving other calls.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::oneshot;
use tracing::debug;

use crate::wire::{CLIENT_REFUSED, NO_ANSWER, Outcome, Reply, single};

/// How long an `ask` waits for the client. A constant: the crate has no settings
/// beyond the server name, and a demo backend does not need this one tunable.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Confirm requests waiting per connection. Each holds a task and a timer for up to
/// [`ANSWER_TIMEOUT`], so a client that never answers must not grow them without bound.
pub(crate) const MAX_WAITING: usize = 256;

/// The client's response to a confirm request, as raw JSON text.
#[derive(Debug, PartialEq)]
pub(crate) enum Answer {
    /// The response's `result`.
    Result(Box<str>),
    /// The response's whole `error` object.
    Error(Box<str>),
}

/// One connection's confirm requests that have not been answered yet.
#[derive(Debug)]
pub(crate) struct Asks {
    /// The number in the next id; never reused, so a late answer to an `ask` that
    /// timed out cannot be taken for the answer to a newer one.
    next: u64,
    /// By id without quotes (`ask-1`). A sender whose receiver is gone belongs to an
    /// `ask` that timed out; those are pruned when the table is full.
    waiting: HashMap<Box<str>, oneshot::Sender<Answer>>,
}

/// Why an `ask` was not sent.
#[derive(Debug, PartialEq)]
pub(crate) struct TooMany;

impl Asks {
    pub(crate) fn new() -> Self {
        Asks {
            next: 1,
            waiting: HashMap::new(),
        }
    }

    /// Allocates the id of a new confirm request (as a JSON string literal, the form
    /// it is written in) and the receiver its answer will arrive on.
    pub(crate) fn start(&mut self) -> Result<(String, oneshot::Receiver<Answer>), TooMany> {
        if self.waiting.len() >= MAX_WAITING {
            self.waiting.retain(|_, answer| !answer.is_closed());
            if self.waiting.len() >= MAX_WAITING {
                return Err(TooMany);
            }
        }
        let mut id = String::with_capacity(16);
        id.push_str("\"ask-");
        id.push_str(itoa::Buffer::new().format(self.next));
        id.push('"');
        self.next += 1;
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(Box::from(&id[1..id.len() - 1]), tx);
        Ok((id, rx))
    }

    /// Routes a response from the client to the `ask` waiting for it. Anything that
    /// answers nothing we asked (an unknown id, a late answer) is dropped: the
    /// client cannot be told, since a response gets no reply.
    pub(crate) fn answer(&mut self, id: &str, answer: Answer) {
        let Ok(id) = serde_json::from_str::<Cow<'_, str>>(id) else {
            debug!(id, "echo backend: response with a non-string id ignored");
            return;
        };
        let Some(waiting) = self.waiting.remove(&*id) else {
            debug!(%id, "echo backend: response to no request of ours ignored");
            return;
        };
        if waiting.send(answer).is_err() {
            debug!(%id, "echo backend: answer came after the ask timed out");
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }
}

/// An `ask` call waiting for the client's answer to reply.
#[derive(Debug)]
pub(crate) struct Ask {
    /// The `ask` call's id, raw.
    pub(crate) call_id: Box<str>,
    /// The question, raw, as the reply repeats it.
    pub(crate) question: Box<str>,
    pub(crate) answer: oneshot::Receiver<Answer>,
}

impl PartialEq for Ask {
    /// The receiver is a handle, not data: two asks are the same by what they reply to.
    fn eq(&self, other: &Self) -> bool {
        self.call_id == other.call_id && self.question == other.question
    }
}

impl Ask {
    /// Waits up to `timeout` for the answer and returns the reply to the `ask` call;
    /// `None` if the connection ended first (its table, and so the sender, dropped).
    pub(crate) async fn reply(self, timeout: Duration) -> Option<String> {
        let outcome = match tokio::time::timeout(timeout, self.answer).await {
            Err(_) => Outcome::error(NO_ANSWER, "no answer from the client within 30s"),
            Ok(Err(_)) => return None,
            Ok(Ok(Answer::Result(result))) => {
                let mut both = String::with_capacity(26 + self.question.len() + result.len());
                both.push_str(r#"{"question":"#);
                both.push_str(&self.question);
                both.push_str(r#","answer":"#);
                both.push_str(&result);
                both.push('}');
                Outcome::Owned(both)
            }
            Ok(Ok(Answer::Error(error))) => {
                return Some(single(&Reply {
                    id: &self.call_id,
                    outcome: refused(&error),
                }));
            }
        };
        Some(single(&Reply {
            id: &self.call_id,
            outcome,
        }))
    }
}

/// -32001 with the client's message in ours and its whole error object as data.
fn refused(error: &str) -> Outcome<'_> {
    #[derive(Deserialize)]
    struct ErrorObject<'a> {
        #[serde(borrow)]
        message: Cow<'a, str>,
    }
    // A client that sends a malformed error object still refused; say so without
    // its message rather than pretend it answered.
    let message =
        serde_json::from_str::<ErrorObject<'_>>(error).map_or(Cow::Borrowed(""), |e| e.message);
    Outcome::Relayed {
        code: CLIENT_REFUSED,
        message: format!("client refused: {message}"),
        data: Some(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(answer: oneshot::Receiver<Answer>) -> Ask {
        Ask {
            call_id: "7".into(),
            question: r#"{"q": "why?"}"#.into(),
            answer,
        }
    }

    #[tokio::test]
    async fn an_answer_is_routed_by_id_and_replied_with_the_question() {
        let mut asks = Asks::new();
        let (one, first) = asks.start().expect("room");
        let (two, second) = asks.start().expect("room");
        assert_eq!((one.as_str(), two.as_str()), (r#""ask-1""#, r#""ask-2""#));

        asks.answer(r#""ask-2""#, Answer::Result("[1, 2]".into()));
        asks.answer(r#""ask-9""#, Answer::Result("1".into()));
        asks.answer("2", Answer::Result("1".into()));
        assert_eq!(asks.len(), 1, "only ask-1 still waits");
        assert_eq!(
            ask(second).reply(ANSWER_TIMEOUT).await.as_deref(),
            Some(r#"{"jsonrpc":"2.0","id":7,"result":{"question":{"q": "why?"},"answer":[1, 2]}}"#)
        );

        // An escaped id is still the same id.
        asks.answer(
            r#""ask\u002d1""#,
            Answer::Error(r#"{"code":1,"message":"no \"way\""}"#.into()),
        );
        assert_eq!(
            ask(first).reply(ANSWER_TIMEOUT).await.as_deref(),
            Some(
                r#"{"jsonrpc":"2.0","id":7,"error":{"code":-32001,"message":"client refused: no \"way\"","data":{"code":1,"message":"no \"way\""}}}"#
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_in_time_is_an_error_and_a_late_answer_is_dropped() {
        let mut asks = Asks::new();
        let (_, answer) = asks.start().expect("room");
        assert_eq!(
            ask(answer).reply(ANSWER_TIMEOUT).await.as_deref(),
            Some(
                r#"{"jsonrpc":"2.0","id":7,"error":{"code":-32002,"message":"no answer from the client within 30s"}}"#
            )
        );
        asks.answer(r#""ask-1""#, Answer::Result("true".into()));
        assert_eq!(asks.len(), 0);

        let (_, answer) = asks.start().expect("room");
        drop(asks);
        assert_eq!(
            ask(answer).reply(ANSWER_TIMEOUT).await,
            None,
            "connection gone"
        );
    }

    #[test]
    fn the_table_is_bounded_and_timed_out_asks_free_their_slots() {
        let mut asks = Asks::new();
        let mut receivers: Vec<_> = (0..MAX_WAITING)
            .map(|_| asks.start().expect("room").1)
            .collect();
        assert_eq!(asks.start().err(), Some(TooMany));
        // Dropping a receiver is what a timed-out `ask` does.
        receivers.truncate(MAX_WAITING - 1);
        let (id, _answer) = asks.start().expect("a slot was freed");
        assert_eq!(id, format!(r#""ask-{}""#, MAX_WAITING + 1));
    }

    #[test]
    fn a_malformed_error_object_still_refuses() {
        let reply = single(&Reply {
            id: "1",
            outcome: refused("42"),
        });
        assert_eq!(
            reply,
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"client refused: ","data":42}}"#
        );
    }
}
