//! What a client gets back: its own id, byte for byte, around the upstream's payload
//! or a gateway failure.

use crate::error::Error;
use serde_json::value::RawValue;

/// Appends the client's reply: its own id, byte for byte, and the upstream's payload
/// (the raw text of `result`, or of `error` when `is_error`).
/// The exact length [`write_reply`] writes: a buffer of that capacity becomes `Bytes`
/// without another allocation.
pub fn reply_len(client_id: &RawValue, is_error: bool, payload: &str) -> usize {
    let member = if is_error { 9 } else { 10 }; // `,"error":` or `,"result":`
    22 + client_id.get().len() + member + payload.len() + 1
}

pub fn write_reply(out: &mut Vec<u8>, client_id: &RawValue, is_error: bool, payload: &str) {
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    out.extend_from_slice(client_id.get().as_bytes());
    out.extend_from_slice(if is_error {
        br#","error":"#
    } else {
        br#","result":"#
    });
    out.extend_from_slice(payload.as_bytes());
    out.push(b'}');
}

/// Appends a JSON-RPC error object for a gateway failure. Its `data` says that rpcgate,
/// not the upstream, produced it, which failure it is, and how long it waited.
pub fn write_error(out: &mut Vec<u8>, id: Option<&RawValue>, error: &Error) {
    out.extend_from_slice(br#"{"jsonrpc":"2.0","error":{"code":"#);
    out.extend_from_slice(itoa::Buffer::new().format(error.code()).as_bytes());
    out.extend_from_slice(br#","message":"#);
    // Serializing a String into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &error.to_string());
    out.extend_from_slice(br#","data":{"source":"rpcgate","kind":""#);
    // Kinds are fixed lowercase identifiers: nothing to escape.
    out.extend_from_slice(error.kind().as_bytes());
    out.push(b'"');
    if let Some(waited) = error.waited() {
        out.extend_from_slice(br#","waited_ms":"#);
        out.extend_from_slice(itoa::Buffer::new().format(waited.as_millis()).as_bytes());
    }
    if let Some(busy) = error.busy() {
        out.extend_from_slice(br#","reason":""#);
        out.extend_from_slice(busy.as_str().as_bytes());
        out.push(b'"');
    }
    if error.may_have_run() {
        out.extend_from_slice(br#","may_have_run":true"#);
    }
    out.extend_from_slice(br#"}},"id":"#);
    out.extend_from_slice(id.map_or("null", |i| i.get()).as_bytes());
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_len_is_what_write_reply_writes() {
        for (id, is_error, payload) in [
            ("1", false, "true"),
            ("\"a-b\"", true, r#"{"code":1,"message":"x"}"#),
            ("1.50", false, ""),
        ] {
            let id = RawValue::from_string(id.to_string()).unwrap();
            let mut out = Vec::new();
            write_reply(&mut out, &id, is_error, payload);
            assert_eq!(out.len(), reply_len(&id, is_error, payload), "{id}");
        }
    }

    #[test]
    fn error_objects() {
        let mut out = Vec::new();
        write_error(&mut out, None, &Error::Parse("x \"y\"".into()));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["code"], -32700);
        assert_eq!(v["id"], serde_json::Value::Null);
        assert!(v["error"]["message"].as_str().unwrap().contains("\"y\""));
        assert_eq!(v["error"]["data"]["source"], "rpcgate");
        assert_eq!(v["error"]["data"]["kind"], "parse");
    }

    #[test]
    fn a_wait_says_how_long_and_a_lost_call_that_it_may_have_run() {
        let mut out = Vec::new();
        let waited = std::time::Duration::from_millis(800);
        write_error(&mut out, None, &Error::Timeout(waited));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["data"]["waited_ms"], 800);
        assert_eq!(v["error"]["data"]["may_have_run"], true);
        out.clear();
        write_error(
            &mut out,
            None,
            &Error::Overloaded(crate::error::Busy::Memory),
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["error"]["data"].get("may_have_run").is_none());
        assert_eq!(v["error"]["data"]["reason"], "memory");
    }
}
