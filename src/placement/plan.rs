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
/// gains `to` and gives up `from`. Two measures, each beside its own ideal: keys (blobs) with
/// at least one copy moving, and copies moving out of all copies. With one copy per key they
/// are the same; with two, adding a fourth shard to three moves a copy of about half the keys,
/// which is a quarter of the copies.
#[derive(Debug, Clone, PartialEq)]
pub struct MovementEstimate {
    pub sample_keys: u64,
    pub replication_factor: usize,
    pub pairs: BTreeMap<Move, f64>,
    /// The fraction of keys with at least one copy moving.
    pub keys_moving: f64,
    /// The least `keys_moving` these weights allow: [`ideal_movement`]'s `keys`.
    pub ideal_keys: f64,
    /// Copies moving (or made), as a fraction of all `sample_keys × replication_factor` copies.
    pub copies_moving: f64,
    /// The least `copies_moving` these weights allow: [`ideal_movement`]'s `copies`.
    pub ideal_copies: f64,
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
    let copies_moving = pairs.values().sum::<u64>() as f64 / (sample_keys as f64 * replication_factor as f64);
    let ideal = ideal_movement(old, new, replication_factor);
    MovementEstimate {
        sample_keys,
        replication_factor,
        pairs: pairs.into_iter().map(|(step, count)| (step, fraction(count))).collect(),
        keys_moving: fraction(keys_moving),
        ideal_keys: ideal.keys,
        copies_moving,
        ideal_copies: ideal.copies,
    }
}

/// The write set of a hash, as shard names.
pub fn write_set_names(ring: &Ring, hash: u64, replication_factor: usize) -> Vec<&str> {
    ring.preference_list(hash).take(replication_factor).map(|i| ring.members()[i].name.as_str()).collect()
}

/// The least movement a change of ring can cause, as fractions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdealMovement {
    /// Of the keys: each key that gains a shard moves at least one copy, so at least the
    /// total coverage gained must move (capped at every key).
    pub keys: f64,
    /// Of the copies: the coverage gained, over `replication_factor` copies per key.
    pub copies: f64,
}

/// What must move at the least when `old` becomes `new`, with `replication_factor` copies of
/// each key on distinct shards. A shard's *coverage* is the fraction of keys it holds a copy
/// of ([`coverage`]); every point of coverage a shard gains is a copy that has to arrive there.
pub fn ideal_movement(old: &Ring, new: &Ring, replication_factor: usize) -> IdealMovement {
    let (before, after) = (coverage(old, replication_factor), coverage(new, replication_factor));
    let gained: f64 = new
        .members()
        .iter()
        .zip(&after)
        .map(|(member, now)| {
            let was = old.members().iter().position(|m| m.name == member.name).map_or(0.0, |i| before[i]);
            (now - was).max(0.0)
        })
        .sum();
    IdealMovement { keys: gained.min(1.0), copies: gained / replication_factor.max(1) as f64 }
}

