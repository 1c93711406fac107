//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), JSON with `CANOPY_LOG_JSON=1`.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("CANOPY_LOG_JSON").is_ok_and(|v| v == "1") {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
