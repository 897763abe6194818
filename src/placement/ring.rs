//! A weighted consistent-hash ring of virtual nodes.
//!
//! Each shard owns `weight × vnodes_per_weight` tokens on a 64-bit circle. A key belongs to the
//! owner of the first token at or after the key's hash; its preference list continues clockwise,
//! skipping shards already listed, so it names distinct shards.
//!
//! Why not the `hashring` crate (../shared/NOTES.md): it has no weights or vnodes of its own,
//! its `get_with_replicas` clones the ring on every call and returns consecutive tokens that
//! often belong to the same physical shard, and it hashes through `std::hash::Hash`, whose
//! output is not a stable format. A preference list of distinct shards that allocates nothing
//! needs to walk the token array itself, so the ring is written here (about a hundred lines).
//!
//! Stable formats: a key hashes as `xxh3_64(key bytes)`; a token as `xxh3_64` of the shard
//! name's length (u32, little-endian), the name's UTF-8 bytes and the vnode index (u32,
//! little-endian). Changing either moves data: treat them as an on-disk format.

use xxhash_rust::xxh3::xxh3_64;

/// The most shards a ring can hold: the preference-list walk tracks the shards it has listed
/// in a fixed bitset of this many bits, so a lookup never allocates.
pub const MAX_SHARDS: usize = 256;

/// Hashes a placement key (a blob key's bytes) onto the ring.
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The position of a shard's `index`-th virtual node.
pub fn vnode_token(shard_name: &str, index: u32) -> u64 {
    let name = shard_name.as_bytes();
    let mut bytes = Vec::with_capacity(name.len() + 8);
    bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(&index.to_le_bytes());
    xxh3_64(&bytes)
}

/// A shard as the ring sees it: a stable name and a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingMember {
    pub name: String,
    /// Relative capacity. Zero means the shard takes no new data (a draining shard).
    pub weight: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("a ring needs at least one shard with a weight above zero")]
    NoWeight,
    #[error("a ring holds at most {MAX_SHARDS} shards, got {0}")]
    TooManyShards(usize),
    #[error("shard name {0:?} appears twice")]
    DuplicateName(String),
    #[error("vnodes_per_weight must be at least 1")]
    NoVnodes,
}

/// The ring: tokens sorted ascending, with the index of the shard that owns each.
///
/// Tokens and owners are kept in two arrays so the binary search touches only tokens.
#[derive(Debug, Clone)]
pub struct Ring {
    members: Vec<RingMember>,
    tokens: Vec<u64>,
    owners: Vec<u16>,
    vnodes_per_weight: u32,
    /// Shards with tokens: a preference list names each once, then stops.
    listed_shards: usize,
}

impl Ring {
    pub fn new(members: Vec<RingMember>, vnodes_per_weight: u32) -> Result<Self, RingError> {
        validate(&members, vnodes_per_weight)?;
        let mut points: Vec<(u64, u16)> = Vec::new();
        for (owner, member) in members.iter().enumerate() {
            let vnodes = member.weight.saturating_mul(vnodes_per_weight);
            points.extend((0..vnodes).map(|index| (vnode_token(&member.name, index), owner as u16)));
        }
        // Ties between tokens (astronomically rare) break by shard order, so the ring is
        // still the same in every process.
        points.sort_unstable();
        let (tokens, owners) = points.into_iter().unzip();
        let listed_shards = members.iter().filter(|member| member.weight > 0).count();
        Ok(Self { members, tokens, owners, vnodes_per_weight, listed_shards })
    }

    pub fn members(&self) -> &[RingMember] {
        &self.members
    }

    pub fn vnodes_per_weight(&self) -> u32 {
        self.vnodes_per_weight
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The index (into [`Ring::members`]) of the shard that owns `hash`.
    pub fn primary(&self, hash: u64) -> usize {
        self.owners[self.first_token_at_or_after(hash)] as usize
    }

    /// Every shard with tokens, in preference order for `hash`: distinct, primary first.
    /// Shards of weight zero never appear. The iterator does not allocate.
    pub fn preference_list(&self, hash: u64) -> PreferenceList<'_> {
        PreferenceList {
            ring: self,
            position: self.first_token_at_or_after(hash),
            steps_left: self.tokens.len(),
            shards_left: self.listed_shards,
            seen: [0; MAX_SHARDS / 64],
        }
    }

