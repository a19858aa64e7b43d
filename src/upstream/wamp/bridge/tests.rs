//! Unit tests of `bridge.rs`: JSON-RPC frames in, WAMP messages out, and back.

use super::*;

fn bridge() -> Bridge {
    bridge_with_prefix("")
}

fn bridge_with_prefix(prefix: &str) -> Bridge {
    Bridge::new(
        Arc::new(Link {
            realm: "realm1".into(),
            procedures: Procedures::new(prefix),
            auth: None,
            auth_at: "upstreams[0].wamp_auth".into(),
            methods: WampConfig::default(),
        }),
        1,
        true,
    )
}

/// What one queued frame becomes: (WAMP messages, local JSON-RPC replies).
fn out(b: &mut Bridge, frame: &str) -> (Vec<String>, Vec<String>) {
    let (mut messages, mut local) = (Vec::new(), Vec::new());
    b.outbound(frame, &mut messages, &mut local);
    (messages, local.iter().map(text).collect())
}

/// What one router frame becomes, as JSON-RPC texts.
fn inb(b: &mut Bridge, frame: &str) -> Vec<String> {
    let mut replies = Vec::new();
    assert_eq!(b.inbound(frame, &mut replies), Ok(true), "{frame}");
    replies.iter().map(text).collect()
}

