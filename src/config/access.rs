//! Who may call, and what: `[auth]` (API keys, JWT, client certificates, method
//! allow and deny lists). How often is `rate_limits.rs`.

use super::file::Section;
use super::rate_limits::{RateLimitConfig, RateScope};
use std::path::PathBuf;
use std::time::Duration;
use toml::{Table, Value};

/// Which methods a caller may use. A call passes when its method matches some `allow`
/// pattern (or `allow` is empty) and no `deny` pattern; patterns are exact names or use
/// `*` for any run of characters (`admin_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MethodRules {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl MethodRules {
    pub fn permits(&self, method: &str) -> bool {
        let allowed =
            self.allow.is_empty() || self.allow.iter().any(|p| super::method_matches(p, method));
        allowed && !self.deny.iter().any(|p| super::method_matches(p, method))
    }

    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    fn read(&mut self, s: &mut Section<'_>, p: &mut Vec<String>) {
        if let Some(list) = s.strings("allow", p) {
            self.allow = list;
        }
        if let Some(list) = s.strings("deny", p) {
            self.deny = list;
        }
    }
}

/// `[auth]`: where credentials come from, which are good, and the rules for everyone.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    /// Whether a request must bring a credential. `None`: yes as soon as any kind of
    /// credential is configured (keys, JWT, certificates), else no.
    pub required: Option<bool>,
    /// The header a credential is read from. `authorization` takes `Bearer <token>`;
    /// any other header (`x-api-key`) holds the token itself.
    pub header: String,
    /// The query parameter a credential is read from, for browsers' EventSource and
    /// WebSocket, which cannot set headers; `None` turns it off.
    pub query_param: Option<String>,
    /// The realm in `WWW-Authenticate`.
    pub realm: String,
    /// Rules every caller is held to, authenticated or not, before its own.
    pub methods: MethodRules,
    pub keys: Vec<KeyConfig>,
    pub jwt: Option<JwtConfig>,
    /// TLS client certificates (`tls.client_ca`) accepted as credentials, by subject.
    pub certificates: Vec<CertificateConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            required: None,
            header: "authorization".into(),
            query_param: Some("access_token".into()),
            realm: "rpcgate".into(),
            methods: MethodRules::default(),
            keys: Vec::new(),
            jwt: None,
            certificates: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// Whether any kind of credential is configured.
    pub fn has_credentials(&self) -> bool {
        !self.keys.is_empty() || self.jwt.is_some() || !self.certificates.is_empty()
    }

    /// Whether a request without a credential is refused (401).
    pub fn is_required(&self) -> bool {
        self.required.unwrap_or_else(|| self.has_credentials())
    }

    /// Whether rpcgate checks anything per call at all.
    pub fn is_active(&self) -> bool {
        self.has_credentials() || !self.methods.is_empty() || self.required == Some(true)
    }
}

/// `[[auth.keys]]`: an API key or bearer token, known by the SHA-256 of its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    /// Shown in the access log and as the `caller` metric label; never the secret.
    pub name: String,
    pub sha256: [u8; 32],
    pub methods: MethodRules,
}

/// `[auth.jwt]`: signed tokens from an identity provider.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtConfig {
    /// Accepted algorithms (`HS256`, `RS256`, `ES256`, `EdDSA`, ...); empty: the ones
    /// the configured keys can verify.
    pub algorithms: Vec<String>,
    /// The HMAC secret (HS256/384/512), from this environment variable...
    pub secret_env: Option<String>,
    /// ... or from this file (a mounted Kubernetes secret), its bytes as they are
    /// but for a final line break.
    pub secret_file: Option<PathBuf>,
    /// A PEM public key (RSA, EC or Ed25519).
    pub public_key: Option<PathBuf>,
    /// A JWKS file (`{"keys": [...]}`), re-read when it changes.
    pub jwks: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The claim that names the caller in the access log.
    pub name_claim: String,
    /// The claim (an array of method patterns, or a space-separated string) that
    /// lists what the token may call; without it in a token, `allow` below applies.
    pub methods_claim: String,
    /// Rules for every token, on top of its claim.
    pub methods: MethodRules,
    /// How often the key files are checked for changes.
    pub reload_interval: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            algorithms: Vec::new(),
            secret_env: None,
            secret_file: None,
            public_key: None,
            jwks: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            name_claim: "sub".into(),
            methods_claim: "rpcgate_methods".into(),
            methods: MethodRules::default(),
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// `[[auth.certificates]]`: a TLS client certificate subject that names a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateConfig {
    /// The subject as rpcgate writes it (`CN=alice,O=Example`); `*` patterns allowed.
    pub subject: String,
    pub name: String,
    pub methods: MethodRules,
}

