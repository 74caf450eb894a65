//! Fused kernels against their composite candle fallbacks (placeholder).
fn main() {}
