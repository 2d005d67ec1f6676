//! Frame encoding/decoding cost, the per-message work of both ends.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tether_benches::payload::make_payload;
use tether_transport::protocol::{
    ClientId, Epoch, Frame, Hello, InstanceId, Message, Offset, Payload, SessionId,
};

fn hello() -> Frame {
    Frame::Hello(Hello {
        v: 1,
        client_id: ClientId::random(),
        token: Some("token".into()),
        resume: Some(SessionId::random()),
        instance: Some(InstanceId::random()),
    })
}

fn bench(c: &mut Criterion) {
    let frame = hello();
    let text = frame.encode();
    c.bench_function("encode hello", |b| b.iter(|| black_box(&frame).encode()));
    c.bench_function("decode hello", |b| {
        b.iter(|| Frame::decode(black_box(&text), 1 << 20).unwrap())
    });
    for size in [64usize, 1024] {
        let body = format!("\"{}\"", "x".repeat(size - 2));
        let message = Frame::Message(Message {
            channel: "room".into(),
            epoch: Epoch::random(),
            offset: Offset(12345),
            payload: Payload::from_json(&body).unwrap(),
        });
        let text = message.encode();
        c.bench_function(&format!("encode message {size} B"), |b| {
            b.iter(|| black_box(&message).encode())
        });
        c.bench_function(
            &format!("decode message {size} B (payload stays raw)"),
            |b| b.iter(|| Frame::decode(black_box(&text), 1 << 20).unwrap()),
        );
        // What a client pays to publish JSON text it holds (the e2e benchmark's payloads).
        let json = Payload::from_bytes(make_payload(size, 1_700_000_000)).bytes();
        c.bench_function(&format!("check JSON payload {size} B"), |b| {
            b.iter(|| Payload::from_json_bytes(black_box(&json).clone()).unwrap())
        });
    }
    c.bench_function("reject malformed", |b| {
        b.iter(|| Frame::decode(black_box(r#"{"type":"nope","x":1}"#), 1 << 20).unwrap_err())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
