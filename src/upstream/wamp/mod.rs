//! WAMP v2 upstreams (`protocol = "wamp"`): each persistent connection is one WAMP
//! session on a router, and JSON-RPC calls, subscriptions and publications travel as
//! WAMP messages.
//!
//! - `codec`: the messages and the JSON-RPC mapping rules, as pure functions.
//! - `join`: HELLO / CHALLENGE / WELCOME on a fresh socket.
//! - `bridge`: one session's translation state between the multiplexer's JSON-RPC
//!   frames and the router's messages (local subscription ids, CANCEL on give-up).

mod bridge;
mod codec;
mod join;

pub(crate) use bridge::{Bridge, Ended, Link};
pub use codec::*;
pub(crate) use join::{JoinError, join};

/// One call through a [`Bridge`] both ways, for `benches/micro.rs`.
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
            bridge: Bridge::new(std::sync::Arc::new(link), 1),
            messages: Vec::new(),
            local: Vec::new(),
        }
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
