//! Route index micro-benchmark: matches per second against 1M filters (90% exact, 10% with a
//! wildcard), the shape of the route replica every shard holds. CI only compiles it.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use shardmq_shards::topic_index::TopicIndex;

fn build(n: usize) -> TopicIndex<u64> {
    let mut idx = TopicIndex::default();
    for i in 0..n {
        let f = if i % 10 == 0 {
            format!("site/{}/+/temp", i % 5000)
        } else {
            format!("site/{}/dev/{i}", i % 5000)
        };
        *idx.get_or_insert_with(&f, || 0) += 1;
    }
    idx
}

fn route_index(c: &mut Criterion) {
    let idx = build(1_000_000);
    let topics: Vec<String> = (0..1024)
        .map(|i| format!("site/{}/dev/{}", (i * 7) % 5000, i * 977))
        .collect();
    let mut g = c.benchmark_group("route_index_1M");
    g.throughput(Throughput::Elements(topics.len() as u64));
    g.bench_function("match", |b| {
        b.iter(|| {
            let mut hits = 0u64;
            for t in &topics {
                idx.for_each_match(black_box(t), |v| hits += *v);
            }
            hits
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = route_index
}
criterion_main!(benches);
