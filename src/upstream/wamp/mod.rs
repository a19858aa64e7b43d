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
