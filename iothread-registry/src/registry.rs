//! The registry of IOThreads: create/delete by id, holders, parameters, queries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use aio_poll::AioContext;

use crate::assignment::VqAssignment;
use crate::error::{Error, Result};
use crate::holder::IoThreadHolder;
use crate::id::validate_id;
use crate::info::{format_info_iothreads, IoThreadInfo};
use crate::iothread::{lock, IoThread, IoThreadState};
use crate::mapping::{assign_vqs, IoThreadVqMapping};
use crate::params::{IoThreadParams, Property};
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
}

/// Serials identify IOThreads process-wide (across registries) for the deadlock
/// check and for guards; 0 means "not an IOThread".
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

impl Inner {
    /// Removes one entry equal to `holder` (the earliest registered) from IOThread
    /// `id`, provided it is still the IOThread with `serial`.
    pub(crate) fn release(
        &self,
        id: &str,
        serial: Option<u64>,
        holder: &IoThreadHolder,
    ) -> Result<()> {
        let mut state = lock(&self.state);
        let entry = state.entry_mut(id)?;
        let pos = entry
            .holders
            .iter()
            .position(|h| h == holder)
            .filter(|_| serial.is_none_or(|s| s == entry.thread.remote().serial()));
        match pos {
            Some(pos) => {
                entry.holders.remove(pos);
                Ok(())
            }
            None => Err(Error::NotHeld {
                id: id.to_owned(),
                holder: holder.clone(),
            }),
        }
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
        IoThreadRegistry {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
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
        let spawned = IoThread::spawn(id, serial, params);
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
            if !entry.holders.is_empty() {
                return Err(Error::InUse {
                    id: id.to_owned(),
                    holders: entry.holders.clone(),
                });
            }
            if entry.thread.remote().on_own_thread() {
                return Err(Error::WouldDeadlock { id: id.to_owned() });
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
        // Validation passed under this lock: every entry exists and is listed once.
        let mut guards = Vec::with_capacity(mapping.len());
        let mut missing = None;
        for m in mapping {
            match state.entry_mut(&m.iothread) {
                Ok(entry) => {
                    entry.holders.push(holder.clone());
                    guards.push(HolderGuard::new(
                        Arc::downgrade(&self.inner),
                        Arc::clone(entry.thread.remote()),
                        holder.clone(),
                    ));
                }
                Err(e) => {
                    missing = Some(e);
                    break;
                }
            }
        }
        // Guards release under the lock: drop it before they can go away.
        drop(state);
        if let Some(e) = missing {
            return Err(e);
        }
        let queue_guard = per_queue
            .iter()
            .map(|id| {
                mapping
                    .iter()
                    .position(|m| &m.iothread == id)
                    .ok_or_else(|| not_found(id))
            })
            .collect::<Result<Vec<usize>>>()?;
        Ok(VqAssignment::new(guards, queue_guard))
    }

    /// Removes one registration of `holder` from IOThread `id` (the earliest one).
    /// Errors with [`Error::NotHeld`] when `holder` does not hold it. Prefer dropping
    /// or releasing the [`HolderGuard`]; this is for holders tracked without guards.
    pub fn release(&self, id: &str, holder: &IoThreadHolder) -> Result<()> {
        self.inner.release(id, None, holder)
    }

    /// Holders of IOThread `id`, in registration order.
    pub fn holders(&self, id: &str) -> Result<Vec<IoThreadHolder>> {
        Ok(lock(&self.inner.state).entry(id)?.holders.clone())
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

    /// Sets one property by its QEMU name (`qom-set /objects/<id> <name> <value>`).
    pub fn set_property(&self, id: &str, name: &str, value: i64) -> Result<()> {
        let property: Property = name.parse()?;
        let thread = self.thread(id)?;
        thread.update_params(|p| p.set(property, value))
    }

    /// Reads one property by its QEMU name (`qom-get`); reports the value in use.
    pub fn get_property(&self, id: &str, name: &str) -> Result<i64> {
        let property: Property = name.parse()?;
        Ok(self.thread(id)?.params().get(property))
    }

    /// Runs `f` inside IOThread `id`'s loop without waiting. Errors with
    /// [`Error::ThreadGone`] when the loop no longer runs.
    pub fn submit(&self, id: &str, f: impl FnOnce(&mut AioContext) + Send + 'static) -> Result<()> {
        self.thread(id)?.remote().submit(f)
    }

    /// Runs `f` inside IOThread `id`'s loop and waits for its result.
    ///
    /// Returns [`Error::WouldDeadlock`] when called on that IOThread, and
    /// [`Error::ThreadGone`] (never hangs) when the loop stopped or panicked before
    /// running `f`.
    pub fn call<R: Send + 'static>(
        &self,
        id: &str,
        f: impl FnOnce(&mut AioContext) -> R + Send + 'static,
    ) -> Result<R> {
        let remote = Arc::clone(self.thread(id)?.remote());
        remote.call(f)
    }

    fn snapshot(&self) -> Vec<(Arc<IoThread>, Vec<IoThreadHolder>)> {
        lock(&self.inner.state)
            .threads
            .iter()
            .map(|e| (Arc::clone(&e.thread), e.holders.clone()))
            .collect()
    }

    /// `query-iothreads`: one element per IOThread, in creation order.
    pub fn query_iothreads(&self) -> Vec<IoThreadInfo> {
        self.snapshot()
            .into_iter()
            .map(|(t, holders)| {
                IoThreadInfo::new(t.remote().id(), t.thread_id(), holders, &t.params())
            })
            .collect()
    }

    /// `info iothreads`: the HMP text of [`query_iothreads`](Self::query_iothreads).
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
