//! iothread-registry: a registry of named IOThreads running work for the VMM.

use iothread_registry::{IoThreadParams, IoThreadRegistry};

/// Creates IOThread `id` and returns the name of the OS thread that runs its loop.
pub fn iothread_thread_name(id: &str) -> Result<Option<String>, iothread_registry::Error> {
    let registry = IoThreadRegistry::new();
    registry.create(id, IoThreadParams::default())?;
    let name = registry.call(id, |_ctx| std::thread::current().name().map(str::to_owned))?;
    registry.delete(id)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn work_runs_on_the_named_iothread() {
        let name = super::iothread_thread_name("iothread0").unwrap();
        assert_eq!(name.as_deref(), Some("IO iothread0"));
    }
}
