//! JSON-RPC over HTTP the way most tests send it: a call's body, a POST in a session
//! (on a fresh connection), and a successful answer's `result`.

use super::http::JSON;
use super::{Response, request};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use std::net::SocketAddr;

/// The default session header (`sessions.header`).
pub const SESSION_HEADER: &str = "rpcgate-session";

pub fn call_body(id: u64, method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

/// POSTs `body` with the session (header) `session`, if any.
pub async fn post_as(addr: SocketAddr, session: Option<&str>, body: String) -> Response {
    let mut headers = vec![JSON];
    if let Some(s) = session {
        headers.push((SESSION_HEADER, s));
    }
    request(addr, Method::POST, "/", &headers, body).await
}

/// A 200 answer's `result`.
#[track_caller]
pub fn result_of(resp: &Response) -> Value {
    assert_eq!(resp.status, StatusCode::OK, "body: {}", resp.text());
    let v = resp.json();
    assert!(v.get("error").is_none(), "an error: {v}");
    v["result"].clone()
}
