//! WAMP v2 upstreams (`protocol = "wamp"`): each persistent connection is one WAMP
//! session on a router, and JSON-RPC calls, subscriptions and publications travel as
//! WAMP messages.
//!
//! - `codec`: the messages, parsed from a router's frames (pure).
//! - `write`: the messages we send, and the JSON-RPC mapping rules (pure).
//! - `cra`: WAMP-CRA signatures.
//! - `join`: HELLO / CHALLENGE / WELCOME on a fresh socket.
//! - `bridge`: one session's translation state between the multiplexer's JSON-RPC
//!   frames and the router's messages (local subscription ids, CANCEL on give-up).

mod bridge;
mod codec;
mod cra;
mod join;
mod write;

pub(crate) use bridge::{Bridge, Ended, Link};
pub use codec::*;
pub use cra::*;
pub(crate) use join::{JoinError, Joined, join};
pub use write::*;

/// A [`Bridge`] driven by hand, for `benches/micro.rs` and the `wamp_frame` fuzz
/// target: not part of the API.
#[doc(hidden)]
pub struct BenchBridge {
    bridge: Bridge,
    messages: Vec<String>,
    local: Vec<bytes::Bytes>,
}

impl BenchBridge {
    pub fn new(prefix: &str) -> BenchBridge {
        let link = Link {
            realm: "realm1".into(),
            procedures: Procedures::new(prefix),
            auth: None,
            auth_at: String::new(),
            methods: crate::config::WampConfig::default(),
        };
        BenchBridge {
            bridge: Bridge::new(std::sync::Arc::new(link), 1, true),
            messages: Vec::new(),
            local: Vec::new(),
        }
    }

    /// A queued JSON-RPC frame: the WAMP messages written, and the replies answered
    /// without the router.
    pub fn outbound(&mut self, frame: &str) -> (Vec<String>, Vec<bytes::Bytes>) {
        self.bridge
            .outbound(frame, &mut self.messages, &mut self.local);
        (
            std::mem::take(&mut self.messages),
            std::mem::take(&mut self.local),
        )
    }

    /// A router frame: the JSON-RPC frames for the multiplexer, or why the session
    /// ended; `Ok(None)` for a frame the session does not read.
    pub fn inbound(&mut self, frame: &str) -> Result<Option<Vec<bytes::Bytes>>, String> {
        let mut out = Vec::new();
        match self.bridge.inbound(frame, &mut out) {
            Ok(true) => Ok(Some(out)),
            Ok(false) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// What a caller giving up on `request` makes the writer send next.
    pub fn forget(&mut self, request: u64) -> Vec<String> {
        self.bridge.forget(request);
        let mut out = Vec::new();
        self.bridge.take_outbox(&mut out);
        out
    }

    /// `frame` (a JSON-RPC call) out as CALL, `result` (its RESULT) back in; returns
    /// the bytes written both ways.
    pub fn round_trip(&mut self, frame: &str, result: &str) -> usize {
        self.bridge
            .outbound(frame, &mut self.messages, &mut self.local);
        let _ = self.bridge.inbound(result, &mut self.local);
        let n = self.messages.iter().map(String::len).sum::<usize>()
            + self.local.iter().map(|b| b.len()).sum::<usize>();
        self.messages.clear();
        self.local.clear();
        n
    }
}