    /// The fraction of the hash space each shard owns (sums to 1), in member order.
    pub fn ownership(&self) -> Vec<f64> {
        let mut owned = vec![0u128; self.members.len()];
        for (i, &token) in self.tokens.iter().enumerate() {
            // The arc (previous token, token] belongs to this token's owner; the first token
            // also owns the wrap-around arc from the last token.
            let previous = if i == 0 { self.tokens[self.tokens.len() - 1] } else { self.tokens[i - 1] };
            let arc = token.wrapping_sub(previous);
            let arc = if self.tokens.len() == 1 { u64::MAX } else { arc };
            owned[self.owners[i] as usize] += u128::from(arc);
        }
        let total: u128 = owned.iter().sum();
        owned.iter().map(|&arc| arc as f64 / total as f64).collect()
    }

    fn first_token_at_or_after(&self, hash: u64) -> usize {
        let index = self.tokens.partition_point(|&token| token < hash);
        if index == self.tokens.len() { 0 } else { index }
    }
}

fn validate(members: &[RingMember], vnodes_per_weight: u32) -> Result<(), RingError> {
    if vnodes_per_weight == 0 {
        return Err(RingError::NoVnodes);
    }
    if members.len() > MAX_SHARDS {
        return Err(RingError::TooManyShards(members.len()));
    }
    for (i, member) in members.iter().enumerate() {
        if members[..i].iter().any(|earlier| earlier.name == member.name) {
            return Err(RingError::DuplicateName(member.name.clone()));
        }
    }
    if members.iter().all(|member| member.weight == 0) {
        return Err(RingError::NoWeight);
    }
    Ok(())
}

/// The distinct shards for one key, in preference order. See [`Ring::preference_list`].
#[derive(Debug, Clone)]
pub struct PreferenceList<'a> {
    ring: &'a Ring,
    position: usize,
    steps_left: usize,
    /// Shards not yet named: once every shard is listed, the walk stops instead of visiting
    /// the remaining tokens (thousands at the default vnodes).
    shards_left: usize,
    seen: [u64; MAX_SHARDS / 64],
}

