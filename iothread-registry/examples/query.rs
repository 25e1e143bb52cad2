// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Creates two IOThreads with holders and prints `query-iothreads` (QMP JSON) and
//! `info iothreads` (HMP text). Run: `cargo run -p iothread-registry --example query`.

use iothread_registry::aio_poll::PollParams;
use iothread_registry::{IoThreadHolder, IoThreadParams, IoThreadRegistry};

fn main() -> Result<(), iothread_registry::Error> {
    let registry = IoThreadRegistry::new();
    registry.create("iothread0", IoThreadParams::default())?;
    registry.create(
        "iothread1",
        IoThreadParams::default()
            .with_poll(PollParams::default().with_max_ns(0))
            .with_aio_max_batch(32),
    )?;
    let _device = registry.acquire(
        "iothread0",
        IoThreadHolder::qom_object("/machine/peripheral/blk0/virtio-backend"),
    )?;
    let _export = registry.acquire("iothread0", IoThreadHolder::block_node("disk0"))?;
    // qom-set /objects/iothread1 poll-weight 5
    registry.set_property("iothread1", "poll-weight", 5)?;

    // A struct (not `json!`) keeps QEMU's field order.
    #[derive(serde::Serialize)]
    struct Reply {
        #[serde(rename = "return")]
        ret: Vec<iothread_registry::IoThreadInfo>,
    }
    let reply = Reply {
        ret: registry.query_iothreads(),
    };
    println!("{}", serde_json::to_string(&reply).unwrap_or_default());
    print!("{}", registry.info_iothreads());
    Ok(())
}
