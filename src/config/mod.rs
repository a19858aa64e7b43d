//! Configuration: the TOML file, its defaults, and validation that reports every
//! problem at once.
//!
//! - `types.rs`: the settings and their defaults.
//! - `choices.rs`: the settings that take one of a few names; one `FromStr` each,
//!   shared by the file and the flags.
//! - `admin_listen.rs`: where the admin listener binds, and whether the operator chose it.
//! - `file.rs`: loading TOML, `${VAR}` expansion, durations, and the key-by-key reader
//!   that reports unknown keys; `sections.rs`: what each table holds.
//! - `check.rs`: [`Config::check`], the relations between settings.
//! - `redact.rs`: upstream URLs without their credentials, for everything shown.
//! - `tls.rs`: `[tls]`, and the check that every certificate file named loads.
//! - `wamp.rs`: an upstream's `protocol`, realm and `wamp_auth`, and `[wamp]`.

mod access;
mod admin_listen;
mod check;
mod choices;
mod cors;
mod file;
mod push;
mod rate_limits;
mod redact;
mod sections;
mod tls;
mod types;
mod wamp;

pub use access::{
    AuthConfig, CertificateConfig, JwtConfig, KeyConfig, MethodRules, key_hash, parse_key_hash,
};
pub use admin_listen::{AdminListen, BadAdminListen};
pub use check::{Problems, check_ws_url};
pub use choices::{
    Affinity, BatchMode, ClientAuth, DiscoveryMode, LogFormat, UnknownName, WhenFull,
};
pub use cors::CorsConfig;
pub use file::{expand_env, parse_duration, parse_size};
pub use push::{PushConfig, SubscriptionRule, matches as method_matches};
pub use rate_limits::{RateLimitConfig, RateScope, parse_rate};
pub use redact::{redact_url, userinfo, without_userinfo};
pub use tls::TlsConfig;
pub use types::{
    BalanceConfig, CallConfig, Config, DiscoveryConfig, HttpConfig, LimitsConfig, LogConfig,
    PreludeCall, RuntimeConfig, SessionConfig, ShutdownConfig, UpstreamConfig, WebSocketConfig,
};
pub use wamp::{Protocol, WampAuth, WampAuthMethod, WampConfig};
