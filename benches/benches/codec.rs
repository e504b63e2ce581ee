//! Codec micro-benchmark: ns per PUBLISH decoded and encoded (16 B and 1 KiB payloads).
//! CI only compiles it (`cargo bench --no-run`); run with `cargo bench -p shardmq-bench`.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardmq_net::{decode, encode, encode_publish_header, Packet, Protocol, Publish, QoS};

fn publish(size: usize) -> Publish {
    Publish {
        qos: QoS::AtLeastOnce,
        topic: "bench/sensors/42/temperature".into(),
        packet_id: 7,
        payload: Bytes::from(vec![0xAB; size]),
        ..Default::default()
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish");
    g.throughput(Throughput::Elements(1));
    for size in [16usize, 1024] {
        let p = publish(size);
        let mut wire = BytesMut::new();
        encode(&Packet::Publish(p.clone()), Protocol::V311, &mut wire);
        g.bench_with_input(BenchmarkId::new("decode", size), &wire, |b, wire| {
            b.iter(|| decode(black_box(wire), Protocol::V311, u32::MAX).unwrap())
        });
        let mut out = BytesMut::with_capacity(64 * 1024);
        g.bench_with_input(BenchmarkId::new("encode_header", size), &p, |b, p| {
            b.iter(|| {
                if out.len() > 32 * 1024 {
                    out.clear();
                }
                encode_publish_header(black_box(p), Protocol::V311, &mut out)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
