//! Unit tests of `mux.rs`, kept apart so the module reads as one noun.

use super::*;

type ReplyReceiver = oneshot::Receiver<Result<Reply, Failure>>;

fn call(mux: &mut Mux, prelude: bool) -> (Result<FrameIds, Refused>, ReplyReceiver) {
    let (tx, rx) = oneshot::channel();
    let ids = mux.submit(prelude, None, smallvec::smallvec![tx], |ids| {
        format!(r#"{{"jsonrpc":"2.0","method":"m","id":{}}}"#, ids[0])
    });
    (ids, rx)
}

fn answer(rx: &mut ReplyReceiver) -> Option<Result<Reply, Failure>> {
    rx.try_recv().ok()
}

#[test]
fn a_closed_mux_refuses_and_a_preparing_one_takes_only_prelude_frames() {
    let mut mux = Mux::new(8, 1 << 20);
    assert_eq!(call(&mut mux, false).0, Err(Refused::Closed));
    mux.set_phase(Phase::Preparing);
    assert_eq!(call(&mut mux, false).0, Err(Refused::Closed));
    assert!(call(&mut mux, true).0.is_ok());
    mux.set_phase(Phase::Open);
    assert!(call(&mut mux, false).0.is_ok());
    assert_eq!(mux.queued(), 2);
}

#[test]
fn frames_carry_the_ids_they_were_given_and_replies_find_their_caller() {
    let mut mux = Mux::new(8, 1 << 20);
    mux.set_phase(Phase::Open);
    let (a, mut rx_a) = call(&mut mux, false);
    let (b, mut rx_b) = call(&mut mux, false);
    let (FrameIds::One(a), FrameIds::One(b)) = (a.unwrap(), b.unwrap()) else {
        panic!("one id each");
    };
    let mut frames = Vec::new();
    assert_eq!(mux.take(&mut frames, 16, usize::MAX), 2);
    assert!(frames[1].text.ends_with(&format!(r#""id":{b}}}"#)));
    // Out of order, in one upstream batch frame.
    let reply = format!(
        r#"[{{"jsonrpc":"2.0","id":{b},"result":"B"}},{{"jsonrpc":"2.0","id":{a},"error":{{"code":1,"message":"m"}}}}]"#
    );
    let seen = mux.deliver(&Bytes::from(reply));
    assert_eq!(seen.matched, 2);
    let b = answer(&mut rx_b).unwrap().unwrap();
    assert_eq!((b.payload(), b.is_error()), (r#""B""#, false));
    let a = answer(&mut rx_a).unwrap().unwrap();
    assert_eq!(
        (a.payload(), a.is_error()),
        (r#"{"code":1,"message":"m"}"#, true)
    );
    assert_eq!(mux.pending_len(), 0);
}

#[test]
fn a_reply_nobody_waits_for_is_unsolicited_and_a_non_jsonrpc_frame_is_garbage() {
    let mut mux = Mux::new(8, 1 << 20);
    mux.set_phase(Phase::Open);
    let (id, _rx) = call(&mut mux, false);
    let FrameIds::One(id) = id.unwrap() else {
        panic!()
    };
    mux.forget(id);
    let late = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":1}}"#);
    assert_eq!(mux.deliver(&Bytes::from(late)).unsolicited, 1);
    let note = r#"{"jsonrpc":"2.0","method":"tick","params":[1]}"#;
    let pushed = mux.deliver(&Bytes::from(note));
    assert_eq!(
        (pushed.unsolicited, pushed.pushed.len()),
        (0, 1),
        "a notification is pushed"
    );
    assert_eq!(mux.deliver(&Bytes::from_static(b"\xff\xfe")).garbage, 1);
    assert_eq!(mux.deliver(&Bytes::from_static(b"{}")).garbage, 1);
}

#[test]
fn closing_tells_queued_callers_not_sent_and_written_ones_lost() {
    let mut mux = Mux::new(8, 1 << 20);
    mux.set_phase(Phase::Open);
    let (_, mut written) = call(&mut mux, false);
    let (_, mut taken) = call(&mut mux, false);
    let (_, mut queued) = call(&mut mux, false);
    let mut frames = Vec::new();
    mux.take(&mut frames, 1, usize::MAX); // written
    let mut half = Vec::new();
    mux.take(&mut half, 1, usize::MAX); // taken by the writer, not written
    let closed = mux.close(half);
    assert_eq!(
        closed,
        Closed {
            not_sent: 2,
            lost: 1
        }
    );
    assert!(matches!(answer(&mut written), Some(Err(Failure::Lost))));
    assert!(matches!(answer(&mut taken), Some(Err(Failure::NotSent))));
    assert!(matches!(answer(&mut queued), Some(Err(Failure::NotSent))));
    assert_eq!(call(&mut mux, false).0, Err(Refused::Closed));
}

#[test]
fn ids_keep_growing_across_reconnects_so_a_late_reply_never_matches_a_new_call() {
    let mut mux = Mux::new(8, 1 << 20);
    mux.set_phase(Phase::Open);
    let (old, _rx) = call(&mut mux, false);
    mux.close(Vec::new());
    mux.set_phase(Phase::Open);
    let (new, mut rx) = call(&mut mux, false);
    let (FrameIds::One(old), FrameIds::One(new)) = (old.unwrap(), new.unwrap()) else {
        panic!()
    };
    assert!(new > old);
    let late = format!(r#"{{"jsonrpc":"2.0","id":{old},"result":1}}"#);
    assert_eq!(mux.deliver(&Bytes::from(late)).matched, 0);
    assert!(answer(&mut rx).is_none());
}

#[test]
fn a_full_queue_refuses_without_registering_the_call() {
    let mut mux = Mux::new(2, 1 << 20);
    mux.set_phase(Phase::Open);
    call(&mut mux, false).0.unwrap();
    call(&mut mux, false).0.unwrap();
    assert_eq!(call(&mut mux, false).0, Err(Refused::Full));
    assert_eq!(mux.pending_len(), 2);
}

#[test]
fn queued_bytes_are_bounded_but_an_empty_queue_takes_any_frame() {
    let mut mux = Mux::new(100, 1000);
    mux.set_phase(Phase::Open);
    let big = |mux: &mut Mux, len: usize| {
        let (tx, _rx) = oneshot::channel();
        mux.submit(false, None, smallvec::smallvec![tx], |_| "x".repeat(len))
    };
    assert!(big(&mut mux, 1500).is_ok(), "alone, even over the limit");
    assert_eq!(big(&mut mux, 10), Err(Refused::Full));
    assert_eq!(mux.pending_len(), 1, "the refused call left nothing behind");
    let mut frames = Vec::new();
    mux.take(&mut frames, 10, usize::MAX);
    assert!(big(&mut mux, 600).is_ok());
    assert!(big(&mut mux, 400).is_ok());
    assert_eq!(big(&mut mux, 1), Err(Refused::Full));
    frames.clear();
    mux.take(&mut frames, 1, usize::MAX);
    assert!(big(&mut mux, 600).is_ok(), "taking a frame frees its bytes");
}

#[test]
fn a_batch_gets_one_id_per_waiting_call_in_order() {
    let mut mux = Mux::new(8, 1 << 20);
    mux.set_phase(Phase::Open);
    let (senders, _receivers): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
    let ids = mux
        .submit(false, None, senders.into(), |ids| format!("{ids:?}"))
        .unwrap();
    let mut frames = Vec::new();
    mux.take(&mut frames, 8, usize::MAX);
    assert_eq!(ids.as_slice().len(), 3);
    assert_eq!(frames[0].text, format!("{:?}", ids.as_slice()));
    let note = mux
        .submit(false, None, Default::default(), |_| "n".into())
        .unwrap();
    assert_eq!(note, FrameIds::None);
}

#[test]
fn the_writer_takes_frames_up_to_a_byte_limit_but_always_one() {
    let mut mux = Mux::new(100, usize::MAX);
    mux.set_phase(Phase::Open);
    for len in [300, 300, 300, 5000] {
        mux.submit(false, None, Default::default(), |_| "x".repeat(len))
            .unwrap();
    }
    let mut frames = Vec::new();
    assert_eq!(
        mux.take(&mut frames, 10, 500),
        2,
        "stops once 500 bytes are taken"
    );
    frames.clear();
    assert_eq!(
        mux.take(&mut frames, 10, 500),
        2,
        "300, then the 5000 that crosses it"
    );
    frames.clear();
    mux.submit(false, None, Default::default(), |_| "x".repeat(9000))
        .unwrap();
    assert_eq!(
        mux.take(&mut frames, 10, 500),
        1,
        "a frame over the limit still goes"
    );
}

#[test]
fn a_queued_frame_is_charged_to_its_payer_until_written() {
    use crate::budget::{Budget, Budgets};
    let budgets = Budgets::for_connection(&Budget::new(1000), 1000);
    let mut mux = Mux::new(100, usize::MAX);
    mux.set_phase(Phase::Open);
    let (tx, _rx) = oneshot::channel();
    mux.submit(false, Some(&budgets), smallvec::smallvec![tx], |_| {
        "x".repeat(700)
    })
    .unwrap();
    assert_eq!(budgets.gateway.used(), 700);
    let (tx, _rx) = oneshot::channel();
    let refused = mux.submit(false, Some(&budgets), smallvec::smallvec![tx], |_| {
        "x".repeat(400)
    });
    assert_eq!(
        refused,
        Err(Refused::Memory),
        "700 + 400 is over the 1000 budget"
    );
    assert_eq!(mux.pending_len(), 1, "the refused call left nothing behind");
    let mut frames = Vec::new();
    mux.take(&mut frames, 10, usize::MAX);
    assert_eq!(budgets.gateway.used(), 700, "taken, not yet written");
    frames.clear();
    assert_eq!(
        budgets.gateway.used(),
        0,
        "written: the bytes are given back"
    );
    assert_eq!(budgets.connection.used(), 0);
}
