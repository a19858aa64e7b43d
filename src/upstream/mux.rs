//! The multiplexer state of one upstream connection: which of our ids wait for a reply,
//! which frames wait for the socket, and matching a reply frame to its callers.
//!
//! Plain synchronous data with no I/O, like [`PendingMap`] inside it: the connection
//! handle (`conn.rs`) wraps it in a mutex that is never held across an `.await`, and the
//! socket task (`socket.rs`) only moves frames in and out of it. That keeps every rule
//! about "may this call still be retried?" in one place that tests can drive by hand.
//!
//! **Ids are allocated here** ([`Mux::submit`]): each frame gets its calls' new ids from
//! the connection's [`PendingMap`] and is finished with them in the same critical
//! section that queues it, so a call is either queued on an accepting socket or
//! refused; there is no window where it is neither. **Replies are matched here**
//! ([`Mux::deliver`]).

use super::pending::{CallId, PendingMap};
use crate::budget::{Budgets, Charge};
use crate::jsonrpc::Message;
use bytes::Bytes;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use tokio::sync::oneshot;

/// A reply to one call, pointing into the frame it arrived in.
///
/// Holding the frame (a refcounted `Bytes`) and a range avoids copying the payload:
/// the HTTP handler splices it straight into the client's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    frame: Bytes,
    range: Range<usize>,
    is_error: bool,
    /// The upstream that answered (none for a session's own connection), for the
    /// access log.
    pub upstream: Option<Arc<str>>,
    /// The connection that answered: where a subscription it opened lives.
    pub conn: Option<Arc<super::Conn>>,
}

impl Reply {
    /// The raw text of `result` (or `error` when [`Reply::is_error`]).
    pub fn payload(&self) -> &str {
        // The frame was valid UTF-8 when parsed and the range lies on a JSON value's bounds.
        std::str::from_utf8(&self.frame[self.range.clone()]).unwrap_or("null")
    }

    pub fn is_error(&self) -> bool {
        self.is_error
    }

    /// A result rpcgate answers itself (`text` is valid JSON).
    pub fn local(text: &'static str) -> Reply {
        Reply {
            frame: Bytes::from_static(text.as_bytes()),
            range: 0..text.len(),
            is_error: false,
            upstream: None,
            conn: None,
        }
    }

    /// The same reply with `result` replaced by `text` (valid JSON).
    pub fn with_result(&self, text: String) -> Reply {
        let len = text.len();
        Reply {
            frame: Bytes::from(text),
            range: 0..len,
            is_error: false,
            upstream: self.upstream.clone(),
            conn: self.conn.clone(),
        }
    }
}

/// Why a call got no reply from this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The frame never reached the socket: the call can safely go elsewhere.
    NotSent,
    /// The socket died after the frame was written: the call may have run.
    Lost,
    /// The upstream answered with something that is no JSON-RPC reply.
    InvalidReply,
}

pub(crate) type ReplySender = oneshot::Sender<Result<Reply, Failure>>;

/// The reply channels of one message: one for a call, inline.
pub(crate) type ReplySenders = smallvec::SmallVec<[ReplySender; 1]>;

/// Why a connection did not take a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The socket is not accepting (closed since the pick, or still preparing): another
    /// connection may take it.
    Closed,
    /// The queue is full: the writer is stuck behind an upstream that does not read.
    /// Retrying would spin; the caller answers "overloaded".
    Full,
    /// The client's memory budget has no room for the frame: the request body and its
    /// rewritten frame both exist until the frame is written.
    Memory,
}

/// Which frames a connection takes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No socket: everything is refused.
    Closed,
    /// A fresh socket running its `on_connect` and replay calls: only those get in, so
    /// no call can overtake the state they set up.
    Preparing,
    /// Serving every call.
    Open,
}

/// The ids a queued frame carries: what its callers are told if the socket dies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameIds {
    /// A notification: nobody waits.
    None,
    One(CallId),
    /// A forwarded batch.
    Many(Vec<CallId>),
}