impl Iterator for PreferenceList<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.steps_left > 0 && self.shards_left > 0 {
            let owner = self.ring.owners[self.position] as usize;
            self.steps_left -= 1;
            self.position = if self.position + 1 == self.ring.tokens.len() { 0 } else { self.position + 1 };
            let (word, bit) = (owner / 64, 1u64 << (owner % 64));
            if self.seen[word] & bit == 0 {
                self.seen[word] |= bit;
                self.shards_left -= 1;
                return Some(owner);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn equal_shards(count: usize) -> Vec<RingMember> {
        (0..count).map(|i| RingMember { name: format!("shard-{i}"), weight: 1 }).collect()
    }

    fn share_of_keys(ring: &Ring, keys: u64) -> Vec<f64> {
        let mut counts = vec![0u64; ring.members().len()];
        for key in 0..keys {
            counts[ring.primary(key_hash(&key.to_le_bytes()))] += 1;
        }
        counts.iter().map(|&c| c as f64 / keys as f64).collect()
    }

    #[test]
    fn hashes_are_a_stable_format() {
        // Pinned values: if these change, every deployed blob would move.
        assert_eq!(key_hash(b"chitram"), xxh3_64(b"chitram"));
        assert_eq!(vnode_token("a", 0), xxh3_64(&[1, 0, 0, 0, b'a', 0, 0, 0, 0]));
        assert_ne!(vnode_token("a", 1), vnode_token("a", 0));
    }

    #[test]
    fn rejects_invalid_rings() {
        let zero = vec![RingMember { name: "a".into(), weight: 0 }];
        assert_eq!(Ring::new(zero, 8).unwrap_err(), RingError::NoWeight);
        let twice = vec![RingMember { name: "a".into(), weight: 1 }, RingMember { name: "a".into(), weight: 1 }];
        assert_eq!(Ring::new(twice, 8).unwrap_err(), RingError::DuplicateName("a".into()));
        assert_eq!(Ring::new(equal_shards(2), 0).unwrap_err(), RingError::NoVnodes);
        assert_eq!(Ring::new(equal_shards(MAX_SHARDS + 1), 1).unwrap_err(), RingError::TooManyShards(MAX_SHARDS + 1));
    }

    #[test]
    fn a_zero_weight_shard_is_never_listed() {
        let mut members = equal_shards(3);
        members[1].weight = 0;
        let ring = Ring::new(members, 64).unwrap();
        for key in 0..1000u64 {
            let list: Vec<usize> = ring.preference_list(key_hash(&key.to_le_bytes())).collect();
            assert_eq!(list.len(), 2);
            assert!(!list.contains(&1));
        }
    }

    #[test]
    fn ownership_follows_weights() {
        let members =
            vec![RingMember { name: "small".into(), weight: 1 }, RingMember { name: "large".into(), weight: 3 }];
        let ring = Ring::new(members, 1024).unwrap();
        let owned = ring.ownership();
        assert!((owned[0] + owned[1] - 1.0).abs() < 1e-9);
        assert!((owned[1] - 0.75).abs() < 0.03, "large shard owns {}", owned[1]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn preference_lists_name_every_shard_once_primary_first(count in 1usize..12, key in any::<u64>()) {
            let ring = Ring::new(equal_shards(count), 16).unwrap();
            let hash = key_hash(&key.to_le_bytes());
            let list: Vec<usize> = ring.preference_list(hash).collect();
            prop_assert_eq!(list.len(), count);
            prop_assert_eq!(list[0], ring.primary(hash));
            let mut sorted = list.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), count);
        }

        #[test]
        fn placement_depends_only_on_names_and_weights(count in 2usize..10, key in any::<u64>()) {
            // Two rings built independently (as in two processes) from the same members agree,
            // whatever order the config lists the shards in.
            let members = equal_shards(count);
            let mut reversed = members.clone();
            reversed.reverse();
            let ring = Ring::new(members, 32).unwrap();
            let other = Ring::new(reversed, 32).unwrap();
            let hash = key_hash(&key.to_le_bytes());
            let names: Vec<&str> = ring.preference_list(hash).map(|i| ring.members()[i].name.as_str()).collect();
            let other_names: Vec<&str> = other.preference_list(hash).map(|i| other.members()[i].name.as_str()).collect();
            prop_assert_eq!(names, other_names);
        }

        #[test]
        fn adding_a_shard_moves_keys_only_onto_it(count in 2usize..9) {
            let before = Ring::new(equal_shards(count), 64).unwrap();
            let after = Ring::new(equal_shards(count + 1), 64).unwrap();
            let newcomer = count;
            let keys = 20_000u64;
            let mut moved = 0u64;
            for key in 0..keys {
                let hash = key_hash(&key.to_le_bytes());
                let (old, new) = (before.primary(hash), after.primary(hash));
                if old != new {
                    prop_assert_eq!(new, newcomer, "a key moved between two old shards");
                    moved += 1;
                }
                // Replicas too: the new preference list is the old one with the newcomer
                // inserted somewhere, so no copy moves between two old shards either.
                let without_newcomer = after.preference_list(hash).filter(|&shard| shard != newcomer);
                prop_assert!(without_newcomer.eq(before.preference_list(hash)));
            }
            let ideal = 1.0 / (count + 1) as f64;
            let fraction = moved as f64 / keys as f64;
            prop_assert!((fraction - ideal).abs() < ideal * 0.35, "moved {fraction}, ideal {ideal}");
        }

        #[test]
        fn shares_stay_within_tolerance_of_the_weights(count in 3usize..9) {
            let ring = Ring::new(equal_shards(count), 256).unwrap();
            let ideal = 1.0 / count as f64;
            for share in share_of_keys(&ring, 50_000) {
                // 256 vnodes give a relative spread of about 1/sqrt(256) = 6%; 25% is beyond 4 sigma.
                prop_assert!((share - ideal).abs() < ideal * 0.25, "share {share}, ideal {ideal}");
            }
        }
    }
}