/// Each member's ideal coverage: the fraction of keys it holds one of their
/// `replication_factor` copies of. Proportional to weight (`rf · w / W`), except that no shard
/// can hold a copy of more than every key: a shard that would is capped at 1, and the copies it
/// cannot take spread over the others by weight.
pub fn coverage(ring: &Ring, replication_factor: usize) -> Vec<f64> {
    let weights: Vec<f64> = ring.members().iter().map(|m| f64::from(m.weight)).collect();
    let mut capped = vec![false; weights.len()];
    loop {
        let free_weight: f64 = weights.iter().zip(&capped).filter(|(_, c)| !**c).map(|(w, _)| w).sum();
        let free_copies = replication_factor as f64 - capped.iter().filter(|c| **c).count() as f64;
        let share = |w: f64| if free_weight > 0.0 { free_copies * w / free_weight } else { 0.0 };
        let over: Vec<usize> = (0..weights.len()).filter(|&i| !capped[i] && share(weights[i]) > 1.0).collect();
        if over.is_empty() {
            return weights.iter().zip(&capped).map(|(w, c)| if *c { 1.0 } else { share(*w) }).collect();
        }
        for i in over {
            capped[i] = true;
        }
    }
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

    fn weighted(members: &[(&str, u32)]) -> Ring {
        Ring::new(members.iter().map(|(n, w)| RingMember { name: (*n).to_owned(), weight: *w }).collect(), 256).unwrap()
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-9
    }

    #[test]
    fn adding_a_fourth_shard_moves_about_a_quarter_all_onto_it() {
        let estimate = estimate_movement(&ring(&["a", "b", "c"]), &ring(&["a", "b", "c", "d"]), 1, 100_000);
        assert!(close(estimate.ideal_keys, 0.25) && close(estimate.ideal_copies, 0.25));
        assert!((estimate.keys_moving - 0.25).abs() < 0.03, "{}", estimate.keys_moving);
        assert!((estimate.copies_moving - estimate.keys_moving).abs() < 1e-9, "one copy: keys and copies agree");
        assert!(estimate.pairs.keys().all(|step| step.to == "d"));
    }

    #[test]
    fn with_two_copies_half_the_keys_move_a_quarter_of_the_copies() {
        let estimate = estimate_movement(&ring(&["a", "b", "c"]), &ring(&["a", "b", "c", "d"]), 2, 50_000);
        assert!(close(estimate.ideal_keys, 0.5), "{}", estimate.ideal_keys);
        assert!(close(estimate.ideal_copies, 0.25), "{}", estimate.ideal_copies);
        assert!((estimate.keys_moving - 0.5).abs() < 0.03, "{}", estimate.keys_moving);
        assert!((estimate.copies_moving - 0.25).abs() < 0.015, "{}", estimate.copies_moving);
        assert!(estimate.pairs.keys().all(|step| step.to == "d" && step.from.is_some()));
    }

    #[test]
    fn ideal_movement_follows_coverage() {
        let three = ring(&["a", "b", "c"]);
        // One copy: a newcomer of weight 1 among 1+1+1 takes a quarter of everything.
        let one = ideal_movement(&three, &ring(&["a", "b", "c", "d"]), 1);
        assert!(close(one.keys, 0.25) && close(one.copies, 0.25), "{one:?}");
        // Three copies on three shards: every shard holds every key; a fourth holds 3/4 of them.
        let all = ideal_movement(&three, &ring(&["a", "b", "c", "d"]), 3);
        assert!(close(all.keys, 0.75) && close(all.copies, 0.25), "{all:?}");
        // Two shards, two copies, then a third: it must gain two thirds of the keys.
        let pair = ideal_movement(&ring(&["a", "b"]), &three, 2);
        assert!(close(pair.keys, 2.0 / 3.0) && close(pair.copies, 1.0 / 3.0), "{pair:?}");
        // Nothing changes: nothing moves.
        let same = ideal_movement(&three, &three, 2);
        assert!(close(same.keys, 0.0) && close(same.copies, 0.0), "{same:?}");
        // Draining c (weight 0): a and b gain what c held.
        let drained = ideal_movement(&three, &weighted(&[("a", 1), ("b", 1), ("c", 0)]), 1);
        assert!(close(drained.keys, 1.0 / 3.0) && close(drained.copies, 1.0 / 3.0), "{drained:?}");
    }

    #[test]
    fn coverage_caps_a_heavy_shard_at_every_key() {
        // Weights 3:1:1 with two copies: 2·3/5 > 1, so a holds every key and b, c half each.
        let cover = coverage(&weighted(&[("a", 3), ("b", 1), ("c", 1)]), 2);
        assert!(close(cover[0], 1.0) && close(cover[1], 0.5) && close(cover[2], 0.5), "{cover:?}");
        assert!(close(cover.iter().sum::<f64>(), 2.0), "coverage sums to the copies per key");
        let even = coverage(&ring(&["a", "b", "c", "d"]), 2);
        assert!(even.iter().all(|c| close(*c, 0.5)), "{even:?}");
    }
}
