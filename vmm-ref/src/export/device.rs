//! Opens an export's drive as the virtio-blk device model.

use super::{ExportConfig, ExportError, MAX_QUEUE_SIZE};
use crate::virtio::block::{Block, BlockConfig, BlockHandle, HolderPolicy};
use crate::virtio::device::VirtioDevice;
use iothread_registry::IoThreadRegistry;

/// Builds the virtio-blk device for `cfg`. The device serves queue `i` on
/// IOThread `cfg.queue_iothreads[i]`. The handle reports per-queue
/// counters and flushes.
pub(super) fn open_block(
    cfg: &ExportConfig,
    registry: &IoThreadRegistry,
) -> Result<(Box<dyn VirtioDevice>, BlockHandle), ExportError> {
    let block = Block::new(
        BlockConfig {
            id: cfg.id.clone(),
            path: cfg.file.clone(),
            num_queues: cfg.num_queues,
            queue_size: MAX_QUEUE_SIZE,
            readonly: cfg.readonly,
            direct: cfg.direct,
            queue_iothreads: cfg.queue_iothreads.clone(),
            engine: cfg.engine,
            serial: Some(cfg.id.clone()),
            holders: HolderPolicy::External,
        },
        registry.clone(),
    )
    .map_err(|e| ExportError::Device(Box::new(e)))?;
    let handle = block.handle();
    Ok((Box::new(block), handle))
}
