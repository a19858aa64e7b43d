//! CORS for browsers on other origins (tower-http's layer), and the same origin list
//! for WebSocket upgrades, which browsers open cross-site without asking.

use super::AppState;
use crate::config::CorsConfig;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Method, Request};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The layer for `[cors]`, or none when no origin is allowed. `check-config` (and
/// startup) refused what tower-http would panic on: credentials with `"*"`.
pub fn layer(state: &AppState) -> Option<CorsLayer> {
    let cors = &state.config.cors;
    if !cors.enabled() {
        return None;
    }
    // tower-http panics on this pair; the config check refuses it, and a `Config` built
    // in code without that check gets credentials off rather than a panic.
    let credentials = cors.allow_credentials && !cors.any_origin();
    let session = HeaderName::from_bytes(state.config.sessions.header.as_bytes()).ok();
    let names = |extra: &[String]| -> Vec<HeaderName> {
        extra
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .chain(session.clone())
            .collect()
    };
    let mut allowed = names(&cors.allowed_headers);
    allowed.extend([
        CONTENT_TYPE,
        AUTHORIZATION,
        HeaderName::from_static("last-event-id"),
    ]);
    // A page sends its key in `auth.header` when that is not `authorization`.
    allowed.extend(HeaderName::from_bytes(state.config.auth.header.as_bytes()).ok());
    allowed.dedup();
    let mut exposed = names(&cors.exposed_headers);
    exposed.push(RETRY_AFTER);
    let origins = match cors.any_origin() {
        true => AllowOrigin::any(),
        false => AllowOrigin::list(
            cors.allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(&o.to_ascii_lowercase()).ok()),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::POST, Method::GET])
            .allow_headers(allowed)
            .expose_headers(exposed)
            .allow_credentials(credentials)
            .max_age(cors.max_age),
    )
}

/// Whether a WebSocket upgrade may go ahead: no `Origin` (not a browser), the same
/// origin as the gateway, or one `[cors]` allows.
pub fn origin_allowed<B>(req: &Request<B>, cors: &CorsConfig) -> bool {
    let Some(origin) = req.headers().get(ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    if cors.allows(origin) {
        return true;
    }
    // Same origin: the page came from this gateway (the demo page does).
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}