impl FrameIds {
    pub fn as_slice(&self) -> &[CallId] {
        match self {
            FrameIds::None => &[],
            FrameIds::One(id) => std::slice::from_ref(id),
            FrameIds::Many(ids) => ids,
        }
    }
}

/// A frame waiting for the socket, with the calls it carries.
#[derive(Debug)]
pub struct Frame {
    pub text: String,
    pub ids: FrameIds,
    /// The frame's bytes against its client's memory budget, given back when the
    /// writer has handed the frame to the socket (or it is dropped unsent).
    #[allow(dead_code)] // Held for its `Drop`, never read.
    pub charge: Option<Charge>,
}

/// What one upstream frame held: what was matched, what was pushed, what was nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Where in the frame each notification or server request lies, for the push
    /// router (`push/`), which reads them outside the lock.
    pub pushed: Vec<Range<usize>>,
    /// Replies handed to their callers.
    pub matched: usize,
    /// Replies that answer nobody waiting: to calls that already gave up, or to ids
    /// that are not ours.
    pub unsolicited: usize,
    /// Frames or elements that are not JSON-RPC at all.
    pub garbage: usize,
}

/// How each caller of a dead socket was answered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    /// Still queued (or taken but not written): safe to send elsewhere.
    pub not_sent: usize,
    /// Written: the call may have run.
    pub lost: usize,
}

/// One connection's calls waiting for replies and frames waiting for the socket.
#[derive(Debug)]
pub struct Mux {
    phase: Phase,
    pending: PendingMap<ReplySender>,
    queue: VecDeque<Frame>,
    /// Frames queued at most; past it the socket is not keeping up.
    max_queue: usize,
    /// Bytes of the queued frames, and their limit: a few large calls to an upstream
    /// that stopped reading must not pile up megabytes each until their deadlines.
    queued_bytes: usize,
    max_queue_bytes: usize,
}

impl Mux {
    pub fn new(max_queue: usize, max_queue_bytes: usize) -> Mux {
        Mux {
            phase: Phase::Closed,
            pending: PendingMap::default(),
            queue: VecDeque::new(),
            max_queue,
            queued_bytes: 0,
            max_queue_bytes,
        }
    }

    /// A socket is up (`Preparing`) or ready for every call (`Open`).
    pub fn set_phase(&mut self, phase: Phase) {
        if phase != Phase::Closed {
            self.pending.open();
        }
        self.phase = phase;
    }

    /// Registers one waiter per entry of `replies`, finishes the frame with their new
    /// ids (`build` gets them in order) and queues it. `prelude` frames are the only
    /// ones a preparing socket takes. The frame is charged to `payer` until written.
    pub fn submit(
        &mut self,
        prelude: bool,
        payer: Option<&Budgets>,
        replies: ReplySenders,
        build: impl FnOnce(&[CallId]) -> String,
    ) -> Result<FrameIds, Refused> {
        let accepting = match self.phase {
            Phase::Open => true,
            Phase::Preparing => prelude,
            Phase::Closed => false,
        };
        if !accepting {
            return Err(Refused::Closed);
        }
        if self.queue.len() >= self.max_queue {
            return Err(Refused::Full);
        }
        let ids = match replies.len() {
            0 => FrameIds::None,
            1 => {
                let Some(tx) = replies.into_iter().next() else {
                    return Err(Refused::Closed);
                };
                match self.pending.insert(tx) {
                    Ok(id) => FrameIds::One(id),
                    Err(_) => return Err(Refused::Closed),
                }
            }
            _ => {
                let mut ids = Vec::with_capacity(replies.len());
                for tx in replies {
                    // Cannot fail: the map opened with the phase and we hold the lock.
                    if let Ok(id) = self.pending.insert(tx) {
                        ids.push(id);
                    }
                }
                FrameIds::Many(ids)
            }
        };
        let text = build(ids.as_slice());
        let refused = |pending: &mut PendingMap<ReplySender>, why| {
            for &id in ids.as_slice() {
                pending.remove(id);
            }
            Err(why)
        };
        // An empty queue takes any frame, or one larger than the limit could never go.
        if self.queued_bytes > 0 && self.queued_bytes + text.len() > self.max_queue_bytes {
            return refused(&mut self.pending, Refused::Full);
        }
        let charge = match payer.map(|budgets| budgets.charge(text.len())) {
            Some(None) => return refused(&mut self.pending, Refused::Memory),
            charge => charge.flatten(),
        };
        self.queued_bytes += text.len();
        self.queue.push_back(Frame {
            text,
            ids: ids.clone(),
            charge,
        });
        Ok(ids)
    }

