//! The methods that do more than hand their params back: `sum` and `sleep`.

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use crate::wire::{INVALID_PARAMS, Outcome};

/// Longest `sleep` honoured; longer requests are clamped so a typo cannot park a
/// connection's reply for hours.
pub(crate) const MAX_SLEEP_MS: u64 = 60_000;

/// `[ms]`, or `[ms, "padding"]`: a string to make the call as large as a benchmark
/// needs (a slow call with a large body), ignored otherwise.
pub(crate) fn sleep_ms(params: Option<&str>) -> Option<u64> {
    let params = params?;
    let ms = match serde_json::from_str::<(u64,)>(params) {
        Ok((ms,)) => ms,
        Err(_) => {
            let (ms, padding): (u64, &serde_json::value::RawValue) =
                serde_json::from_str(params).ok()?;
            if !padding.get().starts_with('"') {
                return None;
            }
            ms
        }
    };
    Some(ms.min(MAX_SLEEP_MS))
}

pub(crate) fn sum(params: Option<&str>) -> Outcome<'static> {
    const BAD: &str = "invalid params: sum expects an array of numbers";
    let Some(Ok(total)) = params.map(serde_json::from_str::<Sum>) else {
        return Outcome::error(INVALID_PARAMS, BAD);
    };
    match total.int.map(i64::try_from) {
        Some(Ok(n)) => Outcome::Int(n),
        _ if total.float.is_finite() => Outcome::Float(total.float),
        _ => Outcome::error(INVALID_PARAMS, "invalid params: sum is not a finite number"),
    }
}

/// The sum of a JSON array of numbers, added up while parsing so no `Vec` is built.
struct Sum {
    /// Exact sum while every element is an integer; `None` after the first float.
    /// i128 so that any i64/u64 elements add up without overflowing in practice.
    int: Option<i128>,
    /// Sum of every element as f64, the answer when `int` is `None` or does not fit i64.
    float: f64,
}

impl<'de> Deserialize<'de> for Sum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(SumVisitor)
    }
}

struct SumVisitor;

impl<'de> Visitor<'de> for SumVisitor {
    type Value = Sum;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of numbers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Sum, A::Error> {
        let mut total = Sum {
            int: Some(0),
            float: 0.0,
        };
        while let Some(n) = seq.next_element::<serde_json::Number>()? {
            let Some(f) = n.as_f64() else {
                return Err(de::Error::custom("number out of range"));
            };
            total.float += f;
            let exact = n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from));
            total.int = total.int.zip(exact).and_then(|(acc, n)| acc.checked_add(n));
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::tests::{dispatch, error, reply, result};

    #[test]
    fn sum_adds_integers_exactly_and_falls_back_to_float() {
        let sum = |params: &str| {
            reply(&format!(
                r#"{{"jsonrpc":"2.0","id":7,"method":"sum","params":{params}}}"#
            ))
        };
        assert_eq!(sum("[1, 2, 3]"), result("7", "6"));
        assert_eq!(sum("[]"), result("7", "0"));
        assert_eq!(sum("[-5]"), result("7", "-5"));
        assert_eq!(
            sum("[9223372036854775807, 1, -1]"),
            result("7", "9223372036854775807")
        );
        assert_eq!(
            sum("[18446744073709551615, -9223372036854775808]"),
            result("7", "9223372036854775807")
        );
        // Floats are compared as numbers: how they are spelled (`e18` or `e+18`) is
        // up to serde_json's formatter.
        let float = |params: &str| {
            #[derive(Deserialize)]
            struct Reply {
                result: serde_json::Number,
            }
            let reply = sum(params);
            let parsed: Reply = serde_json::from_str(&reply).expect("a result");
            assert!(parsed.result.is_f64(), "{reply}");
            parsed.result.as_f64()
        };
        assert_eq!(
            float("[9223372036854775807, 1]"),
            Some(9.223_372_036_854_776e18)
        );
        assert_eq!(float("[1.5, 1.5]"), Some(3.0));
        assert_eq!(float("[1, 0.25]"), Some(1.25));
        assert_eq!(
            float("[12345678901234567890123]"),
            Some(1.234_567_890_123_456_8e22)
        );
        for bad in [
            r#"["1"]"#,
            "[null]",
            r#"{"a":1}"#,
            "3",
            "[[1]]",
            "[1e308, 1e308]",
        ] {
            assert!(
                error("7", INVALID_PARAMS)(&sum(bad)),
                "params {bad}: {}",
                sum(bad)
            );
        }
        assert!(error("7", INVALID_PARAMS)(&reply(
            r#"{"jsonrpc":"2.0","id":7,"method":"sum"}"#
        )));
    }

    #[test]
    fn sleep_delays_the_reply_and_clamps() {
        let out = dispatch(r#"{"jsonrpc":"2.0","id":"s","method":"sleep","params":[250]}"#);
        assert_eq!(out.delay, Duration::from_millis(250));
        assert_eq!(out.reply.as_deref(), Some(result(r#""s""#, "250").as_str()));

        let out = dispatch(r#"{"jsonrpc":"2.0","id":1,"method":"sleep","params":[99999999]}"#);
        assert_eq!(out.delay, Duration::from_millis(MAX_SLEEP_MS));
        assert_eq!(out.reply.as_deref(), Some(result("1", "60000").as_str()));

        let out = dispatch(r#"{"jsonrpc":"2.0","id":2,"method":"sleep","params":[30,"xxxxxxxx"]}"#);
        assert_eq!(out.delay, Duration::from_millis(30), "padding is ignored");

        for bad in [
            "[-1]",
            "[1.5]",
            "[1, 2]",
            "[]",
            "5",
            r#"{"ms":5}"#,
            r#"["5"]"#,
        ] {
            let request = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"sleep","params":{bad}}}"#);
            assert!(error("1", INVALID_PARAMS)(&reply(&request)), "params {bad}");
        }
    }
}
