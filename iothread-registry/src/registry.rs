// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The registry of IOThreads: create/delete by id, holders, parameters, queries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::assignment::VqAssignment;
use crate::error::{Error, Result};
use crate::holder::IoThreadHolder;
use crate::id::validate_id;
#[cfg(feature = "qemu")]
use crate::info::{format_info_iothreads, IoThreadInfo};
use crate::iothread::{lock, IoThread, IoThreadState, SpawnHook, SpawnHookError, SpawnInfo};
use crate::mapping::{assign_vqs, IoThreadVqMapping};
use crate::params::IoThreadParams;
#[cfg(feature = "qemu")]
use crate::params::Property;
use crate::remote::HolderGuard;
use crate::stats::IoThreadStats;
use crate::sys;

/// One registered IOThread and its holders.
struct Entry {
    thread: Arc<IoThread>,
    holders: Vec<IoThreadHolder>,
}

#[derive(Default)]
struct State {
    /// In creation order.
    threads: Vec<Entry>,
    /// Ids whose thread is being spawned (reserved against duplicates).
    pending: Vec<String>,
}

impl State {
    fn entry(&self, id: &str) -> Result<&Entry> {
        self.threads
            .iter()
            .find(|e| e.thread.remote().id() == id)
            .ok_or_else(|| not_found(id))
    }

    fn entry_mut(&mut self, id: &str) -> Result<&mut Entry> {
        self.threads
            .iter_mut()
            .find(|e| e.thread.remote().id() == id)
            .ok_or_else(|| not_found(id))
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFound { id: id.to_owned() }
}

pub(crate) struct Inner {
    state: Mutex<State>,
    /// Run on every new IOThread before its loop.
    hook: Option<SpawnHook>,
}

/// Serials identify IOThreads process-wide (across registries) for the deadlock
/// check and for guards; 0 means "not an IOThread".
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

impl State {
    /// Position of `holder` (the earliest registration) in IOThread `id`'s list,
    /// provided `id` is still the IOThread with `serial`.
    fn held_at(&self, id: &str, serial: u64, holder: &IoThreadHolder) -> Result<usize> {
        let entry = self.entry(id)?;
        entry
            .holders
            .iter()
            .position(|h| h == holder)
            .filter(|_| entry.thread.remote().serial() == serial)
            .ok_or_else(|| Error::NotHeld {
                id: id.to_owned(),
                holder: holder.clone(),
            })
    }

    /// Removes one registration of `holder` from IOThread `id` (see [`State::held_at`]).
    fn release(&mut self, id: &str, serial: u64, holder: &IoThreadHolder) -> Result<()> {
        let pos = self.held_at(id, serial, holder)?;
        self.entry_mut(id)?.holders.remove(pos);
        Ok(())
    }

    /// Registers `holder` on every IOThread of `mapping` (which was validated under
    /// this lock, so every entry exists and is listed once).
    fn acquire_all(
        &mut self,
        registry: &Arc<Inner>,
        mapping: &[IoThreadVqMapping],
        holder: &IoThreadHolder,
    ) -> Result<Vec<HolderGuard>> {
        let mut guards = Vec::with_capacity(mapping.len());
        for m in mapping {
            let entry = self.entry_mut(&m.iothread)?;
            entry.holders.push(holder.clone());
            guards.push(HolderGuard::new(
                Arc::downgrade(registry),
                Arc::clone(entry.thread.remote()),
                holder.clone(),
            ));
        }
        Ok(guards)
    }
}

/// Index into the mapping's guards of the IOThread serving each queue.
fn queue_guards(mapping: &[IoThreadVqMapping], per_queue: &[String]) -> Result<Vec<usize>> {
    per_queue
        .iter()
        .map(|id| {
            mapping
                .iter()
                .position(|m| &m.iothread == id)
                .ok_or_else(|| not_found(id))
        })
        .collect()
}

impl Inner {
    /// Removes the registration of `guard`.
    pub(crate) fn release(&self, guard: &HolderGuard) -> Result<()> {
        lock(&self.state).release(guard.iothread_id(), guard.serial(), guard.holder())
    }

