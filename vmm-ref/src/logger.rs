//! A minimal `log` backend writing to stderr. The level comes from
//! `VMM_REF_LOG` (`error`, `warn` (default), `info`, `debug`, `trace`).

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("?");
            // Logging must never fail the VMM; a closed stderr loses the line.
            let _ = writeln!(
                std::io::stderr().lock(),
                "vmm-ref [{}] {}: {}",
                name,
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger (idempotent).
pub fn init() {
    let level = std::env::var("VMM_REF_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
