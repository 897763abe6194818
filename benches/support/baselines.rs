//! Placement schemes Chitram's ring is measured against, hashed with xxh3 like the ring.
//!
//! - Jump consistent hash (Lamping and Veach, 2014): no memory, perfect balance, but buckets are
//!   numbered 0..n, so only the last one can be removed without renumbering the others, and it
//!   has no weights and no list of replicas of its own.
//! - Rendezvous (highest random weight) hashing: every shard scores every key, the best score
//!   wins; the preference list is the shards sorted by score. O(n) per lookup, no tokens.
//! - The `hashring` crate over per-vnode node values, as its documentation suggests.

// Each bench uses its own part of this module.
#![allow(dead_code)]

use xxhash_rust::xxh3::{Xxh3Builder, xxh3_64, xxh3_64_with_seed};

/// Jump consistent hash: the bucket in `0..buckets` of a 64-bit key hash.
pub fn jump(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// Rendezvous hashing over named shards (equal weights). A shard's seed is the xxh3 of its name;
/// its score for a key is xxh3 of the key's 64-bit hash, seeded with the shard's seed.
pub struct Rendezvous {
    seeds: Vec<u64>,
}

impl Rendezvous {
    pub fn new<S: AsRef<str>>(names: &[S]) -> Self {
        Self { seeds: names.iter().map(|name| xxh3_64(name.as_ref().as_bytes())).collect() }
    }

    fn score(&self, hash: u64, shard: usize) -> u64 {
        xxh3_64_with_seed(&hash.to_le_bytes(), self.seeds[shard])
    }

    /// The shard with the highest score.
    pub fn primary(&self, hash: u64) -> usize {
        let mut best = (0u64, 0usize);
        for shard in 0..self.seeds.len() {
            let score = self.score(hash, shard);
            if score >= best.0 {
                best = (score, shard);
            }
        }
        best.1
    }

    /// The `K` best shards, best first (K ≤ number of shards), without allocating.
    pub fn top<const K: usize>(&self, hash: u64) -> [usize; K] {
        let mut best = [(0u64, usize::MAX); K];
        for shard in 0..self.seeds.len() {
            let score = self.score(hash, shard);
            if best[K - 1].1 != usize::MAX && score < best[K - 1].0 {
                continue;
            }
            // Insertion into the small sorted array.
            let mut at = K - 1;
            while at > 0 && (best[at - 1].1 == usize::MAX || best[at - 1].0 < score) {
                best[at] = best[at - 1];
                at -= 1;
            }
            best[at] = (score, shard);
        }
        best.map(|(_, shard)| shard)
    }

    /// Every shard, best first: scores sorted in a stack buffer (at most 256 shards).
    pub fn full_list(&self, hash: u64, out: &mut [(u64, u16); 256]) -> usize {
        let n = self.seeds.len();
        for (shard, slot) in out.iter_mut().enumerate().take(n) {
            *slot = (self.score(hash, shard), shard as u16);
        }
        out[..n].sort_unstable_by(|a, b| b.cmp(a));
        n
    }
}

/// A value the `hashring` crate places on its ring: one per virtual node.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct VNode {
    pub shard: u16,
    pub index: u32,
}

/// A `hashring` ring of `shards × vnodes` node values, hashed with xxh3.
pub fn hashring_ring(shards: usize, vnodes: u32) -> hashring::HashRing<VNode, Xxh3Builder> {
    let mut ring = hashring::HashRing::with_hasher(Xxh3Builder::new());
    let nodes =
        (0..shards).flat_map(|shard| (0..vnodes).map(move |index| VNode { shard: shard as u16, index })).collect();
    ring.batch_add(nodes);
    ring
}

/// Keys shaped like Chitram's blob keys: 64 lowercase hex characters (a SHA-256).
pub fn blob_keys(count: usize) -> Vec<String> {
    (0..count as u64)
        .map(|i| (0..4u64).map(|part| format!("{:016x}", xxh3_64(&(i * 4 + part).to_le_bytes()))).collect())
        .collect()
}

/// Shard names as an operator might write them.
pub fn shard_names(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("shard-{i}")).collect()
}
