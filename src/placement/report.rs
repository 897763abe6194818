//! What a ring does with keys: each shard's share against its weight, how evenly the load
//! spreads compared with what random tokens predict, and what adding or removing a shard would
//! move. Printed by `chitram ring`; `cargo bench --bench distribution` prints the same figures
//! across shard counts and vnode counts (BENCHMARKS.md).

use std::fmt::Write;

use super::ring::{Ring, RingError, RingMember, key_hash};

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

/// How unevenly the load spreads: the standard deviation, over the shards with a weight, of
/// simulated share / expected share (0 is perfect; 0.05 means a typical shard is 5% off).
pub fn coefficient_of_variation(shares: &[ShardShare]) -> f64 {
    let ratios: Vec<f64> = shares.iter().filter(|s| s.expected > 0.0).map(|s| s.simulated / s.expected).collect();
    if ratios.is_empty() {
        return 0.0;
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    (ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / ratios.len() as f64).sqrt()
}

/// The coefficient of variation that tokens at random positions predict for this ring's
/// hash-space shares. A shard of weight `w` out of `W` holds `w·v` of the `W·v` tokens; its
/// share then follows Beta(w·v, (W−w)·v), whose relative standard deviation is about
/// sqrt((1 − w/W) / (w·v)): roughly 1/sqrt(tokens of the shard). Averaged over the shards.
pub fn random_token_spread(ring: &Ring) -> f64 {
    let total: f64 = ring.members().iter().map(|m| f64::from(m.weight)).sum();
    let vnodes = f64::from(ring.vnodes_per_weight());
    let variances: Vec<f64> = ring
        .members()
        .iter()
        .filter(|m| m.weight > 0)
        .map(|m| {
            let (w, total_tokens) = (f64::from(m.weight), total * vnodes);
            (1.0 - w / total) / (w * vnodes) * total_tokens / (total_tokens + 1.0)
        })
        .collect();
    (variances.iter().sum::<f64>() / variances.len().max(1) as f64).sqrt()
}

/// The coefficient of variation that counting `sample_keys` keys adds on its own (a perfectly
/// balanced ring still shows it): sqrt of the mean of (1 − e) / (K·e).
pub fn sampling_spread(shares: &[ShardShare], sample_keys: u64) -> f64 {
    let variances: Vec<f64> = shares
        .iter()
        .filter(|s| s.expected > 0.0)
        .map(|s| (1.0 - s.expected) / (sample_keys as f64 * s.expected))
        .collect();
    (variances.iter().sum::<f64>() / variances.len().max(1) as f64).sqrt()
}

/// What adding one shard does to the primaries of the sample keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Movement {
    /// The name the hypothetical shard was given.
    pub newcomer: String,
    pub weight: u32,
    /// The fraction of keys whose primary changes.
    pub moved: f64,
    /// The least that must move: the newcomer's share of the weight, `w / (W + w)`.
    pub ideal: f64,
    /// The fraction of keys that change primary between two existing shards (0 for a
    /// consistent-hash ring: every moving key goes to the newcomer).
    pub between_existing: f64,
}

/// Simulates adding a shard of `weight` to `ring` over `sample_keys` keys.
pub fn movement_on_add(ring: &Ring, weight: u32, sample_keys: u64) -> Result<Movement, RingError> {
    let members = ring.members();
    let mut newcomer = "new-shard".to_owned();
    while members.iter().any(|m| m.name == newcomer) {
        newcomer.push('+');
    }
    let mut grown: Vec<RingMember> = members.to_vec();
    grown.push(RingMember { name: newcomer.clone(), weight });
    let after = Ring::new(grown, ring.vnodes_per_weight())?;
    let new_index = members.len();
    let (mut moved, mut between) = (0u64, 0u64);
    for key in 0..sample_keys {
        let hash = key_hash(&key.to_le_bytes());
        let (old, new) = (ring.primary(hash), after.primary(hash));
        if old != new {
            moved += 1;
            if new != new_index {
                between += 1;
            }
        }
    }
    let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
    Ok(Movement {
        newcomer,
        weight,
        moved: moved as f64 / sample_keys as f64,
        ideal: f64::from(weight) / (total + u64::from(weight)) as f64,
        between_existing: between as f64 / sample_keys as f64,
    })
}

