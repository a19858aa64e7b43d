//! Where the admin listener binds, and who chose that address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// Where the admin listener (`/metrics`, `/healthz`, `/readyz`) binds.
///
/// Who chose the address decides what a failed bind means. An address nobody asked for
/// must not keep rpcgate from starting: two instances on one host would both want the
/// default port. An address the operator set is one a probe or a scraper is pointed
/// at, so failing to bind it fails startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListen {
    /// No admin listener (`"off"` or `""`).
    Off,
    /// Nothing was configured: this address, or a free port on the same IP when it is
    /// taken. Built-in value: [`AdminListen::DEFAULT_ADDR`].
    Default(SocketAddr),
    /// Set by `admin_listen`, `--admin-listen` or `RPCGATE_ADMIN_LISTEN`: this address
    /// or no start.
    Explicit(SocketAddr),
}

impl AdminListen {
    /// Loopback only: `/metrics` has no authentication, so exposing it on every
    /// interface has to be asked for.
    pub const DEFAULT_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

    /// The address to try first, if there is a listener at all.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            AdminListen::Off => None,
            AdminListen::Default(addr) | AdminListen::Explicit(addr) => Some(addr),
        }
    }
}

impl Default for AdminListen {
    fn default() -> Self {
        AdminListen::Default(AdminListen::DEFAULT_ADDR)
    }
}

/// An `admin_listen` value that is neither an address nor `"off"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address like 0.0.0.0:9464 (or \"off\")")]
pub struct BadAdminListen(pub String);

/// What an operator writes is explicit by definition: only an absent setting is
/// [`AdminListen::Default`].
impl FromStr for AdminListen {
    type Err = BadAdminListen;

    fn from_str(text: &str) -> Result<Self, BadAdminListen> {
        match text {
            "" | "off" => Ok(AdminListen::Off),
            addr => addr
                .parse()
                .map(AdminListen::Explicit)
                .map_err(|_| BadAdminListen(text.to_owned())),
        }
    }
}

/// For people (`check-config`, logs): says when the address is only a preference.
impl fmt::Display for AdminListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminListen::Off => f.write_str("off"),
            AdminListen::Default(addr) => write!(f, "{addr} or a free port if taken"),
            AdminListen::Explicit(addr) => write!(f, "{addr}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_loopback_and_only_preferred() {
        let default = AdminListen::default();
        assert_eq!(
            default,
            AdminListen::Default(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert!(default.addr().is_some_and(|a| a.ip().is_loopback()));
    }

    #[test]
    fn written_values_are_explicit_or_off() {
        assert_eq!("off".parse(), Ok(AdminListen::Off));
        assert_eq!("".parse(), Ok(AdminListen::Off));
        // Even the default address, once written, is one the operator relies on.
        assert_eq!(
            "127.0.0.1:9464".parse(),
            Ok(AdminListen::Explicit(AdminListen::DEFAULT_ADDR))
        );
        assert_eq!(
            "[::]:9000".parse::<AdminListen>().map(AdminListen::addr),
            Ok(Some(SocketAddr::from(([0u16; 8], 9000))))
        );
    }

    #[test]
    fn explicit_values_round_trip_through_display() {
        for value in [
            AdminListen::Off,
            AdminListen::Explicit(SocketAddr::from(([0, 0, 0, 0], 9464))),
        ] {
            assert_eq!(value.to_string().parse(), Ok(value));
        }
        assert!(AdminListen::default().to_string().contains("free port"));
    }

    #[test]
    fn a_bad_value_names_what_is_accepted() {
        let err = "9464".parse::<AdminListen>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#""9464" is not an address like 0.0.0.0:9464 (or "off")"#
        );
    }
}
