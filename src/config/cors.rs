//! `[cors]`: which web origins may call rpcgate from a browser (calls, batches, event
//! streams) and open WebSockets to it.

use super::file::Section;
use std::time::Duration;
use toml::Table;

/// Cross-origin access for browsers.
#[derive(Debug, Clone, PartialEq)]
pub struct CorsConfig {
    /// Origins (`https://app.example.com`, `http://localhost:3000`) allowed; `"*"`
    /// for any. Empty: no CORS headers, and WebSockets only from the same origin.
    pub allowed_origins: Vec<String>,
    /// Let browsers send cookies and credentials cross-site (not with `"*"`).
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer.
    pub max_age: Duration,
    /// Request headers allowed besides `content-type`, the session header and
    /// `authorization`.
    pub allowed_headers: Vec<String>,
    /// Response headers a page may read besides the session header and `retry-after`.
    pub exposed_headers: Vec<String>,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: Vec::new(),
            allow_credentials: false,
            max_age: Duration::from_secs(600),
            allowed_headers: Vec::new(),
            exposed_headers: Vec::new(),
        }
    }
}

impl CorsConfig {
    pub fn enabled(&self) -> bool {
        !self.allowed_origins.is_empty()
    }

    pub fn any_origin(&self) -> bool {
        self.allowed_origins.iter().any(|o| o == "*")
    }

    /// Whether a page from `origin` may call or connect.
    pub fn allows(&self, origin: &str) -> bool {
        self.any_origin()
            || self
                .allowed_origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
    }

    /// The problems of these settings.
    pub fn check(&self, p: &mut Vec<String>) {
        if self.allow_credentials && self.any_origin() {
            p.push(
                "cors.allow_credentials: cannot be true with allowed_origins = [\"*\"] \
                 (browsers refuse credentials for any origin); list the origins instead"
                    .into(),
            );
        }
        for origin in &self.allowed_origins {
            if origin != "*" && !is_origin(origin) {
                p.push(format!(
                    "cors.allowed_origins: {origin:?} is not an origin like https://app.example.com \
                     or http://localhost:3000 (scheme, host, optional port; no path)"
                ));
            }
        }
        for name in self.allowed_headers.iter().chain(&self.exposed_headers) {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                p.push(format!("cors: {name:?} is not a header name"));
            }
        }
    }
}

/// `scheme://host[:port]` and nothing more.
fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else {
        return false;
    };
    let scheme_ok = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    scheme_ok
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', ' '])
        && http::HeaderValue::from_str(text).is_ok()
}

pub(super) fn read_cors(t: &Table, c: &mut CorsConfig, p: &mut Vec<String>) {
    let mut s = Section::new(t, "cors");
    if let Some(list) = s.strings("allowed_origins", p) {
        c.allowed_origins = list;
    }
    s.boolean("allow_credentials", &mut c.allow_credentials, p);
    s.duration("max_age", &mut c.max_age, p);
    if let Some(list) = s.strings("allowed_headers", p) {
        c.allowed_headers = list;
    }
    if let Some(list) = s.strings("exposed_headers", p) {
        c.exposed_headers = list;
    }
    s.finish(p);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_credentials_are_checked() {
        let mut c = CorsConfig {
            allowed_origins: vec!["*".into()],
            allow_credentials: true,
            ..CorsConfig::default()
        };
        let mut p = Vec::new();
        c.check(&mut p);
        assert_eq!(p.len(), 1, "{p:?}");
        c.allow_credentials = false;
        c.allowed_origins = vec![
            "https://app.example.com".into(),
            "http://localhost:3000".into(),
            "https://x.example/path".into(),
            "app.example.com".into(),
        ];
        let mut p = Vec::new();
        c.check(&mut p);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(c.allows("HTTPS://APP.example.com"));
        assert!(!c.allows("https://evil.example"));
    }
}
