//! Distribution quality of the placement ring: how evenly it spreads keys, how much moves when
//! a shard joins or leaves, and how that compares with what random tokens predict and with other
//! schemes. Prints Markdown tables (BENCHMARKS.md quotes them).
//!
//! `cargo bench --bench distribution` (about ten seconds). Deterministic: keys are `0..1M` hashed
//! like `chitram ring` hashes them, shard names are fixed or drawn from a seeded generator.

#[path = "support/baselines.rs"]
mod baselines;

use std::time::Instant;

use baselines::{Rendezvous, blob_keys, hashring_ring, jump, shard_names};
use chitram::placement::report::{
    SAMPLE_KEYS, coefficient_of_variation, peak_to_mean, random_token_spread, sampling_spread, shard_shares,
};
use chitram::placement::ring::{Ring, RingMember, key_hash};

/// The shard counts the targets speak of (4 to 16 equal shards).
const TARGET_SHARDS: [usize; 4] = [4, 8, 12, 16];
/// The vnode counts a default is chosen from.
const CANDIDATES: [u32; 5] = [256, 512, 1024, 2048, 4096];
/// Independent sets of shard names per (shards, vnodes) in the robustness table.
const NAME_SETS: usize = 100;
/// The targets of the issue.
const PEAK_TARGET: f64 = 1.05;
const LOOKUP_TARGET_NS: f64 = 100.0;

fn main() {
    let started = Instant::now();
    println!("# Ring distribution quality\n");
    println!("Keys: 0..{SAMPLE_KEYS} hashed with xxh3 (as `chitram ring` does). Equal weights unless stated.\n");
    spread_table();
    let robust = robustness_table();
    movement_table();
    weighted_table();
    hashring_replicas_table();
    let lookups = lookup_cost_table();
    change_of_default_table();
    recommend(&robust, &lookups);
    println!("\n(finished in {:.1} s)", started.elapsed().as_secs_f64());
}

fn equal(names: &[String]) -> Vec<RingMember> {
    names.iter().map(|name| RingMember { name: name.clone(), weight: 1 }).collect()
}

fn ring(names: &[String], vnodes: u32) -> Ring {
    Ring::new(equal(names), vnodes).expect("a valid ring")
}

/// E[max of n independent standard normals], by numerical integration: how many standard
/// deviations the most loaded of n shards typically sits above the mean.
fn expected_max_normal(n: usize) -> f64 {
    let (step, mut sum) = (0.001, 0.0);
    let mut x = -8.0;
    while x < 8.0 {
        let pdf = (-x * x / 2.0f64).exp() / (2.0 * std::f64::consts::PI).sqrt();
        sum += x * n as f64 * pdf * normal_cdf(x).powi(n as i32 - 1) * step;
        x += step;
    }
    sum
}

fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
fn erf(x: f64) -> f64 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    sign * (1.0 - poly * (-x * x).exp())
}