    /// Moves `holder` from the IOThreads of `old` to those of `mapping` for a device
    /// with `num_queues` queues, in one critical section: a snapshot sees the holder
    /// either on all the old IOThreads or on all the new ones. Nothing changes on
    /// error. The caller must [`forget`](HolderGuard::forget) the old guards.
    pub(crate) fn remap(
        self: &Arc<Self>,
        old: &[HolderGuard],
        holder: &IoThreadHolder,
        mapping: &[IoThreadVqMapping],
        num_queues: u16,
    ) -> Result<(Vec<HolderGuard>, Vec<usize>)> {
        let mut state = lock(&self.state);
        let per_queue = assign_vqs(mapping, num_queues, |id| state.entry(id).is_ok())?;
        let queue_guard = queue_guards(mapping, &per_queue)?;
        for g in old {
            state.held_at(g.iothread_id(), g.serial(), g.holder())?;
        }
        for g in old {
            state.release(g.iothread_id(), g.serial(), g.holder())?;
        }
        let guards = state.acquire_all(self, mapping, holder)?;
        Ok((guards, queue_guard))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let threads: Vec<Arc<IoThread>> = lock(&self.state)
            .threads
            .drain(..)
            .map(|e| e.thread)
            .collect();
        // Ask all loops to stop first so that they wind down in parallel.
        for t in &threads {
            t.request_stop();
        }
        for t in &threads {
            // The last registry clone may be dropped inside one of its IOThreads;
            // that thread ends on its own after the current callback returns.
            if !t.remote().on_own_thread() {
                t.join();
            }
        }
    }
}

/// The set of IOThreads of a VMM, by id.
///
/// Cheap to clone (all clones share the same IOThreads); `Send + Sync`. When the last
/// clone is dropped, every IOThread is stopped and joined.
///
/// The only way to reach an IOThread's event loop is a [`HolderGuard`] (from
/// [`acquire`](Self::acquire) or [`acquire_vq_mapping`](Self::acquire_vq_mapping)):
/// every user of a context is listed as a holder for as long as it can use it.
///
/// ```
/// use iothread_registry::{IoThreadHolder, IoThreadParams, IoThreadRegistry};
///
/// let registry = IoThreadRegistry::new();
/// registry.create("iothread0", IoThreadParams::default()).unwrap();
///
/// // A device takes the IOThread's context and is tracked as a holder.
/// let guard = registry
///     .acquire("iothread0", IoThreadHolder::qom_object("/machine/peripheral/blk0/virtio-backend"))
///     .unwrap();
/// let answer = guard.call(|_ctx| 6 * 7).unwrap();
/// assert_eq!(answer, 42);
///
/// // Deleting a held IOThread is refused and names the holders.
/// let err = registry.delete("iothread0").unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "IOThread 'iothread0' is in use by qom-object /machine/peripheral/blk0/virtio-backend"
/// );
/// guard.release().unwrap();
/// registry.delete("iothread0").unwrap();
/// ```
#[derive(Clone)]
pub struct IoThreadRegistry {
    inner: Arc<Inner>,
}

impl Default for IoThreadRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for IoThreadRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThreadRegistry")
            .field("ids", &self.ids())
            .finish()
    }
}

