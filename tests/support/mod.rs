#![allow(dead_code)]
//! Shared support for the black-box integration tests; every `tests/*.rs` does `mod support;`.
//!
//! Layout:
//! - this file: [`with_timeout`], the guard every await that could hang goes through.
//! - `binary`: the real `rpcgate` binary in a child process, its address, signals.
//! - `admin`: `/metrics` samples and `eventually`, for tests that watch the admin listener.
//! - `fake_upstream`: [`FakeUpstream`], a real WebSocket server whose every frame is handed to the
//!   test, so the test decides when and how the upstream answers.
//! - `ganache`: [`ganache::Ganache`], a real Ethereum node (npm `ganache`) for `eth_subscribe`
//!   pushes; `.ci/run` installs it.
//! - `crossbar`: [`crossbar::Router`], a real WAMP router (Crossbar.io) on free loopback ports
//!   that can be stopped and restarted on the same ports, and [`crossbar::Component`], the
//!   Autobahn callee and publisher `tests/wamp/component.py`; `.ci/run` installs them.
//! - `echo`: [`echo::Echo`], the real demo backend in-process on a loopback port.
//! - `tls`: throwaway CAs and certificates (rcgen), PEM files that can be rewritten, and TLS
//!   clients (HTTP/1.1, HTTP/2, WebSocket) for the gateway's TLS listener.
//! - `gateway`: `start_gateway()`, the real gateway in-process on port 0.
//! - `rpc`: a call's body, a POST in a session, a successful answer's `result`.
//! - `http`: clients that reach the gateway over real TCP: one-shot [`post`]/[`request`], keep-alive
//!   [`Client`] and [`H2Client`], and [`RawTcp`] for byte-level (slow or malformed) clients.
//!
//! Not every test uses every item, hence the `dead_code` allowance above.

pub mod admin;
pub mod binary;
pub mod browser;
pub mod crossbar;
pub mod echo;
pub mod fake_upstream;
pub mod ganache;
pub mod gateway;
pub mod http;
pub mod python;
pub mod rpc;
pub mod sse;
pub mod tls;

use std::future::{Future, IntoFuture};
use std::panic::Location;
use std::time::Duration;

// Re-exported for convenience; a test that uses only some of them must not warn.
#[allow(unused_imports)]
pub use self::fake_upstream::{Close, FakeUpstream, Handshake, Incoming, Received};
#[allow(unused_imports)]
pub use self::http::{Client, H2Client, RawTcp, Response, post, raw_tcp, request};

/// How long any single await in a test may take before the test fails instead of hanging.
/// Generous on purpose: it only has to catch hangs, never to measure speed.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Awaits `fut`, panicking with the caller's location if it takes longer than [`TEST_TIMEOUT`].
///
/// The timer is tokio's, so under `tokio::time::pause()` it auto-advances while the runtime is
/// idle; keep paused-clock tests away from real sockets or give them [`with_timeout_of`].
#[track_caller]
pub fn with_timeout<F: IntoFuture>(fut: F) -> impl Future<Output = F::Output> {
    labeled_timeout(TEST_TIMEOUT, "future", Location::caller(), fut)
}

/// [`with_timeout`] with an explicit limit.
#[track_caller]
pub fn with_timeout_of<F: IntoFuture>(limit: Duration, fut: F) -> impl Future<Output = F::Output> {
    labeled_timeout(limit, "future", Location::caller(), fut)
}

/// The timeout behind every helper in this module tree; `what` names the thing being waited for
/// so a failure says "timed out waiting for the next upstream frame at tests/x.rs:12:5".
fn labeled_timeout<F: IntoFuture>(
    limit: Duration,
    what: &'static str,
    caller: &'static Location<'static>,
    fut: F,
) -> impl Future<Output = F::Output> {
    let fut = fut.into_future();
    async move {
        match tokio::time::timeout(limit, fut).await {
            Ok(output) => output,
            Err(_) => panic!("timed out after {limit:?} waiting for {what} at {caller}"),
        }
    }
}
