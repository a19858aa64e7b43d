//! Settings of the push side: session buffers and event streams (`[push]`), and which
//! methods open and close subscriptions on shared connections (`[[subscriptions]]`).

use super::file::Section;
use std::str::FromStr;
use std::time::Duration;
use toml::{Table, Value};

/// Buffers, streams and limits of push sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct PushConfig {
    /// Path of the event stream and long-poll endpoint.
    pub events_path: String,
    /// Messages kept per session (delivered or not), for `Last-Event-ID` replays.
    pub buffer: usize,
    /// Bytes those messages may take per session; the oldest go first past it.
    pub buffer_bytes: usize,
    /// Comment line sent on an idle event stream this often.
    pub heartbeat: Duration,
    /// A session with no stream or socket attached and no calls ends after this.
    pub idle_timeout: Duration,
    /// Push sessions at most.
    pub max_sessions: usize,
    /// Subscriptions one session may hold at most.
    pub max_subscriptions: usize,
    /// Longest `wait` a long-poll may ask for.
    pub max_poll_wait: Duration,
    /// Messages a WebSocket client may have queued for writing; past it, it is closed.
    pub max_socket_queue: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            events_path: "/events".into(),
            buffer: 1024,
            buffer_bytes: 4 * 1024 * 1024,
            heartbeat: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            max_sessions: 10_000,
            max_subscriptions: 64,
            max_poll_wait: Duration::from_secs(60),
            max_socket_queue: 1024,
        }
    }
}

/// Which calls open and close a subscription, and where its id sits in a notification.
///
/// Method names are exact, or patterns with `*` standing for any run of characters
/// (`*_subscribe*` matches `chain_subscribeNewHeads`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRule {
    pub subscribe: String,
    pub unsubscribe: String,
    /// The notification method; `None` takes any notification whose id is known.
    pub notification: Option<String>,
    /// JSON pointer (RFC 6901) to the subscription id inside a notification.
    pub id_pointer: String,
}

const DEFAULT_POINTER: &str = "/params/subscription";

impl SubscriptionRule {
    /// A named convention: `ethereum` (`eth_subscribe`), `substrate` (jsonrpsee's
    /// `*_subscribe*` / `*_unsubscribe*`).
    pub fn preset(name: &str) -> Option<SubscriptionRule> {
        let (subscribe, unsubscribe, notification) = match name {
            "ethereum" | "eth" => ("eth_subscribe", "eth_unsubscribe", Some("eth_subscription")),
            "substrate" | "jsonrpsee" => ("*_subscribe*", "*_unsubscribe*", None),
            _ => return None,
        };
        Some(SubscriptionRule {
            subscribe: subscribe.into(),
            unsubscribe: unsubscribe.into(),
            notification: notification.map(Into::into),
            id_pointer: DEFAULT_POINTER.into(),
        })
    }
}

/// `--subscription`: a preset name, or `SUBSCRIBE,UNSUBSCRIBE[,NOTIFICATION]`.
impl FromStr for SubscriptionRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rule) = SubscriptionRule::preset(s.trim()) {
            return Ok(rule);
        }
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        match parts[..] {
            [subscribe, unsubscribe] | [subscribe, unsubscribe, ""]
                if !subscribe.is_empty() && !unsubscribe.is_empty() =>
            {
                Ok(rule(subscribe, unsubscribe, None))
            }
            [subscribe, unsubscribe, notification]
                if !subscribe.is_empty() && !unsubscribe.is_empty() =>
            {
                Ok(rule(subscribe, unsubscribe, Some(notification)))
            }
            _ => Err(format!(
                "{s:?}: expected a preset (ethereum, substrate) or \
                 SUBSCRIBE,UNSUBSCRIBE[,NOTIFICATION], e.g. eth_subscribe,eth_unsubscribe,eth_subscription"
            )),
        }
    }
}

fn rule(subscribe: &str, unsubscribe: &str, notification: Option<&str>) -> SubscriptionRule {
    SubscriptionRule {
        subscribe: subscribe.into(),
        unsubscribe: unsubscribe.into(),
        notification: notification.map(Into::into),
        id_pointer: DEFAULT_POINTER.into(),
    }
}

