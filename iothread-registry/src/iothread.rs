// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One IOThread: a named OS thread that owns an [`AioContext`] and runs it until
//! asked to stop.

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use aio_poll::{AioContext, ContextHandle, PollParams};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::params::IoThreadParams;
use crate::sys;

/// How often a waiter re-checks whether the IOThread is still alive. Only bounds how
/// long a wait on a dead thread takes to fail; results arrive without this delay.
const LIVENESS_CHECK: Duration = Duration::from_millis(50);

thread_local! {
    /// Serial of the IOThread running on this OS thread (0 = not an IOThread).
    static CURRENT_SERIAL: Cell<u64> = const { Cell::new(0) };
}

/// Locks a mutex, ignoring poisoning (every critical section leaves its data
/// consistent, so a panic elsewhere never makes it unusable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Life-cycle state of an IOThread's event loop.
///
/// JSON: `"running"`, `"stopped"`, `{"panicked": {"message": "..."}}`,
/// `{"failed": {"message": "..."}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum IoThreadState {
    /// The event loop is running.
    Running,
    /// The event loop returned after a stop request.
    Stopped,
    /// A callback panicked; the loop was left and the thread ended.
    Panicked {
        /// The panic message, if it was a string.
        message: String,
    },
    /// The event loop returned an error (e.g. `epoll_wait` failed); the
    /// thread ended.
    Failed {
        /// The error and its causes.
        message: String,
    },
}

impl fmt::Display for IoThreadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoThreadState::Running => f.write_str("running"),
            IoThreadState::Stopped => f.write_str("stopped"),
            IoThreadState::Panicked { message } => write!(f, "panicked: {message}"),
            IoThreadState::Failed { message } => write!(f, "failed: {message}"),
        }
    }
}

/// The part of an IOThread shared with holders: enough to run work on it.
pub(crate) struct Remote {
    id: String,
    serial: u64,
    handle: ContextHandle,
    state: Mutex<IoThreadState>,
    /// CPU time of the thread when its loop ended (ns).
    final_cpu_ns: AtomicU64,
}

impl Remote {
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn serial(&self) -> u64 {
        self.serial
    }

    pub(crate) fn handle(&self) -> &ContextHandle {
        &self.handle
    }

    pub(crate) fn state(&self) -> IoThreadState {
        lock(&self.state).clone()
    }

    fn is_running(&self) -> bool {
        *lock(&self.state) == IoThreadState::Running
    }

    fn gone(&self) -> Error {
        Error::ThreadGone {
            id: self.id.clone(),
        }
    }

    /// True when called on this IOThread's own OS thread.
    pub(crate) fn on_own_thread(&self) -> bool {
        CURRENT_SERIAL.with(Cell::get) == self.serial || self.handle.is_loop_thread()
    }

    /// Queues `f` to run inside the loop, without waiting.
    pub(crate) fn submit(&self, f: impl FnOnce(&mut AioContext) + Send + 'static) -> Result<()> {
        if !self.is_running() {
            return Err(self.gone());
        }
        self.handle.schedule_oneshot(f);
        Ok(())
    }

