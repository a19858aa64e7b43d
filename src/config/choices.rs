//! The settings that take one of a few names (`affinity = "upstream"`). Each enum
//! has one spelling table, and its `FromStr` serves the TOML reader and the flags
//! alike, so the file and the command line accept exactly the same words and reject
//! the rest with the same message.

use std::fmt;

/// A value that is none of the names its setting accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} must be {}", or_list(.accepted))]
pub struct UnknownName {
    /// What was written.
    pub value: String,
    /// What would have been accepted, for the message.
    pub accepted: &'static [&'static str],
}

/// `"a", "b" or "c"`.
fn or_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Gives a fieldless enum its spellings: `ALL`, `as_str`, `Display` and `FromStr`.
/// `as_str` is an exhaustive match, so a new variant without a name does not compile.
macro_rules! spelled {
    ($ty:ident { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in the order error messages list them.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The spelling the config file and the flags use.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = UnknownName;

            fn from_str(text: &str) -> Result<Self, UnknownName> {
                match text {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(UnknownName {
                        value: text.to_owned(),
                        accepted: &[$($name),+],
                    }),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// What a session sticks to (`sessions.affinity`, `--affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// No stickiness: every call is balanced on its own.
    None,
    /// A session's calls go to one upstream, over its shared connections.
    Upstream,
    /// A session gets its own upstream WebSocket.
    Connection,
}

spelled!(Affinity {
    None = "none",
    Upstream = "upstream",
    Connection = "connection",
});

/// Whether the listener insists on a client certificate (`tls.client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client without a verified certificate fails the handshake.
    Required,
    /// A client may connect without one; a certificate it sends must still verify.
    Optional,
}

spelled!(ClientAuth {
    Required = "required",
    Optional = "optional",
});

/// Where upstream addresses come from (`discovery.mode`, `--discovery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryMode {
    /// Each `[[upstreams]]` URL is one upstream, dialled by its host name.
    Static,
    /// Each URL's host resolves to all its addresses, one upstream per address.
    Dns,
}

spelled!(DiscoveryMode {
    Static = "static",
    Dns = "dns",
});

/// How log lines are written (`log.format`, `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

spelled!(LogFormat {
    Text = "text",
    Json = "json",
});

/// How a JSON-RPC batch travels upstream (`http.batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// Each element is its own upstream call, spread over connections.
    Split,
    /// The batch goes upstream as one frame on one connection.
    Forward,
}

spelled!(BatchMode {
    Split = "split",
    Forward = "forward",
});

/// What a new `connection` session gets while `max_sessions` are open
/// (`sessions.when_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// New sessions get 503 while `max_sessions` are open.
    Reject,
    /// The least recently used session is closed to make room.
    Evict,
}

spelled!(WhenFull {
    Reject = "reject",
    Evict = "evict",
});

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Debug;
    use std::str::FromStr;

    /// Every value parses back from its spelling, and a bad spelling is answered with
    /// every accepted one.
    fn round_trips<T>(all: &[T], as_str: fn(T) -> &'static str, accepted: &str)
    where
        T: FromStr<Err = UnknownName> + Copy + PartialEq + Debug + fmt::Display,
    {
        for &value in all {
            assert_eq!(as_str(value).parse::<T>(), Ok(value));
            assert_eq!(value.to_string(), as_str(value));
        }
        let err = "Bogus".parse::<T>().unwrap_err();
        assert_eq!(err.to_string(), format!("\"Bogus\" must be {accepted}"));
        assert_eq!(err.accepted.len(), all.len());
    }

    #[test]
    fn affinity_spellings() {
        round_trips(
            Affinity::ALL,
            Affinity::as_str,
            r#""none", "upstream" or "connection""#,
        );
    }

    #[test]
    fn discovery_mode_spellings() {
        round_trips(
            DiscoveryMode::ALL,
            DiscoveryMode::as_str,
            r#""static" or "dns""#,
        );
    }

    #[test]
    fn log_format_spellings() {
        round_trips(LogFormat::ALL, LogFormat::as_str, r#""text" or "json""#);
    }

    #[test]
    fn batch_mode_spellings() {
        round_trips(BatchMode::ALL, BatchMode::as_str, r#""split" or "forward""#);
    }

    #[test]
    fn when_full_spellings() {
        round_trips(WhenFull::ALL, WhenFull::as_str, r#""reject" or "evict""#);
    }

    #[test]
    fn spellings_are_exact() {
        // The file has always been case-sensitive; flags must not be laxer.
        assert!("JSON".parse::<LogFormat>().is_err());
        assert!(" none".parse::<Affinity>().is_err());
        assert!("".parse::<BatchMode>().is_err());
    }

    #[test]
    fn or_list_reads_like_a_sentence() {
        assert_eq!(or_list(&["a"]), r#""a""#);
        assert_eq!(or_list(&["a", "b"]), r#""a" or "b""#);
        assert_eq!(or_list(&["a", "b", "c"]), r#""a", "b" or "c""#);
    }
}

/// What an upstream speaks over its WebSocket (`upstreams[].protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    /// JSON-RPC 2.0: frames pass through with their ids rewritten.
    #[default]
    JsonRpc,
    /// WAMP v2 (`wamp.2.json`) through a router: calls become CALLs, subscriptions
    /// SUBSCRIBEs.
    Wamp,
}

spelled!(Protocol {
    JsonRpc = "jsonrpc",
    Wamp = "wamp",
});

/// How a WAMP session proves who it is (`upstreams[].wamp_auth.method`); the names
/// are also what HELLO's `authmethods` and CHALLENGE say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WampAuthMethod {
    /// The secret is sent as it is (use `wss://`).
    Ticket,
    /// WAMP-CRA: the router's challenge is signed with the secret, which never travels.
    WampCra,
}

spelled!(WampAuthMethod {
    Ticket = "ticket",
    WampCra = "wampcra",
});
