// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! QEMU's `iothread-vq-mapping` (virtio-blk, QEMU 9.0): which IOThread serves which
//! virtqueue.

use std::fmt;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::Result;

/// One element of an `iothread-vq-mapping` list.
///
/// ```
/// use iothread_registry::IoThreadVqMapping;
/// let m: Vec<IoThreadVqMapping> =
///     serde_json::from_str(r#"[{"iothread": "io0", "vqs": [0, 2]}, {"iothread": "io1", "vqs": [1]}]"#)
///         .unwrap();
/// assert_eq!(m[0].vqs.as_deref(), Some(&[0u16, 2][..]));
/// assert_eq!(serde_json::to_string(&IoThreadVqMapping::new("io1")).unwrap(), r#"{"iothread":"io1"}"#);
/// ```
///
/// Only the object form is accepted, as by QEMU's QAPI: serde's derived
/// `Deserialize` would also take a sequence (`["io0", [0]]`), which no QMP client
/// means.
///
/// ```
/// use iothread_registry::IoThreadVqMapping;
/// assert!(serde_json::from_str::<Vec<IoThreadVqMapping>>(r#"[["io0"]]"#).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IoThreadVqMapping {
    /// Id of the IOThread.
    pub iothread: String,
    /// Virtqueues served by this IOThread. `None` (or an empty list, which QEMU's QAPI
    /// also treats as absent) asks for round-robin assignment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vqs: Option<Vec<u16>>,
}

/// The derived parts of [`IoThreadVqMapping`]'s `Deserialize`: member names,
/// `deny_unknown_fields`, the optional `vqs`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "IoThreadVqMapping")]
struct MappingObject {
    iothread: String,
    #[serde(default, deserialize_with = "present_list")]
    vqs: Option<Vec<u16>>,
}

/// `vqs` when present: a list (QAPI has no null for an optional member).
fn present_list<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<u16>>, D::Error> {
    Vec::<u16>::deserialize(d).map(Some)
}

impl<'de> Deserialize<'de> for IoThreadVqMapping {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct ObjectOnly;

        impl<'de> Visitor<'de> for ObjectOnly {
            type Value = IoThreadVqMapping;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("struct IoThreadVqMapping")
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<IoThreadVqMapping, A::Error> {
                let MappingObject { iothread, vqs } =
                    MappingObject::deserialize(MapAccessDeserializer::new(map))?;
                Ok(IoThreadVqMapping { iothread, vqs })
            }
        }

        deserializer.deserialize_map(ObjectOnly)
    }
}

impl IoThreadVqMapping {
    /// An entry without `vqs` (round-robin).
    pub fn new(iothread: impl Into<String>) -> Self {
        IoThreadVqMapping {
            iothread: iothread.into(),
            vqs: None,
        }
    }

    /// An entry with an explicit queue list.
    pub fn with_vqs(iothread: impl Into<String>, vqs: impl Into<Vec<u16>>) -> Self {
        IoThreadVqMapping {
            iothread: iothread.into(),
            vqs: Some(vqs.into()),
        }
    }

    /// The explicit queue list, if any (an empty list counts as none).
    fn explicit_vqs(&self) -> Option<&[u16]> {
        self.vqs.as_deref().filter(|v| !v.is_empty())
    }
}

/// Why an `iothread-vq-mapping` was rejected. Messages are QEMU's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    /// The mapping list is empty (QEMU's QAPI cannot express this; we reject it).
    #[error("iothread-vq-mapping must not be empty")]
    Empty,
    /// Rule 1: the named IOThread does not exist.
    #[error("IOThread \"{iothread}\" object does not exist")]
    NoSuchIoThread {
        /// The unknown IOThread id.
        iothread: String,
    },
    /// Rule 2: an IOThread is listed twice.
    #[error("duplicate IOThread name \"{iothread}\" in iothread-vq-mapping")]
    DuplicateIoThread {
        /// The IOThread id listed twice.
        iothread: String,
    },
    /// Rule 3: some entries have `vqs` and others do not.
    #[error("either all items in iothread-vq-mapping must have vqs or none of them must have it")]
    MixedVqs,
    /// Rule 4: a queue index is not below `num-queues`.
    #[error(
        "vq index {vq} for IOThread \"{iothread}\" must be less than num_queues {num_queues} in iothread-vq-mapping"
    )]
    VqOutOfRange {
        /// The queue index.
        vq: u16,
        /// The IOThread it was given to.
        iothread: String,
        /// The device's number of queues.
        num_queues: u16,
    },
    /// Rule 5: a queue is assigned twice.
    #[error("cannot assign vq {vq} to IOThread \"{iothread}\" because it is already assigned")]
    VqAssignedTwice {
        /// The queue index.
        vq: u16,
        /// The IOThread of the second assignment.
        iothread: String,
    },
    /// Rule 6: with explicit `vqs`, a queue is left without an IOThread.
    #[error("missing vq {vq} IOThread assignment in iothread-vq-mapping")]
    VqMissing {
        /// The first unassigned queue.
        vq: u16,
    },
}

