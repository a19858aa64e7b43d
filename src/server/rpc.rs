//! One HTTP request in, exactly one HTTP answer out: the body read within its limits,
//! parsed, and each call sent through the dispatch pipeline.
//!
//! The cheap checks (path, method, content type, declared length) already ran in the
//! stack (`stack.rs`); every failure leaves through `response::error`, the only place
//! an [`Error`] becomes HTTP.

use super::AppState;
pub(super) use super::answer::Answer;
use super::auth::Admitted;
use super::body::read_body;
use super::listener::ConnInfo;
use super::response::{self, HttpResponse};
use super::session_key::{SessionKey, session_of};
use crate::budget::Budgets;
use crate::config::{Affinity, BatchMode};
use crate::dispatch::{self, Outbound, OwnedRoute, Route, Sent};
use crate::error::Error;
use crate::jsonrpc::{self, Body, Call, Entry, Invalid, OwnedCall};
use crate::push::{Kind, Reservation, Unsubscribe};
use crate::upstream::{Conn, Reply};
use futures_util::future::join_all;
use http::header::SET_COOKIE;
use http::{HeaderValue, Request};
use hyper::body::Incoming;
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::time::Instant;

/// Answers one request that passed the stack's checks (`stack.rs`).
pub async fn handle(req: Request<Incoming>, state: &AppState, conn: &ConnInfo) -> HttpResponse {
    let http = &state.config.http;
    let limit = http.max_body_bytes;
    let session = match session_of(&req, state, conn.peer) {
        Ok(s) => s,
        Err(e) => return response::error(None, &e),
    };
    let budgets = conn.budgets.clone();
    let admitted = Admitted::of(&req, state, conn.peer);
    // Held for the whole request: the calls borrow from the body.
    let (body, _body_charge) = match read_body(req, &budgets, limit, http.body_read_timeout).await {
        Ok(read) => read,
        Err(e) => return response::error(None, &e),
    };
    state.metrics.bytes_in.inc_by(body.len() as u64);
    // The deadline starts once the request is in: slow clients don't eat upstream time.
    let deadline = Instant::now() + state.config.calls.request_timeout;
    // `affinity = "connection"`: the session's own socket, held for the whole request.
    let own = match own_connection(state, session.as_ref()) {
        Ok(own) => own,
        Err(e) => return response::error(None, &e),
    };
    let caller = Caller {
        session: session.as_ref().map(|s| s.key.as_str()),
        own: own.as_ref(),
        budgets: &budgets,
        admitted: &admitted,
    };
    let mut resp = answer(state, &body, &caller, deadline).await.into_http();
    if let Some(SessionKey {
        shown: key,
        issued: Some(secure),
        ..
    }) = &session
    {
        let cfg = &state.config.sessions;
        // A page on another origin that calls with credentials only gets the cookie back
        // with `SameSite=None`, which browsers accept only with `Secure` (on
        // `http://localhost` too).
        let cookie = match (state.config.cors.allow_credentials, *secure) {
            (true, _) => format!(
                "{}={key}; Path=/; HttpOnly; SameSite=None; Secure",
                cfg.cookie
            ),
            (false, true) => format!(
                "{}={key}; Path=/; HttpOnly; SameSite=Lax; Secure",
                cfg.cookie
            ),
            (false, false) => format!("{}={key}; Path=/; HttpOnly; SameSite=Lax", cfg.cookie),
        };
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(SET_COOKIE, v);
        }
    }
    // The call ran: its answer is kept whatever the budget says, and counts against
    // it until the client has taken it.
    let len = resp.body().len();
    resp.body_mut().hold(budgets.force(len));
    resp
}

/// The session's own connection, opening it if needed (`affinity = "connection"`).
fn own_connection(
    state: &AppState,
    session: Option<&SessionKey>,
) -> Result<Option<Arc<Conn>>, Error> {
    match (session, &state.sessions) {
        (Some(SessionKey { key, client, .. }), Some(sessions))
            if state.config.sessions.affinity == Affinity::Connection =>
        {
            sessions
                .connection(key, *client)
                .map(Some)
                .inspect_err(|e| {
                    let reason = match e {
                        Error::TooManySessions(_) => "max_sessions",
                        Error::TooManyClientSessions(limit) => limit.key(),
                        _ => return,
                    };
                    state
                        .metrics
                        .sessions_refused
                        .with_label_values(&[reason])
                        .inc();
                })
        }
        _ => Ok(None),
    }
}

