//! Finding a subscription id inside a notification, and swapping it for another,
//! without re-serializing the message: the rest of it goes out byte for byte.

use crate::jsonrpc::first_byte;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::ops::Range;

/// Where the value at `pointer` (RFC 6901, e.g. `/params/subscription`) lies in `text`.
pub fn find(text: &str, pointer: &str) -> Option<Range<usize>> {
    let mut at: &RawValue = serde_json::from_str(text).ok()?;
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        let raw = at.get();
        at = match first_byte(raw.as_bytes())? {
            b'{' => {
                let members: HashMap<String, &RawValue> = serde_json::from_str(raw).ok()?;
                *members.get(&token)?
            }
            b'[' => {
                let items: Vec<&RawValue> = serde_json::from_str(raw).ok()?;
                *items.get(token.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    let start = at.get().as_ptr() as usize - text.as_ptr() as usize;
    Some(start..start + at.get().len())
}

/// `text` with `range` replaced by `with`.
pub fn splice(text: &str, range: Range<usize>, with: &str) -> String {
    let mut out = String::with_capacity(text.len() + with.len());
    out.push_str(&text[..range.start]);
    out.push_str(with);
    out.push_str(&text[range.end..]);
    out
}

/// The first element of a positional `params` array, where unsubscribe calls carry
/// the subscription id.
pub fn first_param(params: Option<&RawValue>) -> Option<&RawValue> {
    let params = params?.get();
    if first_byte(params.as_bytes()) != Some(b'[') {
        return None;
    }
    let items: Vec<&RawValue> = serde_json::from_str(params).ok()?;
    items.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_swaps_an_id_leaving_the_rest_alone() {
        let text = r#"{"jsonrpc":"2.0","method":"eth_subscription","params":{"result":{"n":1.50},"subscription":"0xab"}}"#;
        let at = find(text, "/params/subscription").unwrap();
        assert_eq!(&text[at.clone()], r#""0xab""#);
        let out = splice(text, at, r#""0x01""#);
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","method":"eth_subscription","params":{"result":{"n":1.50},"subscription":"0x01"}}"#
        );
        let arr = r#"{"method":"x","params":[7,"s-1"]}"#;
        assert_eq!(&arr[find(arr, "/params/1").unwrap()], r#""s-1""#);
        assert_eq!(find(arr, "/params/9"), None);
        assert_eq!(find(arr, "/nope/x"), None);
        let escaped = r#"{"a/b":{"~":1}}"#;
        assert_eq!(&escaped[find(escaped, "/a~1b/~0").unwrap()], "1");
    }

    #[test]
    fn the_first_positional_param() {
        let params: &RawValue = serde_json::from_str(r#"["0xab", 1]"#).unwrap();
        assert_eq!(first_param(Some(params)).unwrap().get(), r#""0xab""#);
        let named: &RawValue = serde_json::from_str(r#"{"id":1}"#).unwrap();
        assert!(first_param(Some(named)).is_none());
    }
}
