// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Who holds an IOThread (the "IOThread holders" series' `IOThreadHolder`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A user of an IOThread's context, registered while it uses the context.
///
/// Serialized as QEMU's tagged union, discriminator `type`:
///
/// ```
/// use iothread_registry::IoThreadHolder;
/// let h = IoThreadHolder::qom_object("/machine/peripheral/blk0/virtio-backend");
/// assert_eq!(
///     serde_json::to_string(&h).unwrap(),
///     r#"{"type":"qom-object","qom-path":"/machine/peripheral/blk0/virtio-backend"}"#
/// );
/// let b: IoThreadHolder =
///     serde_json::from_str(r#"{"type":"block-node","node-name":"disk0"}"#).unwrap();
/// assert_eq!(b, IoThreadHolder::block_node("disk0"));
/// assert_eq!(b.to_string(), "block-node disk0");
/// ```
///
/// Two holders are the same holder when kind and name are equal; the same holder may
/// hold an IOThread several times.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum IoThreadHolder {
    /// A QOM object, typically a device (`qom-path`).
    QomObject {
        /// Canonical QOM path, e.g. `/machine/peripheral/blk0/virtio-backend`.
        #[serde(rename = "qom-path")]
        qom_path: String,
    },
    /// A block-layer user such as a block export (`node-name`).
    BlockNode {
        /// Block node name, e.g. `disk0`.
        #[serde(rename = "node-name")]
        node_name: String,
    },
}

impl IoThreadHolder {
    /// A QOM object holder.
    pub fn qom_object(qom_path: impl Into<String>) -> Self {
        IoThreadHolder::QomObject {
            qom_path: qom_path.into(),
        }
    }

    /// A block node holder.
    pub fn block_node(node_name: impl Into<String>) -> Self {
        IoThreadHolder::BlockNode {
            node_name: node_name.into(),
        }
    }

    /// The discriminator as it appears in JSON (`qom-object`, `block-node`).
    pub fn kind(&self) -> &'static str {
        match self {
            IoThreadHolder::QomObject { .. } => "qom-object",
            IoThreadHolder::BlockNode { .. } => "block-node",
        }
    }

    /// The holder's name (QOM path or node name).
    pub fn name(&self) -> &str {
        match self {
            IoThreadHolder::QomObject { qom_path } => qom_path,
            IoThreadHolder::BlockNode { node_name } => node_name,
        }
    }
}

impl fmt::Display for IoThreadHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_both_kinds() {
        for (h, json) in [
            (
                IoThreadHolder::qom_object("/machine/peripheral/d0/virtio-backend"),
                r#"{"type":"qom-object","qom-path":"/machine/peripheral/d0/virtio-backend"}"#,
            ),
            (
                IoThreadHolder::block_node("disk0"),
                r#"{"type":"block-node","node-name":"disk0"}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&h).unwrap(), json);
            assert_eq!(serde_json::from_str::<IoThreadHolder>(json).unwrap(), h);
        }
    }

    #[test]
    fn rejects_unknown_type_and_missing_field() {
        assert!(serde_json::from_str::<IoThreadHolder>(r#"{"type":"monitor","x":"y"}"#).is_err());
        assert!(serde_json::from_str::<IoThreadHolder>(r#"{"type":"block-node"}"#).is_err());
        assert!(
            serde_json::from_str::<IoThreadHolder>(r#"{"type":"qom-object","node-name":"a"}"#)
                .is_err()
        );
    }

    #[test]
    fn display_and_accessors() {
        let q = IoThreadHolder::qom_object("/machine/peripheral/d0/virtio-backend");
        assert_eq!(
            q.to_string(),
            "qom-object /machine/peripheral/d0/virtio-backend"
        );
        assert_eq!(q.kind(), "qom-object");
        let b = IoThreadHolder::block_node("disk0");
        assert_eq!(b.to_string(), "block-node disk0");
        assert_eq!(b.name(), "disk0");
        // Same name, different kind: different holders.
        assert_ne!(
            IoThreadHolder::qom_object("x"),
            IoThreadHolder::block_node("x")
        );
    }
}