/// `sha256:<64 hex digits>`, as `rpcgate hash-key` prints it.
pub fn parse_key_hash(text: &str) -> Result<[u8; 32], String> {
    let bad = || {
        "expected sha256:<64 hex digits>, as `rpcgate hash-key` prints it (never the key itself)"
            .to_string()
    };
    let hex = text.trim().strip_prefix("sha256:").ok_or_else(bad)?;
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The hash a key is configured by: `sha256:<hex>` of its exact text.
pub fn key_hash(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for byte in digest.as_ref() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

pub(super) fn read_auth(t: &Table, c: &mut AuthConfig, p: &mut Vec<String>) {
    let mut s = Section::new(t, "auth");
    if let Some(Value::Boolean(b)) = s.get("required") {
        c.required = Some(*b);
    } else if s.get("required").is_some() {
        p.push("auth.required: expected true or false".into());
    }
    if let Some(header) = s.string("header", p) {
        c.header = header.to_ascii_lowercase();
    }
    if let Some(param) = s.string("query_param", p) {
        c.query_param = (!param.is_empty()).then_some(param);
    }
    if let Some(realm) = s.string("realm", p) {
        c.realm = realm;
    }
    c.methods.read(&mut s, p);
    if let Some(v) = s.get("keys") {
        c.keys = tables(v, "auth.keys", p)
            .into_iter()
            .filter_map(|(path, t)| read_key(t, path, p))
            .collect();
    }
    if let Some(t) = s.table("jwt", p) {
        c.jwt = Some(read_jwt(t, p));
    }
    if let Some(v) = s.get("certificates") {
        c.certificates = tables(v, "auth.certificates", p)
            .into_iter()
            .filter_map(|(path, t)| read_certificate(t, path, p))
            .collect();
    }
    s.finish(p);
}

/// The tables of an array of tables, each with its path (`auth.keys[2]`).
pub(super) fn tables<'a>(
    v: &'a Value,
    path: &str,
    p: &mut Vec<String>,
) -> Vec<(String, &'a Table)> {
    let Value::Array(items) = v else {
        p.push(format!("{path}: expected an array of tables ([[{path}]])"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::Table(t) => out.push((format!("{path}[{i}]"), t)),
            _ => p.push(format!("{path}[{i}]: expected a table")),
        }
    }
    out
}

fn read_key(t: &Table, path: String, p: &mut Vec<String>) -> Option<KeyConfig> {
    let mut s = Section::new(t, &path);
    let name = s.string("name", p);
    let hash = s.string("hash", p);
    let mut methods = MethodRules::default();
    methods.read(&mut s, p);
    s.finish(p);
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        p.push(format!("{path}.name: required (shown in logs and metrics)"));
        return None;
    };
    let Some(hash) = hash else {
        p.push(format!("{path}.hash: required: sha256:<hex> of the key"));
        return None;
    };
    match parse_key_hash(&hash) {
        Ok(sha256) => Some(KeyConfig {
            name,
            sha256,
            methods,
        }),
        Err(e) => {
            p.push(format!("{path}.hash: {e}"));
            None
        }
    }
}

fn read_jwt(t: &Table, p: &mut Vec<String>) -> JwtConfig {
    let mut c = JwtConfig::default();
    let mut s = Section::new(t, "auth.jwt");
    if let Some(list) = s.strings("algorithms", p) {
        c.algorithms = list;
    }
    c.secret_env = s.string("secret_env", p);
    c.secret_file = s.string("secret_file", p).map(PathBuf::from);
    c.public_key = s.string("public_key", p).map(PathBuf::from);
    c.jwks = s.string("jwks", p).map(PathBuf::from);
    c.issuer = s.string("issuer", p);
    c.audience = s.string("audience", p);
    s.duration("leeway", &mut c.leeway, p);
    if let Some(claim) = s.string("name_claim", p) {
        c.name_claim = claim;
    }
    if let Some(claim) = s.string("methods_claim", p) {
        c.methods_claim = claim;
    }
    c.methods.read(&mut s, p);
    s.duration("reload_interval", &mut c.reload_interval, p);
    s.finish(p);
    c
}

fn read_certificate(t: &Table, path: String, p: &mut Vec<String>) -> Option<CertificateConfig> {
    let mut s = Section::new(t, &path);
    let subject = s.string("subject", p);
    let name = s.string("name", p);
    let mut methods = MethodRules::default();
    methods.read(&mut s, p);
    s.finish(p);
    match (subject, name) {
        (Some(subject), Some(name)) if !name.is_empty() => Some(CertificateConfig {
            subject,
            name,
            methods,
        }),
        _ => {
            p.push(format!("{path}: needs subject and name"));
            None
        }
    }
}

impl AuthConfig {
    /// The problems of these settings that need more than one key to see.
    pub fn check(&self, rate_limits: &[RateLimitConfig], p: &mut Vec<String>) {
        let mut names = std::collections::HashSet::new();
        for name in self
            .keys
            .iter()
            .map(|k| &k.name)
            .chain(self.certificates.iter().map(|c| &c.name))
        {
            if name == "anonymous" || name == "jwt" {
                p.push(format!(
                    "auth: the name {name:?} is taken by rpcgate's own callers; choose another"
                ));
            }
            if !names.insert(name.as_str()) {
                p.push(format!("auth: two credentials share the name {name:?}"));
            }
        }
        let mut hashes = std::collections::HashSet::new();
        for key in &self.keys {
            if !hashes.insert(key.sha256) {
                p.push(format!(
                    "auth.keys: {:?} has the hash of another key: one key, one name",
                    key.name
                ));
            }
        }
        if http::HeaderName::from_bytes(self.header.as_bytes()).is_err() {
            p.push(format!(
                "auth.header: {:?} is not a header name",
                self.header
            ));
        }
        if let Some(jwt) = &self.jwt {
            if jwt.secret_env.is_none()
                && jwt.secret_file.is_none()
                && jwt.public_key.is_none()
                && jwt.jwks.is_none()
            {
                p.push(
                    "auth.jwt: needs a key to verify tokens: secret_env, secret_file, public_key or jwks"
                        .into(),
                );
            }
            if jwt.secret_env.is_some() && jwt.secret_file.is_some() {
                p.push("auth.jwt: secret_env and secret_file exclude each other".into());
            }
            // The keys read as they will at startup: the files exist and parse, the
            // secret is set.
            if let Err(e) = crate::access::jwt::Jwt::new(jwt) {
                p.push(e);
            }
        }
        for limit in rate_limits {
            if let RateScope::Caller(name) = &limit.scope
                && !names.contains(name.as_str())
                && name != "anonymous"
                && name != "jwt"
            {
                p.push(format!(
                    "{}: key = {name:?} names no [[auth.keys]] or [[auth.certificates]] entry \
                     (nor \"jwt\", \"anonymous\" or \"*\")",
                    limit.name
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hashes_round_trip() {
        let hash = key_hash("secret");
        assert_eq!(
            hash,
            "sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        let bytes = parse_key_hash(&hash).unwrap();
        assert_eq!(bytes[0], 0x2b);
        assert!(parse_key_hash("secret").is_err());
        assert!(parse_key_hash("sha256:abc").is_err());
        assert!(parse_key_hash(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn method_rules_allow_then_deny() {
        let rules = MethodRules {
            allow: vec!["eth_*".into(), "net_version".into()],
            deny: vec!["eth_sendRawTransaction".into()],
        };
        assert!(rules.permits("eth_call"));
        assert!(rules.permits("net_version"));
        assert!(!rules.permits("eth_sendRawTransaction"));
        assert!(!rules.permits("admin_peers"));
        assert!(MethodRules::default().permits("anything"));
    }
}