/// Who sends a body of calls: over HTTP or a WebSocket, the same three things.
pub(super) struct Caller<'a> {
    /// The session key, when the client named one (or was given one).
    pub session: Option<&'a str>,
    /// The session's own upstream connection (`affinity = "connection"`).
    pub own: Option<&'a Arc<Conn>>,
    /// The client connection's budgets, which each call's frame is charged to.
    pub budgets: &'a Budgets,
    /// Who calls, from where: what each call is admitted as.
    pub admitted: &'a Admitted,
}

/// Answers one body of JSON-RPC (a call, a notification, a batch, or a client's
/// answer to the upstream), from HTTP or from a WebSocket frame.
pub(super) async fn answer(
    state: &AppState,
    body: &[u8],
    caller: &Caller<'_>,
    deadline: Instant,
) -> Answer {
    let via = Via {
        state,
        route: route_of(state, caller.session, caller.own),
        payer: caller.budgets,
        session: caller.session,
        admitted: caller.admitted,
        limited: Default::default(),
    };
    match jsonrpc::parse_body(body, state.config.http.max_batch_size) {
        Err(e) => Answer::failed(None, e),
        Ok(Body::Single(Err(invalid))) => match jsonrpc::parse_answer(body) {
            // An answer calls no method, so only limits that count every call apply.
            Some(id) => match via.admit("") {
                Err(e) => Answer::failed(Some(id), e),
                Ok(()) => match state.hub.answer(caller.session, id, as_text(body)).await {
                    Ok(()) => Answer::Accepted,
                    Err(e) => Answer::failed(Some(id), e),
                },
            },
            None => {
                via.count_invalid();
                Answer::failed(invalid.id, Error::InvalidRequest(invalid.reason))
            }
        },
        Ok(Body::Single(Ok(call))) => single(call, &via, deadline).await,
        Ok(Body::Batch(entries)) => batch(entries, &via, deadline).await,
    }
}

/// The body as text: `parse_body` accepted it, so it is UTF-8.
fn as_text(body: &[u8]) -> &str {
    std::str::from_utf8(body).unwrap_or_default()
}

/// Where this request's calls go: one value, decided once per request.
fn route_of<'a>(
    state: &AppState,
    session: Option<&'a str>,
    own: Option<&'a Arc<Conn>>,
) -> Route<'a> {
    match (own, session) {
        (Some(conn), _) => Route::Own(conn),
        (None, Some(key)) if state.config.sessions.affinity == Affinity::Upstream => {
            Route::Sticky(key.as_bytes())
        }
        _ => Route::Any,
    }
}

/// A request's calls on their way upstream.
struct Via<'a> {
    state: &'a AppState,
    route: Route<'a>,
    /// The client connection's budgets, which each call's frame is charged to.
    payer: &'a Budgets,
    /// Whose subscriptions these calls open or close.
    session: Option<&'a str>,
    /// Who calls: each call is admitted by the access rules first.
    admitted: &'a Admitted,
    /// Calls (with an id) a rate limit refused, and the refusal that asks the longest
    /// wait: a batch whose every answer is one gets 429 as a whole.
    limited: parking_lot::Mutex<(usize, Option<Error>)>,
}

