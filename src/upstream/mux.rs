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

/// Why a connection did not take a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The socket is not accepting (closed since the pick, or still preparing): another
    /// connection may take it.
    Closed,
    /// The queue is full: the writer is stuck behind an upstream that does not read.
    /// Retrying would spin; the caller answers "overloaded".
    Full,
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
}

/// What one upstream frame held, for counting what matched nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Replies handed to their callers.
    pub matched: usize,
    /// Valid messages that answer nobody waiting: notifications, server requests,
    /// replies to calls that already gave up.
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
    /// ones a preparing socket takes.
    pub fn submit(
        &mut self,
        prelude: bool,
        replies: Vec<ReplySender>,
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
        // An empty queue takes any frame, or one larger than the limit could never go.
        if self.queued_bytes > 0 && self.queued_bytes + text.len() > self.max_queue_bytes {
            for &id in ids.as_slice() {
                self.pending.remove(id);
            }
            return Err(Refused::Full);
        }
        self.queued_bytes += text.len();
        self.queue.push_back(Frame {
            text,
            ids: ids.clone(),
        });
        Ok(ids)
    }

    /// Frames waiting for the socket.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Moves up to `max` queued frames, oldest first, into `out` for the writer.
    pub fn take(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        let n = self.queue.len().min(max.saturating_sub(out.len()));
        for frame in self.queue.drain(..n) {
            self.queued_bytes -= frame.text.len();
            out.push(frame);
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
        let inbound = crate::jsonrpc::read_upstream(text, |id, outcome| {
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
mod tests {
    use super::*;

    type ReplyReceiver = oneshot::Receiver<Result<Reply, Failure>>;

    fn call(mux: &mut Mux, prelude: bool) -> (Result<FrameIds, Refused>, ReplyReceiver) {
        let (tx, rx) = oneshot::channel();
        let ids = mux.submit(prelude, vec![tx], |ids| {
            format!(r#"{{"jsonrpc":"2.0","method":"m","id":{}}}"#, ids[0])
        });
        (ids, rx)
    }

    fn answer(rx: &mut ReplyReceiver) -> Option<Result<Reply, Failure>> {
        rx.try_recv().ok()
    }

    #[test]
    fn a_closed_mux_refuses_and_a_preparing_one_takes_only_prelude_frames() {
        let mut mux = Mux::new(8, 1 << 20);
        assert_eq!(call(&mut mux, false).0, Err(Refused::Closed));
        mux.set_phase(Phase::Preparing);
        assert_eq!(call(&mut mux, false).0, Err(Refused::Closed));
        assert!(call(&mut mux, true).0.is_ok());
        mux.set_phase(Phase::Open);
        assert!(call(&mut mux, false).0.is_ok());
        assert_eq!(mux.queued(), 2);
    }

    #[test]
    fn frames_carry_the_ids_they_were_given_and_replies_find_their_caller() {
        let mut mux = Mux::new(8, 1 << 20);
        mux.set_phase(Phase::Open);
        let (a, mut rx_a) = call(&mut mux, false);
        let (b, mut rx_b) = call(&mut mux, false);
        let (FrameIds::One(a), FrameIds::One(b)) = (a.unwrap(), b.unwrap()) else {
            panic!("one id each");
        };
        let mut frames = Vec::new();
        assert_eq!(mux.take(&mut frames, 16), 2);
        assert!(frames[1].text.ends_with(&format!(r#""id":{b}}}"#)));
        // Out of order, in one upstream batch frame.
        let reply = format!(
            r#"[{{"jsonrpc":"2.0","id":{b},"result":"B"}},{{"jsonrpc":"2.0","id":{a},"error":{{"code":1,"message":"m"}}}}]"#
        );
        let seen = mux.deliver(&Bytes::from(reply));
        assert_eq!(seen.matched, 2);
        let b = answer(&mut rx_b).unwrap().unwrap();
        assert_eq!((b.payload(), b.is_error()), (r#""B""#, false));
        let a = answer(&mut rx_a).unwrap().unwrap();
        assert_eq!(
            (a.payload(), a.is_error()),
            (r#"{"code":1,"message":"m"}"#, true)
        );
        assert_eq!(mux.pending_len(), 0);
    }

    #[test]
    fn a_reply_nobody_waits_for_is_unsolicited_and_a_non_jsonrpc_frame_is_garbage() {
        let mut mux = Mux::new(8, 1 << 20);
        mux.set_phase(Phase::Open);
        let (id, _rx) = call(&mut mux, false);
        let FrameIds::One(id) = id.unwrap() else {
            panic!()
        };
        mux.forget(id);
        let late = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":1}}"#);
        assert_eq!(mux.deliver(&Bytes::from(late)).unsolicited, 1);
        let note = r#"{"jsonrpc":"2.0","method":"tick","params":[1]}"#;
        assert_eq!(mux.deliver(&Bytes::from(note)).unsolicited, 1);
        assert_eq!(mux.deliver(&Bytes::from_static(b"\xff\xfe")).garbage, 1);
        assert_eq!(mux.deliver(&Bytes::from_static(b"{}")).garbage, 1);
    }

    #[test]
    fn closing_tells_queued_callers_not_sent_and_written_ones_lost() {
        let mut mux = Mux::new(8, 1 << 20);
        mux.set_phase(Phase::Open);
        let (_, mut written) = call(&mut mux, false);
        let (_, mut taken) = call(&mut mux, false);
        let (_, mut queued) = call(&mut mux, false);
        let mut frames = Vec::new();
        mux.take(&mut frames, 1); // written
        let mut half = Vec::new();
        mux.take(&mut half, 1); // taken by the writer, not written
        let closed = mux.close(half);
        assert_eq!(
            closed,
            Closed {
                not_sent: 2,
                lost: 1
            }
        );
        assert!(matches!(answer(&mut written), Some(Err(Failure::Lost))));
        assert!(matches!(answer(&mut taken), Some(Err(Failure::NotSent))));
        assert!(matches!(answer(&mut queued), Some(Err(Failure::NotSent))));
        assert_eq!(call(&mut mux, false).0, Err(Refused::Closed));
    }

    #[test]
    fn ids_keep_growing_across_reconnects_so_a_late_reply_never_matches_a_new_call() {
        let mut mux = Mux::new(8, 1 << 20);
        mux.set_phase(Phase::Open);
        let (old, _rx) = call(&mut mux, false);
        mux.close(Vec::new());
        mux.set_phase(Phase::Open);
        let (new, mut rx) = call(&mut mux, false);
        let (FrameIds::One(old), FrameIds::One(new)) = (old.unwrap(), new.unwrap()) else {
            panic!()
        };
        assert!(new > old);
        let late = format!(r#"{{"jsonrpc":"2.0","id":{old},"result":1}}"#);
        assert_eq!(mux.deliver(&Bytes::from(late)).matched, 0);
        assert!(answer(&mut rx).is_none());
    }

    #[test]
    fn a_full_queue_refuses_without_registering_the_call() {
        let mut mux = Mux::new(2, 1 << 20);
        mux.set_phase(Phase::Open);
        call(&mut mux, false).0.unwrap();
        call(&mut mux, false).0.unwrap();
        assert_eq!(call(&mut mux, false).0, Err(Refused::Full));
        assert_eq!(mux.pending_len(), 2);
    }

    #[test]
    fn queued_bytes_are_bounded_but_an_empty_queue_takes_any_frame() {
        let mut mux = Mux::new(100, 1000);
        mux.set_phase(Phase::Open);
        let big = |mux: &mut Mux, len: usize| {
            let (tx, _rx) = oneshot::channel();
            mux.submit(false, vec![tx], |_| "x".repeat(len))
        };
        assert!(big(&mut mux, 1500).is_ok(), "alone, even over the limit");
        assert_eq!(big(&mut mux, 10), Err(Refused::Full));
        assert_eq!(mux.pending_len(), 1, "the refused call left nothing behind");
        let mut frames = Vec::new();
        mux.take(&mut frames, 10);
        assert!(big(&mut mux, 600).is_ok());
        assert!(big(&mut mux, 400).is_ok());
        assert_eq!(big(&mut mux, 1), Err(Refused::Full));
        frames.clear();
        mux.take(&mut frames, 1);
        assert!(big(&mut mux, 600).is_ok(), "taking a frame frees its bytes");
    }

    #[test]
    fn a_batch_gets_one_id_per_waiting_call_in_order() {
        let mut mux = Mux::new(8, 1 << 20);
        mux.set_phase(Phase::Open);
        let (senders, _receivers): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        let ids = mux
            .submit(false, senders, |ids| format!("{ids:?}"))
            .unwrap();
        let mut frames = Vec::new();
        mux.take(&mut frames, 8);
        assert_eq!(ids.as_slice().len(), 3);
        assert_eq!(frames[0].text, format!("{:?}", ids.as_slice()));
        let note = mux.submit(false, Vec::new(), |_| "n".into()).unwrap();
        assert_eq!(note, FrameIds::None);
    }
}
