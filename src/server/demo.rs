//! The page `rpcgate demo` serves at `/demo/`: the browser client (`clients/js/rpcgate.js`)
//! against the demo backend, so a newcomer sees calls, pushed messages and the HTTP
//! fallback in a browser. Only the demo serves it; the gateway serves no files.

use super::response::{self, HttpResponse};
use crate::error::Error;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, StatusCode};

const INDEX: &str = include_str!("demo/index.html");
const CLIENT: &str = include_str!("../../clients/js/rpcgate.js");

/// Whether `path` is the demo page's.
pub fn owns(path: &str) -> bool {
    path == "/demo" || path.starts_with("/demo/")
}

pub fn handle<B>(req: &Request<B>) -> HttpResponse {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response::error(None, &Error::MethodNotAllowed);
    }
    let (body, kind) = match req.uri().path() {
        "/demo" | "/demo/" | "/demo/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/demo/rpcgate.js" => (CLIENT, "text/javascript; charset=utf-8"),
        _ => return response::error(None, &Error::NotFound("/demo/".into())),
    };
    let mut resp = response::json(StatusCode::OK, body.as_bytes().to_vec());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
