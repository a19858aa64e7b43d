//! Upstream URLs as they may be shown: in logs, the access log, metric labels, errors
//! and `check-config` output.
//!
//! Operators put credentials in URLs (`wss://user:secret@host/`, `?apikey=...`); those
//! must never leave the process. What is shown keeps what tells upstreams apart (scheme,
//! host, port, path, the query's keys) and drops what authenticates (the userinfo, the
//! query's values, the fragment).

/// `url` with its userinfo removed and every query value replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let rest = rest.split('#').next().unwrap_or("");
    let end_of_authority = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end_of_authority);
    // The userinfo ends at the authority's last '@' (a password may contain one).
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    out.push_str(host);
    out.push_str(path);
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((key, _)) => {
                    out.push_str(key);
                    out.push_str("=***");
                }
                None => out.push_str(pair),
            }
        }
    }
    out
}

/// The userinfo of `url` (`user:password`, still percent-encoded), if it has one.
pub fn userinfo(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    authority.rsplit_once('@').map(|(info, _)| info)
}

/// `url` without its userinfo: what is dialled and sent in the handshake.
pub fn without_userinfo(url: &str) -> String {
    match userinfo(url) {
        Some(info) => url.replacen(&format!("{info}@"), "", 1),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_survive_redaction() {
        let cases = [
            ("ws://127.0.0.1:9000/", "ws://127.0.0.1:9000/"),
            (
                "wss://user:p%40ss@rpc.example.com/ws",
                "wss://rpc.example.com/ws",
            ),
            ("wss://a:b@c@host:8443/v1?x=1", "wss://host:8443/v1?x=***"),
            (
                "wss://rpc.example.com/v3?apikey=SECRET&net=main&flag",
                "wss://rpc.example.com/v3?apikey=***&net=***&flag",
            ),
            ("ws://host?token=abc#frag", "ws://host?token=***"),
            ("ws://[::1]:9000/x", "ws://[::1]:9000/x"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn userinfo_is_found_and_removed_for_dialling() {
        assert_eq!(userinfo("wss://u:p@h/x?q=1"), Some("u:p"));
        assert_eq!(userinfo("wss://h/x?mail=a@b"), None);
        assert_eq!(without_userinfo("wss://u:p@h/x"), "wss://h/x");
        assert_eq!(without_userinfo("ws://h:1/"), "ws://h:1/");
    }
}