    /// Frames waiting for the socket.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Moves queued frames, oldest first, into `out` for the writer, until `out` holds
    /// `max` frames or at least `max_bytes` bytes (always one, however large). Frames
    /// left here still count against `max_queue_bytes`: a writer stuck on a large
    /// batch makes later calls refused, instead of taking them all off the books.
    pub fn take(&mut self, out: &mut Vec<Frame>, max: usize, max_bytes: usize) -> usize {
        let mut bytes: usize = out.iter().map(|f| f.text.len()).sum();
        let mut n = 0;
        while out.len() < max && (bytes < max_bytes || out.is_empty()) {
            let Some(frame) = self.queue.pop_front() else {
                break;
            };
            self.queued_bytes -= frame.text.len();
            bytes += frame.text.len();
            out.push(frame);
            n += 1;
        }
        n
    }

    /// A caller gave up (timeout, client gone): forget its call. A reply that still
    /// comes counts as unsolicited.
    pub fn forget(&mut self, id: CallId) {
        self.pending.remove(id);
    }

    /// Calls waiting for a reply.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Matches one upstream frame's replies to their callers.
    pub fn deliver(&mut self, frame: &Bytes) -> Delivery {
        let mut seen = Delivery::default();
        let Ok(text) = std::str::from_utf8(frame) else {
            seen.garbage = 1;
            return seen;
        };
        let base = text.as_ptr() as usize;
        let pending = &mut self.pending;
        let inbound = crate::jsonrpc::read_upstream(text, |message| {
            let (id, outcome) = match message {
                Message::Reply(id, outcome) => (id, outcome),
                Message::Pushed(p) => {
                    let start = p.text.as_ptr() as usize - base;
                    seen.pushed.push(start..start + p.text.len());
                    return;
                }
            };
            let Some(tx) = pending.remove(id) else {
                seen.unsolicited += 1;
                return;
            };
            seen.matched += 1;
            let answer = match outcome.payload() {
                Some(payload) => {
                    let start = payload.get().as_ptr() as usize - base;
                    Ok(Reply {
                        frame: frame.clone(),
                        range: start..start + payload.get().len(),
                        is_error: outcome.is_error(),
                        upstream: None,
                        conn: None,
                    })
                }
                None => Err(Failure::InvalidReply),
            };
            let _ = tx.send(answer);
        });
        seen.unsolicited += inbound.unsolicited;
        seen.garbage += inbound.garbage;
        seen
    }

    /// The socket is gone: answer every caller now. Frames still queued, and `unsent`
    /// (taken by the writer but not written), never reached the upstream, so their
    /// callers may go elsewhere; the rest may have run.
    pub fn close(&mut self, unsent: Vec<Frame>) -> Closed {
        self.phase = Phase::Closed;
        let mut waiting: std::collections::HashMap<CallId, ReplySender> =
            self.pending.close().into_iter().collect();
        let mut closed = Closed::default();
        for frame in unsent.into_iter().chain(self.queue.drain(..)) {
            for id in frame.ids.as_slice() {
                if let Some(tx) = waiting.remove(id) {
                    closed.not_sent += 1;
                    let _ = tx.send(Err(Failure::NotSent));
                }
            }
        }
        self.queued_bytes = 0;
        // A burst can leave a large ring behind; give the memory back while down.
        self.queue.shrink_to(64);
        closed.lost = waiting.len();
        for (_, tx) in waiting {
            let _ = tx.send(Err(Failure::Lost));
        }
        closed
    }
}

#[cfg(test)]
mod tests;
