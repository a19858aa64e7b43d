//! What the backend pushes (ticks, notices, `confirm` requests), against a real socket
//! and a real WebSocket client. Ticks use 10-20 ms intervals and the tests assert only
//! order and content: paused time would also jump over the sockets' waits.

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::connection::tests::{Client, connect, next_text, start_tracked, within};

async fn send(client: &mut Client, text: &str) {
    within("send", client.send(Message::text(text.to_owned())))
        .await
        .expect("send");
}

async fn stop(
    mut client: Client,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
) {
    shutdown.cancel();
    while let Some(Ok(_)) = within("close", client.next()).await {}
    within("server to stop", server)
        .await
        .expect("server task")
        .expect("serve");
}

/// The parts of a tick the tests look at.
#[derive(Deserialize)]
struct Tick {
    method: String,
    params: TickParams,
}

#[derive(Deserialize)]
struct TickParams {
    subscription: String,
    result: u64,
}

/// `(subscription, n)` if `text` is a tick, asserting its exact shape.
fn tick(text: &str) -> Option<(String, u64)> {
    let tick: Tick = serde_json::from_str(text).ok()?;
    assert_eq!(tick.method, "ticks", "{text}");
    assert_eq!(
        text,
        format!(
            r#"{{"jsonrpc":"2.0","method":"ticks","params":{{"subscription":"{}","result":{}}}}}"#,
            tick.params.subscription, tick.params.result
        )
    );
    Some((tick.params.subscription, tick.params.result))
}

async fn next_tick(client: &mut Client) -> (String, u64) {
    let text = next_text(client).await;
    tick(&text).unwrap_or_else(|| panic!("expected a tick, got {text}"))
}

#[tokio::test]
async fn a_subscription_ticks_1_2_3_under_its_id_after_the_reply() {
    let (addr, shutdown, server, _) = start_tracked().await;
    let mut client = connect(addr).await;

    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":1,"method":"ticks_subscribe","params":[20]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":1,"result":"tick-1"}"#,
        "the reply comes before any tick"
    );
    for n in 1..=3 {
        assert_eq!(next_tick(&mut client).await, ("tick-1".to_owned(), n));
    }
    stop(client, shutdown, server).await;
}

#[tokio::test]
async fn two_subscriptions_tick_under_their_own_ids() {
    let (addr, shutdown, server, _) = start_tracked().await;
    let mut client = connect(addr).await;

    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":1,"method":"ticks_subscribe","params":[10]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":1,"result":"tick-1"}"#
    );
    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":2,"method":"ticks_subscribe","params":[10]}"#,
    )
    .await;
    // Ticks of the first may come before the second's reply.
    let mut seen = [0u64; 2];
    loop {
        let text = next_text(&mut client).await;
        if text == r#"{"jsonrpc":"2.0","id":2,"result":"tick-2"}"# {
            break;
        }
        let (id, n) = tick(&text).unwrap_or_else(|| panic!("unexpected {text}"));
        assert_eq!((id.as_str(), n), ("tick-1", seen[0] + 1));
        seen[0] = n;
    }
    while seen.iter().any(|&n| n < 3) {
        let (id, n) = next_tick(&mut client).await;
        let slot = match id.as_str() {
            "tick-1" => 0,
            "tick-2" => 1,
            other => panic!("tick of unknown subscription {other}"),
        };
        assert_eq!(n, seen[slot] + 1, "{id} counts by one, from 1");
        seen[slot] = n;
    }
    stop(client, shutdown, server).await;
}

// Multi-threaded, where a ticker can race the reader that cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_unsubscribe_no_tick_of_it_follows() {
    let (addr, shutdown, server, _) = start_tracked().await;
    let mut client = connect(addr).await;

    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":1,"method":"ticks_subscribe","params":[10]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":1,"result":"tick-1"}"#
    );
    assert_eq!(next_tick(&mut client).await, ("tick-1".to_owned(), 1));

    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":2,"method":"ticks_unsubscribe","params":["tick-1"]}"#,
    )
    .await;
    // Ticks already queued may still come first; none may come after the reply.
    loop {
        let text = next_text(&mut client).await;
        if text == r#"{"jsonrpc":"2.0","id":2,"result":true}"# {
            break;
        }
        assert_eq!(
            tick(&text).map(|t| t.0).as_deref(),
            Some("tick-1"),
            "{text}"
        );
    }
    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":3,"method":"ticks_unsubscribe","params":["tick-1"]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":3,"result":false}"#
    );

    // Had tick-1 survived, its 10 ms ticks would be interleaved with these.
    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":4,"method":"ticks_subscribe","params":[10]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":4,"result":"tick-2"}"#
    );
    for n in 1..=5 {
        assert_eq!(next_tick(&mut client).await, ("tick-2".to_owned(), n));
    }
    stop(client, shutdown, server).await;
}

