//! Background upkeep that uses the same layers as the request path.

pub mod deletion;
pub mod leader;
pub mod progress;
pub mod rebalance;
pub mod scrub;
pub mod suspicion;
