//! One HTTP request in, exactly one HTTP answer out: the body read within its limits,
//! parsed, and each call sent through the dispatch pipeline.
//!
//! The cheap checks (path, method, content type, declared length) already ran in the
//! stack (`stack.rs`); every failure leaves through `response::error`, the only place
//! an [`Error`] becomes HTTP.

use super::AppState;
use super::response::{self, HttpResponse};
use super::session_key::{SessionKey, session_of};
use crate::budget::{Budgets, Charge};
use crate::config::{Affinity, BatchMode};
use crate::dispatch::{self, Outbound, Route, Sent};
use crate::error::{Busy, Error};
use crate::jsonrpc::{self, Body, Call, Entry, Invalid};
use crate::upstream::{Conn, Reply};
use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use http::header::{CONTENT_LENGTH, SET_COOKIE};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;
use tokio::time::Instant;

/// Answers one request that passed the stack's checks (`stack.rs`).
pub async fn handle(req: Request<Incoming>, state: &AppState) -> HttpResponse {
    let http = &state.config.http;
    let limit = http.max_body_bytes;
    let session = match session_of(&req, state) {
        Ok(s) => s,
        Err(e) => return response::error(None, &e),
    };
    let budgets = match req.extensions().get::<Budgets>() {
        Some(budgets) => budgets.clone(),
        None => state.connection_budgets(),
    };
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
    let via = Via {
        state,
        route: route_of(state, session.as_ref(), own.as_ref()),
        payer: &budgets,
    };
    let mut resp = match jsonrpc::parse_body(&body, http.max_batch_size) {
        Err(e) => response::error(None, &e),
        Ok(Body::Single(entry)) => single(entry, &via, deadline).await,
        Ok(Body::Batch(entries)) => batch(entries, &via, deadline).await,
    };
    if let Some(SessionKey {
        key,
        issued: Some(secure),
        ..
    }) = &session
    {
        let cfg = &state.config.sessions;
        let mut cookie = format!("{}={key}; Path=/; HttpOnly; SameSite=Lax", cfg.cookie);
        if *secure {
            cookie.push_str("; Secure");
        }
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

/// Reads the whole body within `limit` bytes and `timeout`, charging it to `budgets`
/// as it arrives: a body that does not fit is refused before the rest is read.
async fn read_body(
    req: Request<Incoming>,
    budgets: &Budgets,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<(Bytes, Charge), Error> {
    let over_budget = Error::Overloaded(Busy::Memory);
    if !budgets.has_room() {
        return Err(over_budget);
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // A declared length is charged whole, up front: refused before a byte is read.
    let mut charge = match declared {
        Some(len) => budgets.charge(len).ok_or(over_budget.clone())?,
        None => budgets.empty(),
    };
    let mut body = req.into_body();
    // Most bodies arrive in one chunk: that one is kept as it came, without a copy.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                // The client broke off mid-body; whatever we answer will likely not arrive.
                tracing::debug!(error = %e, "reading request body failed");
                Error::InvalidRequest("request body could not be read")
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = buf.len() + first.as_ref().map_or(0, Bytes::len) + data.len();
            if len > limit {
                return Err(Error::PayloadTooLarge { limit });
            }
            if len > charge.bytes() && !charge.grow(len - charge.bytes()) {
                return Err(over_budget.clone());
            }
            match first.take() {
                None if buf.is_empty() => first = Some(data),
                earlier => {
                    if let Some(earlier) = earlier {
                        buf.reserve(declared.unwrap_or(len).min(limit));
                        buf.extend_from_slice(&earlier);
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok((first.unwrap_or_else(|| buf.freeze()), charge)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::BodyTimeout(timeout)),
    }
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

/// Where this request's calls go: one value, decided once per request.
fn route_of<'a>(
    state: &AppState,
    session: Option<&'a SessionKey>,
    own: Option<&'a Arc<Conn>>,
) -> Route<'a> {
    match (own, session) {
        (Some(conn), _) => Route::Own(conn),
        (None, Some(SessionKey { key, .. }))
            if state.config.sessions.affinity == Affinity::Upstream =>
        {
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
}

impl Via<'_> {
    async fn call(&self, call: &Call<'_>, deadline: Instant) -> Result<Reply, Error> {
        match self.send(Outbound::Call(call), deadline).await? {
            Sent::Reply(reply) => Ok(reply),
            _ => Err(Error::Internal("a call was answered as if it were not one")),
        }
    }

    async fn notify(&self, call: &Call<'_>, deadline: Instant) -> Result<(), Error> {
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

async fn single(entry: Entry<'_>, via: &Via<'_>, deadline: Instant) -> HttpResponse {
    let call = match entry {
        Ok(call) => call,
        Err(Invalid { id, reason }) => {
            via.count_invalid();
            return response::error(id, &Error::InvalidRequest(reason));
        }
    };
    match call.id {
        None => match via.notify(&call, deadline).await {
            Ok(()) => response::no_content(),
            Err(e) => response::error(None, &e),
        },
        Some(id) => match via.call(&call, deadline).await {
            Ok(reply) => {
                let mut resp = response::json(StatusCode::OK, response::reply_bytes(id, &reply));
                if let Some(upstream) = reply.upstream {
                    resp.extensions_mut().insert(response::AnsweredBy(upstream));
                }
                resp
            }
            Err(e) => response::error(Some(id), &e),
        },
    }
}

/// One element's answer inside a batch response; `None` for notifications.
type Slot = Option<Vec<u8>>;

async fn batch(entries: Vec<Entry<'_>>, via: &Via<'_>, deadline: Instant) -> HttpResponse {
    let n = entries.len();
    via.state.metrics.batch_size.observe(n as f64);
    let mut resp = batch_answer(entries, via, deadline).await;
    resp.extensions_mut().insert(response::BatchLen(n));
    resp
}

async fn batch_answer(entries: Vec<Entry<'_>>, via: &Via<'_>, deadline: Instant) -> HttpResponse {
    let slots: Vec<Slot> = match via.state.config.http.batch {
        BatchMode::Split => {
            join_all(entries.iter().map(|entry| element(entry, via, deadline))).await
        }
        BatchMode::Forward => forward(&entries, via, deadline).await,
    };
    let answered: Vec<Vec<u8>> = slots.into_iter().flatten().collect();
    if answered.is_empty() {
        return response::no_content();
    }
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
    response::json(StatusCode::OK, out)
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

/// The valid elements go upstream as one frame; invalid ones are answered here.
async fn forward(entries: &[Entry<'_>], via: &Via<'_>, deadline: Instant) -> Vec<Slot> {
    let calls: Vec<Call<'_>> = entries
        .iter()
        .filter_map(|e| e.as_ref().ok().copied())
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
        .map(|entry| match entry {
            Err(Invalid { id, reason }) => {
                Some(response::error_bytes(*id, &Error::InvalidRequest(reason)))
            }
            Ok(call) => {
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