/// Peak-to-mean of the hash-space shares (exact: no key sampling).
fn owned_peak(ring: &Ring) -> f64 {
    let n = ring.members().len() as f64;
    ring.ownership().iter().fold(0.0f64, |peak, &share| peak.max(share * n))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn spread_table() {
    println!("## Load spread over {SAMPLE_KEYS} keys (shards named shard-0 … shard-N-1)\n");
    println!(
        "CV is the standard deviation of share/expected. \"theory\" is what random tokens predict for the \
         hash-space share, sqrt((N-1)/(N·v)) ≈ 1/sqrt(v); key sampling adds sqrt((N-1)/K) on top. \
         \"typical peak\" is 1 + CV_theory × E[max of N normals].\n"
    );
    println!(
        "| shards | vnodes/weight | tokens | peak-to-mean (keys) | CV (keys) | CV (hash space) | CV theory | 1/sqrt(v) | key-sampling CV | typical peak (theory) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for shards in [3usize, 4, 8, 16, 32, 128] {
        let names = shard_names(shards);
        let max_sigmas = expected_max_normal(shards);
        for vnodes in [16u32, 64, 256, 512, 1024, 2048, 4096] {
            let ring = ring(&names, vnodes);
            let shares = shard_shares(&ring, SAMPLE_KEYS);
            let owned = ring.ownership();
            let owned_cv = {
                let ratios: Vec<f64> = owned.iter().map(|s| s * shards as f64).collect();
                (ratios.iter().map(|r| (r - 1.0).powi(2)).sum::<f64>() / shards as f64).sqrt()
            };
            let theory = random_token_spread(&ring);
            println!(
                "| {shards} | {vnodes} | {} | {:.3} | {:.2}% | {:.2}% | {:.2}% | {:.2}% | {:.2}% | {:.3} |",
                ring.token_count(),
                peak_to_mean(&shares),
                coefficient_of_variation(&shares) * 100.0,
                owned_cv * 100.0,
                theory * 100.0,
                100.0 / f64::from(vnodes).sqrt(),
                sampling_spread(&shares, SAMPLE_KEYS) * 100.0,
                1.0 + theory * max_sigmas,
            );
        }
    }
    println!();
}

/// Per (shards, vnodes): the peak-to-mean of the hash space over NAME_SETS independent sets of
/// shard names. One set of names is one draw of the dice; an operator gets whichever their names
/// give, so the default must hold for most draws, not only for `shard-0 … shard-N-1`.
struct Robust {
    vnodes: u32,
    median: f64,
    p90: f64,
    max: f64,
    within_target: f64,
}

fn robustness_table() -> Vec<Robust> {
    println!("## Peak-to-mean across {NAME_SETS} random sets of shard names (hash-space shares, exact)\n");
    println!(
        "Each set names its shards `<8 random hex>-<i>`. \"≤ {PEAK_TARGET}\" is the fraction of sets that meet the \
         target. Counting 1M keys on top adds sampling noise of about 0.2–0.4% (see the table above).\n"
    );
    println!("| shards | vnodes/weight | median | p90 | worst | ≤ {PEAK_TARGET} |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut state = 0x5eed_u64;
    let mut random = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        state >> 32
    };
    let mut rows = Vec::new();
    for shards in TARGET_SHARDS {
        let sets: Vec<Vec<String>> = (0..NAME_SETS)
            .map(|_| {
                let prefix = format!("{:08x}", random());
                (0..shards).map(|i| format!("{prefix}-{i}")).collect()
            })
            .collect();
        for vnodes in CANDIDATES {
            let mut peaks: Vec<f64> = sets.iter().map(|names| owned_peak(&ring(names, vnodes))).collect();
            peaks.sort_by(f64::total_cmp);
            let row = Robust {
                vnodes,
                median: percentile(&peaks, 0.5),
                p90: percentile(&peaks, 0.9),
                max: peaks[peaks.len() - 1],
                within_target: peaks.iter().filter(|&&p| p <= PEAK_TARGET).count() as f64 / peaks.len() as f64,
            };
            println!(
                "| {shards} | {vnodes} | {:.3} | {:.3} | {:.3} | {:.0}% |",
                row.median,
                row.p90,
                row.max,
                row.within_target * 100.0
            );
            rows.push(row);
        }
    }
    println!();
    rows
}

fn movement_table() {
    println!("## Keys moved when a shard joins or leaves ({SAMPLE_KEYS} keys)\n");
    println!(
        "Add: shard-N joins shard-0 … shard-N-1; ideal 1/(N+1), all of it onto the newcomer. Remove: shard-0 \
         leaves; ideal 1/N. \"copies\" is the fraction of copies that change shard with RF = 2 (ideal also 1/(N+1)). \
         \"between old\" counts keys whose primary moves between two shards that were already there (0 is \
         consistent hashing).\n"
    );
    println!(
        "| N | vnodes/weight | add: moved | ideal | moved/ideal | between old | add, RF=2: copies moved | remove: moved | ideal |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in [3usize, 4, 8, 16, 32] {
        let names = shard_names(n + 1);
        for vnodes in [64u32, 256, 1024, 4096] {
            let before = ring(&names[..n], vnodes);
            let after = ring(&names, vnodes);
            let without_first = ring(&names[1..n], vnodes);
            let (mut moved, mut between, mut copies, mut removed) = (0u64, 0u64, 0u64, 0u64);
            for key in 0..SAMPLE_KEYS {
                let hash = key_hash(&key.to_le_bytes());
                let (old, new) = (before.primary(hash), after.primary(hash));
                if old != new {
                    moved += 1;
                    between += u64::from(new != n);
                }
                let mut old_set = before.preference_list(hash).take(2);
                let (a, b) = (old_set.next(), old_set.next());
                copies += after.preference_list(hash).take(2).filter(|s| Some(*s) != a && Some(*s) != b).count() as u64;
                // Indices in `without_first` are shifted by one.
                removed += u64::from(before.primary(hash) != without_first.primary(hash) + 1);
            }
            let k = SAMPLE_KEYS as f64;
            let ideal = 1.0 / (n + 1) as f64;
            println!(
                "| {n} | {vnodes} | {:.2}% | {:.2}% | {:.3} | {:.2}% | {:.2}% | {:.2}% | {:.2}% |",
                moved as f64 / k * 100.0,
                ideal * 100.0,
                moved as f64 / k / ideal,
                between as f64 / k * 100.0,
                copies as f64 / (2.0 * k) * 100.0,
                removed as f64 / k * 100.0,
                100.0 / n as f64,
            );
        }
    }
    println!();
    println!("Other schemes, same keys (no vnodes):\n");
    println!(
        "| N | jump: add last | jump: remove shard-0 (renumbering) | rendezvous: add | rendezvous: remove shard-0 | modulo: add | ideal add | ideal remove |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in [3usize, 4, 8, 16, 32] {
        let names = shard_names(n + 1);
        let (hrw_before, hrw_after, hrw_without) =
            (Rendezvous::new(&names[..n]), Rendezvous::new(&names), Rendezvous::new(&names[1..n]));
        let (mut jump_add, mut jump_remove, mut hrw_add, mut hrw_remove, mut modulo) = (0u64, 0u64, 0u64, 0u64, 0u64);
        for key in 0..SAMPLE_KEYS {
            let hash = key_hash(&key.to_le_bytes());
            let j = jump(hash, n as u32);
            jump_add += u64::from(j != jump(hash, n as u32 + 1));
            // Removing shard-0 renumbers shard-i as i-1: a key keeps its shard only if the
            // new bucket is its old bucket minus one.
            jump_remove += u64::from(j == 0 || jump(hash, n as u32 - 1) != j - 1);
            let h = hrw_before.primary(hash);
            hrw_add += u64::from(h != hrw_after.primary(hash));
            hrw_remove += u64::from(h != hrw_without.primary(hash) + 1);
            modulo += u64::from(hash % n as u64 != hash % (n as u64 + 1));
        }
        let pct = |count: u64| count as f64 / SAMPLE_KEYS as f64 * 100.0;
        println!(
            "| {n} | {:.2}% | {:.2}% | {:.2}% | {:.2}% | {:.2}% | {:.2}% | {:.2}% |",
            pct(jump_add),
            pct(jump_remove),
            pct(hrw_add),
            pct(hrw_remove),
            pct(modulo),
            100.0 / (n + 1) as f64,
            100.0 / n as f64
        );
    }
    println!();
}

fn weighted_table() {
    println!("## A weighted ring: weights 1, 1, 2, 4 ({SAMPLE_KEYS} keys)\n");
    println!("| vnodes/weight | shard | weight | tokens | expected | simulated | simulated/expected |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for vnodes in [256u32, 1024, 2048] {
        let members = [("w1-a", 1), ("w1-b", 1), ("w2", 2), ("w4", 4)]
            .iter()
            .map(|(name, weight)| RingMember { name: (*name).to_owned(), weight: *weight })
            .collect();
        let ring = Ring::new(members, vnodes).unwrap();
        for share in shard_shares(&ring, SAMPLE_KEYS) {
            println!(
                "| {vnodes} | {} | {} | {} | {:.2}% | {:.2}% | {:.3} |",
                share.name,
                share.weight,
                share.vnodes,
                share.expected * 100.0,
                share.simulated * 100.0,
                share.simulated / share.expected
            );
        }
    }
    println!();
}

fn hashring_replicas_table() {
    const KEYS: u64 = 20_000;
    println!("## The `hashring` crate's `get_with_replicas(key, 1)` as a write set of two shards ({KEYS} keys)\n");
    println!(
        "It returns the next token's node, not the next distinct shard: the fraction below get two copies on \
         one shard (one copy, in effect). Chitram's preference list never does. With N equal shards random tokens \
         predict about 1/N.\n"
    );
    println!("| shards | vnodes | same shard twice | 1/N |");
    println!("|---:|---:|---:|---:|");
    for shards in [3usize, 8, 32] {
        let ring = hashring_ring(shards, 256);
        let same = (0..KEYS)
            .filter(|key| {
                let nodes = ring.get_with_replicas(&key.to_le_bytes(), 1).unwrap();
                nodes[0].shard == nodes[1].shard
            })
            .count();
        println!("| {shards} | 256 | {:.1}% | {:.1}% |", same as f64 / KEYS as f64 * 100.0, 100.0 / shards as f64);
    }
    println!();
}

struct Lookup {
    vnodes: u32,
    rf2_ns: f64,
    all_ns: f64,
}

fn lookup_cost_table() -> Vec<Lookup> {
    const ROUNDS: usize = 500_000;
    println!(
        "## Lookup cost, rough (key hashing included; up to {ROUNDS} lookups over 4096 blob keys; `cargo bench --bench \
         ring` has the careful figures)\n"
    );
    println!(
        "\"write set\" takes the first RF = 2 shards (what placement needs); \"every shard\" takes N distinct shards; \
         \"to the end\" drives the iterator until it returns None, as `StorageRouter::read_order` does on every read \
         today: the iterator keeps walking the remaining tokens after the last distinct shard.\n"
    );
    println!("| shards | vnodes/weight | tokens | ring memory | write set (RF=2) | every shard | to the end |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let keys = blob_keys(4096);
    let mut rows = Vec::new();
    for shards in [4usize, 16] {
        for vnodes in CANDIDATES {
            let ring = ring(&shard_names(shards), vnodes);
            let time = |rounds: usize, f: &dyn Fn(u64) -> usize| {
                let started = Instant::now();
                let mut sink = 0usize;
                for i in 0..rounds {
                    sink ^= f(key_hash(keys[i % keys.len()].as_bytes()));
                }
                std::hint::black_box(sink);
                started.elapsed().as_nanos() as f64 / rounds as f64
            };
            let rf2_ns = time(ROUNDS, &|hash| ring.preference_list(hash).take(2).fold(0, |a, s| a ^ s));
            let all_ns = time(ROUNDS, &|hash| ring.preference_list(hash).take(shards).fold(0, |a, s| a ^ s));
            let end_rounds = (100_000_000 / ring.token_count()).clamp(1_000, ROUNDS);
            let end_ns = time(end_rounds, &|hash| ring.preference_list(hash).fold(0, |a, s| a ^ s));
            println!(
                "| {shards} | {vnodes} | {} | {} KiB | {rf2_ns:.0} ns | {all_ns:.0} ns | {:.1} µs |",
                ring.token_count(),
                ring.token_count() * 10 / 1024,
                end_ns / 1000.0
            );
            rows.push(Lookup { vnodes, rf2_ns, all_ns });
        }
    }
    println!();
    rows
}

/// What changing `vnodes_per_weight` on a running deployment moves: new tokens land between
/// the old ones, so most keys change owner.
fn change_of_default_table() {
    println!("## Changing vnodes_per_weight on an existing deployment ({SAMPLE_KEYS} keys)\n");
    println!(
        "Tokens 0..v-1 of each shard stay, the new ones land between them, so most keys change primary: a \
         deployment that changes the setting has to rebalance most of its data (or keep its old value pinned).\n"
    );
    println!("| shards | from | to | keys whose primary moves | copies moved, RF=2 |");
    println!("|---:|---:|---:|---:|---:|");
    for shards in [4usize, 16] {
        let names = shard_names(shards);
        let old = ring(&names, 256);
        for to in [1024u32, 2048, 4096] {
            let new = ring(&names, to);
            let (mut moved, mut copies) = (0u64, 0u64);
            for key in 0..SAMPLE_KEYS {
                let hash = key_hash(&key.to_le_bytes());
                moved += u64::from(old.primary(hash) != new.primary(hash));
                let mut before = old.preference_list(hash).take(2);
                let (a, b) = (before.next(), before.next());
                copies += new.preference_list(hash).take(2).filter(|s| Some(*s) != a && Some(*s) != b).count() as u64;
            }
            println!(
                "| {shards} | 256 | {to} | {:.1}% | {:.1}% |",
                moved as f64 / SAMPLE_KEYS as f64 * 100.0,
                copies as f64 / (2 * SAMPLE_KEYS) as f64 * 100.0
            );
        }
    }
    println!();
}

fn recommend(robust: &[Robust], lookups: &[Lookup]) {
    println!("## The default\n");
    for vnodes in CANDIDATES {
        let rows = || robust.iter().filter(move |r| r.vnodes == vnodes);
        let least = rows().map(|r| r.within_target).fold(1.0f64, f64::min);
        let worst_median = rows().map(|r| r.median).fold(0.0f64, f64::max);
        let worst_p90 = rows().map(|r| r.p90).fold(0.0f64, f64::max);
        let costs = || lookups.iter().filter(move |l| l.vnodes == vnodes);
        let rf2 = costs().map(|l| l.rf2_ns).fold(0.0f64, f64::max);
        let all = costs().map(|l| l.all_ns).fold(0.0f64, f64::max);
        println!(
            "- {vnodes}: over 4–16 equal shards, worst median peak-to-mean {worst_median:.3}, worst p90 {worst_p90:.3}, \
             at least {:.0}% of name sets ≤ {PEAK_TARGET}; write-set lookup ≤ {rf2:.0} ns, every shard ≤ {all:.0} ns.",
            least * 100.0
        );
    }
    let meets = |vnodes: u32| {
        robust.iter().filter(|r| r.vnodes == vnodes).all(|r| r.median <= PEAK_TARGET && r.within_target >= 0.9)
            && lookups.iter().filter(|l| l.vnodes == vnodes).all(|l| l.rf2_ns <= LOOKUP_TARGET_NS)
    };
    match CANDIDATES.iter().copied().find(|&v| meets(v)) {
        Some(vnodes) => println!(
            "\nSmallest candidate where, for every count of 4 to 16 equal shards, at least 90% of name sets reach \
             peak-to-mean ≤ {PEAK_TARGET} and the write-set lookup (RF = 2) costs ≤ {LOOKUP_TARGET_NS} ns: **{vnodes}**."
        ),
        None => println!("\nNo candidate meets both targets on this machine."),
    }
}
