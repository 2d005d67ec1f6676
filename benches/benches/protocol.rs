//! Frame encoding/decoding cost, the per-message work of both ends.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tether_transport::protocol::{ClientId, Frame, Hello, SessionId};

fn hello() -> Frame {
    Frame::Hello(Hello {
        v: 1,
        client_id: ClientId::random(),
        token: Some("token".into()),
        resume: Some(SessionId::random()),
    })
}

fn bench(c: &mut Criterion) {
    let frame = hello();
    let text = frame.encode();
    c.bench_function("encode hello", |b| b.iter(|| black_box(&frame).encode()));
    c.bench_function("decode hello", |b| {
        b.iter(|| Frame::decode(black_box(&text), 1 << 20).unwrap())
    });
    c.bench_function("reject malformed", |b| {
        b.iter(|| Frame::decode(black_box(r#"{"type":"nope","x":1}"#), 1 << 20).unwrap_err())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
