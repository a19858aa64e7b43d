//! The access line, written straight into a byte buffer: exactly what
//! tracing-subscriber's fmt layer, configured as [`super::init`] does, writes for the
//! `rpcgate::access` event, at a fraction of its cost. No field visitor and no
//! `fmt::Arguments` per field; numbers through `itoa`; the timestamp's date and time
//! of day formatted once a second.
//!
//! The tests below hold the two to the same bytes, so a tracing-subscriber upgrade
//! that changes its layout, or a change to `init`'s builder, fails them instead of
//! making access lines look different from every other line.

use super::AccessRecord;
use crate::config::LogFormat;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

pub(super) struct Lines {
    format: LogFormat,
    /// The second `date` was formatted for.
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS.` of `second`.
    date: Vec<u8>,
}

impl Lines {
    pub(super) fn new(format: LogFormat) -> Lines {
        Lines {
            format,
            second: None,
            date: Vec::with_capacity(24),
        }
    }

    /// Appends the line for `record`, newline included.
    pub(super) fn write(&mut self, out: &mut Vec<u8>, record: &AccessRecord, now: SystemTime) {
        let mut n = itoa::Buffer::new();
        match self.format {
            LogFormat::Text => {
                self.timestamp(out, now);
                out.extend_from_slice(b"  INFO rpcgate::access: peer=");
                peer(out, record.peer);
                out.extend_from_slice(b" method=");
                out.extend_from_slice(record.method.as_str().as_bytes());
                out.extend_from_slice(b" status=");
                out.extend_from_slice(n.format(record.status).as_bytes());
                out.extend_from_slice(b" duration_us=");
                out.extend_from_slice(n.format(record.duration_us).as_bytes());
                out.extend_from_slice(b" bytes=");
                out.extend_from_slice(n.format(record.bytes).as_bytes());
                if let Some(batch) = record.batch {
                    out.extend_from_slice(b" batch=");
                    out.extend_from_slice(n.format(batch).as_bytes());
                }
                text_field(out, b" upstream=", record.upstream.as_deref());
                text_field(out, b" caller=", record.caller.as_deref());
                text_field(out, b" client_cert=", record.client_cert.as_deref());
                out.push(b'\n');
            }
            LogFormat::Json => {
                out.extend_from_slice(b"{\"timestamp\":\"");
                self.timestamp(out, now);
                // Addresses and methods (HTTP tokens) hold nothing JSON escapes.
                out.extend_from_slice(b"\",\"level\":\"INFO\",\"peer\":\"");
                peer(out, record.peer);
                out.extend_from_slice(b"\",\"method\":\"");
                out.extend_from_slice(record.method.as_str().as_bytes());
                out.extend_from_slice(b"\",\"status\":");
                out.extend_from_slice(n.format(record.status).as_bytes());
                out.extend_from_slice(b",\"duration_us\":");
                out.extend_from_slice(n.format(record.duration_us).as_bytes());
                out.extend_from_slice(b",\"bytes\":");
                out.extend_from_slice(n.format(record.bytes).as_bytes());
                if let Some(batch) = record.batch {
                    out.extend_from_slice(b",\"batch\":");
                    out.extend_from_slice(n.format(batch).as_bytes());
                }
                json_field(out, b",\"upstream\":", record.upstream.as_deref());
                json_field(out, b",\"caller\":", record.caller.as_deref());
                json_field(out, b",\"client_cert\":", record.client_cert.as_deref());
                out.extend_from_slice(b",\"target\":\"rpcgate::access\"}\n");
            }
        }
    }

    /// `2026-12-01T11:26:52.613531Z`, as tracing-subscriber's `SystemTime` timer
    /// writes it. A clock before 1970 writes the epoch.
    fn timestamp(&mut self, out: &mut Vec<u8>, now: SystemTime) {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        if self.second != Some(secs) {
            self.second = Some(secs);
            self.date.clear();
            date(&mut self.date, secs);
        }
        out.extend_from_slice(&self.date);
        let micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        let mut rest = micros;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out.extend_from_slice(&digits);
        out.push(b'Z');
    }
}

/// A `&str` field as tracing-subscriber's text format writes it: with `Debug`, quoted
/// and escaped.
fn text_field(out: &mut Vec<u8>, name: &[u8], value: Option<&str>) {
    let Some(value) = value else { return };
    out.extend_from_slice(name);
    if plain(value) {
        quoted(out, value);
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// A `&str` field as its JSON format writes it.
fn json_field(out: &mut Vec<u8>, name: &[u8], value: Option<&str>) {
    let Some(value) = value else { return };
    out.extend_from_slice(name);
    if plain(value) {
        quoted(out, value);
    } else {
        let _ = serde_json::to_writer(&mut *out, value);
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` for `secs` after 1970-01-01 UTC.
fn date(out: &mut Vec<u8>, secs: u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = if year > 9999 {
        write!(out, "+{year}")
    } else {
        write!(out, "{year:04}")
    };
    let _ = write!(
        out,
        "-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
}

/// Printable ASCII without `"` or `\`, which `Debug` and JSON both write as it is:
/// every upstream URL in practice.
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

fn quoted(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// As `SocketAddr`'s `Display`, without the formatting machinery for the common case.
fn peer(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            let mut n = itoa::Buffer::new();
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(n.format(octet).as_bytes());
            }
            out.push(b':');
            out.extend_from_slice(n.format(v4.port()).as_bytes());
        }
        SocketAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::access::{self, AccessLog};
    use crate::logging::capture::Capture;
    use crate::logging::{Direct, Writer, subscriber};
    use std::sync::Arc;
    use std::time::Duration;

    fn records() -> Vec<AccessRecord> {
        let base = access::tests::record(200);
        vec![
            base.clone(),
            AccessRecord {
                batch: None,
                upstream: None,
                ..access::tests::record(502)
            },
            AccessRecord {
                peer: "[fe80::1%3]:65535".parse().expect("an address"),
                method: http::Method::from_bytes(b"PURGE").expect("a method"),
                status: 404,
                duration_us: u64::MAX,
                bytes: 0,
                batch: Some(0),
                upstream: Some(Arc::from("wss://h/\"q\"\\é\u{1}\u{7f}\u{200b}")),
                caller: Some(Arc::from("caller \"q\" é")),
                client_cert: Some(Arc::from(r"CN=alice,O=Example\, Inc.")),
            },
            AccessRecord {
                peer: "255.0.10.1:0".parse().expect("an address"),
                upstream: Some(Arc::from(" ~ws://x/#!$%&'()*+,-./:;<=>?@[]^_`{|}")),
                ..base.clone()
            },
            AccessRecord {
                upstream: Some(Arc::from("ws://tab\t/\"q\"")),
                caller: Some(Arc::from("alice")),
                ..base
            },
        ]
    }

    /// Everything after the timestamp, which the two write at different instants.
    fn after_timestamp(line: &str) -> &str {
        match line.strip_prefix("{\"timestamp\":\"") {
            Some(json) => json.split_once('"').map_or(line, |(_, rest)| rest),
            None => line.split_once(' ').map_or(line, |(_, rest)| rest),
        }
    }

    fn same_bytes_as_tracing_subscriber(format: LogFormat) {
        let (events, direct) = (Capture::default(), Capture::default());
        let (lines, guard) = tracing_appender::non_blocking(events.clone());
        let writer = Writer {
            lines,
            direct: Some(Direct {
                format,
                sink: direct.sink(),
            }),
        };
        let filter = tracing_subscriber::EnvFilter::new("info");
        let dispatch = subscriber(format, filter, false, writer);
        let log = tracing::dispatcher::with_default(&dispatch, || {
            for record in records() {
                access::emit(record);
            }
            AccessLog::start(1.0)
        });
        for record in records() {
            log.record(record);
        }
        assert!(log.flush());
        drop(guard);
        let (ours, theirs) = (direct.text(), events.text());
        assert_eq!(ours.lines().count(), records().len(), "{ours}");
        for (ours, theirs) in ours.lines().zip(theirs.lines()) {
            assert_eq!(after_timestamp(ours), after_timestamp(theirs));
            assert_eq!(ours.len(), theirs.len(), "timestamps of one length");
        }
        assert_eq!(ours.lines().count(), theirs.lines().count(), "{theirs}");
        assert!(ours.ends_with('\n'));
    }

    #[test]
    fn text_lines_are_what_tracing_subscriber_writes() {
        same_bytes_as_tracing_subscriber(LogFormat::Text);
    }

    #[test]
    fn json_lines_are_what_tracing_subscriber_writes() {
        same_bytes_as_tracing_subscriber(LogFormat::Json);
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let mut lines = Lines::new(LogFormat::Text);
        let at =
            |secs: u64, micros: u64| UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros);
        let cases = [
            (at(0, 0), "1970-01-01T00:00:00.000000Z"),
            (at(951_782_400, 7), "2000-02-29T00:00:00.000007Z"),
            (at(1_796_124_412, 613_531), "2026-12-01T11:26:52.613531Z"),
            // The same second, then the next: the cached date must follow.
            (at(1_796_124_412, 999_999), "2026-12-01T11:26:52.999999Z"),
            (at(1_796_124_413, 0), "2026-12-01T11:26:53.000000Z"),
            (at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z"),
        ];
        for (time, want) in cases {
            let mut out = Vec::new();
            lines.timestamp(&mut out, time);
            assert_eq!(String::from_utf8_lossy(&out), want);
        }
    }
}