impl Via<'_> {
    /// The access rules' verdict on a call to `method` (`[auth]`, `[[rate_limits]]`).
    fn admit(&self, method: &str) -> Result<(), Error> {
        let who = self.admitted;
        self.state.access.admit(&who.principal, who.address, method)
    }

    /// Notes a call with an id that `error` refused (see `limited`).
    fn note_refused(&self, error: &Error) {
        let Error::RateLimited { retry_after, .. } = error else {
            return;
        };
        let mut limited = self.limited.lock();
        limited.0 += 1;
        if !matches!(&limited.1, Some(Error::RateLimited { retry_after: worst, .. }) if worst >= retry_after)
        {
            limited.1 = Some(error.clone());
        }
    }

    async fn call(&self, call: &Call<'_>, deadline: Instant) -> Result<Reply, Error> {
        self.admit(&call.method_name())
            .inspect_err(|e| self.note_refused(e))?;
        let hub = &self.state.hub;
        match hub.kind_of(&call.method_name()) {
            None => self.plain_call(call, self.route, deadline).await,
            Some(Kind::Subscribe(rule)) => {
                let reservation = hub.may_subscribe(self.session, &call.method_name())?;
                self.subscribe(call, rule, reservation, deadline).await
            }
            Some(Kind::Unsubscribe(_)) => match hub.unsubscribe_target(self.session, call.params) {
                Unsubscribe::Held { id, conn, params } => {
                    let params = RawValue::from_string(params).map_err(|_| {
                        Error::Internal("an unsubscribe call could not be rewritten")
                    })?;
                    let rewritten = Call {
                        params: Some(&params),
                        ..*call
                    };
                    let reply = self
                        .plain_call(&rewritten, Route::Own(&conn), deadline)
                        .await;
                    hub.unsubscribed(id);
                    reply
                }
                // Its socket died: rpcgate closes it once it is open again.
                Unsubscribe::Moving => Ok(Reply::local("true")),
                // On the session's own socket the upstream knows its own ids.
                Unsubscribe::NotHeld if matches!(self.route, Route::Own(_)) => {
                    self.plain_call(call, self.route, deadline).await
                }
                // On shared sockets an id is only unique per socket: one this session
                // does not hold may be another session's, and is not sent.
                Unsubscribe::NotHeld => Ok(Reply::local("false")),
            },
        }
    }

    /// A subscribe call, run to its end in a task of its own: if the client goes away
    /// meanwhile, the subscription it opened upstream is still recorded (and closed
    /// when its session ends), never left open with nobody to close it.
    async fn subscribe(
        &self,
        call: &Call<'_>,
        rule: usize,
        reservation: Reservation,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        let owned = OwnedCall::of(call);
        let upstreams = self.state.upstreams.clone();
        let hub = self.state.hub.clone();
        let payer = self.payer.clone();
        let route = OwnedRoute::of(self.route);
        let task = tokio::spawn(async move {
            let call = owned.call();
            let msg = Outbound::Call(&call);
            match dispatch::send(&upstreams, msg, route.route(), Some(&payer), deadline).await? {
                Sent::Reply(reply) => Ok(hub.subscribed(reservation, rule, &call, reply)),
                _ => Err(Error::Internal("a call was answered as if it were not one")),
            }
        });
        task.await
            .unwrap_or(Err(Error::Internal("a subscribe call's task failed")))
    }

    async fn plain_call(
        &self,
        call: &Call<'_>,
        route: Route<'_>,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        let sent = dispatch::send(
            &self.state.upstreams,
            Outbound::Call(call),
            route,
            Some(self.payer),
            deadline,
        );
        match sent.await? {
            Sent::Reply(reply) => Ok(reply),
            _ => Err(Error::Internal("a call was answered as if it were not one")),
        }
    }

    async fn notify(&self, call: &Call<'_>, deadline: Instant) -> Result<(), Error> {
        self.admit(&call.method_name())?;
        if !matches!(self.route, Route::Own(_))
            && self.state.hub.kind_of(&call.method_name()).is_some()
        {
            // On shared sockets a subscription's id is only unique per socket, and the
            // hub checks an unsubscribe against the caller's own: a notification skips
            // that check, and nobody would learn what a subscribe opened.
            tracing::debug!(method = %call.method_name(), "a subscribe or unsubscribe sent as a notification is not forwarded");
            return Ok(());
        }
        self.send(Outbound::Notification(call), deadline)
            .await
            .map(|_| ())
    }

    async fn forward(
        &self,
        calls: &[Call<'_>],
        deadline: Instant,
    ) -> Result<Vec<Result<Reply, Error>>, Error> {
        match self.send(Outbound::Batch(calls), deadline).await? {
            Sent::Batch(answers) => Ok(answers),
            _ => Err(Error::Internal(
                "a batch was answered as if it were not one",
            )),
        }
    }

    /// A notification or forwarded batch (calls go through [`Via::call`]).
    async fn send(&self, msg: Outbound<'_>, deadline: Instant) -> Result<Sent, Error> {
        dispatch::send(
            &self.state.upstreams,
            msg,
            self.route,
            Some(self.payer),
            deadline,
        )
        .await
    }

    /// Counts a request object that was not a valid call: it never reaches the
    /// dispatch pipeline, which counts every other call.
    fn count_invalid(&self) {
        self.state
            .metrics
            .rpc_calls
            .with_label_values(&["other", "invalid"])
            .inc();
    }
}

async fn single(call: Call<'_>, via: &Via<'_>, deadline: Instant) -> Answer {
    match call.id {
        None => match via.notify(&call, deadline).await {
            Ok(()) => Answer::Nothing,
            Err(e) => Answer::failed(None, e),
        },
        Some(id) => match via.call(&call, deadline).await {
            Ok(reply) => Answer::Reply {
                bytes: response::reply_bytes(id, &reply),
                upstream: reply.upstream,
            },
            Err(e) => Answer::failed(Some(id), e),
        },
    }
}

