// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! iothread-registry: a registry whose spawn hook runs the VMM's per-thread setup on every
//! new IOThread (cloud-hypervisor applies a seccomp filter there), and a device that
//! holds an IOThread to run work in its loop.

use std::sync::{Arc, Mutex, PoisonError};

use iothread_registry::{IoThreadHolder, IoThreadParams, IoThreadRegistry};

/// What the spawn hook saw, and where the device's work ran.
#[derive(Debug, PartialEq, Eq)]
pub struct IoThreadReport {
    /// `(IOThread id, OS thread name)` as seen by the hook, on the new thread.
    pub hooked: Vec<(String, Option<String>)>,
    /// Name of the OS thread the held IOThread ran the device's work on.
    pub work_ran_on: Option<String>,
}

/// Creates IOThread `id` through a registry with a spawn hook, holds it as a device and
/// runs work in its loop.
pub fn run_on_hooked_iothread(id: &str) -> Result<IoThreadReport, iothread_registry::Error> {
    let hooked = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&hooked);
    let registry = IoThreadRegistry::with_spawn_hook(move |info| {
        // A VMM would apply its seccomp filter / affinity here, before the loop runs.
        let name = std::thread::current().name().map(str::to_owned);
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((info.id.to_owned(), name));
        Ok(())
    });
    registry.create(id, IoThreadParams::default())?;
    let device = IoThreadHolder::qom_object("/machine/peripheral/blk0/virtio-backend");
    let guard = registry.acquire(id, device)?;
    let work_ran_on = guard.call(|_ctx| std::thread::current().name().map(str::to_owned))?;
    drop(guard);
    registry.delete(id)?;
    let hooked = std::mem::take(&mut *hooked.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(IoThreadReport {
        hooked,
        work_ran_on,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_hook_runs_on_the_new_iothread_before_the_work() {
        let report = super::run_on_hooked_iothread("iothread0").unwrap();
        let thread = Some("IO iothread0".to_owned());
        assert_eq!(
            report.hooked,
            vec![("iothread0".to_owned(), thread.clone())]
        );
        assert_eq!(report.work_ran_on, thread);
    }
}
