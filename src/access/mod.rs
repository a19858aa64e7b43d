//! Who is calling, what they may call, and how often: the access rules every call
//! passes before it reaches the dispatch pipeline.
//!
//! - A request's credential (an API key, a JWT, or a TLS client certificate) names
//!   its [`Principal`] once, in the HTTP stack (`server/auth.rs`); no credential
//!   makes it [`Principal::anonymous`], if `[auth]` lets such callers in.
//! - Each call, and each element of a batch, is then [`Access::admit`]ted: its
//!   method against the global rules and the principal's own, then against every
//!   rate limit it counts for.
//!
//! Keys are configured by their SHA-256, never in clear: a config file that leaks
//! gives away no key. Looking one up hashes the presented key and finds the hash in a
//! map, so what the lookup's timing could reveal is a hash, not the key.

pub mod jwt;
pub mod rate;

use crate::config::{AuthConfig, MethodRules, RateLimitConfig, method_matches};
use crate::error::{AuthFailure, Error};
use crate::metrics::Metrics;
use jwt::Jwt;
use rate::{Calling, RateLimits};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Who a request comes from.
#[derive(Debug)]
pub struct Principal {
    /// For the access log: a key's or certificate rule's name, a token's subject.
    pub name: Arc<str>,
    /// For metrics and `key = "..."` rate limits: bounded (a configured name, `jwt`
    /// or `anonymous`).
    pub label: Arc<str>,
    /// Its own rules, on top of the global ones.
    methods: MethodRules,
    /// A token's methods claim: only these, when present.
    claimed: Option<Vec<String>>,
    /// Whether a credential named it (not anonymous): its sessions are its own.
    pub authenticated: bool,
    /// Its `rpcgate_caller_calls_total` series, found once rather than per call.
    calls: Option<prometheus::IntCounter>,
}

impl Principal {
    pub fn anonymous() -> Principal {
        Principal {
            name: "anonymous".into(),
            label: "anonymous".into(),
            methods: MethodRules::default(),
            claimed: None,
            authenticated: false,
            calls: None,
        }
    }

    fn named(name: &str, methods: &MethodRules, metrics: &Metrics) -> Principal {
        Principal {
            name: name.into(),
            label: name.into(),
            methods: methods.clone(),
            claimed: None,
            authenticated: true,
            calls: Some(metrics.caller_calls.with_label_values(&[name])),
        }
    }

    fn permits(&self, method: &str) -> bool {
        self.methods.permits(method)
            && self
                .claimed
                .as_ref()
                .is_none_or(|list| list.iter().any(|p| method_matches(p, method)))
    }
}

/// Tokens verified lately, by their SHA-256, until they expire or the keys change.
#[derive(Default)]
struct Verified {
    entries: parking_lot::Mutex<HashMap<[u8; 32], Good>>,
}

struct Good {
    principal: Arc<Principal>,
    /// Unix seconds: `exp` plus the leeway.
    until: u64,
    /// The key files' generation it was verified with.
    generation: u64,
}

/// Tokens remembered at most; past it the table starts over, which costs each
/// caller one verification.
const MAX_VERIFIED: usize = 10_000;

impl Verified {
    fn get(&self, hash: &[u8; 32], generation: u64) -> Option<Arc<Principal>> {
        let entries = self.entries.lock();
        let good = entries.get(hash)?;
        (good.generation == generation && unix_now() <= good.until).then(|| good.principal.clone())
    }

