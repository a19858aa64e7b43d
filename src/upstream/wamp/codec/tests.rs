use super::*;
use crate::upstream::wamp::*;

fn raw(s: &str) -> &RawValue {
    serde_json::from_str(s).unwrap()
}

fn written(f: impl FnOnce(&mut String)) -> String {
    let mut out = String::new();
    f(&mut out);
    // Every writer produces a JSON array.
    let _: Vec<&RawValue> = serde_json::from_str(&out).unwrap();
    out
}

#[test]
fn wamp_parse_reads_a_welcome_and_its_session() {
    let m = parse(r#"[2, 9129137332, {"roles": {"broker": {}}, "authid": "joe"}]"#).unwrap();
    let Message::Welcome { session, details } = m else {
        panic!("{m:?}")
    };
    assert_eq!(session, 9129137332);
    assert!(details.get().contains("broker"));
}

#[test]
fn wamp_parse_reads_an_abort_reason_and_its_message() {
    let m = parse(
        r#"[3,{"message":"no realm \"x\" exists on this router"},"wamp.error.no_such_realm"]"#,
    )
    .unwrap();
    let Message::Abort { details, reason } = m else {
        panic!("{m:?}")
    };
    assert_eq!(reason, "wamp.error.no_such_realm");
    assert_eq!(
        details_message(details).unwrap(),
        r#"no realm "x" exists on this router"#
    );
}

#[test]
fn wamp_parse_reads_results_with_and_without_payload() {
    let m = parse("[50,7,{}]").unwrap();
    assert!(
        matches!(m, Message::Result { request: 7, payload, .. } if payload == Payload::default())
    );
    let m = parse(r#"[50,7,{},[1,"two"],{"c":3}]"#).unwrap();
    let Message::Result {
        request: 7,
        payload,
        ..
    } = m
    else {
        panic!("{m:?}")
    };
    assert_eq!(payload.args.unwrap().get(), r#"[1,"two"]"#);
    assert_eq!(payload.kwargs.unwrap().get(), r#"{"c":3}"#);
}

#[test]
fn wamp_parse_reads_an_error_for_a_call() {
    let m = parse(r#"[8,48,12,{},"com.example.error.fail",["boom",2]]"#).unwrap();
    let Message::Error {
        request_type,
        request,
        error,
        payload,
        ..
    } = m
    else {
        panic!("{m:?}")
    };
    assert_eq!((request_type, request), (code::CALL, 12));
    assert_eq!(error, "com.example.error.fail");
    assert_eq!(payload.args.unwrap().get(), r#"["boom",2]"#);
    assert!(payload.kwargs.is_none());
}

#[test]
fn wamp_parse_reads_challenge_subscribed_published_event_unsubscribed() {
    let m = parse(r#"[4,"wampcra",{"challenge":"{}"}]"#).unwrap();
    assert!(matches!(m, Message::Challenge { ref authmethod, .. } if authmethod == "wampcra"));
    assert!(matches!(
        parse("[33,3,55]"),
        Ok(Message::Subscribed {
            request: 3,
            subscription: 55
        })
    ));
    assert!(matches!(
        parse("[17,4,66]"),
        Ok(Message::Published {
            request: 4,
            publication: 66
        })
    ));
    assert!(matches!(
        parse("[35,5]"),
        Ok(Message::Unsubscribed { request: 5 })
    ));
    let m = parse(r#"[36,55,77,{},[1]]"#).unwrap();
    let Message::Event {
        subscription: 55,
        publication: 77,
        payload,
        ..
    } = m
    else {
        panic!("{m:?}")
    };
    assert_eq!(payload.args.unwrap().get(), "[1]");
    let m = parse(r#"[6,{},"wamp.close.close_realm"]"#).unwrap();
    assert!(matches!(m, Message::Goodbye { ref reason, .. } if reason == "wamp.close.close_realm"));
}

#[test]
fn wamp_parse_reads_what_a_caller_writes() {
    // A fake router in a test can read the gateway's frames with the same codec.
    let hello = written(|o| write_hello(o, "realm1", HelloAuth::default()));
    assert!(
        matches!(parse(&hello).unwrap(), Message::Hello { ref realm, .. } if realm == "realm1")
    );
    let call = written(|o| {
        write_call(
            o,
            1,
            None,
            r#""com.example.add2""#,
            Payload {
                args: Some(raw("[2,3]")),
                kwargs: None,
            },
        )
    });
    let Message::Call {
        request: 1,
        procedure,
        payload,
        ..
    } = parse(&call).unwrap()
    else {
        panic!()
    };
    assert_eq!(procedure, "com.example.add2");
    assert_eq!(payload.args.unwrap().get(), "[2,3]");
    let sub = written(|o| write_subscribe(o, 2, None, r#""com.example.tick""#));
    assert!(
        matches!(parse(&sub).unwrap(), Message::Subscribe { request: 2, ref topic, .. } if topic == "com.example.tick")
    );
    let unsub = written(|o| write_unsubscribe(o, 3, 55));
    assert!(matches!(
        parse(&unsub),
        Ok(Message::Unsubscribe {
            request: 3,
            subscription: 55
        })
    ));
    let cancel = written(|o| write_cancel(o, 4, CancelMode::KillNoWait));
    assert!(
        matches!(parse(&cancel), Ok(Message::Cancel { request: 4, options }) if options.get() == r#"{"mode":"killnowait"}"#)
    );
    let auth = written(|o| write_authenticate(o, "sig=="));
    assert!(
        matches!(parse(&auth).unwrap(), Message::Authenticate { ref signature, .. } if signature == "sig==")
    );
    let bye = written(|o| write_goodbye(o, CLOSE_SHUTDOWN));
    assert!(
        matches!(parse(&bye).unwrap(), Message::Goodbye { ref reason, .. } if reason == CLOSE_SHUTDOWN)
    );
}

#[test]
fn wamp_parse_unescapes_uris_only_when_needed() {
    let Message::Abort { reason, .. } = parse(r#"[3,{},"wamp.error.no_such_realm"]"#).unwrap()
    else {
        panic!()
    };
    assert!(matches!(reason, Cow::Borrowed(_)));
    let Message::Abort { reason, .. } = parse(r#"[3,{},"wamp.error.\u006eo"]"#).unwrap() else {
        panic!()
    };
    assert_eq!(reason, "wamp.error.no");
}

#[test]
fn wamp_parse_refuses_malformed_frames() {
    assert_eq!(parse("{}").unwrap_err(), ParseError::NotAMessage);
    assert_eq!(parse("[]").unwrap_err(), ParseError::NotAMessage);
    assert_eq!(parse(r#"["x"]"#).unwrap_err(), ParseError::NotAMessage);
    assert_eq!(parse("[69,1,{}]").unwrap_err(), ParseError::Unsupported(69));
    assert!(matches!(
        parse("[2,0,{}]"),
        Err(ParseError::Element { index: 1, .. })
    ));
    assert!(matches!(
        parse("[2,9007199254740993,{}]"),
        Err(ParseError::Element { index: 1, .. })
    ));
    assert!(matches!(
        parse("[2,1.5,{}]"),
        Err(ParseError::Element { index: 1, .. })
    ));
    assert!(matches!(
        parse("[2,1,[]]"),
        Err(ParseError::Element { index: 2, .. })
    ));
    assert!(matches!(
        parse("[2,1]"),
        Err(ParseError::Element { index: 2, .. })
    ));
    assert!(matches!(
        parse("[50,1,{},{}]"),
        Err(ParseError::Element { index: 3, .. })
    ));
    assert!(matches!(
        parse("[50,1,{},[],[]]"),
        Err(ParseError::Element { index: 4, .. })
    ));
    assert!(matches!(
        parse("[50,1,{},[],{},1]"),
        Err(ParseError::TooLong { len: 6, .. })
    ));
    assert!(matches!(
        parse("[3,{},7]"),
        Err(ParseError::Element { index: 2, .. })
    ));
}

#[test]
fn wamp_hello_announces_roles_and_auth() {
    let anon = written(|o| write_hello(o, "realm1", HelloAuth::default()));
    assert!(anon.starts_with(r#"[1,"realm1",{"#));
    assert!(anon.contains(r#""caller":{"features":{"call_canceling":true}}"#));
    // Prefix and wildcard subscriptions, and `exclude_me: false` on PUBLISH, are
    // advanced-profile features: announced so a router may hold us to them.
    assert!(anon.contains(r#""subscriber":{"features":{"pattern_based_subscription":true}}"#));
    assert!(anon.contains(r#""publisher":{"features":{"publisher_exclusion":true}}"#));
    assert!(!anon.contains("authmethods") && !anon.contains("authid"));
    let cra = written(|o| {
        write_hello(
            o,
            "re\"alm",
            HelloAuth {
                methods: &["wampcra", "ticket"],
                authid: Some("joe"),
            },
        )
    });
    assert!(cra.starts_with(r#"[1,"re\"alm",{"#));
    assert!(cra.contains(r#""authmethods":["wampcra","ticket"],"authid":"joe"}"#));
}

#[test]
fn wamp_params_become_arguments_or_keyword_arguments() {
    assert_eq!(split_params(None), Ok(Payload::default()));
    assert_eq!(split_params(Some(raw("null"))), Ok(Payload::default()));
    let p = raw("[1,2]");
    assert_eq!(
        split_params(Some(p)),
        Ok(Payload {
            args: Some(p),
            kwargs: None
        })
    );
    let p = raw(r#"{"a":1}"#);
    assert_eq!(
        split_params(Some(p)),
        Ok(Payload {
            args: None,
            kwargs: Some(p)
        })
    );
    assert_eq!(split_params(Some(raw("3"))), Err(InvalidParams));
    assert_eq!(split_params(Some(raw(r#""x""#))), Err(InvalidParams));
}

#[test]
fn wamp_call_frames_keep_params_bytes_and_put_kwargs_after_empty_args() {
    let args = raw(r#"[1, 2.50, "\u00e9"]"#);
    let out = written(|o| write_call(o, 9, None, r#""p""#, split_params(Some(args)).unwrap()));
    assert_eq!(out, r#"[48,9,{},"p",[1, 2.50, "\u00e9"]]"#);
    let kw = raw(r#"{"a":1}"#);
    let out = written(|o| {
        write_call(
            o,
            9,
            Some(r#"{"timeout":500}"#),
            r#""p""#,
            split_params(Some(kw)).unwrap(),
        )
    });
    assert_eq!(out, r#"[48,9,{"timeout":500},"p",[],{"a":1}]"#);
    let out = written(|o| write_call(o, MAX_ID, None, r#""p""#, Payload::default()));
    assert_eq!(out, r#"[48,9007199254740992,{},"p"]"#);
}

#[test]
fn wamp_publish_asks_for_an_acknowledgement_only_when_told() {
    let p = Payload {
        args: Some(raw("[1]")),
        kwargs: None,
    };
    assert_eq!(
        written(|o| write_publish(o, 3, true, r#""t""#, p)),
        r#"[16,3,{"acknowledge":true,"exclude_me":false},"t",[1]]"#
    );
    assert_eq!(
        written(|o| write_publish(o, 3, false, r#""t""#, Payload::default())),
        r#"[16,3,{"exclude_me":false},"t"]"#
    );
}

#[test]
fn wamp_procedures_are_the_method_or_behind_a_prefix() {
    let mut out = String::new();
    assert!(Procedures::default().write(&mut out, raw(r#""com.example.add2""#)));
    assert_eq!(out, r#""com.example.add2""#);
    out.clear();
    assert!(Procedures::new("com.\"x\".").write(&mut out, raw(r#""add\u0032""#)));
    assert_eq!(out, r#""com.\"x\".add\u0032""#);
    assert_eq!(
        serde_json::from_str::<String>(&out).unwrap(),
        r#"com."x".add2"#
    );
    out.clear();
    assert!(!Procedures::default().write(&mut out, raw("5")));
    assert!(out.is_empty());
}

fn payload<'a>(args: Option<&'a str>, kwargs: Option<&'a str>) -> Payload<'a> {
    Payload {
        args: args.map(raw),
        kwargs: kwargs.map(raw),
    }
}

#[test]
fn wamp_results_unwrap_one_argument_and_keep_several_or_keywords() {
    assert_eq!(result_json(payload(None, None)), "null");
    assert_eq!(result_json(payload(Some("[]"), None)), "null");
    assert_eq!(result_json(payload(Some("[ ]"), Some("{}"))), "null");
    assert_eq!(
        result_json(payload(Some(r#"[ {"x": 1.50} ]"#), None)),
        r#"{"x": 1.50}"#
    );
    assert_eq!(result_json(payload(Some("[5]"), Some("{}"))), "5");
    assert_eq!(result_json(payload(Some("[1, 2]"), None)), "[1, 2]");
    assert_eq!(
        result_json(payload(Some("[]"), Some(r#"{"a":1}"#))),
        r#"{"a":1}"#
    );
    assert_eq!(result_json(payload(None, Some(r#"{"a":1}"#))), r#"{"a":1}"#);
    assert_eq!(
        result_json(payload(Some("[1,2]"), Some(r#"{"a":1}"#))),
        r#"{"args":[1,2],"kwargs":{"a":1}}"#
    );
    // Borrowed: no copy of a result on the common paths.
    assert!(matches!(
        result_json(payload(Some("[[1,2,3]]"), None)),
        Cow::Borrowed("[1,2,3]")
    ));
}

#[test]
fn wamp_errors_carry_the_uri_in_the_message_and_args_in_data() {
    let mut out = String::new();
    write_error_object(
        &mut out,
        "com.example.error.fail",
        payload(Some(r#"["it broke", 7]"#), None),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["code"], -32000);
    assert_eq!(v["message"], "com.example.error.fail: it broke");
    assert_eq!(
        v["data"],
        serde_json::json!({"uri": "com.example.error.fail", "args": ["it broke", 7]})
    );

    out.clear();
    write_error_object(
        &mut out,
        "wamp.error.no_such_procedure",
        payload(None, Some(r#"{"k":1}"#)),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["code"], -32601);
    assert_eq!(v["message"], "wamp.error.no_such_procedure");
    assert_eq!(
        v["data"],
        serde_json::json!({"uri": "wamp.error.no_such_procedure", "kwargs": {"k": 1}})
    );

    out.clear();
    write_error_object(&mut out, "x\"y", payload(Some("[1]"), None));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["message"], "x\"y");
}

// Autobahn|Python's own vectors (autobahn/wamp/test/test_wamp_auth.py, 26.11.1):
// test_derive_key, with derive_key's defaults (1000 iterations, 32 bytes).
#[test]
fn wamp_cra_derive_key_matches_autobahn() {
    let key = derive_key(b"L3L1YUE8Txlw", b"salt123", 1000, 32).unwrap();
    assert_eq!(key, AUTOBAHN_DERIVED_KEY);
    assert_eq!(
        derive_key(b"s", b"salt", 0, 32),
        Err(CraError::NoIterations)
    );
    assert_eq!(derive_key(b"s", b"salt", 1, 0), Err(CraError::KeyLength(0)));
}

const AUTOBAHN_DERIVED_KEY: &str = "qzcdsr9uu/L5hnss3kjNTRe490ETgA70ZBaB5rvnJ5Y=";

#[test]
fn wamp_cra_signature_matches_autobahn() {
    assert_eq!(
        cra_sign(CRA_SECRET.as_bytes(), CRA_CHALLENGE.as_bytes()),
        CRA_SIGNATURE
    );
}

// test_compute_wcs: the challenge is `json.dumps([1, 2, 3])`.
const CRA_SECRET: &str = "L3L1YUE8Txlw";
const CRA_CHALLENGE: &str = "[1, 2, 3]";
const CRA_SIGNATURE: &str = "1njQtmmeYO41N5EWEzD2kAjjEKRZ5kPZt/TzpYXOzR0=";

#[test]
fn wamp_cra_challenges_are_signed_salted_or_not() {
    let plain = CraChallenge::from_extra(raw(r#"{"challenge":"abc"}"#)).unwrap();
    assert_eq!(plain.sign(b"secret").unwrap(), cra_sign(b"secret", b"abc"));
    let salted = CraChallenge::from_extra(raw(
        r#"{"challenge":"abc","salt":"salt123","iterations":1000,"keylen":32}"#,
    ))
    .unwrap();
    assert_eq!(
        salted.sign(b"L3L1YUE8Txlw").unwrap(),
        cra_sign(AUTOBAHN_DERIVED_KEY.as_bytes(), b"abc")
    );
    let defaults =
        CraChallenge::from_extra(raw(r#"{"challenge":"abc","salt":"salt123"}"#)).unwrap();
    assert_eq!(defaults.sign(b"L3L1YUE8Txlw"), salted.sign(b"L3L1YUE8Txlw"));
    assert!(CraChallenge::from_extra(raw(r#"{"nonce":"abc"}"#)).is_err());
}
