//! Pure negotiation logic: which back-ends are usable, which virtio features
//! the guest is offered, which protocol features are acknowledged, and the
//! configuration space the guest sees. No I/O, so every rule is unit-tested.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};

use crate::virtio::device::{
    feature, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of the virtio-blk configuration space read from the back-end
/// (`struct virtio_blk_config` up to `write_zeroes_may_unmap` and padding).
pub const CONFIG_SIZE: usize = 60;
/// Offset of `num_queues` (u16) in the configuration space.
const NUM_QUEUES_OFFSET: usize = 34;
/// Offset of `writeback` (u8), the only field a driver may write (with
/// `VIRTIO_BLK_F_CONFIG_WCE`).
pub const WRITEBACK_OFFSET: u64 = 32;

/// Virtio features a back-end may pass on to the guest: the virtio-blk
/// features vmm-ref's transport and the test guest understand, split-ring
/// notification suppression and indirect descriptors (both handled entirely
/// by the back-end), and `VIRTIO_F_VERSION_1`. Everything else the back-end
/// offers (packed rings, IOMMU platform, ...) is masked.
pub const GUEST_FEATURE_MASK: u64 = feature(VIRTIO_BLK_F_SIZE_MAX)
    | feature(VIRTIO_BLK_F_SEG_MAX)
    | feature(VIRTIO_BLK_F_RO)
    | feature(VIRTIO_BLK_F_BLK_SIZE)
    | feature(VIRTIO_BLK_F_FLUSH)
    | feature(VIRTIO_BLK_F_TOPOLOGY)
    | feature(VIRTIO_BLK_F_CONFIG_WCE)
    | feature(VIRTIO_BLK_F_MQ)
    | feature(VIRTIO_BLK_F_DISCARD)
    | feature(VIRTIO_BLK_F_WRITE_ZEROES)
    | feature(VIRTIO_RING_F_INDIRECT_DESC)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_F_VERSION_1);

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30).
pub const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Protocol features vmm-ref uses when the back-end offers them.
pub fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Why a back-end cannot serve the device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FeatureError {
    /// The back-end lacks a required virtio or vhost-user feature.
    #[error("the back-end does not offer {0}")]
    Missing(&'static str),
    /// The back-end serves fewer queues than the device has.
    #[error("the back-end serves {backend} queues, the device has {wanted}")]
    TooFewQueues {
        /// Queues of the back-end (`GET_QUEUE_NUM`).
        backend: u64,
        /// `num-queues` of the device.
        wanted: u16,
    },
    /// A reconnected back-end does not offer features the driver is using.
    #[error("the back-end no longer offers features {missing:#x} the driver acknowledged")]
    FeaturesLost {
        /// The acknowledged feature bits the back-end lacks.
        missing: u64,
    },
}

/// Checks a back-end's virtio features, protocol features and queue count
/// (`queue_num`, when it has the MQ protocol feature) against a device of
/// `num_queues` queues.
pub fn check_backend(
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: Option<u64>,
    num_queues: u16,
) -> Result<(), FeatureError> {
    if features & feature(VIRTIO_F_VERSION_1) == 0 {
        return Err(FeatureError::Missing("VIRTIO_F_VERSION_1"));
    }
    if features & PROTOCOL_FEATURES == 0 {
        return Err(FeatureError::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
    }
    if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(FeatureError::Missing(
            "VHOST_USER_PROTOCOL_F_CONFIG (the configuration space)",
        ));
    }
    if num_queues > 1 {
        if features & feature(VIRTIO_BLK_F_MQ) == 0 {
            return Err(FeatureError::Missing("VIRTIO_BLK_F_MQ (several queues)"));
        }
        if !protocol.contains(VhostUserProtocolFeatures::MQ) {
            return Err(FeatureError::Missing("VHOST_USER_PROTOCOL_F_MQ"));
        }
    }
    match queue_num {
        Some(n) if n < u64::from(num_queues) => Err(FeatureError::TooFewQueues {
            backend: n,
            wanted: num_queues,
        }),
        _ => Ok(()),
    }
}

/// Virtio features offered to the guest: what the back-end offers within
/// [`GUEST_FEATURE_MASK`], without `VIRTIO_BLK_F_MQ` for a single queue (as
/// QEMU does).
pub fn guest_features(backend: u64, num_queues: u16) -> u64 {
    let mut f = backend & GUEST_FEATURE_MASK;
    if num_queues <= 1 {
        f &= !feature(VIRTIO_BLK_F_MQ);
    }
    f
}

/// The virtio features set on the back-end (`SET_FEATURES`) once the guest
/// acknowledged `guest_acked`.
pub fn backend_features(guest_acked: u64) -> u64 {
    guest_acked | PROTOCOL_FEATURES
}

/// Checks that a reconnected back-end still offers what the guest acked.
pub fn check_reconnect(backend: u64, guest_acked: u64) -> Result<(), FeatureError> {
    let missing = guest_acked & !backend;
    if missing != 0 {
        return Err(FeatureError::FeaturesLost { missing });
    }
    Ok(())
}

/// Turns the back-end's configuration space into the guest's: exactly
/// [`CONFIG_SIZE`] bytes, `num_queues` set to the device's queue count (the
/// back-end may serve more; the guest must not use them).
pub fn guest_config(backend: &[u8], num_queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_SIZE];
    let n = backend.len().min(CONFIG_SIZE);
    if let (Some(dst), Some(src)) = (c.get_mut(..n), backend.get(..n)) {
        dst.copy_from_slice(src);
    }
    if let Some(dst) = c.get_mut(NUM_QUEUES_OFFSET..NUM_QUEUES_OFFSET + 2) {
        dst.copy_from_slice(&num_queues.to_le_bytes());
    }
    c
}

