//! `[[rate_limits]]`: token buckets (governor's GCRA), one per caller or per client
//! address, that every call (each batch element too) takes its cost from.

use crate::config::{RateLimitConfig, RateScope};
use crate::error::Error;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// tokio's clock for governor, so that limits follow `tokio::time::pause()` like every
/// other timer in the gateway.
#[derive(Debug, Clone)]
pub struct TokioClock(pub Instant);

impl governor::clock::Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Whose bucket a call takes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    /// The single bucket of a rule for one named caller.
    One,
    Caller(Arc<str>),
    Address(IpAddr),
}

type Limiter =
    RateLimiter<Subject, HashMapStateStore<Subject>, TokioClock, NoOpMiddleware<Duration>>;

struct Bucket {
    config: RateLimitConfig,
    limiter: Limiter,
    clock: TokioClock,
}

/// Who is calling, as the limits see it.
pub struct Calling<'a> {
    /// The caller's name (a key's name, a token's subject).
    pub name: &'a Arc<str>,
    /// What the caller counts as in `key = "..."` rules and metrics (`jwt` for
    /// every token).
    pub label: &'a str,
    pub address: IpAddr,
}

/// Every configured limit.
pub struct RateLimits {
    buckets: Vec<Bucket>,
}

impl RateLimits {
    pub fn new(configs: &[RateLimitConfig]) -> RateLimits {
        let clock = TokioClock(Instant::now());
        let buckets = configs
            .iter()
            .map(|config| {
                let interval = config.per / config.rate.max(1);
                let quota = Quota::with_period(interval.max(Duration::from_nanos(1)))
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                    .allow_burst(NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN));
                Bucket {
                    config: config.clone(),
                    limiter: RateLimiter::hashmap_with_clock(quota, clock.clone()),
                    clock: clock.clone(),
                }
            })
            .collect();
        RateLimits { buckets }
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Takes a call to `method` from every bucket it counts against. Refused by the
    /// first that cannot pay: the error says which limit and when to try again.
    /// (Buckets checked before it have already been charged; a refused call still
    /// cost its caller something, which is what a limit against floods wants.)
    pub fn take(&self, who: &Calling<'_>, method: &str) -> Result<(), Error> {
        for bucket in &self.buckets {
            let subject = match &bucket.config.scope {
                RateScope::Caller(name) if name.as_str() == who.label => Subject::One,
                RateScope::Caller(name) if name.as_str() == who.name.as_ref() => Subject::One,
                RateScope::Caller(_) => continue,
                RateScope::EveryCaller => Subject::Caller(who.name.clone()),
                RateScope::Address => Subject::Address(network_of(who.address)),
            };
            let Some(cost) = bucket.config.cost(method).and_then(NonZeroU32::new) else {
                continue;
            };
            let refused = match bucket.limiter.check_key_n(&subject, cost) {
                Ok(Ok(())) => continue,
                Ok(Err(not_until)) => {
                    not_until.wait_time_from(governor::clock::Clock::now(&bucket.clock))
                }
                // Checked in the config: no cost exceeds its burst. Were it to, the
                // call could never pass, and saying so beats a retry loop.
                Err(_) => Duration::MAX,
            };
            return Err(Error::RateLimited {
                limit: bucket.config.name.clone(),
                retry_after: refused,
            });
        }
        Ok(())
    }

    /// Forgets every subject whose bucket is full again: the tables hold only callers
    /// and addresses seen within about one refill of their bucket.
    pub fn forget_idle(&self) {
        for bucket in &self.buckets {
            bucket.limiter.retain_recent();
            bucket.limiter.shrink_to_fit();
        }
    }

    /// `(limit name, tokens per second, burst)` of every limit, for the metrics.
    pub fn describe(&self) -> impl Iterator<Item = (&str, f64, u32)> {
        self.buckets.iter().map(|b| {
            let c = &b.config;
            (
                c.name.as_str(),
                f64::from(c.rate) / c.per.as_secs_f64(),
                c.burst,
            )
        })
    }

    /// Subjects held, all limits together.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.iter().map(|b| b.limiter.len()).sum()
    }
}

/// An IPv6 client by its /64, the block one subscriber typically holds: counted per
/// address, a client with a /64 would have 2^64 buckets.
fn network_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn limit(scope: RateScope, rate: u32, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            name: "test".into(),
            scope,
            rate,
            per: Duration::from_secs(1),
            burst,
            method: None,
            costs: vec![("eth_getLogs".into(), 5)],
        }
    }

    fn calling(name: &Arc<str>, last_octet: u8) -> Calling<'_> {
        Calling {
            name,
            label: name,
            address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last_octet)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_refuses_past_its_burst_and_refills_at_its_rate() {
        let limits = RateLimits::new(&[limit(RateScope::Address, 10, 5)]);
        let alice: Arc<str> = "alice".into();
        for _ in 0..5 {
            limits.take(&calling(&alice, 1), "eth_call").unwrap();
        }
        let Err(Error::RateLimited { retry_after, .. }) =
            limits.take(&calling(&alice, 1), "eth_call")
        else {
            panic!("the sixth call passed a burst of 5");
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        // Another address has a bucket of its own.
        limits.take(&calling(&alice, 2), "eth_call").unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        limits.take(&calling(&alice, 1), "eth_call").unwrap();
        assert!(limits.take(&calling(&alice, 1), "eth_call").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn costs_take_several_tokens() {
        let limits = RateLimits::new(&[limit(RateScope::EveryCaller, 5, 5)]);
        let bob: Arc<str> = "bob".into();
        limits.take(&calling(&bob, 1), "eth_getLogs").unwrap();
        assert!(limits.take(&calling(&bob, 1), "eth_call").is_err());
        let carol: Arc<str> = "carol".into();
        limits.take(&calling(&carol, 1), "eth_call").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_named_rule_counts_only_its_caller() {
        let limits = RateLimits::new(&[limit(RateScope::Caller("alice".into()), 1, 1)]);
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        limits.take(&calling(&alice, 1), "x").unwrap();
        assert!(limits.take(&calling(&alice, 2), "x").is_err());
        for _ in 0..10 {
            limits.take(&calling(&bob, 1), "x").unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_subjects_are_forgotten() {
        let limits = RateLimits::new(&[limit(RateScope::Address, 10, 10)]);
        let name: Arc<str> = "anonymous".into();
        for octet in 0..100 {
            limits.take(&calling(&name, octet), "x").unwrap();
        }
        assert_eq!(limits.len(), 100);
        tokio::time::advance(Duration::from_secs(2)).await;
        limits.forget_idle();
        assert_eq!(limits.len(), 0);
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(network_of(a), network_of(b));
        assert_ne!(network_of(a), network_of(c));
    }
}
