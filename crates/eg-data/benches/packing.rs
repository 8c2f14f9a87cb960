//! Packing throughput (placeholder until written).

fn main() {}
