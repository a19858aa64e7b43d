//! A WAMP router's text frames, after a few calls and subscriptions are out: each goes
//! through the bridge of a `protocol = "wamp"` connection, and everything it hands the
//! multiplexer must be one JSON-RPC message, as an upstream would have written it.
//! Also the bridge's own side: arbitrary JSON-RPC frames in, WAMP messages out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpcgate::jsonrpc;
use rpcgate::upstream::WampBridge;
use rpcgate::upstream::wamp;

/// What the multiplexer queued before the router's frames arrive: calls 1 to 3, a
/// subscribe (4), the same topic again (5), a publish (6).
const OUT: [&str; 6] = [
    r#"{"jsonrpc":"2.0","method":"com.example.add2","params":[2,3],"id":1}"#,
    r#"{"jsonrpc":"2.0","method":"kw","params":{"a":1},"id":2}"#,
    r#"[{"jsonrpc":"2.0","method":"a","id":3},{"jsonrpc":"2.0","method":"b"}]"#,
    r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":["t"],"id":4}"#,
    r#"{"jsonrpc":"2.0","method":"wamp.subscribe","params":{"topic":"t"},"id":5}"#,
    r#"{"jsonrpc":"2.0","method":"wamp.publish","params":["t",1],"id":6}"#,
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut bridge = WampBridge::new("");
    for frame in OUT {
        bridge.outbound(frame);
    }
    // Lines are frames; a line starting with '>' is a JSON-RPC frame queued for the
    // router, '!' followed by an id a caller giving up.
    for line in text.split('\n') {
        if let Some(frame) = line.strip_prefix('>') {
            let (messages, local) = bridge.outbound(frame);
            messages.iter().for_each(|m| written(m));
            local.iter().for_each(|r| for_the_mux(r));
        } else if let Some(id) = line.strip_prefix('!') {
            bridge
                .forget(id.parse().unwrap_or(1))
                .iter()
                .for_each(|m| written(m));
        } else if let Ok(Some(out)) = bridge.inbound(line) {
            out.iter().for_each(|r| for_the_mux(r));
        }
    }
});

/// A message the writer sends must be one WAMP message this codec reads.
fn written(message: &str) {
    assert!(
        wamp::parse(message).is_ok(),
        "the bridge wrote a message that is not WAMP: {message}"
    );
}

/// A frame handed to the multiplexer must be one JSON-RPC message, never garbage.
fn for_the_mux(frame: &[u8]) {
    let text = std::str::from_utf8(frame).expect("the bridge writes UTF-8");
    let mut messages = 0;
    let seen = jsonrpc::read_upstream(text, |_| messages += 1);
    assert_eq!(
        (messages, seen.garbage),
        (1, 0),
        "the bridge handed the multiplexer something else: {text}"
    );
}
