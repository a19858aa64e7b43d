//! `[[rate_limits]]`: token buckets per caller or client address, and what each call
//! costs them.

use super::access::tables;
use super::file::{Section, parse_duration};
use std::time::Duration;
use toml::{Table, Value};

/// Whose calls a rate limit counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateScope {
    /// The caller of this name: an API key, a certificate rule, `jwt` or `anonymous`.
    Caller(String),
    /// Every caller, each with a bucket of its own.
    EveryCaller,
    /// Each client address (IPv6 by /64), with `sessions.client_ip_header` if set.
    Address,
}

/// `[[rate_limits]]`: a token bucket per scope.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// The `limit` metric label: `name`, or `rate_limits[i]`.
    pub name: String,
    pub scope: RateScope,
    /// Tokens added per `per`.
    pub rate: u32,
    pub per: Duration,
    /// Tokens the bucket holds when full: the largest burst.
    pub burst: u32,
    /// Only calls to matching methods count; `None`: every call.
    pub method: Option<String>,
    /// Tokens a call to a matching method takes (default 1): the most specific
    /// pattern that matches wins (an exact name, else the longest pattern).
    pub costs: Vec<(String, u32)>,
}

impl RateLimitConfig {
    /// Tokens a call to `method` takes from this bucket; `None`: it does not count.
    pub fn cost(&self, method: &str) -> Option<u32> {
        if let Some(pattern) = &self.method
            && !super::method_matches(pattern, method)
        {
            return None;
        }
        Some(
            self.costs
                .iter()
                .filter(|(p, _)| super::method_matches(p, method))
                .max_by_key(|(p, _)| (p.as_str() == method, p.len()))
                .map_or(1, |(_, cost)| *cost),
        )
    }
}

/// `100/s`, `6000/min`, `10/1h`, `5/10s`: tokens per period.
pub fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("{text:?} is not a rate like 100/s, 600/min or 5/10s");
    let (count, period) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let period = match period.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => parse_duration(other).map_err(|_| bad())?,
    };
    if count == 0 || period.is_zero() {
        return Err(format!("{text:?}: the rate must be more than 0"));
    }
    Ok((count, period))
}

pub(super) fn read_rate_limits(v: &Value, p: &mut Vec<String>) -> Vec<RateLimitConfig> {
    tables(v, "rate_limits", p)
        .into_iter()
        .enumerate()
        .filter_map(|(i, (path, t))| read_rate_limit(t, i, path, p))
        .collect()
}

fn read_rate_limit(
    t: &Table,
    i: usize,
    path: String,
    p: &mut Vec<String>,
) -> Option<RateLimitConfig> {
    let mut s = Section::new(t, &path);
    let name = s
        .string("name", p)
        .unwrap_or_else(|| format!("rate_limits[{i}]"));
    let key = s.string("key", p);
    let mut address = false;
    s.boolean("address", &mut address, p);
    let rate = s.string("rate", p);
    let mut burst = usize::MAX;
    s.number("burst", &mut burst, p);
    let method = s.string("method", p);
    let mut costs = Vec::new();
    if let Some(t) = s.table("costs", p) {
        for (pattern, cost) in t {
            match cost.as_integer().and_then(|c| u32::try_from(c).ok()) {
                Some(c) if c > 0 => costs.push((pattern.clone(), c)),
                _ => p.push(format!(
                    "{path}.costs.{pattern}: expected a whole number of tokens, at least 1"
                )),
            }
        }
    }
    s.finish(p);
    let scope = match (key, address) {
        (Some(_), true) => {
            p.push(format!("{path}: key and address = true exclude each other"));
            return None;
        }
        (Some(k), false) if k == "*" => RateScope::EveryCaller,
        (Some(k), false) => RateScope::Caller(k),
        (None, true) => RateScope::Address,
        (None, false) => {
            p.push(format!(
                "{path}: say whose calls count: key = \"<name>\" (or \"*\" for each caller) or address = true"
            ));
            return None;
        }
    };
    let Some(rate) = rate else {
        p.push(format!("{path}.rate: required, like 100/s"));
        return None;
    };
    let (rate, per) = match parse_rate(&rate) {
        Ok(r) => r,
        Err(e) => {
            p.push(format!("{path}.rate: {e}"));
            return None;
        }
    };
    let burst = match burst {
        usize::MAX => rate,
        0 => {
            p.push(format!("{path}.burst: must be at least 1"));
            return None;
        }
        n => u32::try_from(n).unwrap_or(u32::MAX),
    };
    for (pattern, cost) in &costs {
        if *cost > burst {
            p.push(format!(
                "{path}.costs.{pattern}: a call costing {cost} could never pass a bucket of burst {burst}"
            ));
        }
    }
    Some(RateLimitConfig {
        name,
        scope,
        rate,
        per,
        burst,
        method,
        costs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_as_operators_write_them() {
        assert_eq!(parse_rate("100/s"), Ok((100, Duration::from_secs(1))));
        assert_eq!(parse_rate("600/min"), Ok((600, Duration::from_secs(60))));
        assert_eq!(parse_rate(" 5 / 10s "), Ok((5, Duration::from_secs(10))));
        assert_eq!(parse_rate("1/h"), Ok((1, Duration::from_secs(3600))));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").unwrap_err().contains("like 100/s"));
        assert!(parse_rate("10/fortnight").is_err());
    }

    #[test]
    fn costs_first_match_and_method_scope() {
        let limit = RateLimitConfig {
            name: "x".into(),
            scope: RateScope::Address,
            rate: 10,
            per: Duration::from_secs(1),
            burst: 10,
            method: Some("eth_*".into()),
            costs: vec![("eth_*".into(), 2), ("eth_getLogs".into(), 5)],
        };
        assert_eq!(limit.cost("eth_getLogs"), Some(5));
        assert_eq!(limit.cost("eth_call"), Some(2));
        assert_eq!(limit.cost("net_version"), None);
    }
}
