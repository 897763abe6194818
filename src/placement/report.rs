//! What a ring does with keys: each shard's share against its weight. Printed by `chitram ring`.

use std::fmt::Write;

use super::ring::{Ring, key_hash};

/// Keys hashed to measure the simulated share (deterministic: keys are `0..SAMPLE_KEYS`).
pub const SAMPLE_KEYS: u64 = 1_000_000;

/// One shard's line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardShare {
    pub name: String,
    pub weight: u32,
    pub vnodes: usize,
    /// Weight over total weight: the share the shard should get.
    pub expected: f64,
    /// The fraction of the hash space its tokens own.
    pub owned: f64,
    /// The fraction of `SAMPLE_KEYS` sample keys whose primary it is.
    pub simulated: f64,
}

pub fn shard_shares(ring: &Ring, sample_keys: u64) -> Vec<ShardShare> {
    let total_weight: u64 = ring.members().iter().map(|m| u64::from(m.weight)).sum();
    let mut primaries = vec![0u64; ring.members().len()];
    for key in 0..sample_keys {
        primaries[ring.primary(key_hash(&key.to_le_bytes()))] += 1;
    }
    let owned = ring.ownership();
    ring.members()
        .iter()
        .enumerate()
        .map(|(i, member)| ShardShare {
            name: member.name.clone(),
            weight: member.weight,
            vnodes: (member.weight * ring.vnodes_per_weight()) as usize,
            expected: f64::from(member.weight) / total_weight as f64,
            owned: owned[i],
            simulated: primaries[i] as f64 / sample_keys as f64,
        })
        .collect()
}

/// The largest ratio of a shard's simulated share to its expected share (1.0 is perfect).
pub fn peak_to_mean(shares: &[ShardShare]) -> f64 {
    shares.iter().filter(|s| s.expected > 0.0).map(|s| s.simulated / s.expected).fold(0.0, f64::max)
}

pub fn ring_report(ring: &Ring) -> String {
    let shares = shard_shares(ring, SAMPLE_KEYS);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} shards, {} tokens ({} per unit of weight)",
        shares.len(),
        ring.token_count(),
        ring.vnodes_per_weight()
    );
    let _ = writeln!(
        out,
        "{:<20} {:>6} {:>7} {:>9} {:>9} {:>9}",
        "shard", "weight", "vnodes", "expected", "owned", "simulated"
    );
    for s in &shares {
        let _ = writeln!(
            out,
            "{:<20} {:>6} {:>7} {:>8.2}% {:>8.2}% {:>8.2}%",
            s.name,
            s.weight,
            s.vnodes,
            s.expected * 100.0,
            s.owned * 100.0,
            s.simulated * 100.0
        );
    }
    let _ = writeln!(out, "peak-to-mean over {SAMPLE_KEYS} keys: {:.3}", peak_to_mean(&shares));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::ring::RingMember;

    #[test]
    fn shares_follow_weights_and_sum_to_one() {
        let ring = Ring::new(
            vec![RingMember { name: "a".into(), weight: 1 }, RingMember { name: "b".into(), weight: 3 }],
            512,
        )
        .unwrap();
        let shares = shard_shares(&ring, 100_000);
        assert_eq!(shares[1].expected, 0.75);
        assert!((shares.iter().map(|s| s.simulated).sum::<f64>() - 1.0).abs() < 1e-9);
        assert!((shares[1].simulated - 0.75).abs() < 0.03);
        assert!(peak_to_mean(&shares) >= 1.0);
    }
}