/// The weight a new shard most likely gets: the most common weight of the current shards.
fn typical_weight(ring: &Ring) -> u32 {
    let weights: Vec<u32> = ring.members().iter().map(|m| m.weight).filter(|&w| w > 0).collect();
    weights
        .iter()
        .copied()
        .max_by_key(|w| (weights.iter().filter(|x| *x == w).count(), std::cmp::Reverse(*w)))
        .unwrap_or(1)
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
    let _ = writeln!(
        out,
        "coefficient of variation: {:.2}% (random tokens predict {:.2}%, about 1/sqrt(tokens per shard); \
         counting {SAMPLE_KEYS} keys adds {:.2}%)",
        coefficient_of_variation(&shares) * 100.0,
        random_token_spread(ring) * 100.0,
        sampling_spread(&shares, SAMPLE_KEYS) * 100.0
    );
    match movement_on_add(ring, typical_weight(ring), SAMPLE_KEYS) {
        Ok(movement) => {
            let _ = writeln!(
                out,
                "adding a shard of weight {} would move {:.2}% of the keys (ideal {:.2}%), {:.2}% between existing shards",
                movement.weight,
                movement.moved * 100.0,
                movement.ideal * 100.0,
                movement.between_existing * 100.0
            );
        }
        Err(error) => {
            let _ = writeln!(out, "adding a shard: not possible ({error})");
        }
    }
    let weighted: Vec<&ShardShare> = shares.iter().filter(|s| s.expected > 0.0).collect();
    let least = weighted.iter().min_by(|a, b| a.simulated.total_cmp(&b.simulated));
    let most = weighted.iter().max_by(|a, b| a.simulated.total_cmp(&b.simulated));
    if let (Some(least), Some(most)) = (least, most) {
        let _ = writeln!(
            out,
            "removing a shard moves only its own keys: from {:.2}% ({}) to {:.2}% ({}); ideal: its expected share",
            least.simulated * 100.0,
            least.name,
            most.simulated * 100.0,
            most.name
        );
    }
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

    fn share(expected: f64, simulated: f64) -> ShardShare {
        ShardShare { name: "s".into(), weight: 1, vnodes: 1, expected, owned: expected, simulated }
    }

    #[test]
    fn coefficient_of_variation_measures_spread_around_the_expected_shares() {
        assert_eq!(coefficient_of_variation(&[share(0.5, 0.5), share(0.5, 0.5)]), 0.0);
        // Ratios 1.1 and 0.9: one standard deviation of 0.1.
        let cv = coefficient_of_variation(&[share(0.5, 0.55), share(0.5, 0.45)]);
        assert!((cv - 0.1).abs() < 1e-9, "{cv}");
        // Shards without weight do not count.
        assert_eq!(coefficient_of_variation(&[share(1.0, 1.0), share(0.0, 0.0)]), 0.0);
    }

    #[test]
    fn random_token_spread_is_about_one_over_sqrt_vnodes() {
        let members = (0..16).map(|i| RingMember { name: format!("s{i}"), weight: 1 }).collect();
        let spread = random_token_spread(&Ring::new(members, 256).unwrap());
        // sqrt(15/16 / 256) = 0.0605
        assert!((spread - 0.0605).abs() < 0.001, "{spread}");
    }

    #[test]
    fn adding_a_shard_moves_about_its_share_and_only_onto_it() {
        let members = (0..4).map(|i| RingMember { name: format!("s{i}"), weight: 1 }).collect();
        let ring = Ring::new(members, 256).unwrap();
        let movement = movement_on_add(&ring, 1, 100_000).unwrap();
        assert_eq!(movement.ideal, 0.2);
        assert!((movement.moved - 0.2).abs() < 0.05, "{}", movement.moved);
        assert_eq!(movement.between_existing, 0.0);
        assert_eq!(movement.newcomer, "new-shard");
    }

    #[test]
    fn the_report_shows_spread_and_movement() {
        let members = vec![
            RingMember { name: "a".into(), weight: 1 },
            RingMember { name: "b".into(), weight: 1 },
            RingMember { name: "c".into(), weight: 2 },
        ];
        let report = ring_report(&Ring::new(members, 64).unwrap());
        assert!(report.contains("coefficient of variation"), "{report}");
        assert!(report.contains("adding a shard of weight 1 would move"), "{report}");
        assert!(report.contains("ideal 20.00%"), "{report}");
        assert!(report.contains("removing a shard moves only its own keys"), "{report}");
    }
}
