//! Micro-benchmarks of the per-call work that does not touch a socket: rewriting a
//! request, restoring a reply, the pending map under churn, batch split and reassembly,
//! and a WAMP upstream's translation both ways.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rpcgate::jsonrpc::{self, Body};
use rpcgate::upstream::{PendingMap, WampBridge};
use std::hint::black_box;

/// A request whose params are a string of about `size` bytes.
fn request(size: usize) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":"client-7","method":"echo","params":["{}"]}}"#,
        "x".repeat(size)
    )
}

fn reply(size: usize) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":42,"result":["{}"]}}"#,
        "y".repeat(size)
    )
}

fn sizes() -> [(usize, &'static str); 3] {
    [(100, "100B"), (10 * 1024, "10KB"), (1024 * 1024, "1MB")]
}

fn rewrite_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("rewrite_request");
    for (size, label) in sizes() {
        let body = request(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &body, |b, body| {
            b.iter(|| {
                let Ok(Body::Single(Ok(call))) = jsonrpc::parse_body(body.as_bytes(), 100) else {
                    unreachable!("valid request")
                };
                let mut frame = String::with_capacity(call.frame_len_hint());
                call.encode_prefix(&mut frame);
                jsonrpc::finish_frame(&mut frame, Some(black_box(123_456)));
                black_box(frame)
            })
        });
    }
    group.finish();
}

fn restore_reply(c: &mut Criterion) {
    let mut group = c.benchmark_group("restore_reply");
    let client_body = request(10);
    let Ok(Body::Single(Ok(call))) = jsonrpc::parse_body(client_body.as_bytes(), 100) else {
        unreachable!("valid request")
    };
    let client_id = call.id.expect("has id");
    for (size, label) in sizes() {
        let frame = reply(size);
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &frame, |b, frame| {
            b.iter(|| {
                let mut out = Vec::new();
                jsonrpc::read_upstream(frame, |m| {
                    let jsonrpc::Message::Reply(_, outcome) = m else {
                        return;
                    };
                    let payload = outcome.payload().map_or("null", |p| p.get());
                    out.reserve(payload.len() + 64);
                    jsonrpc::write_reply(&mut out, client_id, outcome.is_error(), payload);
                });
                black_box(out)
            })
        });
    }
    group.finish();
}

fn pending_churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("pending_map");
    for live in [100usize, 10_000] {
        group.bench_function(BenchmarkId::new("insert_remove_with_live", live), |b| {
            let mut map = PendingMap::default();
            map.open();
            let mut ids: std::collections::VecDeque<u64> =
                (0..live).map(|i| map.insert(i).expect("open")).collect();
            b.iter(|| {
                let id = map.insert(black_box(1)).expect("open");
                ids.push_back(id);
                let old = ids.pop_front().expect("non-empty");
                black_box(map.remove(old))
            })
        });
    }
    group.finish();
}

fn batch_split_and_reassemble(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch");
    for n in [10usize, 100] {
        let elements: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"echo","params":[{i}]}}"#))
            .collect();
        let body = format!("[{}]", elements.join(","));
        let replies: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{},"result":[{i}]}}"#, 1000 + i))
            .collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let Ok(Body::Batch(entries)) = jsonrpc::parse_body(body.as_bytes(), 1000) else {
                    unreachable!("valid batch")
                };
                let mut frames = Vec::with_capacity(n);
                for (i, entry) in entries.iter().enumerate() {
                    let call = entry.as_ref().expect("valid element");
                    let mut frame = String::with_capacity(call.frame_len_hint());
                    call.encode_prefix(&mut frame);
                    jsonrpc::finish_frame(&mut frame, Some(1000 + i as u64));
                    frames.push(frame);
                }
                let mut out = Vec::with_capacity(n * 48);
                out.push(b'[');
                for (i, (entry, text)) in entries.iter().zip(&replies).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let id = entry.as_ref().expect("valid").id.expect("has id");
                    jsonrpc::read_upstream(text, |m| {
                        let jsonrpc::Message::Reply(_, o) = m else {
                            return;
                        };
                        jsonrpc::write_reply(
                            &mut out,
                            id,
                            o.is_error(),
                            o.payload().map_or("null", |p| p.get()),
                        )
                    });
                }
                out.push(b']');
                black_box((frames, out))
            })
        });
    }
    group.finish();
}

/// What a WAMP upstream adds per call on top of `rewrite_request` and `restore_reply`:
/// the queued JSON-RPC frame read again and written as CALL, and the RESULT written as
/// the JSON-RPC reply the multiplexer then reads like any other.
fn wamp_bridge(c: &mut Criterion) {
    let mut group = c.benchmark_group("wamp_bridge");
    for (size, label) in sizes() {
        let frame = format!(
            r#"{{"jsonrpc":"2.0","method":"echo","params":["{}"],"id":42}}"#,
            "x".repeat(size)
        );
        let result = format!(r#"[50,42,{{}},["{}"]]"#, "y".repeat(size));
        group.throughput(Throughput::Bytes((frame.len() + result.len()) as u64));
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            let mut bridge = WampBridge::new("");
            b.iter(|| black_box(bridge.round_trip(&frame, &result)))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    rewrite_request,
    restore_reply,
    pending_churn,
    batch_split_and_reassemble,
    wamp_bridge
);
criterion_main!(benches);
