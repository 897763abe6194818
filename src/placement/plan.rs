//! What a change of ring moves: the diff between two rings, over hypothetical keys (the
//! expected movement) or over the blobs the metadata records (the exact plan).

use std::collections::BTreeMap;

use super::ring::{Ring, key_hash};

/// Where one copy has to go: from a shard it leaves to a shard it joins. `from` is `None`
/// when the copy is new (the blob was below its replication factor).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Move {
    pub from: Option<String>,
    pub to: String,
}

/// Pairs the shards a blob leaves with those it joins, in order, so each move names a source
/// that is being given up. `holders` are the shards holding a stored copy now, `wanted` the new
/// write set.
pub fn moves_for(holders: &[&str], wanted: &[&str]) -> Vec<Move> {
    let mut leaving = holders.iter().filter(|shard| !wanted.contains(shard));
    wanted
        .iter()
        .filter(|shard| !holders.contains(shard))
        .map(|to| Move { from: leaving.next().map(|from| (*from).to_owned()), to: (*to).to_owned() })
        .collect()
}

/// How keys move between two rings: per (from, to) pair, the fraction of keys whose write set
/// gains `to` and gives up `from`.
#[derive(Debug, Clone, PartialEq)]
pub struct MovementEstimate {
    pub sample_keys: u64,
    pub pairs: BTreeMap<Move, f64>,
    /// The fraction of keys with at least one copy moving.
    pub keys_moving: f64,
    /// The least fraction any ring change with these weights could move: the total increase
    /// of the shards whose share grows.
    pub ideal: f64,
}

/// Estimates movement over `sample_keys` keys (`0..sample_keys`, hashed like blob keys).
pub fn estimate_movement(old: &Ring, new: &Ring, replication_factor: usize, sample_keys: u64) -> MovementEstimate {
    let mut pairs: BTreeMap<Move, u64> = BTreeMap::new();
    let mut keys_moving = 0u64;
    for key in 0..sample_keys {
        let hash = key_hash(&key.to_le_bytes());
        let before = write_set_names(old, hash, replication_factor);
        let after = write_set_names(new, hash, replication_factor);
        let moves = moves_for(&before, &after);
        if !moves.is_empty() {
            keys_moving += 1;
        }
        for step in moves {
            *pairs.entry(step).or_default() += 1;
        }
    }
    let fraction = |count: u64| count as f64 / sample_keys as f64;
    MovementEstimate {
        sample_keys,
        pairs: pairs.into_iter().map(|(step, count)| (step, fraction(count))).collect(),
        keys_moving: fraction(keys_moving),
        ideal: ideal_movement(old, new),
    }
}

/// The write set of a hash, as shard names.
pub fn write_set_names(ring: &Ring, hash: u64, replication_factor: usize) -> Vec<&str> {
    ring.preference_list(hash).take(replication_factor).map(|i| ring.members()[i].name.as_str()).collect()
}

/// Sum over shards of the growth of their weight share: what must move at the least.
fn ideal_movement(old: &Ring, new: &Ring) -> f64 {
    let share = |ring: &Ring, name: &str| {
        let total: u64 = ring.members().iter().map(|m| u64::from(m.weight)).sum();
        let weight = ring.members().iter().find(|m| m.name == name).map_or(0, |m| m.weight);
        f64::from(weight) / total as f64
    };
    new.members().iter().map(|m| (share(new, &m.name) - share(old, &m.name)).max(0.0)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::ring::RingMember;

    fn ring(names: &[&str]) -> Ring {
        Ring::new(names.iter().map(|n| RingMember { name: (*n).to_owned(), weight: 1 }).collect(), 256).unwrap()
    }

    #[test]
    fn moves_pair_leaving_shards_with_joining_ones() {
        assert_eq!(moves_for(&["a", "b"], &["a", "b"]), vec![]);
        assert_eq!(moves_for(&["a", "b"], &["a", "d"]), vec![Move { from: Some("b".into()), to: "d".into() }]);
        assert_eq!(moves_for(&["a"], &["a", "c"]), vec![Move { from: None, to: "c".into() }]);
    }

    #[test]
    fn adding_a_fourth_shard_moves_about_a_quarter_all_onto_it() {
        let estimate = estimate_movement(&ring(&["a", "b", "c"]), &ring(&["a", "b", "c", "d"]), 1, 100_000);
        assert!((estimate.ideal - 0.25).abs() < 1e-9);
        assert!((estimate.keys_moving - 0.25).abs() < 0.03, "{}", estimate.keys_moving);
        assert!(estimate.pairs.keys().all(|step| step.to == "d"));
    }

    #[test]
    fn with_two_copies_only_the_newcomer_gains() {
        let estimate = estimate_movement(&ring(&["a", "b", "c"]), &ring(&["a", "b", "c", "d"]), 2, 50_000);
        assert!(estimate.pairs.keys().all(|step| step.to == "d" && step.from.is_some()));
    }
}
