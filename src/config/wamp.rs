//! WAMP upstreams: an upstream's `protocol`, its realm, procedure prefix and
//! `[upstreams.wamp_auth]`, and the method names of WAMP's PubSub (`[wamp]`).

use super::file::Section;
use super::push::SubscriptionRule;
use std::path::PathBuf;
use toml::Table;

pub use super::choices::{Protocol, WampAuthMethod};

/// `[upstreams.wamp_auth]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WampAuth {
    pub method: WampAuthMethod,
    pub authid: String,
    /// The environment variable holding the secret (ticket or WAMP-CRA key).
    pub secret_env: Option<String>,
    /// Or a file holding it (one trailing newline is not part of it). Read on every
    /// connect, so a rotated secret is used from the next reconnect on.
    pub secret_file: Option<PathBuf>,
}

impl WampAuth {
    /// The secret as it is now; the error names the setting at fault.
    pub fn secret(&self, at: &str) -> Result<Vec<u8>, String> {
        let bytes = match (&self.secret_env, &self.secret_file) {
            (Some(var), _) => std::env::var(var).map(String::into_bytes).map_err(|_| {
                format!("{at}.secret_env: the environment variable {var} is not set")
            })?,
            (None, Some(path)) => {
                let mut bytes = crate::tls::read_key_file(path)
                    .map_err(|e| format!("{at}.secret_file: {}: {e}", path.display()))?;
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                }
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
                bytes
            }
            (None, None) => return Err(format!("{at}: needs secret_env or secret_file")),
        };
        if bytes.is_empty() {
            return Err(format!("{at}: the secret is empty"));
        }
        Ok(bytes)
    }
}

/// The methods that stand for WAMP's PubSub (`[wamp]`); every other method is a
/// procedure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WampConfig {
    /// `params: ["topic"]`, `["topic", {options}]` or `{"topic": .., "options": {..}}`
    /// → SUBSCRIBE.
    pub subscribe_method: String,
    /// `params: [subscription]` → UNSUBSCRIBE.
    pub unsubscribe_method: String,
    /// `params: ["topic", args..]` or `{"topic", "args", "kwargs"}` → PUBLISH.
    pub publish_method: String,
    /// The notification an EVENT becomes.
    pub event_method: String,
}

impl Default for WampConfig {
    fn default() -> Self {
        WampConfig {
            subscribe_method: "wamp.subscribe".into(),
            unsubscribe_method: "wamp.unsubscribe".into(),
            publish_method: "wamp.publish".into(),
            event_method: "wamp.event".into(),
        }
    }
}

impl WampConfig {
    /// The `[[subscriptions]]` rule that lets push sessions hold WAMP subscriptions.
    pub fn subscription_rule(&self) -> SubscriptionRule {
        SubscriptionRule {
            subscribe: self.subscribe_method.clone(),
            unsubscribe: self.unsubscribe_method.clone(),
            notification: Some(self.event_method.clone()),
            id_pointer: "/params/subscription".into(),
        }
    }
}

impl super::Config {
    /// The `[[subscriptions]]` rules push sessions use: the configured ones, and the
    /// WAMP rule when an upstream speaks WAMP (unless a rule already claims its
    /// subscribe method).
    pub fn subscription_rules(&self) -> Vec<SubscriptionRule> {
        let mut rules = self.subscriptions.clone();
        let wamp = self.upstreams.iter().any(|u| u.protocol == Protocol::Wamp);
        if wamp
            && !rules
                .iter()
                .any(|r| super::method_matches(&r.subscribe, &self.wamp.subscribe_method))
        {
            rules.push(self.wamp.subscription_rule());
        }
        rules
    }
}

pub(super) fn read_wamp(t: &Table, c: &mut WampConfig, p: &mut Vec<String>) {
    let mut s = Section::new(t, "wamp");
    for (key, slot) in [
        ("subscribe_method", &mut c.subscribe_method),
        ("unsubscribe_method", &mut c.unsubscribe_method),
        ("publish_method", &mut c.publish_method),
        ("event_method", &mut c.event_method),
    ] {
        if let Some(v) = s.string(key, p) {
            *slot = v;
        }
    }
    s.finish(p);
}

pub(super) fn read_wamp_auth(t: &Table, i: usize, p: &mut Vec<String>) -> Option<WampAuth> {
    let at = format!("upstreams[{i}].wamp_auth");
    let mut s = Section::new(t, at.clone());
    let mut method = WampAuthMethod::WampCra;
    let given = s.get("method").is_some();
    s.parsed("method", &mut method, p);
    let authid = s.string("authid", p);
    let secret_env = s.string("secret_env", p);
    let secret_file = s.string("secret_file", p).map(PathBuf::from);
    s.finish(p);
    if !given {
        p.push(format!("{at}.method: missing (\"ticket\" or \"wampcra\")"));
    }
    let Some(authid) = authid else {
        p.push(format!("{at}.authid: missing"));
        return None;
    };
    if secret_env.is_some() == secret_file.is_some() {
        p.push(format!(
            "{at}: needs exactly one of secret_env and secret_file"
        ));
        return None;
    }
    Some(WampAuth {
        method,
        authid,
        secret_env,
        secret_file,
    })
}

/// `[wamp]`'s method names: each given, and four different ones.
pub(super) fn check_methods(c: &WampConfig, p: &mut Vec<String>) {
    let names = [
        ("subscribe_method", &c.subscribe_method),
        ("unsubscribe_method", &c.unsubscribe_method),
        ("publish_method", &c.publish_method),
        ("event_method", &c.event_method),
    ];
    for (i, (key, name)) in names.iter().enumerate() {
        if name.is_empty() {
            p.push(format!("wamp.{key}: empty"));
        }
        if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
            p.push(format!("wamp.{key}: {name:?} is also wamp.{other}"));
        }
    }
}

/// The relations between an upstream's WAMP keys.
pub(super) fn check_upstream(i: usize, up: &super::UpstreamConfig, p: &mut Vec<String>) {
    let at = format!("upstreams[{i}]");
    match up.protocol {
        Protocol::JsonRpc => {
            for (key, set) in [
                ("realm", up.realm.is_some()),
                ("procedure_prefix", !up.procedure_prefix.is_empty()),
                ("wamp_auth", up.wamp_auth.is_some()),
            ] {
                if set {
                    p.push(format!("{at}.{key}: only for protocol = \"wamp\""));
                }
            }
        }
        Protocol::Wamp => {
            match &up.realm {
                None => p.push(format!(
                    "{at}.realm: a WAMP upstream needs the realm its router serves (e.g. \"realm1\")"
                )),
                Some(r) if r.is_empty() => p.push(format!("{at}.realm: empty")),
                Some(_) => {}
            }
            if up.subprotocol.is_some() {
                p.push(format!(
                    "{at}.subprotocol: a WAMP upstream always asks for wamp.2.json; leave it out"
                ));
            }
            if let Some(auth) = &up.wamp_auth
                && let Err(e) = auth.secret(&format!("{at}.wamp_auth"))
            {
                p.push(e);
            }
        }
    }
}

#[cfg(test)]
mod tests;
