//! Timers for a shard: a hashed timer wheel ([`wheel::Wheel`]) driven by tick numbers the shard
//! derives from its clock. The wheel itself never reads the clock.

pub mod wheel;