impl IoThreadRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::with_hook(None)
    }

    /// An empty registry whose IOThreads run `hook` on their own thread, after their
    /// event loop was created and before it starts: the place to install a seccomp
    /// filter, set CPU affinity or a cgroup, as a VMM does for every thread it
    /// spawns. When the hook returns an error (or panics), the thread ends without
    /// running its loop and [`create`](Self::create) returns
    /// [`Error::SpawnHook`] with that error as its source.
    ///
    /// A seccomp filter installed here must allow the syscalls of the event loop
    /// (listed in aio-poll's README), thread exit, and whatever the work submitted
    /// to the IOThread needs; `examples/seccomp_pool.rs` shows a complete one.
    ///
    /// ```
    /// use iothread_registry::{Error, IoThreadParams, IoThreadRegistry};
    ///
    /// let registry = IoThreadRegistry::with_spawn_hook(|info| {
    ///     if info.id.starts_with("forbidden") {
    ///         return Err(format!("no IOThread may be called {}", info.id).into());
    ///     }
    ///     // e.g. seccompiler::apply_filter(&filter)?; sched_setaffinity(...)
    ///     Ok(())
    /// });
    /// registry.create("io0", IoThreadParams::default())?;
    /// let err = registry.create("forbidden0", IoThreadParams::default()).unwrap_err();
    /// assert_eq!(err.to_string(), "the spawn hook failed for IOThread 'forbidden0'");
    /// assert_eq!(registry.ids(), ["io0"]);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn with_spawn_hook(
        hook: impl Fn(&SpawnInfo<'_>) -> std::result::Result<(), SpawnHookError> + Send + Sync + 'static,
    ) -> Self {
        Self::with_hook(Some(Arc::new(hook)))
    }

    fn with_hook(hook: Option<SpawnHook>) -> Self {
        IoThreadRegistry {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                hook,
            }),
        }
    }

    fn thread(&self, id: &str) -> Result<Arc<IoThread>> {
        Ok(Arc::clone(&lock(&self.inner.state).entry(id)?.thread))
    }

    /// Creates IOThread `id`: validates id and parameters, spawns the thread
    /// `IO <id>` and returns once its event loop runs.
    pub fn create(&self, id: &str, params: IoThreadParams) -> Result<()> {
        validate_id(id)?;
        let params = params.validate()?;
        {
            let mut state = lock(&self.inner.state);
            if state.entry(id).is_ok() || state.pending.iter().any(|p| p == id) {
                return Err(Error::AlreadyExists { id: id.to_owned() });
            }
            state.pending.push(id.to_owned());
        }
        let serial = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
        let spawned = IoThread::spawn(id, serial, params, self.inner.hook.clone());
        let mut state = lock(&self.inner.state);
        state.pending.retain(|p| p != id);
        state.threads.push(Entry {
            thread: Arc::new(spawned?),
            holders: Vec::new(),
        });
        Ok(())
    }

    /// Deletes IOThread `id`: refused with [`Error::InUse`] (listing the holders)
    /// while it has holders; otherwise stops its loop from inside and joins the
    /// thread. Calling it on the IOThread itself returns [`Error::WouldDeadlock`].
    pub fn delete(&self, id: &str) -> Result<()> {
        let thread = {
            let mut state = lock(&self.inner.state);
            let pos = state
                .threads
                .iter()
                .position(|e| e.thread.remote().id() == id)
                .ok_or_else(|| not_found(id))?;
            let entry = state.threads.get(pos).ok_or_else(|| not_found(id))?;
            if entry.thread.remote().on_own_thread() {
                return Err(Error::WouldDeadlock { id: id.to_owned() });
            }
            if !entry.holders.is_empty() {
                return Err(Error::InUse {
                    id: id.to_owned(),
                    holders: entry.holders.clone(),
                });
            }
            state.threads.remove(pos).thread
        };
        thread.stop_and_join()
    }

    /// Ids of all IOThreads, in creation order.
    pub fn ids(&self) -> Vec<String> {
        lock(&self.inner.state)
            .threads
            .iter()
            .map(|e| e.thread.remote().id().to_owned())
            .collect()
    }

    /// Whether IOThread `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        lock(&self.inner.state).entry(id).is_ok()
    }

    /// Fetches IOThread `id`'s context handle and registers `holder`, in one step
    /// under one lock. The returned guard releases the holder when dropped.
    pub fn acquire(&self, id: &str, holder: IoThreadHolder) -> Result<HolderGuard> {
        let mut state = lock(&self.inner.state);
        let entry = state.entry_mut(id)?;
        entry.holders.push(holder.clone());
        Ok(HolderGuard::new(
            Arc::downgrade(&self.inner),
            Arc::clone(entry.thread.remote()),
            holder,
        ))
    }

    /// Applies an `iothread-vq-mapping` for a device with `num_queues` queues: validates
    /// it against the existing IOThreads (see [`assign_vqs`]) and registers `holder`
    /// on every mapped IOThread, all under one lock (all or nothing). Like QEMU, every
    /// listed IOThread is held even if round-robin leaves it without a queue.
    pub fn acquire_vq_mapping(
        &self,
        mapping: &[IoThreadVqMapping],
        num_queues: u16,
        holder: IoThreadHolder,
    ) -> Result<VqAssignment> {
        let mut state = lock(&self.inner.state);
        let per_queue = assign_vqs(mapping, num_queues, |id| state.entry(id).is_ok())?;
        let queue_guard = queue_guards(mapping, &per_queue)?;
        let guards = state.acquire_all(&self.inner, mapping, &holder);
        // Guards release under the lock: drop it before they can go away.
        drop(state);
        Ok(VqAssignment::new(
            Arc::downgrade(&self.inner),
            holder,
            mapping.to_vec(),
            num_queues,
            guards?,
            queue_guard,
        ))
    }

    /// Holders of IOThread `id`, in registration order.
    pub fn holders(&self, id: &str) -> Result<Vec<IoThreadHolder>> {
        Ok(lock(&self.inner.state).entry(id)?.holders.clone())
    }

    /// Every IOThread's id and holders, in creation order, from one consistent
    /// snapshot (what `query-iothreads` shows, without the QEMU shapes).
    pub fn all_holders(&self) -> Vec<(String, Vec<IoThreadHolder>)> {
        lock(&self.inner.state)
            .threads
            .iter()
            .map(|e| (e.thread.remote().id().to_owned(), e.holders.clone()))
            .collect()
    }

    /// Replaces all parameters of IOThread `id` (validated like at creation). The loop
    /// resets its adaptive state and wakes up.
    pub fn set_params(&self, id: &str, params: IoThreadParams) -> Result<()> {
        self.thread(id)?.update_params(|p| {
            *p = params;
            Ok(())
        })
    }

    /// Parameters in use by IOThread `id` (0 replaced by defaults where 0 means
    /// "default").
    pub fn params(&self, id: &str) -> Result<IoThreadParams> {
        Ok(self.thread(id)?.params())
    }

    /// Sets one property by its QEMU name (`qom-set /objects/<id> <name> <value>`;
    /// feature `qemu`).
    #[cfg(feature = "qemu")]
    pub fn set_property(&self, id: &str, name: &str, value: i64) -> Result<()> {
        let property: Property = name.parse()?;
        let thread = self.thread(id)?;
        thread.update_params(|p| p.set(property, value))
    }

    /// Reads one property by its QEMU name (`qom-get`; feature `qemu`); reports the
    /// value in use.
    #[cfg(feature = "qemu")]
    pub fn get_property(&self, id: &str, name: &str) -> Result<i64> {
        let property: Property = name.parse()?;
        Ok(self.thread(id)?.params().get(property))
    }

    #[cfg(feature = "qemu")]
    fn snapshot(&self) -> Vec<(Arc<IoThread>, Vec<IoThreadHolder>)> {
        lock(&self.inner.state)
            .threads
            .iter()
            .map(|e| (Arc::clone(&e.thread), e.holders.clone()))
            .collect()
    }

    /// `query-iothreads`: one element per IOThread, in creation order (feature `qemu`).
    #[cfg(feature = "qemu")]
    pub fn query_iothreads(&self) -> Vec<IoThreadInfo> {
        self.snapshot()
            .into_iter()
            .map(|(t, holders)| {
                IoThreadInfo::new(t.remote().id(), t.thread_id(), holders, &t.params())
            })
            .collect()
    }

    /// `info iothreads`: the HMP text of [`query_iothreads`](Self::query_iothreads)
    /// (feature `qemu`).
    #[cfg(feature = "qemu")]
    pub fn info_iothreads(&self) -> String {
        format_info_iothreads(&self.query_iothreads())
    }

    /// Host thread id (TID) of IOThread `id`.
    pub fn thread_id(&self, id: &str) -> Result<i64> {
        Ok(self.thread(id)?.thread_id())
    }

    /// Life-cycle state of IOThread `id` (running, stopped or panicked).
    pub fn state(&self, id: &str) -> Result<IoThreadState> {
        Ok(self.thread(id)?.remote().state())
    }

    /// Statistics of IOThread `id`: thread CPU time and the event loop's counters.
    pub fn stats(&self, id: &str) -> Result<IoThreadStats> {
        let thread = self.thread(id)?;
        let remote = thread.remote();
        Ok(IoThreadStats {
            id: remote.id().to_owned(),
            thread_id: thread.thread_id(),
            state: remote.state(),
            cpu_time_ns: thread.cpu_time_ns(),
            poll: remote.handle().stats(),
        })
    }

    /// Pins IOThread `id` to `cpus` (like libvirt's `iothreadpin`). Every CPU must be
    /// online and allowed for this process.
    pub fn set_affinity(&self, id: &str, cpus: &[usize]) -> Result<()> {
        let thread = self.thread(id)?;
        if cpus.is_empty() {
            return Err(Error::EmptyCpuList { id: id.to_owned() });
        }
        let os = |op, source| Error::Os {
            id: id.to_owned(),
            op,
            source,
        };
        let available = sys::available_cpus().map_err(|e| os("reading the available CPUs", e))?;
        if let Some(&cpu) = cpus.iter().find(|c| !available.contains(c)) {
            return Err(Error::InvalidCpu { cpu, available });
        }
        self.running(&thread)?;
        sys::set_affinity(thread.thread_id(), cpus).map_err(|e| os("sched_setaffinity", e))
    }

    /// CPUs IOThread `id` may run on, ascending.
    pub fn affinity(&self, id: &str) -> Result<Vec<usize>> {
        let thread = self.thread(id)?;
        self.running(&thread)?;
        sys::get_affinity(thread.thread_id()).map_err(|source| Error::Os {
            id: id.to_owned(),
            op: "sched_getaffinity",
            source,
        })
    }

    fn running(&self, thread: &IoThread) -> Result<()> {
        match thread.remote().state() {
            IoThreadState::Running => Ok(()),
            _ => Err(Error::ThreadGone {
                id: thread.remote().id().to_owned(),
            }),
        }
    }
}

/// Weak handle used by [`HolderGuard`] so that guards never keep IOThreads alive.
pub(crate) type WeakInner = Weak<Inner>;
