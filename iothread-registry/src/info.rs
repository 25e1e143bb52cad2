// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `query-iothreads` (QMP) reply elements and `info iothreads` (HMP) text (feature
//! `qemu`).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::holder::IoThreadHolder;
use crate::params::IoThreadParams;

/// One element of the `query-iothreads` reply (feature `qemu`).
///
/// Serializes with exactly QEMU's field names and order (holders in registration
/// order):
///
/// ```
/// use iothread_registry::{IoThreadHolder, IoThreadInfo};
/// let info = IoThreadInfo {
///     id: "iothread0".into(),
///     thread_id: 3134,
///     holders: vec![IoThreadHolder::block_node("disk0")],
///     poll_max_ns: 32768,
///     poll_grow: 2,
///     poll_shrink: 2,
///     poll_weight: 3,
///     aio_max_batch: 0,
/// };
/// assert_eq!(
///     serde_json::to_string(&info).unwrap(),
///     r#"{"id":"iothread0","thread-id":3134,"holders":[{"type":"block-node","node-name":"disk0"}],"poll-max-ns":32768,"poll-grow":2,"poll-shrink":2,"poll-weight":3,"aio-max-batch":0}"#
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IoThreadInfo {
    /// IOThread id.
    pub id: String,
    /// Host thread id (TID) of the IOThread.
    pub thread_id: i64,
    /// Current holders, in registration order (a holder may appear several times).
    pub holders: Vec<IoThreadHolder>,
    /// `poll-max-ns` in use.
    pub poll_max_ns: i64,
    /// `poll-grow` in use.
    pub poll_grow: i64,
    /// `poll-shrink` in use.
    pub poll_shrink: i64,
    /// `poll-weight` in use.
    pub poll_weight: i64,
    /// `aio-max-batch` in use.
    pub aio_max_batch: i64,
}

impl IoThreadInfo {
    /// Builds an element from an id, TID, holders and the parameters in use.
    pub fn new(
        id: impl Into<String>,
        thread_id: i64,
        holders: Vec<IoThreadHolder>,
        params: &IoThreadParams,
    ) -> Self {
        IoThreadInfo {
            id: id.into(),
            thread_id,
            holders,
            poll_max_ns: params.poll.max_ns,
            poll_grow: params.poll.grow,
            poll_shrink: params.poll.shrink,
            poll_weight: params.poll.weight,
            aio_max_batch: params.aio_max_batch,
        }
    }
}

/// Formats `info iothreads` text in QEMU's HMP layout: per IOThread an `<id>:` line,
/// then two-space indented `key=value` lines using the QMP names. Holders follow
/// `thread_id=` as a `holders=` line and one four-space indented line per holder.
///
/// ```
/// use iothread_registry::{format_info_iothreads, IoThreadHolder, IoThreadInfo, IoThreadParams};
/// let info = IoThreadInfo::new("io0", 42, vec![IoThreadHolder::block_node("disk0")], &IoThreadParams::default());
/// assert_eq!(
///     format_info_iothreads(&[info]),
///     "io0:\n  thread_id=42\n  holders=\n    block-node disk0\n  poll-max-ns=32768\n  \
///      poll-grow=2\n  poll-shrink=2\n  poll-weight=3\n  aio-max-batch=0\n"
/// );
/// ```
pub fn format_info_iothreads(infos: &[IoThreadInfo]) -> String {
    let mut out = String::new();
    for info in infos {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{}:", info.id);
        let _ = writeln!(out, "  thread_id={}", info.thread_id);
        let _ = writeln!(out, "  holders=");
        for holder in &info.holders {
            let _ = writeln!(out, "    {holder}");
        }
        let _ = writeln!(out, "  poll-max-ns={}", info.poll_max_ns);
        let _ = writeln!(out, "  poll-grow={}", info.poll_grow);
        let _ = writeln!(out, "  poll-shrink={}", info.poll_shrink);
        let _ = writeln!(out, "  poll-weight={}", info.poll_weight);
        let _ = writeln!(out, "  aio-max-batch={}", info.aio_max_batch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let info = IoThreadInfo::new(
            "io1",
            7,
            vec![
                IoThreadHolder::qom_object("/machine/peripheral/blk0/virtio-backend"),
                IoThreadHolder::block_node("disk0"),
            ],
            &IoThreadParams::default(),
        );
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<IoThreadInfo>(&json).unwrap(), info);
    }

    #[test]
    fn empty_list_prints_nothing() {
        assert_eq!(format_info_iothreads(&[]), "");
    }
}
