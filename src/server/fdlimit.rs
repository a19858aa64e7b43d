//! The open-files limit, checked once at startup.
//!
//! Every client connection, every refused one being answered, and every upstream
//! socket is a file descriptor. Many systems still start services with a soft
//! limit of 1024, far below `http.max_connections`, and then accepts fail with
//! EMFILE under load. As Go's runtime and nginx do, the soft limit is raised to
//! the hard limit when it is lower than what the configuration can use; if even the
//! hard limit is too low, one warning says both numbers and what to set.

use crate::config::Config;

/// Descriptors beyond the sockets: listeners, the log pipe, DNS, files, headroom.
const SPARE: u64 = 128;

/// Descriptors the configuration can have open at once.
pub fn needed(config: &Config) -> u64 {
    let clients = config.http.max_connections as u64;
    // Sockets accepted over the cap while they are answered 503 (see `listener`).
    let refused = clients.min(super::listener::MAX_REFUSING as u64);
    let upstream: u64 = config.upstreams.iter().map(|u| u.connections as u64).sum();
    clients + refused + upstream + SPARE
}

/// What to do about a soft limit of `soft` with a hard limit of `hard`.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Enough,
    /// Raise the soft limit to this.
    Raise(u64),
    /// Raise to the hard limit, which is still short of what is needed.
    RaiseShort(u64),
}

fn plan(soft: u64, hard: u64, needed: u64) -> Plan {
    if soft >= needed {
        Plan::Enough
    } else if hard >= needed {
        // Up to the hard limit, not just to `needed`: a descriptor limit costs nothing
        // until used, and later growth (discovery, more upstreams) fits too.
        Plan::Raise(hard)
    } else {
        Plan::RaiseShort(hard)
    }
}

/// Raises the soft RLIMIT_NOFILE if `config` can use more; warns if it cannot.
#[cfg(unix)]
pub fn ensure(config: &Config) {
    let needed = needed(config);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot read the open-files limit");
        return;
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "rlim_t is u64 on Linux, not everywhere"
    )]
    let (soft, hard) = (limit.rlim_cur as u64, limit.rlim_max as u64);
    let target = match plan(soft, hard, needed) {
        Plan::Enough => return,
        Plan::Raise(to) | Plan::RaiseShort(to) => to,
    };
    // macOS refuses a soft limit above OPEN_MAX even with an unlimited hard limit.
    #[cfg(target_os = "macos")]
    let target = target.min(libc::OPEN_MAX as u64);
    let raised = libc::rlimit {
        rlim_cur: target as libc::rlim_t,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads one rlimit we own.
    let now = if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::debug!(from = soft, to = target, "raised the open-files limit");
        target
    } else {
        soft
    };
    if now < needed {
        tracing::warn!(
            limit = now,
            needed,
            "the open-files limit is below what http.max_connections and the upstream \
             connections can use: accepts will fail when it is reached; raise it to at \
             least {needed} (ulimit -n, systemd LimitNOFILE, docker --ulimit nofile) or \
             lower http.max_connections"
        );
    }
}

#[cfg(not(unix))]
pub fn ensure(_: &Config) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one_only_when_short() {
        assert_eq!(plan(1024, 4096, 1000), Plan::Enough);
        assert_eq!(plan(1024, 1_048_576, 20_000), Plan::Raise(1_048_576));
        assert_eq!(plan(1024, 4096, 20_000), Plan::RaiseShort(4096));
    }

    #[test]
    fn clients_refused_ones_upstreams_and_spare_descriptors_are_counted() {
        let mut config = Config::default();
        config.http.max_connections = 100;
        let mut up = crate::config::UpstreamConfig::new("ws://127.0.0.1:9/");
        up.connections = 4;
        config.upstreams.push(up);
        assert_eq!(needed(&config), 100 + 100 + 4 + SPARE);
    }
}