/// Whether `name` matches `pattern`, where `*` is any run of characters. Checked on
/// every call by the access rules, so it allocates nothing.
pub fn matches(pattern: &str, name: &str) -> bool {
    let Some((first, tail)) = pattern.split_once('*') else {
        return pattern == name; // no `*`: exact
    };
    let (middle, last) = tail.rsplit_once('*').unwrap_or(("", tail));
    let Some(rest) = name.strip_prefix(first) else {
        return false;
    };
    let Some(mut rest) = rest.strip_suffix(last) else {
        return false;
    };
    // Each middle part at its leftmost place leaves the most room for the next.
    for part in middle.split('*').filter(|part| !part.is_empty()) {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

pub(super) fn read_push(t: &Table, c: &mut PushConfig, p: &mut Vec<String>) {
    let mut s = Section::new(t, "push");
    if let Some(path) = s.string("events_path", p) {
        c.events_path = path;
    }
    s.number("buffer", &mut c.buffer, p);
    s.size("buffer_bytes", &mut c.buffer_bytes, p);
    s.duration("heartbeat", &mut c.heartbeat, p);
    s.duration("idle_timeout", &mut c.idle_timeout, p);
    s.number("max_sessions", &mut c.max_sessions, p);
    s.number("max_subscriptions", &mut c.max_subscriptions, p);
    s.duration("max_poll_wait", &mut c.max_poll_wait, p);
    s.number("max_socket_queue", &mut c.max_socket_queue, p);
    s.finish(p);
}

pub(super) fn read_subscriptions(v: &Value, p: &mut Vec<String>) -> Vec<SubscriptionRule> {
    let Value::Array(items) = v else {
        p.push("subscriptions: expected an array of tables ([[subscriptions]])".into());
        return Vec::new();
    };
    let mut rules = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Value::Table(t) = item else {
            p.push(format!("subscriptions[{i}]: expected a table"));
            continue;
        };
        let name = format!("subscriptions[{i}]");
        let mut s = Section::new(t, &name);
        let preset = s.string("preset", p);
        let base = match preset.as_deref().map(|n| (n, SubscriptionRule::preset(n))) {
            Some((_, Some(rule))) => Some(rule),
            Some((n, None)) => {
                p.push(format!(
                    "{name}.preset: {n:?} is not one of ethereum, substrate"
                ));
                None
            }
            None => None,
        };
        let subscribe = s.string("subscribe", p);
        let unsubscribe = s.string("unsubscribe", p);
        let notification = s.string("notification", p);
        let pointer = s.string("id_pointer", p);
        s.finish(p);
        let mut rule = match (base, subscribe, unsubscribe) {
            (Some(mut rule), sub, unsub) => {
                rule.subscribe = sub.unwrap_or(rule.subscribe);
                rule.unsubscribe = unsub.unwrap_or(rule.unsubscribe);
                rule
            }
            (None, Some(sub), Some(unsub)) => self::rule(&sub, &unsub, None),
            (None, _, _) => {
                p.push(format!(
                    "{name}: needs a preset, or both subscribe and unsubscribe"
                ));
                continue;
            }
        };
        if notification.is_some() {
            rule.notification = notification;
        }
        if let Some(pointer) = pointer {
            if !pointer.starts_with('/') {
                p.push(format!(
                    "{name}.id_pointer: {pointer:?} is not a JSON pointer like /params/subscription"
                ));
            }
            rule.id_pointer = pointer;
        }
        rules.push(rule);
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches("eth_subscribe", "eth_subscribe"));
        assert!(!matches("eth_subscribe", "eth_subscribeX"));
        assert!(matches("*_subscribe*", "chain_subscribeNewHeads"));
        assert!(matches("*_subscribe*", "ticks_subscribe"));
        assert!(!matches("*_subscribe*", "chain_unsubscribeNewHeads"));
        assert!(matches("*_unsubscribe*", "chain_unsubscribeNewHeads"));
        assert!(matches("a*b*c", "a-b-c"));
        assert!(!matches("a*b*c", "a-c-b"));
        assert!(matches("*", "anything"));
        assert!(!matches("a*a", "a"), "prefix and suffix may not overlap");
        assert!(matches("a*a", "aa"));
        assert!(matches("admin_*", "admin_"));
        assert!(!matches("admin_*", "admin"));
    }

    #[test]
    fn flag_values() {
        let eth: SubscriptionRule = "ethereum".parse().unwrap();
        assert_eq!(eth.notification.as_deref(), Some("eth_subscription"));
        let custom: SubscriptionRule = "a_sub,a_unsub,a_note".parse().unwrap();
        assert_eq!(
            (custom.subscribe.as_str(), custom.unsubscribe.as_str()),
            ("a_sub", "a_unsub")
        );
        assert_eq!(custom.notification.as_deref(), Some("a_note"));
        assert!("only_one".parse::<SubscriptionRule>().is_err());
    }
}
