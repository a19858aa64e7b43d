//! The client's id comes back exactly as sent: the same JSON text, not an equal value.

mod support;

use http::StatusCode;
use support::gateway::{config_for, start_gateway};
use support::{FakeUpstream, post};

/// Ids whose text a JSON round trip through numbers or strings would change.
const IDS: &[&str] = &[
    r#""abc""#,
    "1.5",
    "12345678901234567890123",
    "null",
    r#""\u00e9""#,
    "\"é😀\"",
    r#""with \"quotes\" and \\ backslash""#,
    "-0",
    "1E+2",
    "0.10",
    r#""""#,
    "18446744073709551615",
];

#[tokio::test]
async fn every_id_shape_is_restored_byte_for_byte() {
    let up = FakeUpstream::start().await;
    // The upstream echoes params; what it sees as id is the gateway's own.
    up.auto_reply(|f| Some(f.result_text(f.params().cloned().unwrap_or_default())));
    let gw = start_gateway(config_for(&[up.url()], 2)).await;
    gw.wait_open(2).await;
    for id in IDS {
        let body = format!(r#"{{"jsonrpc":"2.0","method":"echo","params":[{id}],"id":{id}}}"#);
        let resp = post(gw.addr, "/", body).await;
        assert_eq!(resp.status, StatusCode::OK, "id {id}");
        let text = resp.text();
        assert!(
            text.starts_with(&format!(r#"{{"jsonrpc":"2.0","id":{id},"#)),
            "id {id} came back as {text}"
        );
    }
}

#[tokio::test]
async fn ids_survive_inside_batches_and_error_answers() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.error_text(-32000, "upstream says no")));
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;
    let elements: Vec<String> = IDS
        .iter()
        .map(|id| format!(r#"{{"jsonrpc":"2.0","method":"x","id":{id}}}"#))
        .collect();
    let resp = post(gw.addr, "/", format!("[{}]", elements.join(","))).await;
    let text = resp.text();
    for id in IDS {
        assert!(
            text.contains(&format!(r#""id":{id},"#)),
            "id {id} missing from {text}"
        );
    }
    // Gateway-made errors carry the id too.
    let resp = post(gw.addr, "/", r#"{"jsonrpc":"2.0","method":{},"id":1.50}"#).await;
    assert!(resp.text().ends_with(r#""id":1.50}"#), "{}", resp.text());
}
