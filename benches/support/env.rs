//! Settings of the throughput harnesses, shared by the benches.

/// The value of environment variable `k`, or `d` when it is unset or does not parse.
pub fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}