#[tokio::test]
async fn notify_me_replies_then_pushes_the_notice() {
    let (addr, shutdown, server, _) = start_tracked().await;
    let mut client = connect(addr).await;

    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":1,"method":"notify_me","params":[{"k": [1, 2.50]}]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":1,"result":true}"#
    );
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","method":"notice","params":[{"k": [1, 2.50]}]}"#
    );
    stop(client, shutdown, server).await;
}

/// The `confirm` request the backend sent, by its parts.
#[derive(Deserialize)]
struct Confirm<'a> {
    #[serde(borrow)]
    id: &'a RawValue,
    method: &'a str,
    #[serde(borrow)]
    params: &'a RawValue,
}

#[tokio::test]
async fn ask_sends_confirm_and_replies_with_the_answer_while_serving_other_calls() {
    let (addr, shutdown, server, _) = start_tracked().await;
    let mut client = connect(addr).await;

    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":"a","method":"ask","params":["deploy?"]}"#,
    )
    .await;
    let text = next_text(&mut client).await;
    assert_eq!(
        text,
        r#"{"jsonrpc":"2.0","id":"ask-1","method":"confirm","params":["deploy?"]}"#
    );
    let confirm: Confirm<'_> = serde_json::from_str(&text).expect("a request");
    assert_eq!(
        (confirm.method, confirm.params.get()),
        ("confirm", r#"["deploy?"]"#)
    );

    // The ask is waiting; the connection is not.
    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":2,"method":"echo","params":[2]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":2,"result":[2]}"#
    );

    // An answer to something never asked is ignored, not replied to.
    send(&mut client, r#"{"jsonrpc":"2.0","id":"ask-9","result":0}"#).await;
    send(
        &mut client,
        &format!(
            r#"{{"jsonrpc":"2.0","id":{},"result":{{"ok":true}}}}"#,
            confirm.id.get()
        ),
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":"a","result":{"question":"deploy?","answer":{"ok":true}}}"#
    );

    // Ids go on counting on this connection.
    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":3,"method":"ask","params":[1]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":"ask-2","method":"confirm","params":[1]}"#
    );
    stop(client, shutdown, server).await;
}

#[tokio::test]
async fn ask_answered_with_an_error_is_refused() {
    let (addr, shutdown, server, _) = start_tracked().await;
    let mut client = connect(addr).await;

    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":7,"method":"ask","params":[{"x":1}]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":"ask-1","method":"confirm","params":[{"x":1}]}"#
    );
    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":"ask-1","error":{"code":4001,"message":"user said no"}}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut client).await,
        r#"{"jsonrpc":"2.0","id":7,"error":{"code":-32001,"message":"client refused: user said no","data":{"code":4001,"message":"user said no"}}}"#
    );
    stop(client, shutdown, server).await;
}

#[tokio::test]
async fn closing_the_socket_ends_its_tickers_and_asks() {
    let (addr, shutdown, server, tasks) = start_tracked().await;
    // The other connection and its ticker must live on.
    let mut other = connect(addr).await;
    send(
        &mut other,
        r#"{"jsonrpc":"2.0","id":1,"method":"ticks_subscribe","params":[10]}"#,
    )
    .await;
    assert_eq!(
        next_text(&mut other).await,
        r#"{"jsonrpc":"2.0","id":1,"result":"tick-1"}"#
    );
    assert_eq!(next_tick(&mut other).await.1, 1);

    let mut client = connect(addr).await;
    for id in 1..=3 {
        send(
            &mut client,
            &format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ticks_subscribe","params":[10]}}"#),
        )
        .await;
    }
    send(
        &mut client,
        r#"{"jsonrpc":"2.0","id":4,"method":"ask","params":["left waiting"]}"#,
    )
    .await;
    // Once a tick of every subscription and the confirm request arrived, all four
    // tasks are running.
    let mut pending: Vec<String> = ["tick-1", "tick-2", "tick-3", "ask-1"]
        .map(String::from)
        .into();
    while !pending.is_empty() {
        let text = next_text(&mut client).await;
        match tick(&text) {
            Some((id, _)) => pending.retain(|p| *p != id),
            None if text.contains(r#""method":"confirm""#) => pending.retain(|p| p != "ask-1"),
            None => {}
        }
    }
    // Two connections, four tickers, one ask.
    assert!(tasks.len() >= 6, "{} tasks", tasks.len());

    within("close", client.close(None)).await.expect("close");
    while let Some(Ok(_)) = within("close ack", client.next()).await {}
    within("the closed connection's tasks to end", async {
        // Tasks end on their own schedule; poll the count rather than sleep and hope.
        while tasks.len() > 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(tasks.len(), 2, "the other connection and its ticker remain");
    let (id, n) = next_tick(&mut other).await;
    assert_eq!(id, "tick-1");
    assert!(n > 1);

    stop(other, shutdown, server).await;
    assert_eq!(tasks.len(), 0);
}
