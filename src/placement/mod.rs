//! Placement: which shards a blob belongs on. Pure and deterministic (DESIGN invariant 6):
//! no I/O, no clocks, no randomness, and the same config gives the same answer in every
//! process and every version.

pub mod plan;
pub mod report;
pub mod ring;
