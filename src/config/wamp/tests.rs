//! Unit tests of `wamp.rs`: reading and checking the WAMP keys.

use crate::config::{Config, Protocol, WampAuthMethod};

fn problems(text: &str) -> String {
    match Config::parse(text) {
        Ok(c) => c.check().join("\n"),
        Err(p) => p.to_string(),
    }
}

#[test]
fn a_wamp_upstream_reads_its_realm_prefix_and_auth() {
    let dir = std::env::temp_dir().join(format!("rpcgate-wamp-read-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    std::fs::write(&file, "s3cret\n").unwrap();
    let c = Config::parse(&format!(
        r#"
        [[upstreams]]
        url = "ws://127.0.0.1:1/ws"
        protocol = "wamp"
        realm = "realm1"
        procedure_prefix = "com.example."
        [upstreams.wamp_auth]
        method = "wampcra"
        authid = "gw"
        secret_file = "{}"
        [wamp]
        event_method = "tick"
        "#,
        file.display()
    ))
    .unwrap();
    assert!(c.check().is_empty(), "{:?}", c.check());
    let up = &c.upstreams[0];
    assert_eq!(up.protocol, Protocol::Wamp);
    assert_eq!(up.realm.as_deref(), Some("realm1"));
    assert_eq!(up.procedure_prefix, "com.example.");
    let auth = up.wamp_auth.as_ref().unwrap();
    assert_eq!(
        (auth.method, auth.authid.as_str()),
        (WampAuthMethod::WampCra, "gw")
    );
    assert_eq!(auth.secret("x").unwrap(), b"s3cret");
    // The push hub gets a subscription rule for WAMP's PubSub methods.
    let rules = c.subscription_rules();
    let rule = rules.last().unwrap();
    assert_eq!(rule.subscribe, "wamp.subscribe");
    assert_eq!(rule.notification.as_deref(), Some("tick"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_jsonrpc_config_gets_no_wamp_rule_and_a_rule_of_the_operator_s_wins() {
    let plain = Config::parse("[[upstreams]]\nurl = \"ws://127.0.0.1:1/\"\n").unwrap();
    assert!(plain.subscription_rules().is_empty());
    let own = Config::parse(
        r#"
        [[subscriptions]]
        subscribe = "wamp.*"
        unsubscribe = "wamp.unsubscribe"
        [[upstreams]]
        url = "ws://127.0.0.1:1/"
        protocol = "wamp"
        realm = "r"
        "#,
    )
    .unwrap();
    assert_eq!(own.subscription_rules().len(), 1);
}

#[test]
fn wamp_keys_are_checked_with_the_setting_at_fault_named() {
    let up = "[[upstreams]]\nurl = \"ws://127.0.0.1:1/\"\n";
    let no_realm = problems(&format!("{up}protocol = \"wamp\"\n"));
    assert!(no_realm.contains("upstreams[0].realm"), "{no_realm}");
    let not_wamp = problems(&format!("{up}realm = \"r\"\n"));
    assert!(
        not_wamp.contains("only for protocol = \"wamp\""),
        "{not_wamp}"
    );
    let bad = problems(&format!("{up}protocol = \"mqtt\"\n"));
    assert!(bad.contains("\"jsonrpc\" or \"wamp\""), "{bad}");
    let sub = problems(&format!(
        "{up}protocol = \"wamp\"\nrealm = \"r\"\nsubprotocol = \"x\"\n"
    ));
    assert!(sub.contains("upstreams[0].subprotocol"), "{sub}");
    let unset = problems(&format!(
        "{up}protocol = \"wamp\"\nrealm = \"r\"\n[upstreams.wamp_auth]\nmethod = \"ticket\"\nauthid = \"a\"\nsecret_env = \"RPCGATE_TEST_NEVER_SET\"\n"
    ));
    assert!(
        unset.contains("RPCGATE_TEST_NEVER_SET is not set"),
        "{unset}"
    );
    let both = problems(&format!(
        "{up}protocol = \"wamp\"\nrealm = \"r\"\n[upstreams.wamp_auth]\nmethod = \"ticket\"\nauthid = \"a\"\nsecret_env = \"A\"\nsecret_file = \"/b\"\n"
    ));
    assert!(
        both.contains("exactly one of secret_env and secret_file"),
        "{both}"
    );
    let method = problems(&format!(
        "{up}protocol = \"wamp\"\nrealm = \"r\"\n[upstreams.wamp_auth]\nmethod = \"cryptosign\"\nauthid = \"a\"\nsecret_env = \"A\"\n"
    ));
    assert!(method.contains("\"ticket\" or \"wampcra\""), "{method}");
    let same = problems(&format!("{up}[wamp]\nevent_method = \"wamp.subscribe\"\n"));
    assert!(
        same.contains("wamp.event_method: \"wamp.subscribe\" is also wamp.subscribe_method"),
        "{same}"
    );
    let empty = problems(&format!("{up}[wamp]\npublish_method = \"\"\n"));
    assert!(empty.contains("wamp.publish_method: empty"), "{empty}");
}

#[test]
fn a_secret_file_loses_its_final_line_break_and_an_empty_one_is_refused() {
    let dir = std::env::temp_dir().join(format!("rpcgate-wamp-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    std::fs::write(&file, "ticket-secret\n").unwrap();
    let auth = crate::config::WampAuth {
        method: WampAuthMethod::Ticket,
        authid: "a".into(),
        secret_env: None,
        secret_file: Some(file.clone()),
    };
    assert_eq!(auth.secret("x").unwrap(), b"ticket-secret");
    std::fs::write(&file, "\n").unwrap();
    assert!(auth.secret("x").unwrap_err().contains("empty"));
    let _ = std::fs::remove_dir_all(&dir);
}