/// One element's answer inside a batch response; `None` for notifications.
type Slot = Option<Vec<u8>>;

async fn batch(entries: Vec<Entry<'_>>, via: &Via<'_>, deadline: Instant) -> Answer {
    let n = entries.len();
    via.state.metrics.batch_size.observe(n as f64);
    // Subscribe and unsubscribe calls need rpcgate to see their answers one by one: a
    // batch holding one is split, whatever `http.batch` says.
    let pushy = entries
        .iter()
        .flatten()
        .any(|call| via.state.hub.kind_of(&call.method_name()).is_some());
    let mode = match pushy {
        true => BatchMode::Split,
        false => via.state.config.http.batch,
    };
    let slots: Vec<Slot> = match mode {
        BatchMode::Split => {
            join_all(entries.iter().map(|entry| element(entry, via, deadline))).await
        }
        BatchMode::Forward => forward(&entries, via, deadline).await,
    };
    let answered: Vec<Vec<u8>> = slots.into_iter().flatten().collect();
    if answered.is_empty() {
        return Answer::Batch {
            bytes: Vec::new(),
            len: n,
            limited: None,
        };
    }
    // Every answer a rate limit's refusal: the batch as a whole was limited, and says
    // so in its status and `Retry-After`, as a single call would.
    let limited = match std::mem::take(&mut *via.limited.lock()) {
        (count, Some(e)) if count == answered.len() => Some(e),
        _ => None,
    };
    let len = answered.iter().map(|a| a.len() + 1).sum::<usize>() + 1;
    let mut out = Vec::with_capacity(len);
    out.push(b'[');
    for (i, item) in answered.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
    Answer::Batch {
        bytes: out,
        len: n,
        limited,
    }
}

/// One batch element sent as its own upstream call.
async fn element(entry: &Entry<'_>, via: &Via<'_>, deadline: Instant) -> Slot {
    match entry {
        Err(Invalid { id, reason }) => {
            via.count_invalid();
            Some(response::error_bytes(*id, &Error::InvalidRequest(reason)))
        }
        Ok(call) => match call.id {
            // A notification's failure has nobody to be told to, by definition.
            None => {
                let _ = via.notify(call, deadline).await;
                None
            }
            Some(id) => Some(match via.call(call, deadline).await {
                Ok(reply) => response::reply_bytes(id, &reply),
                Err(e) => response::error_bytes(Some(id), &e),
            }),
        },
    }
}

/// The valid, admitted elements go upstream as one frame; invalid and refused ones
/// are answered here.
async fn forward(entries: &[Entry<'_>], via: &Via<'_>, deadline: Instant) -> Vec<Slot> {
    let refused: Vec<Option<Error>> = entries
        .iter()
        .map(|e| match e {
            Ok(call) => via.admit(&call.method_name()).err(),
            Err(_) => None,
        })
        .collect();
    let calls: Vec<Call<'_>> = entries
        .iter()
        .zip(&refused)
        .filter(|(_, refused)| refused.is_none())
        .filter_map(|(e, _)| e.as_ref().ok().copied())
        .collect();
    let expecting = calls.iter().filter(|c| !c.is_notification()).count();
    let answers: Vec<Result<Reply, Error>> = if calls.is_empty() {
        Vec::new()
    } else {
        match via.forward(&calls, deadline).await {
            Ok(answers) => answers,
            // No connection took the batch: every call in it gets the same error.
            Err(e) => vec![Err(e); expecting],
        }
    };
    for _ in entries.iter().filter(|e| e.is_err()) {
        via.count_invalid();
    }
    let mut answers = answers.into_iter();
    entries
        .iter()
        .zip(refused)
        .map(|(entry, refused)| match (entry, refused) {
            (Err(Invalid { id, reason }), _) => {
                Some(response::error_bytes(*id, &Error::InvalidRequest(reason)))
            }
            // A refused notification, like any notification, gets no answer.
            (Ok(call), Some(e)) => {
                let id = call.id?;
                via.note_refused(&e);
                Some(response::error_bytes(Some(id), &e))
            }
            (Ok(call), None) => {
                let id = call.id?;
                Some(match answers.next() {
                    Some(Ok(reply)) => response::reply_bytes(id, &reply),
                    Some(Err(e)) => response::error_bytes(Some(id), &e),
                    None => {
                        response::error_bytes(Some(id), &Error::Internal("batch reply missing"))
                    }
                })
            }
        })
        .collect()
}