fn text(b: &Bytes) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn a_call_becomes_call_with_our_id_and_params_pass_byte_for_byte() {
    let mut b = bridge_with_prefix("com.example.");
    let (m, local) = out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"add2","params":[2, 3.50],"id":7}"#,
    );
    assert_eq!(m, [r#"[48,7,{},"com.example.add2",[2, 3.50]]"#]);
    assert!(local.is_empty());
    let (m, _) = out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"kw","params":{"a":1},"id":8}"#,
    );
    assert_eq!(m, [r#"[48,8,{},"com.example.kw",[],{"a":1}]"#]);
    assert_eq!(
        inb(&mut b, r#"[50,7,{},[5.5]]"#),
        [r#"{"jsonrpc":"2.0","id":7,"result":5.5}"#]
    );
    assert_eq!(
        inb(&mut b, r#"[50,8,{},[],{"sum":3}]"#),
        [r#"{"jsonrpc":"2.0","id":8,"result":{"sum":3}}"#]
    );
}

#[test]
fn a_batch_becomes_one_message_per_element_and_a_notification_gets_an_id_nobody_waits_on() {
    let mut b = bridge();
    let (m, _) = out(
        &mut b,
        r#"[{"jsonrpc":"2.0","method":"a","id":1},{"jsonrpc":"2.0","method":"b","params":[1]}]"#,
    );
    assert_eq!(m.len(), 2);
    assert_eq!(m[0], r#"[48,1,{},"a"]"#);
    let discard: u64 = json(&m[1])[1].as_u64().unwrap();
    assert!(discard > DISCARD_BASE && discard <= codec::MAX_ID);
    // Its RESULT is dropped, not handed to the multiplexer as a reply.
    assert!(inb(&mut b, &format!("[50,{discard},{{}},[1]]")).is_empty());
}

#[test]
fn an_error_carries_the_uri_and_arguments_and_maps_known_uris_to_jsonrpc_codes() {
    let mut b = bridge();
    out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"com.example.fail","params":["boom"],"id":3}"#,
    );
    let r = json(
        &inb(
            &mut b,
            r#"[8,48,3,{},"com.example.error.fail",["boom"],{"k":1}]"#,
        )[0],
    );
    assert_eq!(r["id"], 3);
    assert_eq!(r["error"]["code"], -32000);
    assert_eq!(r["error"]["message"], "com.example.error.fail: boom");
    assert_eq!(r["error"]["data"]["args"], json(r#"["boom"]"#));
    assert_eq!(r["error"]["data"]["kwargs"], json(r#"{"k":1}"#));
    out(&mut b, r#"{"jsonrpc":"2.0","method":"nope","id":4}"#);
    let r = json(&inb(&mut b, r#"[8,48,4,{},"wamp.error.no_such_procedure"]"#)[0]);
    assert_eq!(r["error"]["code"], -32601);
}

#[test]
fn giving_up_on_a_written_call_queues_a_cancel_once() {
    let mut b = bridge();
    out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"slow","params":[30],"id":9}"#,
    );
    b.forget(9);
    b.forget(9);
    let mut outbox = Vec::new();
    b.take_outbox(&mut outbox);
    assert_eq!(outbox, [r#"[49,9,{"mode":"killnowait"}]"#]);
    assert!(!b.has_outbox());
    // An id that never went out as a CALL is not canceled.
    b.forget(10);
    assert!(!b.has_outbox());
}

#[test]
fn params_wamp_cannot_carry_are_answered_here_with_invalid_params() {
    let mut b = bridge();
    for frame in [
        r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":[],"id":1}"#,
        r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":[1],"id":1}"#,
        r#"{"jsonrpc":"2.0","method":"wamp.publish","params":{"args":[1]},"id":1}"#,
        r#"{"jsonrpc":"2.0","method":"wamp.unsubscribe","params":[12345],"id":1}"#,
    ] {
        let (m, local) = out(&mut b, frame);
        assert!(m.is_empty(), "{frame}");
        assert_eq!(json(&local[0])["error"]["code"], -32602, "{frame}");
    }
}

#[test]
fn two_subscribers_to_one_topic_get_ids_of_their_own_and_each_gets_every_event() {
    let mut b = bridge();
    let (m, _) = out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":["com.example.tick"],"id":1}"#,
    );
    assert_eq!(m, [r#"[32,1,{},"com.example.tick"]"#]);
    out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":{"topic":"com.example.tick"},"id":2}"#,
    );
    // The router has one subscription per topic and session: the same id twice.
    let first = json(&inb(&mut b, "[33,1,555]")[0])["result"]
        .as_u64()
        .unwrap();
    let second = json(&inb(&mut b, "[33,2,555]")[0])["result"]
        .as_u64()
        .unwrap();
    assert_ne!(first, second);
    assert_eq!(b.router_subscriptions(), 1);
    let events = inb(&mut b, r#"[36,555,77,{},[4],{"n":4}]"#);
    let ids: Vec<u64> = events
        .iter()
        .map(|e| json(e)["params"]["subscription"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [first, second]);
    let e = json(&events[0]);
    assert_eq!(e["method"], "wamp.event");
    assert_eq!(e["params"]["topic"], "com.example.tick");
    assert_eq!(e["params"]["publication"], 77);
    assert_eq!(
        e["params"]["result"],
        json(r#"{"args":[4],"kwargs":{"n":4}}"#)
    );

    // The first leaving is answered here: the router keeps the topic for the second.
    let (m, local) = out(
        &mut b,
        &format!(r#"{{"jsonrpc":"2.0","method":"wamp.unsubscribe","params":[{first}],"id":3}}"#),
    );
    assert!(m.is_empty());
    assert_eq!(local, [r#"{"jsonrpc":"2.0","id":3,"result":true}"#]);
    assert_eq!(inb(&mut b, r#"[36,555,78,{},[5]]"#).len(), 1);
    // The last one's UNSUBSCRIBE goes to the router, and its answer comes back as true.
    let (m, _) = out(
        &mut b,
        &format!(r#"{{"jsonrpc":"2.0","method":"wamp.unsubscribe","params":["{second}"],"id":4}}"#),
    );
    assert_eq!(m, ["[34,4,555]"]);
    assert_eq!(
        inb(&mut b, "[35,4]"),
        [r#"{"jsonrpc":"2.0","id":4,"result":true}"#]
    );
    assert_eq!(b.router_subscriptions(), 0);
    let mut nothing = Vec::new();
    assert_eq!(b.inbound(r#"[36,555,79,{},[6]]"#, &mut nothing), Ok(false));
}

#[test]
fn a_subscription_whose_caller_left_is_closed_when_it_opens() {
    let mut b = bridge();
    out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":["t"],"id":5}"#,
    );
    b.forget(5);
    assert!(inb(&mut b, "[33,5,900]").is_empty(), "nobody is told");
    let mut outbox = Vec::new();
    b.take_outbox(&mut outbox);
    assert_eq!(outbox.len(), 1);
    assert!(outbox[0].starts_with("[34,") && outbox[0].ends_with(",900]"));
    assert_eq!(b.router_subscriptions(), 0);
}

#[test]
fn publish_is_acknowledged_for_a_call_and_not_for_a_notification() {
    let mut b = bridge();
    let (m, _) = out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"wamp.publish","params":["news","hi",2],"id":6}"#,
    );
    assert_eq!(
        m,
        [r#"[16,6,{"acknowledge":true,"exclude_me":false},"news",["hi",2]]"#]
    );
    assert_eq!(
        inb(&mut b, "[17,6,4242]"),
        [r#"{"jsonrpc":"2.0","id":6,"result":4242}"#]
    );
    let (m, _) = out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"wamp.publish","params":{"topic":"news","kwargs":{"k":1}}}"#,
    );
    assert!(
        m[0].contains(r#"{"exclude_me":false},"news",[],{"k":1}]"#),
        "{}",
        m[0]
    );
    assert!(!m[0].contains("acknowledge"));
}

#[test]
fn goodbye_and_abort_end_the_session_with_the_router_s_reason() {
    let mut b = bridge();
    let mut out = Vec::new();
    assert_eq!(
        b.inbound(
            r#"[6,{"message":"node going down"},"wamp.close.system_shutdown"]"#,
            &mut out
        ),
        Err(Ended::Goodbye(
            "wamp.close.system_shutdown: node going down".into()
        ))
    );
    assert!(matches!(
        b.inbound(r#"[3,{},"wamp.error.protocol_violation"]"#, &mut out),
        Err(Ended::Abort(_))
    ));
    assert_eq!(b.inbound("not wamp", &mut out), Ok(false));
}

#[test]
fn local_subscription_ids_keep_growing_on_the_next_socket() {
    let mut b = bridge();
    out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":["t"],"id":1}"#,
    );
    let first = json(&inb(&mut b, "[33,1,10]")[0])["result"]
        .as_u64()
        .unwrap();
    let mut next = Bridge::new(b.link.clone(), b.next_local(), true);
    out(
        &mut next,
        r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":["t"],"id":2}"#,
    );
    let again = json(&inb(&mut next, "[33,2,10]")[0])["result"]
        .as_u64()
        .unwrap();
    assert!(again > first);
}

fn subscribe(b: &mut Bridge, id: u64, topic: &str) {
    let frame =
        format!(r#"{{"jsonrpc":"2.0","method":"wamp.subscribe","params":["{topic}"],"id":{id}}}"#);
    assert_eq!(out(b, &frame).0.len(), 1);
}

fn unsubscribe(b: &mut Bridge, id: u64, local: u64) -> (Vec<String>, Vec<String>) {
    out(
        b,
        &format!(r#"{{"jsonrpc":"2.0","method":"wamp.unsubscribe","params":[{local}],"id":{id}}}"#),
    )
}

fn outbox(b: &mut Bridge) -> Vec<String> {
    let mut out = Vec::new();
    b.take_outbox(&mut out);
    out
}

#[test]
fn an_unsubscribe_or_subscribe_without_an_id_is_never_sent() {
    let mut b = bridge();
    subscribe(&mut b, 1, "t");
    let local = json(&inb(&mut b, "[33,1,900]")[0])["result"]
        .as_u64()
        .unwrap();
    // Local ids are small and easy to guess: a notification skips the hub's check that
    // the id is the caller's own.
    let (m, replies) = out(
        &mut b,
        &format!(r#"{{"jsonrpc":"2.0","method":"wamp.unsubscribe","params":[{local}]}}"#),
    );
    assert!(m.is_empty() && replies.is_empty());
    let (m, _) = out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":["u"]}"#,
    );
    assert!(m.is_empty());
    assert_eq!(
        inb(&mut b, r#"[36,900,1,{},[1]]"#).len(),
        1,
        "still subscribed"
    );
}

#[test]
fn unsubscribing_while_a_subscribe_of_the_same_topic_is_out_keeps_the_router_s_subscription() {
    let mut b = bridge();
    subscribe(&mut b, 1, "t");
    let a = json(&inb(&mut b, "[33,1,900]")[0])["result"]
        .as_u64()
        .unwrap();
    subscribe(&mut b, 2, "t");
    // A leaves before B's SUBSCRIBED: the router will answer B with 900 itself.
    let (m, replies) = unsubscribe(&mut b, 3, a);
    assert!(
        m.is_empty(),
        "no UNSUBSCRIBE while B's SUBSCRIBE is out: {m:?}"
    );
    assert_eq!(replies, [r#"{"jsonrpc":"2.0","id":3,"result":true}"#]);
    let b_id = json(&inb(&mut b, "[33,2,900]")[0])["result"]
        .as_u64()
        .unwrap();
    assert!(outbox(&mut b).is_empty());
    let events = inb(&mut b, r#"[36,900,5,{},[1]]"#);
    assert_eq!(events.len(), 1);
    assert_eq!(json(&events[0])["params"]["subscription"], b_id);
}

#[test]
fn a_kept_subscription_the_router_did_not_reuse_is_closed() {
    let mut b = bridge();
    subscribe(&mut b, 1, "t");
    let a = json(&inb(&mut b, "[33,1,900]")[0])["result"]
        .as_u64()
        .unwrap();
    subscribe(&mut b, 2, "t");
    unsubscribe(&mut b, 3, a);
    // Answered with another subscription: 900 is nobody's now.
    inb(&mut b, "[33,2,901]");
    let sent = outbox(&mut b);
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].starts_with("[34,") && sent[0].ends_with(",900]"),
        "{sent:?}"
    );
    assert_eq!(b.router_subscriptions(), 1);
}

#[test]
fn an_orphan_opening_while_another_subscribe_of_its_topic_is_out_closes_nothing_yet() {
    let mut b = bridge();
    subscribe(&mut b, 1, "t");
    subscribe(&mut b, 2, "t");
    b.forget(1);
    assert!(inb(&mut b, "[33,1,900]").is_empty());
    assert!(
        outbox(&mut b).is_empty(),
        "B's SUBSCRIBE will be answered with 900"
    );
    let b_id = json(&inb(&mut b, "[33,2,900]")[0])["result"]
        .as_u64()
        .unwrap();
    assert!(outbox(&mut b).is_empty());
    assert_eq!(
        json(&inb(&mut b, r#"[36,900,5,{},[1]]"#)[0])["params"]["subscription"],
        b_id
    );
}

#[test]
fn a_call_or_subscribe_given_up_while_queued_is_not_sent() {
    let mut b = bridge();
    out(&mut b, r#"{"jsonrpc":"2.0","method":"a","id":1}"#);
    b.forget(2);
    b.forget(3);
    let (m, _) = out(&mut b, r#"{"jsonrpc":"2.0","method":"slow","id":2}"#);
    assert!(m.is_empty(), "its caller left: {m:?}");
    let (m, _) = out(
        &mut b,
        r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":["t"],"id":3}"#,
    );
    assert!(m.is_empty(), "nobody would hold what it opens: {m:?}");
    let (m, _) = out(&mut b, r#"{"jsonrpc":"2.0","method":"b","id":4}"#);
    assert_eq!(m.len(), 1, "later calls go as usual");
    assert!(b.forgotten.is_empty());
}

#[test]
fn no_cancel_is_sent_to_a_router_that_did_not_announce_call_canceling() {
    let mut b = Bridge::new(bridge().link.clone(), 1, false);
    out(&mut b, r#"{"jsonrpc":"2.0","method":"slow","id":9}"#);
    b.forget(9);
    assert!(outbox(&mut b).is_empty());
}