/// Capacity in 512-byte sectors from a configuration space.
pub fn capacity(config: &[u8]) -> u64 {
    config
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = feature(VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES;

    fn proto(bits: &[VhostUserProtocolFeatures]) -> VhostUserProtocolFeatures {
        bits.iter()
            .fold(VhostUserProtocolFeatures::empty(), |a, b| a | *b)
    }

    #[test]
    fn required_features() {
        let cfg = proto(&[VhostUserProtocolFeatures::CONFIG]);
        assert_eq!(check_backend(BASE, cfg, None, 1), Ok(()));
        assert_eq!(
            check_backend(PROTOCOL_FEATURES, cfg, None, 1),
            Err(FeatureError::Missing("VIRTIO_F_VERSION_1"))
        );
        assert_eq!(
            check_backend(feature(VIRTIO_F_VERSION_1), cfg, None, 1),
            Err(FeatureError::Missing("VHOST_USER_F_PROTOCOL_FEATURES"))
        );
        assert!(matches!(
            check_backend(BASE, VhostUserProtocolFeatures::MQ, None, 1),
            Err(FeatureError::Missing(m)) if m.starts_with("VHOST_USER_PROTOCOL_F_CONFIG")
        ));
    }

    #[test]
    fn queue_requirements() {
        let mq = BASE | feature(VIRTIO_BLK_F_MQ);
        let p = proto(&[
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::MQ,
        ]);
        assert_eq!(check_backend(mq, p, Some(4), 4), Ok(()));
        assert_eq!(check_backend(mq, p, Some(8), 4), Ok(()));
        assert_eq!(
            check_backend(mq, p, Some(2), 4),
            Err(FeatureError::TooFewQueues {
                backend: 2,
                wanted: 4
            })
        );
        assert!(
            check_backend(BASE, p, Some(4), 4).is_err(),
            "no VIRTIO_BLK_F_MQ"
        );
        let no_mq = proto(&[VhostUserProtocolFeatures::CONFIG]);
        assert_eq!(
            check_backend(mq, no_mq, None, 4),
            Err(FeatureError::Missing("VHOST_USER_PROTOCOL_F_MQ"))
        );
        // One queue needs neither.
        assert_eq!(check_backend(BASE, no_mq, None, 1), Ok(()));
    }

    #[test]
    fn guest_sees_masked_features() {
        let packed = 1u64 << 34; // VIRTIO_F_RING_PACKED
        let backend = BASE
            | packed
            | feature(VIRTIO_BLK_F_MQ)
            | feature(VIRTIO_BLK_F_FLUSH)
            | feature(VIRTIO_RING_F_EVENT_IDX);
        let g = guest_features(backend, 4);
        assert_eq!(
            g,
            feature(VIRTIO_F_VERSION_1)
                | feature(VIRTIO_BLK_F_MQ)
                | feature(VIRTIO_BLK_F_FLUSH)
                | feature(VIRTIO_RING_F_EVENT_IDX)
        );
        assert_eq!(
            g & PROTOCOL_FEATURES,
            0,
            "a vhost-user bit never reaches the guest"
        );
        assert_eq!(guest_features(backend, 1) & feature(VIRTIO_BLK_F_MQ), 0);
        assert_eq!(backend_features(g), g | PROTOCOL_FEATURES);
    }

    #[test]
    fn reconnect_keeps_acked_features() {
        let acked = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BLK_F_FLUSH);
        assert_eq!(
            check_reconnect(BASE | feature(VIRTIO_BLK_F_FLUSH), acked),
            Ok(())
        );
        assert_eq!(
            check_reconnect(BASE, acked),
            Err(FeatureError::FeaturesLost {
                missing: feature(VIRTIO_BLK_F_FLUSH)
            })
        );
    }

    #[test]
    fn config_space_for_the_guest() {
        let mut backend = vec![0xffu8; 64];
        backend[..8].copy_from_slice(&8192u64.to_le_bytes());
        let c = guest_config(&backend, 2);
        assert_eq!(c.len(), CONFIG_SIZE);
        assert_eq!(capacity(&c), 8192);
        assert_eq!(&c[34..36], &2u16.to_le_bytes());
        assert_eq!(c[36], 0xff, "other fields are the back-end's");
        let short = guest_config(&[1, 0, 0], 1);
        assert_eq!(capacity(&short), 1);
        assert_eq!(&short[34..36], &1u16.to_le_bytes());
        assert_eq!(capacity(&[1, 2]), 0);
    }
}
