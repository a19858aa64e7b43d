//! `[auth.jwt]`: tokens signed by an identity provider, verified with a secret, a PEM
//! public key or a JWKS file, the files re-read when they change.
//!
//! Verification is jsonwebtoken's: signature, `exp` (always required: a token that
//! never expires is a key that cannot be revoked), `nbf`, and `iss`/`aud` when
//! configured. A key only ever verifies the algorithms of its own family, so an RSA
//! public key can never be used as an HMAC secret (the classic algorithm confusion).

use crate::config::JwtConfig;
use crate::error::AuthFailure;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// What a good token says about its caller.
#[derive(Debug)]
pub struct Claims {
    /// The `name_claim` (by default `sub`), for the access log.
    pub name: Option<String>,
    /// The `methods_claim`'s patterns, when the token carries one: then only these
    /// may be called (none, if it lists none).
    pub methods: Option<Vec<String>>,
    /// Until when (Unix seconds) the token stays good: its `exp` plus the leeway.
    pub good_until: u64,
}

/// A verifying key and the algorithms it may verify.
struct Key {
    kid: Option<String>,
    algorithms: &'static [Algorithm],
    key: DecodingKey,
}

const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
const ED: &[Algorithm] = &[Algorithm::EdDSA];

/// The key files as last read, and what they were when read.
struct Loaded {
    keys: Vec<Key>,
    stamps: Vec<Option<(SystemTime, u64)>>,
}

pub struct Jwt {
    config: JwtConfig,
    /// Algorithms accepted at all (`algorithms`, or every one some key can verify).
    allowed: Vec<Algorithm>,
    secret: Option<Key>,
    files: RwLock<Arc<Loaded>>,
    /// Bumped whenever the keys change: what was verified with the old ones is not
    /// taken on trust any more.
    generation: std::sync::atomic::AtomicU64,
}