    fn put(&self, hash: [u8; 32], principal: Arc<Principal>, until: u64, generation: u64) {
        let mut entries = self.entries.lock();
        if entries.len() >= MAX_VERIFIED {
            let now = unix_now();
            entries.retain(|_, g| g.generation == generation && now <= g.until);
            if entries.len() >= MAX_VERIFIED {
                entries.clear();
            }
        }
        entries.insert(
            hash,
            Good {
                principal,
                until,
                generation,
            },
        );
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request's credential, as it arrived.
pub enum Credential<'a> {
    None,
    /// A key or token (from the header or query parameter).
    Token(&'a str),
    /// The subject of a verified TLS client certificate.
    Certificate(&'a str),
}

/// The access rules of one gateway.
pub struct Access {
    config: AuthConfig,
    keys: HashMap<[u8; 32], Arc<Principal>>,
    certificates: Vec<(String, Arc<Principal>)>,
    jwt: Option<Arc<Jwt>>,
    anonymous: Arc<Principal>,
    /// Every token's `rpcgate_caller_calls_total` series.
    jwt_calls: prometheus::IntCounter,
    rates: RateLimits,
    /// Tokens verified lately: a client sends the same one on every request, and an
    /// ES256 or EdDSA signature costs tens of microseconds to check.
    verified: Verified,
    metrics: Arc<Metrics>,
    /// Whether any call can be refused at all: with nothing configured, `admit` is a
    /// single branch.
    active: bool,
}

impl Access {
    /// Builds the rules; an error names the setting at fault (a JWT key file that does
    /// not read).
    pub fn new(
        config: &AuthConfig,
        limits: &[RateLimitConfig],
        metrics: Arc<Metrics>,
    ) -> Result<Access, String> {
        let keys = config
            .keys
            .iter()
            .map(|k| {
                let principal = Principal::named(&k.name, &k.methods, &metrics);
                (k.sha256, Arc::new(principal))
            })
            .collect();
        let certificates = config
            .certificates
            .iter()
            .map(|c| {
                (
                    c.subject.clone(),
                    Arc::new(Principal::named(&c.name, &c.methods, &metrics)),
                )
            })
            .collect();
        let jwt = config.jwt.as_ref().map(Jwt::new).transpose()?.map(Arc::new);
        let rates = RateLimits::new(limits);
        for (name, per_second, burst) in rates.describe() {
            metrics
                .rate_limit_rate
                .with_label_values(&[name])
                .set(per_second);
            metrics
                .rate_limit_burst
                .with_label_values(&[name])
                .set(i64::from(burst));
        }
        Ok(Access {
            active: config.is_active() || !rates.is_empty(),
            config: config.clone(),
            keys,
            certificates,
            jwt,
            anonymous: Arc::new(Principal {
                calls: Some(metrics.caller_calls.with_label_values(&["anonymous"])),
                ..Principal::anonymous()
            }),
            jwt_calls: metrics.caller_calls.with_label_values(&["jwt"]),
            rates,
            verified: Verified::default(),
            metrics,
        })
    }

    /// The caller of requests without a credential.
    pub fn anonymous(&self) -> Arc<Principal> {
        self.anonymous.clone()
    }

    /// Whether requests are checked at all.
    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Names the caller behind `credential`, or says why not (401).
    pub fn authenticate(&self, credential: Credential<'_>) -> Result<Arc<Principal>, AuthFailure> {
        // With no kind of credential configured there is nothing to check one against:
        // an `Authorization` header meant for someone else is not a bad key.
        if !self.config.has_credentials() && !self.config.is_required() {
            return Ok(self.anonymous.clone());
        }
        let found = match credential {
            Credential::None if self.config.is_required() => Err(AuthFailure::Missing),
            Credential::None => Ok(self.anonymous.clone()),
            Credential::Token(token) => self.token(token),
            Credential::Certificate(subject) => self
                .certificates
                .iter()
                .find(|(pattern, _)| method_matches(pattern, subject))
                .map(|(_, p)| p.clone())
                .ok_or(AuthFailure::UnknownCertificate),
        };
        if let Err(failure) = &found {
            self.metrics
                .auth_failures
                .with_label_values(&[failure.as_str()])
                .inc();
        }
        found
    }

    fn token(&self, token: &str) -> Result<Arc<Principal>, AuthFailure> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest.as_ref());
        if let Some(p) = self.keys.get(&hash) {
            return Ok(p.clone());
        }
        // A JWT is three base64url parts; anything else cannot be one.
        let Some(jwt) = self.jwt.as_ref().filter(|_| token.split('.').count() == 3) else {
            return Err(AuthFailure::UnknownKey);
        };
        if let Some(p) = self.verified.get(&hash, jwt.generation()) {
            return Ok(p);
        }
        let claims = jwt.verify(token)?;
        let settings = self.config.jwt.as_ref();
        let principal = Arc::new(Principal {
            name: claims.name.as_deref().unwrap_or("jwt").into(),
            label: "jwt".into(),
            methods: settings.map(|j| j.methods.clone()).unwrap_or_default(),
            claimed: claims.methods,
            authenticated: true,
            calls: Some(self.jwt_calls.clone()),
        });
        self.verified
            .put(hash, principal.clone(), claims.good_until, jwt.generation());
        Ok(principal)
    }

    /// Whether `principal` may call `method` now: the method rules, then the rate
    /// limits. Counted in metrics either way.
    pub fn admit(&self, principal: &Principal, address: IpAddr, method: &str) -> Result<(), Error> {
        if !self.active {
            return Ok(());
        }
        let label = principal.label.as_ref();
        if !(self.config.methods.permits(method) && principal.permits(method)) {
            self.metrics
                .calls_forbidden
                .with_label_values(&[label])
                .inc();
            return Err(Error::Forbidden {
                caller: principal.name.to_string(),
                method: method.to_string(),
            });
        }
        let calling = Calling {
            name: &principal.name,
            label,
            address,
        };
        if let Err(e) = self.rates.take(&calling, method) {
            if let Error::RateLimited { limit, .. } = &e {
                self.metrics
                    .rate_limited
                    .with_label_values(&[label, limit])
                    .inc();
            }
            return Err(e);
        }
        match &principal.calls {
            Some(calls) => calls.inc(),
            None => self.metrics.caller_calls.with_label_values(&[label]).inc(),
        }
        Ok(())
    }

    /// Runs until `stop`: re-reads changed JWT key files, and forgets rate limit
    /// subjects whose buckets are full again.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let every = self
            .jwt
            .as_ref()
            .map_or(std::time::Duration::from_secs(10), |j| j.reload_interval())
            .max(std::time::Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(jwt) = self.jwt.as_ref().filter(|j| j.watches_files()) {
                let jwt = jwt.clone();
                // File reads off the event loop.
                if let Ok(Some(ok)) =
                    tokio::task::spawn_blocking(move || jwt.reload_if_changed()).await
                {
                    let result = if ok { "ok" } else { "error" };
                    self.metrics.key_reloads.with_label_values(&[result]).inc();
                }
            }
            self.rates.forget_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verified_token_is_remembered_until_it_expires_or_the_keys_change() {
        let cache = Verified::default();
        let p = Arc::new(Principal::anonymous());
        let now = unix_now();
        cache.put([1; 32], p.clone(), now + 60, 0);
        cache.put([2; 32], p.clone(), now - 1, 0);
        assert!(cache.get(&[1; 32], 0).is_some());
        assert!(
            cache.get(&[1; 32], 1).is_none(),
            "verified with keys since replaced"
        );
        assert!(cache.get(&[2; 32], 0).is_none(), "expired");
        assert!(cache.get(&[3; 32], 0).is_none());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = Verified::default();
        let p = Arc::new(Principal::anonymous());
        let until = unix_now() + 60;
        for i in 0..(MAX_VERIFIED as u32 + 10) {
            let mut hash = [0u8; 32];
            hash[..4].copy_from_slice(&i.to_le_bytes());
            cache.put(hash, p.clone(), until, 0);
        }
        assert!(cache.entries.lock().len() <= MAX_VERIFIED);
    }
}