    /// Runs `f` inside the loop and waits for its result.
    pub(crate) fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut AioContext) -> R + Send + 'static,
    ) -> Result<R> {
        if self.on_own_thread() {
            return Err(Error::WouldDeadlock {
                id: self.id.clone(),
            });
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(move |ctx| {
            // The caller may have given up (thread found dead); nothing to do then.
            let _ = tx.send(f(ctx));
        })?;
        loop {
            match rx.recv_timeout(LIVENESS_CHECK) {
                Ok(value) => return Ok(value),
                Err(RecvTimeoutError::Disconnected) => return Err(self.gone()),
                Err(RecvTimeoutError::Timeout) if !self.is_running() => {
                    // The loop ended: the closure either ran already or never will.
                    return match rx.try_recv() {
                        Ok(value) => Ok(value),
                        Err(_) => Err(self.gone()),
                    };
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// An IOThread as owned by the registry.
pub(crate) struct IoThread {
    remote: Arc<Remote>,
    thread_id: i64,
    /// Checked by the loop after every iteration.
    stop: Arc<AtomicBool>,
    join: Mutex<Option<JoinHandle<()>>>,
    /// Effective parameters; the lock also serialises read-modify-write updates.
    params: Mutex<IoThreadParams>,
}

/// What a spawn hook reports on failure.
pub type SpawnHookError = Box<dyn std::error::Error + Send + Sync>;

/// A registry's spawn hook (see
/// [`IoThreadRegistry::with_spawn_hook`](crate::IoThreadRegistry::with_spawn_hook)).
pub(crate) type SpawnHook =
    Arc<dyn Fn(&SpawnInfo<'_>) -> std::result::Result<(), SpawnHookError> + Send + Sync>;

/// What a spawn hook learns about the IOThread it runs on.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct SpawnInfo<'a> {
    /// The IOThread's id.
    pub id: &'a str,
    /// Host thread id (TID) of the new thread (the calling thread of the hook).
    pub thread_id: i64,
}

/// Why the new thread did not reach its loop.
enum StartError {
    Poll(aio_poll::Error),
    Hook(SpawnHookError),
}

/// What the new thread reports to `spawn` before it enters its loop.
type Ready = std::result::Result<(i64, ContextHandle), StartError>;

/// A panic of the spawn hook, as its error.
#[derive(Debug, thiserror::Error)]
#[error("the spawn hook panicked: {0}")]
struct HookPanicked(String);

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// `e` and its causes, `": "`-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Body of an IOThread.
#[allow(clippy::too_many_arguments)]
fn thread_main(
    id: &str,
    serial: u64,
    params: PollParams,
    batch: u64,
    hook: Option<SpawnHook>,
    ready: mpsc::SyncSender<Ready>,
    running: mpsc::SyncSender<()>,
    stop: Arc<AtomicBool>,
    remote_slot: Arc<Mutex<Option<Arc<Remote>>>>,
) {
    CURRENT_SERIAL.with(|c| c.set(serial));
    let tid = sys::gettid();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let mut ctx = match AioContext::with_params(params) {
            Ok(ctx) => ctx,
            Err(e) => {
                let _ = ready.send(Err(StartError::Poll(e)));
                return Ok(());
            }
        };
        ctx.set_aio_max_batch(batch);
        if let Some(hook) = hook {
            let info = SpawnInfo { id, thread_id: tid };
            let outcome = match panic::catch_unwind(AssertUnwindSafe(|| hook(&info))) {
                Ok(result) => result,
                Err(payload) => {
                    Err(Box::new(HookPanicked(panic_message(payload.as_ref()))) as SpawnHookError)
                }
            };
            if let Err(e) = outcome {
                let _ = ready.send(Err(StartError::Hook(e)));
                return Ok(());
            }
        }
        if ready.send(Ok((tid, ctx.handle()))).is_err() {
            return Ok(());
        }
        // Runs inside the loop: `create` returns once the loop really turns.
        ctx.handle().schedule_oneshot(move |_| {
            let _ = running.send(());
        });
        ctx.run(|_| stop.load(Ordering::Acquire))
    }));
    let cpu_ns = sys::thread_cpu_time_ns(tid).unwrap_or(0);
    if let Some(remote) = lock(&remote_slot).as_ref() {
        remote.final_cpu_ns.store(cpu_ns, Ordering::Release);
        *lock(&remote.state) = match outcome {
            Ok(Ok(())) => IoThreadState::Stopped,
            Ok(Err(e)) => IoThreadState::Failed {
                message: error_chain(&e),
            },
            Err(payload) => IoThreadState::Panicked {
                message: panic_message(payload.as_ref()),
            },
        };
    }
}

impl IoThread {
    /// Spawns `IO <id>` with already validated (effective) parameters and waits until
    /// its loop runs.
    pub(crate) fn spawn(
        id: &str,
        serial: u64,
        params: IoThreadParams,
        hook: Option<SpawnHook>,
    ) -> Result<IoThread> {
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Ready>(1);
        let (running_tx, running_rx) = mpsc::sync_channel::<()>(1);
        let stop = Arc::new(AtomicBool::new(false));
        // Filled in once the handle is known; the thread records its end state there.
        let remote_slot: Arc<Mutex<Option<Arc<Remote>>>> = Arc::new(Mutex::new(None));

        let (pp, batch) = (params.poll, params.max_batch());
        let (thread_stop, thread_slot) = (Arc::clone(&stop), Arc::clone(&remote_slot));
        let thread_id = id.to_owned();
        // std truncates the OS-level name to 15 bytes (TASK_COMM_LEN - 1); ids are
        // ASCII so the cut never splits a character. The Rust-level name stays whole.
        let join = thread::Builder::new()
            .name(format!("IO {id}"))
            .spawn(move || {
                thread_main(
                    &thread_id,
                    serial,
                    pp,
                    batch,
                    hook,
                    ready_tx,
                    running_tx,
                    thread_stop,
                    thread_slot,
                )
            })
            .map_err(Error::Spawn)?;

        let gone = || Error::ThreadGone { id: id.to_owned() };
        let (thread_id, handle) = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = join.join();
                return Err(match e {
                    StartError::Poll(e) => Error::Poll(e),
                    StartError::Hook(source) => Error::SpawnHook {
                        id: id.to_owned(),
                        source,
                    },
                });
            }
            Err(_) => {
                let _ = join.join();
                return Err(gone());
            }
        };
        let remote = Arc::new(Remote {
            id: id.to_owned(),
            serial,
            handle,
            state: Mutex::new(IoThreadState::Running),
            final_cpu_ns: AtomicU64::new(0),
        });
        *lock(&remote_slot) = Some(Arc::clone(&remote));
        let thread = IoThread {
            remote,
            thread_id,
            stop,
            join: Mutex::new(Some(join)),
            params: Mutex::new(params),
        };
        // Wait for the first loop iteration; fail (never hang) if the thread died.
        loop {
            match running_rx.recv_timeout(LIVENESS_CHECK) {
                Ok(()) => return Ok(thread),
                Err(RecvTimeoutError::Timeout) if !thread.join_handle_finished() => {}
                Err(_) => {
                    let _ = thread.stop_and_join();
                    return Err(gone());
                }
            }
        }
    }

    pub(crate) fn remote(&self) -> &Arc<Remote> {
        &self.remote
    }

    pub(crate) fn thread_id(&self) -> i64 {
        self.thread_id
    }

    pub(crate) fn params(&self) -> IoThreadParams {
        *lock(&self.params)
    }

    fn join_handle_finished(&self) -> bool {
        lock(&self.join)
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
    }

    /// Applies `update` to the parameters, validates the result and hands it to the
    /// loop. Nothing changes on error.
    pub(crate) fn update_params(
        &self,
        update: impl FnOnce(&mut IoThreadParams) -> Result<()>,
    ) -> Result<()> {
        let mut current = lock(&self.params);
        let mut next = *current;
        update(&mut next)?;
        let next = next.validate()?;
        let pp = next.poll;
        let handle = self.remote.handle();
        // Applied inside the loop, in submission order: the loop resets its adaptive
        // state at once and publishes the new values with that iteration's stats
        // (a pending update on the handle would only show after the next event).
        handle.schedule_oneshot(move |ctx| {
            // Already validated above; an error cannot happen here.
            let _ = ctx.set_poll_params(pp);
        });
        handle.set_aio_max_batch(next.max_batch());
        *current = next;
        Ok(())
    }

    /// Thread CPU time in ns (the final value once the loop ended).
    pub(crate) fn cpu_time_ns(&self) -> u64 {
        if self.remote.is_running() {
            if let Ok(ns) = sys::thread_cpu_time_ns(self.thread_id) {
                return ns;
            }
        }
        self.remote.final_cpu_ns.load(Ordering::Acquire)
    }

    /// Asks the loop to stop from inside the loop (the callback runs on the IOThread).
    pub(crate) fn request_stop(&self) {
        // No ContextHandle is captured, so a never-run callback cannot keep the
        // context alive.
        let stop = Arc::clone(&self.stop);
        self.remote.handle().schedule_oneshot(move |ctx| {
            stop.store(true, Ordering::Release);
            ctx.handle().request_stop();
        });
    }

    /// Waits for the thread to end. Must not be called on the IOThread itself.
    pub(crate) fn join(&self) {
        if let Some(join) = lock(&self.join).take() {
            // The loop's panics are caught inside the thread; a panic here could only
            // come from thread teardown and there is nothing left to clean up.
            let _ = join.join();
        }
    }

    /// Requests a stop and waits for the thread to end.
    pub(crate) fn stop_and_join(&self) -> Result<()> {
        if self.remote.on_own_thread() {
            return Err(Error::WouldDeadlock {
                id: self.remote.id().to_owned(),
            });
        }
        self.request_stop();
        self.join();
        Ok(())
    }
}
