//! Choosing an upstream: power of two choices for plain calls, weighted rendezvous
//! hashing for sessions.
//!
//! Both are pure functions over the candidates' ids, weights and loads, so they are
//! tested here without sockets. Selection yields an *order*: the first usable
//! candidate is the choice and the rest are the failover order.

/// One upstream as the balancer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Stable identity (`ip:port` or the URL): the same on every rpcgate replica.
    pub id: &'a str,
    pub weight: u32,
    /// Calls in flight on it now.
    pub load: usize,
}

/// A 64-bit hash that is identical on every replica and every run (unlike std's
/// randomly keyed SipHash), so every rpcgate replica maps a session to the same upstream.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    // FNV-1a, then a final avalanche so nearby keys spread over the whole range.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Candidates ordered by weighted rendezvous score for `key`, best first.
///
/// Each (key, upstream) pair gets a score `-weight / ln(u)` with `u` uniform in (0,1)
/// from a stable hash: an upstream that leaves only moves its own sessions, and a
/// weight-2 upstream draws twice the sessions of a weight-1 one.
pub fn rendezvous_order(key: &[u8], candidates: &[Candidate<'_>]) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (rendezvous_score(key, c), i))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The first of [`rendezvous_order`], without ordering the rest: what a call needs.
pub fn rendezvous_first(key: &[u8], candidates: &[Candidate<'_>]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (rendezvous_score(key, c), i))
        // Ties go to the lower index, as in the full order.
        .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, i)| i)
}

fn rendezvous_score(key: &[u8], c: &Candidate<'_>) -> f64 {
    let h = stable_hash(&[key, c.id.as_bytes()]);
    // 53 random bits in (0, 1): never 0, so ln is finite.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(c.weight.max(1)) / u.ln()
}

fn load_per_weight(c: &Candidate<'_>) -> f64 {
    c.load as f64 / f64::from(c.weight.max(1))
}

/// Power of two choices, honouring weights: draws two candidates with probability
/// proportional to weight and keeps the one with less load per weight.
pub fn p2c_choice(
    candidates: &[Candidate<'_>],
    mut random: impl FnMut(u64) -> u64,
) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let total: u64 = candidates.iter().map(|c| u64::from(c.weight.max(1))).sum();
    let draw = |random: &mut dyn FnMut(u64) -> u64| {
        let mut r = random(total);
        for (i, c) in candidates.iter().enumerate() {
            let w = u64::from(c.weight.max(1));
            if r < w {
                return i;
            }
            r -= w;
        }
        n - 1
    };
    let a = draw(&mut random);
    let mut b = draw(&mut random);
    if n > 1 && a == b {
        b = (a + 1 + (random(n as u64 - 1) as usize)) % n;
    }
    Some(
        if load_per_weight(&candidates[b]) < load_per_weight(&candidates[a]) {
            b
        } else {
            a
        },
    )
}

/// Every candidate but `first`, least load per weight first: the fallback order when
/// the chosen one turns out full.
pub fn by_load_except(candidates: &[Candidate<'_>], first: usize) -> Vec<usize> {
    let mut rest: Vec<usize> = (0..candidates.len()).filter(|&i| i != first).collect();
    rest.sort_by(|&x, &y| {
        load_per_weight(&candidates[x]).total_cmp(&load_per_weight(&candidates[y]))
    });
    rest
}

/// [`p2c_choice`], then [`by_load_except`] it: the whole preference order.
pub fn p2c_order(candidates: &[Candidate<'_>], random: impl FnMut(u64) -> u64) -> Vec<usize> {
    let Some(first) = p2c_choice(candidates, random) else {
        return Vec::new();
    };
    let mut order = vec![first];
    order.extend(by_load_except(candidates, first));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands<'a>(ids: &'a [&'a str]) -> Vec<Candidate<'a>> {
        ids.iter()
            .map(|id| Candidate {
                id,
                weight: 1,
                load: 0,
            })
            .collect()
    }

    #[test]
    fn rendezvous_first_is_the_head_of_the_order() {
        let ids = ["a:1", "b:1", "c:1", "d:1"];
        let mut c = cands(&ids);
        c[1].weight = 3;
        for k in 0..500 {
            let key = format!("k{k}");
            assert_eq!(
                rendezvous_first(key.as_bytes(), &c),
                rendezvous_order(key.as_bytes(), &c).first().copied()
            );
        }
        assert_eq!(rendezvous_first(b"k", &[]), None);
    }

    #[test]
    fn rendezvous_is_stable_and_only_moves_the_leavers_sessions() {
        let all = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
        let without_b = ["10.0.0.1:80", "10.0.0.3:80"];
        let mut moved = 0;
        for k in 0..2000 {
            let key = format!("session-{k}");
            let first = all[rendezvous_order(key.as_bytes(), &cands(&all))[0]];
            assert_eq!(
                first,
                all[rendezvous_order(key.as_bytes(), &cands(&all))[0]]
            );
            let after = without_b[rendezvous_order(key.as_bytes(), &cands(&without_b))[0]];
            if first != "10.0.0.2:80" {
                assert_eq!(first, after, "a session not on the leaver stays put");
            } else {
                moved += 1;
            }
        }
        // About a third of the sessions lived on the upstream that left.
        assert!((500..830).contains(&moved), "moved {moved}");
    }

    #[test]
    fn rendezvous_order_is_independent_of_listing_order() {
        let a = ["x:1", "y:1", "z:1"];
        let b = ["z:1", "x:1", "y:1"];
        for k in 0..100 {
            let key = format!("k{k}");
            let oa: Vec<&str> = rendezvous_order(key.as_bytes(), &cands(&a))
                .iter()
                .map(|&i| a[i])
                .collect();
            let ob: Vec<&str> = rendezvous_order(key.as_bytes(), &cands(&b))
                .iter()
                .map(|&i| b[i])
                .collect();
            assert_eq!(oa, ob);
        }
    }

    #[test]
    fn rendezvous_honours_weights() {
        let ids = ["heavy", "light"];
        let mut c = cands(&ids);
        c[0].weight = 3;
        let heavy = (0..4000)
            .filter(|k| rendezvous_order(format!("s{k}").as_bytes(), &c)[0] == 0)
            .count();
        // Expect 3/4 of 4000.
        assert!((2800..3200).contains(&heavy), "heavy got {heavy}");
    }

    #[test]
    fn p2c_prefers_the_less_loaded_of_two() {
        let ids = ["a", "b"];
        let mut c = cands(&ids);
        c[0].load = 10;
        c[1].load = 1;
        let mut seq = [0u64, 1].into_iter().cycle();
        let order = p2c_order(&c, |_| seq.next().unwrap_or(0));
        assert_eq!(order, vec![1, 0]);
    }

    #[test]
    fn p2c_spreads_by_weight_when_idle() {
        let ids = ["a", "b", "c"];
        let mut c = cands(&ids);
        c[2].weight = 2;
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0usize; 3];
        for _ in 0..8000 {
            counts[p2c_order(&c, |n| rng.u64(..n))[0]] += 1;
        }
        // Equal loads: the first draw wins ties, so picks follow the weights.
        assert!(counts[2] > counts[0] && counts[2] > counts[1], "{counts:?}");
        assert!(counts.iter().all(|&n| n > 1000), "{counts:?}");
    }

    #[test]
    fn p2c_order_lists_everyone_once() {
        let ids = ["a", "b", "c", "d"];
        let c = cands(&ids);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut order = p2c_order(&c, |n| rng.u64(..n));
        order.sort();
        assert_eq!(order, vec![0, 1, 2, 3]);
        assert!(p2c_order(&[], |_| 0).is_empty());
    }
}