impl Jwt {
    /// Reads the keys; an error names the file or setting at fault.
    pub fn new(config: &JwtConfig) -> Result<Jwt, String> {
        let secret = match (&config.secret_env, &config.secret_file) {
            (Some(var), _) => Some(std::env::var(var).map(String::into_bytes).map_err(|_| {
                format!("auth.jwt.secret_env: the environment variable {var} is not set")
            })?),
            (None, Some(path)) => {
                let mut bytes = read(path, "auth.jwt.secret_file")?;
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                }
                Some(bytes)
            }
            (None, None) => None,
        };
        if secret.as_ref().is_some_and(Vec::is_empty) {
            return Err("auth.jwt: the HMAC secret is empty".into());
        }
        let secret = secret.map(|bytes| Key {
            kid: None,
            algorithms: HMAC,
            key: DecodingKey::from_secret(&bytes),
        });
        let mut allowed = Vec::new();
        for name in &config.algorithms {
            let alg = name.parse::<Algorithm>().map_err(|_| {
                format!("auth.jwt.algorithms: {name:?} is not a JWT algorithm like RS256 or EdDSA")
            })?;
            allowed.push(alg);
        }
        let jwt = Jwt {
            config: config.clone(),
            allowed,
            secret,
            files: RwLock::new(Arc::new(Loaded {
                keys: Vec::new(),
                stamps: Vec::new(),
            })),
            generation: std::sync::atomic::AtomicU64::new(0),
        };
        let loaded = jwt.load()?;
        *jwt.files.write() = Arc::new(loaded);
        Ok(jwt)
    }

    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.config.public_key.iter().chain(&self.config.jwks)
    }

    fn load(&self) -> Result<Loaded, String> {
        let mut keys = Vec::new();
        if let Some(path) = &self.config.public_key {
            let pem = read(path, "auth.jwt.public_key")?;
            keys.push(pem_key(&pem).ok_or_else(|| {
                format!(
                    "auth.jwt.public_key: {} holds no RSA, EC or Ed25519 public key in PEM",
                    path.display()
                )
            })?);
        }
        if let Some(path) = &self.config.jwks {
            let text = read(path, "auth.jwt.jwks")?;
            let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
                format!(
                    "auth.jwt.jwks: {} is not a JWKS ({{\"keys\": [...]}}): {e}",
                    path.display()
                )
            })?;
            for jwk in &set.keys {
                let algorithms = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => RSA,
                    AlgorithmParameters::EllipticCurve(_) => EC,
                    AlgorithmParameters::OctetKeyPair(_) => ED,
                    // Symmetric keys in a file others read too are not accepted.
                    AlgorithmParameters::OctetKey(_) => continue,
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                    format!(
                        "auth.jwt.jwks: {}: a key is not usable: {e}",
                        path.display()
                    )
                })?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    algorithms,
                    key,
                });
            }
        }
        Ok(Loaded {
            keys,
            stamps: self.paths().map(|p| stamp(p)).collect(),
        })
    }

    /// Re-reads the key files if any changed: `Some(true)` if they were, `Some(false)`
    /// if they no longer read or parse (the keys in use are kept, and the warning
    /// says why), `None` if nothing changed.
    pub fn reload_if_changed(&self) -> Option<bool> {
        let current = self.files.read().clone();
        let now: Vec<_> = self.paths().map(|p| stamp(p)).collect();
        if now == current.stamps {
            return None;
        }
        match self.load() {
            Ok(loaded) => {
                tracing::info!(keys = loaded.keys.len(), "auth.jwt: key files re-read");
                *self.files.write() = Arc::new(loaded);
                self.generation
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                Some(true)
            }
            Err(error) => {
                tracing::warn!(%error, "auth.jwt: key files changed but cannot be used; keeping the keys in use");
                // Not retried until the files change again.
                *self.files.write() = Arc::new(Loaded {
                    keys: current.keys.iter().map(Key::clone_key).collect(),
                    stamps: now,
                });
                Some(false)
            }
        }
    }

    /// Which set of keys is in use; changes with every successful reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn reload_interval(&self) -> std::time::Duration {
        self.config.reload_interval
    }

    pub fn watches_files(&self) -> bool {
        self.paths().next().is_some()
    }

    /// Verifies `token` and reads what it says about its caller.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthFailure> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::BadToken("not a JWT"))?;
        if !self.allowed.is_empty() && !self.allowed.contains(&header.alg) {
            return Err(AuthFailure::BadToken("its algorithm is not accepted here"));
        }
        let loaded = self.files.read().clone();
        let candidates = self
            .secret
            .iter()
            .chain(&loaded.keys)
            .filter(|k| k.algorithms.contains(&header.alg))
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            });
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(iss) = &self.config.issuer {
            validation.set_issuer(&[iss]);
        }
        match &self.config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let mut failure = AuthFailure::BadToken("no configured key verifies its signature");
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return Ok(self.claims(data.claims)),
                Err(e) => {
                    failure = match e.kind() {
                        ErrorKind::InvalidSignature => continue,
                        ErrorKind::ExpiredSignature => AuthFailure::Expired,
                        ErrorKind::ImmatureSignature => {
                            AuthFailure::BadToken("not valid yet (nbf)")
                        }
                        ErrorKind::InvalidIssuer => AuthFailure::BadToken("wrong issuer (iss)"),
                        ErrorKind::InvalidAudience => AuthFailure::BadToken("wrong audience (aud)"),
                        ErrorKind::MissingRequiredClaim(_) => {
                            AuthFailure::BadToken("it has no expiry (exp)")
                        }
                        _ => AuthFailure::BadToken("malformed"),
                    };
                    break;
                }
            }
        }
        Err(failure)
    }

    fn claims(&self, mut claims: Map<String, Value>) -> Claims {
        // Validation required it; a non-integer `exp` never gets this far.
        let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let name = match claims.remove(&self.config.name_claim) {
            Some(Value::String(s)) => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let methods = match claims.remove(&self.config.methods_claim) {
            Some(Value::Array(items)) => Some(
                items
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s),
                        _ => None,
                    })
                    .collect(),
            ),
            Some(Value::String(s)) => Some(s.split_whitespace().map(str::to_string).collect()),
            _ => None,
        };
        Claims {
            name,
            methods,
            good_until: exp.saturating_add(self.config.leeway.as_secs()),
        }
    }
}

impl Key {
    fn clone_key(&self) -> Key {
        Key {
            kid: self.kid.clone(),
            algorithms: self.algorithms,
            key: self.key.clone(),
        }
    }
}

fn read(path: &Path, setting: &str) -> Result<Vec<u8>, String> {
    crate::tls::read_key_file(path).map_err(|e| format!("{setting}: {}: {e}", path.display()))
}

/// A file's modification time and length: what says it changed.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A PEM public key of whichever family it is.
fn pem_key(pem: &[u8]) -> Option<Key> {
    type Parse = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
    let tries: [(Parse, _); 3] = [
        (DecodingKey::from_rsa_pem, RSA),
        (DecodingKey::from_ec_pem, EC),
        (DecodingKey::from_ed_pem, ED),
    ];
    tries.into_iter().find_map(|(parse, algorithms)| {
        parse(pem).ok().map(|key| Key {
            kid: None,
            algorithms,
            key,
        })
    })
}
