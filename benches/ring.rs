//! Lookup and build cost of the placement ring, against the `hashring` crate, jump consistent
//! hashing and rendezvous hashing, in one run.
//!
//! `cargo bench --bench ring` (about three minutes); filter with e.g.
//! `cargo bench --bench ring -- 'lookup/chitram_primary'`.
//!
//! Every lookup includes hashing the key: a 64-character hex blob key, as the router hashes it.
//! Keys cycle through 4096 distinct ones, so the binary search meets a realistic mix of cached
//! and uncached tokens rather than one hot path.

#[path = "support/baselines.rs"]
mod baselines;

use std::hint::black_box;
use std::time::Duration;

use baselines::{Rendezvous, blob_keys, hashring_ring, jump, shard_names};
use chitram::placement::ring::{Ring, RingMember, key_hash};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};

const SHARDS: [usize; 4] = [3, 8, 32, 128];
const VNODES: [u32; 4] = [16, 256, 1024, 4096];
const KEYS: usize = 4096;

fn members(shards: usize) -> Vec<RingMember> {
    shard_names(shards).into_iter().map(|name| RingMember { name, weight: 1 }).collect()
}

fn id(shards: usize, vnodes: u32) -> BenchmarkId {
    BenchmarkId::from_parameter(format!("{shards}x{vnodes}"))
}

/// Runs `lookup` over the key set in turn, one key per iteration.
fn cycle<'k, R>(keys: &'k [String], mut lookup: impl FnMut(&'k str) -> R) -> impl FnMut() -> R {
    let mut next = 0usize;
    move || {
        let key = &keys[next % KEYS];
        next = next.wrapping_add(1);
        lookup(key)
    }
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(200));
    for shards in SHARDS {
        for vnodes in VNODES {
            let members = members(shards);
            group.throughput(Throughput::Elements(shards as u64 * u64::from(vnodes)));
            group.bench_with_input(id(shards, vnodes), &members, |b, members| {
                b.iter(|| Ring::new(black_box(members.clone()), vnodes).unwrap())
            });
        }
    }
    group.finish();
}

fn lookup(c: &mut Criterion) {
    let keys = blob_keys(KEYS);
    let mut group = c.benchmark_group("lookup");
    group.bench_function("key_hash_only", |b| b.iter(cycle(&keys, |key| key_hash(black_box(key).as_bytes()))));
    for shards in SHARDS {
        for vnodes in VNODES {
            let ring = Ring::new(members(shards), vnodes).unwrap();
            let p = format!("{shards}x{vnodes}");
            group.bench_function(BenchmarkId::new("chitram_primary", &p), |b| {
                b.iter(cycle(&keys, |key| ring.primary(key_hash(key.as_bytes()))))
            });
            // What a write uses: the first RF distinct shards (RF = 2, the default).
            group.bench_function(BenchmarkId::new("chitram_preference_rf2", &p), |b| {
                b.iter(cycle(&keys, |key| ring.preference_list(key_hash(key.as_bytes())).take(2).fold(0, |a, s| a ^ s)))
            });
            // Every shard, in order: the longest list a failing-over read can walk.
            group.bench_function(BenchmarkId::new("chitram_preference_all_shards", &p), |b| {
                b.iter(cycle(&keys, |key| {
                    ring.preference_list(key_hash(key.as_bytes())).take(shards).fold(0, |a, s| a ^ s)
                }))
            });
            // Driving the iterator until it returns None, as `for shard in list` does when no
            // shard has the blob: today it walks every remaining token after the last shard.
            group.bench_function(BenchmarkId::new("chitram_preference_exhausted", &p), |b| {
                b.iter(cycle(&keys, |key| ring.preference_list(key_hash(key.as_bytes())).fold(0, |a, s| a ^ s)))
            });

            let hashring = hashring_ring(shards, vnodes);
            group.bench_function(BenchmarkId::new("hashring_get", &p), |b| {
                b.iter(cycle(&keys, |key| *hashring.get(&key).unwrap()))
            });
            // One replica after the primary: two consecutive tokens (often the same shard), and
            // the crate clones its whole token vector on every call.
            group.bench_function(BenchmarkId::new("hashring_get_with_replicas_1", &p), |b| {
                b.iter(cycle(&keys, |key| hashring.get_with_replicas(&key, 1).unwrap()))
            });
        }
    }
    for shards in SHARDS {
        let p = shards;
        group.bench_function(BenchmarkId::new("jump_primary", p), |b| {
            b.iter(cycle(&keys, |key| jump(key_hash(key.as_bytes()), shards as u32)))
        });
        let hrw = Rendezvous::new(&shard_names(shards));
        group.bench_function(BenchmarkId::new("rendezvous_primary", p), |b| {
            b.iter(cycle(&keys, |key| hrw.primary(key_hash(key.as_bytes()))))
        });
        group.bench_function(BenchmarkId::new("rendezvous_rf2", p), |b| {
            b.iter(cycle(&keys, |key| hrw.top::<2>(key_hash(key.as_bytes()))))
        });
        let mut scratch = [(0u64, 0u16); 256];
        group.bench_function(BenchmarkId::new("rendezvous_all_shards", p), |b| {
            b.iter(cycle(&keys, |key| {
                let n = hrw.full_list(key_hash(key.as_bytes()), &mut scratch);
                scratch[n - 1].1
            }))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(700))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = build, lookup
}
criterion_main!(benches);
