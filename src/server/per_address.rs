//! Open client connections per client address (`http.max_connections_per_address`),
//! so one client cannot take every place `http.max_connections` has.
//!
//! IPv4 counts by address; IPv6 by /64, the block one host or site is usually given,
//! within which it can pick a new address for every connection. An entry exists only
//! while a connection of its address is open, so the table never holds more entries
//! than there are open connections.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// What one client address is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

impl Client {
    fn of(ip: IpAddr) -> Client {
        match ip {
            IpAddr::V4(v4) => Client::V4(v4.into()),
            // A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client::V4(v4.into()),
                None => Client::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// The open connections of each client address.
pub struct PerAddress {
    limit: usize,
    open: Mutex<HashMap<Client, usize>>,
}

impl PerAddress {
    /// A table for `limit` connections per address; `None` for 0 (no limit).
    pub fn new(limit: usize) -> Option<Arc<PerAddress>> {
        (limit > 0).then(|| {
            Arc::new(PerAddress {
                limit,
                open: Mutex::new(HashMap::new()),
            })
        })
    }

    /// The limit, for the refusal's message.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place for one more connection from `ip`, or `None` if it has `limit` open.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<AddressPlace> {
        let client = Client::of(ip);
        let mut open = self.open.lock();
        let n = open.entry(client).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(AddressPlace {
            table: self.clone(),
            client,
        })
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.open.lock().len()
    }
}

/// One connection's place in its address's count, given back on drop.
pub struct AddressPlace {
    table: Arc<PerAddress>,
    client: Client,
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut open = self.table.open.lock();
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_address_gets_limit_places_and_a_freed_one_is_reusable() {
        let table = PerAddress::new(2).unwrap();
        let a = table.enter(ip("10.0.0.1")).unwrap();
        let _b = table.enter(ip("10.0.0.1")).unwrap();
        assert!(table.enter(ip("10.0.0.1")).is_none());
        let _other = table.enter(ip("10.0.0.2")).unwrap();
        drop(a);
        assert!(table.enter(ip("10.0.0.1")).is_some());
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let table = PerAddress::new(1).unwrap();
        let _a = table.enter(ip("2001:db8:1:2::1")).unwrap();
        assert!(table.enter(ip("2001:db8:1:2:ffff::9")).is_none());
        let _b = table.enter(ip("2001:db8:1:3::1")).unwrap();
        let _c = table.enter(ip("192.0.2.7")).unwrap();
        assert!(table.enter(ip("::ffff:192.0.2.7")).is_none());
    }

    #[test]
    fn an_address_leaves_the_table_with_its_last_connection() {
        let table = PerAddress::new(3).unwrap();
        let places: Vec<_> = (0..3)
            .map(|_| table.enter(ip("10.0.0.1")).unwrap())
            .collect();
        let _other = table.enter(ip("10.0.0.2")).unwrap();
        assert_eq!(table.entries(), 2);
        drop(places);
        assert_eq!(table.entries(), 1);
        assert!(PerAddress::new(0).is_none());
    }
}
