//! Unit tests of `access.rs`, kept apart so the module reads as one noun; `record` is
//! shared with the other logging tests.

use super::*;
use crate::logging::capture::Capture;

pub(in crate::logging) fn record(status: u16) -> AccessRecord {
    AccessRecord {
        peer: "127.0.0.1:5000".parse().expect("an address"),
        method: http::Method::POST,
        status,
        duration_us: 12,
        bytes: 34,
        batch: Some(3),
        upstream: Some(Arc::from("ws://a/")),
        caller: None,
        client_cert: None,
    }
}

fn start(capture: &Capture, capacity: usize) -> AccessLog {
    tracing::dispatcher::with_default(&capture.json_dispatch(), || {
        AccessLog::with_capacity(1.0, capacity)
    })
}

#[test]
fn a_record_becomes_an_access_event_with_every_field() {
    let capture = Capture::default();
    let log = start(&capture, 16);
    assert!(log.enabled());
    log.record(record(200));
    log.record(AccessRecord {
        batch: None,
        upstream: None,
        caller: None,
        ..record(503)
    });
    assert!(log.flush());
    let lines = capture.json_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let full = &lines[0];
    assert_eq!(full["target"], "rpcgate::access");
    assert_eq!(full["level"], "INFO");
    assert_eq!(full["peer"], "127.0.0.1:5000");
    assert_eq!(full["method"], "POST");
    assert_eq!(full["status"], 200);
    assert_eq!(full["duration_us"], 12);
    assert_eq!(full["bytes"], 34);
    assert_eq!(full["batch"], 3);
    assert_eq!(full["upstream"], "ws://a/");
    let bare = &lines[1];
    assert_eq!(bare["status"], 503);
    assert!(bare.get("batch").is_none() && bare.get("upstream").is_none());
    assert_eq!(log.dropped(), 0);
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let capture = Capture::gated();
    let log = start(&capture, 2);
    log.record(record(200));
    // The writer took the first record and is stuck writing it.
    capture.wait_entered();
    // On another thread, so that a record() that blocked fails the test instead
    // of hanging it.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn({
        let log = log.clone();
        move || {
            for status in [201, 202, 203, 204] {
                log.record(record(status));
            }
            let _ = done.send(());
        }
    });
    assert!(
        finished.recv_timeout(Duration::from_secs(10)).is_ok(),
        "record() blocked on a stuck writer"
    );
    assert_eq!(log.dropped(), 2);
    assert!(super::super::dropped_lines() >= 2);
    capture.open();
    assert!(log.flush());
    let statuses: Vec<_> = capture
        .json_lines()
        .iter()
        .map(|l| l["status"].clone())
        .collect();
    assert_eq!(statuses, [200, 201, 202]);
}

#[test]
fn flush_waits_for_the_records_queued_before_it() {
    let capture = Capture::gated();
    let log = start(&capture, 16);
    log.record(record(200));
    capture.wait_entered();
    log.record(record(201));
    assert!(
        !log.flush_within(Duration::from_millis(20)),
        "nothing was written yet"
    );
    capture.open();
    assert!(log.flush());
    assert_eq!(capture.json_lines().len(), 2);
}

#[test]
fn the_last_handle_dropped_still_writes_what_is_queued() {
    let capture = Capture::gated();
    let log = start(&capture, 16);
    log.record(record(200));
    capture.wait_entered();
    log.record(record(201));
    let queue = log.queue.as_ref().map(|o| o.0.clone()).expect("a queue");
    drop(log);
    capture.open();
    assert!(queue.flush(Instant::now() + Duration::from_secs(10)));
    assert_eq!(capture.json_lines().len(), 2);
}

#[test]
fn off_when_the_subscriber_filters_the_access_target_out() {
    let capture = Capture::default();
    let dispatch: tracing::Dispatch = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "info,rpcgate::access=off",
        ))
        .with_writer(capture.clone())
        .into();
    let log = tracing::dispatcher::with_default(&dispatch, || AccessLog::start(1.0));
    assert!(!log.enabled());
    log.record(record(200));
    assert!(log.flush());
    assert!(capture.bytes().is_empty());
}

#[test]
fn sampling_picks_about_the_configured_share() {
    let capture = Capture::default();
    let dispatch = capture.json_dispatch();
    let never = tracing::dispatcher::with_default(&dispatch, || AccessLog::start(0.0));
    assert!(!never.enabled());
    let tenth = tracing::dispatcher::with_default(&dispatch, || AccessLog::start(0.1));
    let picked = (0..10_000).filter(|_| tenth.enabled()).count();
    // Ten standard deviations either side of 1,000.
    assert!((700..1300).contains(&picked), "{picked}");
}
