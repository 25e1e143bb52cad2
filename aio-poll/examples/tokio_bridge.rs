// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! aio-poll on its own thread serving a tokio application through
//! `ContextHandle`, the way a VMM with an async control plane (HTTP API,
//! QMP over tokio) would keep its I/O thread: the context is `!Sync` and
//! runs its own loop; async tasks send it closures and await the answers.
//!
//! ```text
//! cargo run -p aio-poll --example tokio_bridge
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aio_poll::{AioContext, ContextHandle, FnHandler, Interest, PollParams, SharedEventFd};
use tokio::sync::oneshot;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Runs `f` inside the aio-poll loop and awaits its result. The closure runs
/// on the I/O thread with the context; the loop is woken by the scheduling
/// itself (no syscall if it is busy).
async fn call<R: Send + 'static>(
    io: &ContextHandle,
    f: impl FnOnce(&mut AioContext) -> R + Send + 'static,
) -> Result<R, &'static str> {
    let (tx, rx) = oneshot::channel();
    io.schedule_oneshot(move |ctx| {
        // The caller may have gone away: nothing to do then.
        let _ = tx.send(f(ctx));
    });
    // Dropped unrun (context gone) closes the channel.
    rx.await.map_err(|_| "the I/O thread is gone")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The I/O thread: creates its context, hands out the handle, runs.
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let io_thread = std::thread::Builder::new().name("io0".into()).spawn(
        move || -> Result<u64, aio_poll::Error> {
            let mut ctx = AioContext::with_params(PollParams::default())?;
            // A device interrupt source: every write is one "completion".
            let irq = SharedEventFd::new(EventFd::new(EFD_NONBLOCK).map_err(|source| {
                aio_poll::Error::Io {
                    op: "eventfd",
                    source,
                }
            })?);
            let reader = irq.clone();
            let completions = Arc::new(AtomicU64::new(0));
            let c = completions.clone();
            ctx.add_fd_handler(
                irq.clone(),
                Interest::READABLE,
                FnHandler::new(move |_ctx, _ready| {
                    c.fetch_add(reader.read().unwrap_or(0), Ordering::SeqCst);
                }),
            )?;
            let _ = handle_tx.send((ctx.handle(), irq, completions));
            // Until an async task calls `request_stop`.
            ctx.run(|_| false)?;
            Ok(ctx.stats().bh_runs)
        },
    )?;
    let (io, irq, completions) = handle_rx.recv()?;

    // The tokio application (a current-thread runtime is enough here).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    rt.block_on(async {
        // Concurrent tasks asking the I/O thread for work.
        let mut tasks = Vec::new();
        for task in 0..4u64 {
            let io = io.clone();
            let irq = irq.clone();
            tasks.push(tokio::spawn(async move {
                let mut sum = 0;
                for i in 0..250u64 {
                    // "Submit a request": the device completes it through
                    // its eventfd, which the I/O thread's handler counts.
                    irq.write(1).map_err(|_| "eventfd write failed")?;
                    sum +=
                        call(&io, move |ctx| task * 1000 + i + ctx.handler_count() as u64).await?;
                }
                Ok::<u64, &'static str>(sum)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.map_err(|_| "task panicked")??;
        }
        // An async timer on the tokio side, a loop timer on the I/O side.
        let (tx, rx) = oneshot::channel();
        call(&io, move |ctx| {
            let now = ctx.now_ns();
            let mut tx = Some(tx);
            ctx.add_timer(now + 2_000_000, None, move |_ctx| {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            });
        })
        .await?;
        tokio::time::timeout(std::time::Duration::from_secs(10), rx)
            .await
            .map_err(|_| "loop timer did not fire")?
            .map_err(|_| "timer dropped")?;
        let stats = call(&io, |ctx| ctx.stats()).await?;
        println!(
            "1000 calls answered (checksum {total}), {} completions counted, \
             loop iterations {}, eventfd wake-ups {}",
            completions.load(Ordering::SeqCst),
            stats.iterations,
            stats.eventfd_wakeups,
        );
        Ok::<(), &'static str>(())
    })?;

    io.request_stop();
    let bh_runs = io_thread.join().map_err(|_| "I/O thread panicked")??;
    println!("I/O thread stopped after {bh_runs} bottom halves");
    Ok(())
}
