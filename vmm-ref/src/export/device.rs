//! Opens an export's drive as the virtio-blk device model.

use super::{ExportConfig, ExportError, MAX_QUEUE_SIZE};
use crate::virtio::block::{Block, BlockConfig, BlockHandle, BlockRole};
use crate::virtio::device::VirtioDevice;
use iothread_registry::{IoThreadHolder, IoThreadRegistry, IoThreadVqMapping};

/// Builds the virtio-blk device for `cfg`. The device serves queue `i` on
/// IOThread `cfg.queue_iothreads[i]` and holds those IOThreads as
/// `block-node <node-name>` for as long as it exists (the export's life). The
/// handle reports per-queue counters and flushes.
pub(super) fn open_block(
    cfg: &ExportConfig,
    registry: &IoThreadRegistry,
) -> Result<(Box<dyn VirtioDevice>, BlockHandle), ExportError> {
    if cfg.queue_iothreads.len() != usize::from(cfg.num_queues) {
        return Err(ExportError::QueueMapping {
            queues: cfg.num_queues,
            iothreads: cfg.queue_iothreads.len(),
        });
    }
    let block = Block::new(
        BlockConfig {
            id: cfg.id.clone(),
            path: cfg.file.clone(),
            num_queues: cfg.num_queues,
            queue_size: MAX_QUEUE_SIZE,
            readonly: cfg.readonly,
            direct: cfg.direct,
            iothreads: explicit_mapping(&cfg.queue_iothreads),
            engine: cfg.engine,
            serial: Some(cfg.id.clone()),
            holder: IoThreadHolder::block_node(cfg.node_name.clone()),
            role: BlockRole::Export,
        },
        registry.clone(),
    )
    .map_err(|e| ExportError::Device(Box::new(e)))?;
    let handle = block.handle();
    Ok((Box::new(block), handle))
}

/// The explicit `iothread-vq-mapping` that serves queue `q` on `per_queue[q]`
/// (IOThreads in order of first use).
fn explicit_mapping(per_queue: &[String]) -> Vec<IoThreadVqMapping> {
    let mut mapping: Vec<IoThreadVqMapping> = Vec::new();
    for (q, id) in (0u16..).zip(per_queue) {
        match mapping.iter_mut().find(|m| &m.iothread == id) {
            Some(m) => m.vqs.get_or_insert_with(Vec::new).push(q),
            None => mapping.push(IoThreadVqMapping::with_vqs(id.clone(), [q])),
        }
    }
    mapping
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_mapping_round_trips_through_assign_vqs() {
        let per_queue: Vec<String> = ["io1", "io0", "io1", "io2"].map(String::from).to_vec();
        let m = explicit_mapping(&per_queue);
        assert_eq!(
            m,
            [
                IoThreadVqMapping::with_vqs("io1", [0, 2]),
                IoThreadVqMapping::with_vqs("io0", [1]),
                IoThreadVqMapping::with_vqs("io2", [3]),
            ]
        );
        assert_eq!(
            iothread_registry::assign_vqs(&m, 4, |_| true).unwrap(),
            per_queue
        );
    }
}