/// Validates `mapping` for a device with `num_queues` queues and returns, for each
/// queue index, the id of the IOThread that serves it.
///
/// Rules, checked entry by entry exactly like QEMU's `iothread_vq_mapping_validate()`
/// (so the first offending entry determines the error): (1) the IOThread exists
/// (`exists`), (2) no IOThread is listed twice, (3) either all entries have `vqs` or
/// none, (4) every queue index is below `num_queues`, (5) no queue is assigned twice;
/// then (6) with explicit `vqs`, every queue is covered. Without `vqs`, entry `i` of
/// `N` gets queues `i, i+N, i+2N, ...` (round-robin).
///
/// ```
/// use iothread_registry::{assign_vqs, IoThreadVqMapping};
/// let rr = [IoThreadVqMapping::new("io0"), IoThreadVqMapping::new("io1")];
/// assert_eq!(assign_vqs(&rr, 3, |_| true).unwrap(), ["io0", "io1", "io0"]);
/// let bad = [IoThreadVqMapping::with_vqs("io0", [0, 1]), IoThreadVqMapping::with_vqs("io1", [1])];
/// assert_eq!(
///     assign_vqs(&bad, 2, |_| true).unwrap_err().to_string(),
///     "cannot assign vq 1 to IOThread \"io1\" because it is already assigned"
/// );
/// ```
pub fn assign_vqs(
    mapping: &[IoThreadVqMapping],
    num_queues: u16,
    exists: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    Ok(assign(mapping, num_queues, exists)?)
}

/// [`assign_vqs`] with the specific error type.
fn assign(
    mapping: &[IoThreadVqMapping],
    num_queues: u16,
    exists: impl Fn(&str) -> bool,
) -> std::result::Result<Vec<String>, MappingError> {
    let first = mapping.first().ok_or(MappingError::Empty)?;
    let explicit = first.explicit_vqs().is_some();
    // owner[q] = index of the entry that serves queue q.
    let mut owner: Vec<Option<usize>> = vec![None; usize::from(num_queues)];

    for (index, entry) in mapping.iter().enumerate() {
        let name = entry.iothread.as_str();
        if !exists(name) {
            return Err(MappingError::NoSuchIoThread {
                iothread: name.to_owned(),
            });
        }
        if mapping[..index].iter().any(|e| e.iothread == name) {
            return Err(MappingError::DuplicateIoThread {
                iothread: name.to_owned(),
            });
        }
        if entry.explicit_vqs().is_some() != explicit {
            return Err(MappingError::MixedVqs);
        }
        for &vq in entry.explicit_vqs().unwrap_or_default() {
            let slot =
                owner
                    .get_mut(usize::from(vq))
                    .ok_or_else(|| MappingError::VqOutOfRange {
                        vq,
                        iothread: name.to_owned(),
                        num_queues,
                    })?;
            if slot.is_some() {
                return Err(MappingError::VqAssignedTwice {
                    vq,
                    iothread: name.to_owned(),
                });
            }
            *slot = Some(index);
        }
    }

    if explicit {
        if let Some(vq) = owner.iter().position(Option::is_none) {
            // `vq` < owner.len() == num_queues, so it fits in u16.
            let vq = u16::try_from(vq).unwrap_or(u16::MAX);
            return Err(MappingError::VqMissing { vq });
        }
    } else {
        let n = mapping.len();
        for (q, slot) in owner.iter_mut().enumerate() {
            *slot = Some(q % n);
        }
    }

    Ok(owner
        .into_iter()
        .flatten()
        .filter_map(|i| mapping.get(i).map(|e| e.iothread.clone()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_object_form_deserializes() {
        let parse =
            |s: &str| serde_json::from_str::<IoThreadVqMapping>(s).map_err(|e| e.to_string());
        assert_eq!(
            parse(r#"{"iothread": "io0", "vqs": [1, 0]}"#),
            Ok(IoThreadVqMapping::with_vqs("io0", [1, 0]))
        );
        assert_eq!(
            parse(r#"{"iothread": "io0"}"#),
            Ok(IoThreadVqMapping::new("io0"))
        );
        // A sequence is what serde's derive would also have taken.
        for seq in [r#"["io0"]"#, r#"["io0", [0]]"#] {
            let err = parse(seq).unwrap_err();
            assert!(
                err.starts_with("invalid type: sequence, expected struct IoThreadVqMapping"),
                "{err}"
            );
        }
        assert!(parse(r#""io0""#).is_err());
        assert!(parse(r#"{"iothread": "io0", "vq": [0]}"#)
            .unwrap_err()
            .starts_with("unknown field `vq`"));
        assert!(parse(r#"{"vqs": [0]}"#)
            .unwrap_err()
            .starts_with("missing field `iothread`"));
        assert!(parse(r#"{"iothread": "io0", "vqs": [-1]}"#).is_err());
        // Absent is round-robin; null is not absent.
        assert!(parse(r#"{"iothread": "io0", "vqs": null}"#)
            .unwrap_err()
            .starts_with("invalid type: null, expected a sequence"));
        let round_trip = IoThreadVqMapping::with_vqs("io1", [2]);
        assert_eq!(
            parse(&serde_json::to_string(&round_trip).unwrap()),
            Ok(round_trip)
        );
    }

    #[test]
    fn empty_vqs_list_counts_as_absent() {
        let m = [
            IoThreadVqMapping::with_vqs("a", Vec::new()),
            IoThreadVqMapping::new("b"),
        ];
        assert_eq!(assign(&m, 3, |_| true).unwrap(), ["a", "b", "a"]);
    }

    #[test]
    fn empty_mapping_rejected() {
        assert_eq!(assign(&[], 4, |_| true).unwrap_err(), MappingError::Empty);
    }

    #[test]
    fn zero_queues() {
        assert!(assign(&[IoThreadVqMapping::new("a")], 0, |_| true)
            .unwrap()
            .is_empty());
    }
}
