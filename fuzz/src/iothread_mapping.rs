//! `iothread_mapping`: arbitrary `iothread-vq-mapping`s through validation and
//! assignment ([`iothread_registry::assign_vqs`]).
//!
//! Format: `u16` num-queues (taken modulo 1025), a byte with the number of existing
//! IOThreads (`io0..ioN`, modulo 9), then either (first byte odd) JSON text for the
//! mapping list, or (even) entries: a name byte (`io<b % 10>`, so some do not exist)
//! and a length byte (0 = no `vqs`; else that many `u16` queue indexes modulo 1100).
//!
//! Invariant: when assignment succeeds every queue is assigned exactly once, to an
//! IOThread that exists and is named in the mapping, honouring explicit `vqs`; when
//! it fails the error has a message. Nothing panics.

use iothread_registry::{assign_vqs, IoThreadVqMapping};

use crate::bytes::{Reader, Writer};

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// `num-queues` of the device.
    pub num_queues: u16,
    /// How many IOThreads exist (`io0..`).
    pub existing: u8,
    /// The mapping, or `None` when the JSON text did not parse.
    pub mapping: Option<Vec<IoThreadVqMapping>>,
}

impl Input {
    /// Decodes any byte string.
    pub fn decode(data: &[u8]) -> Input {
        let mut r = Reader::new(data);
        let num_queues = r.u16() % 1025;
        let existing = r.u8() % 9;
        let mode = r.u8();
        let mapping = if mode & 1 == 1 {
            std::str::from_utf8(r.rest())
                .ok()
                .and_then(|s| serde_json::from_str::<Vec<IoThreadVqMapping>>(s).ok())
        } else {
            let mut entries = Vec::new();
            while !r.is_empty() && entries.len() < 64 {
                let name = format!("io{}", r.u8() % 10);
                let len = r.u8();
                let vqs = (len != 0).then(|| (0..len).map(|_| r.u16() % 1100).collect());
                entries.push(IoThreadVqMapping {
                    iothread: name,
                    vqs,
                });
            }
            Some(entries)
        };
        Input {
            num_queues,
            existing,
            mapping,
        }
    }

    /// Encodes a structured input (binary entry form).
    pub fn encode(num_queues: u16, existing: u8, mapping: &[IoThreadVqMapping]) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(num_queues).u8(existing).u8(0);
        for m in mapping {
            let n: u8 = m.iothread.trim_start_matches("io").parse().unwrap_or(0);
            w.u8(n);
            match &m.vqs {
                None => {
                    w.u8(0);
                }
                Some(v) => {
                    w.u8(u8::try_from(v.len()).unwrap_or(u8::MAX));
                    for q in v.iter().take(255) {
                        w.u16(*q);
                    }
                }
            }
        }
        w.finish()
    }

    /// Encodes an input whose mapping is given as JSON text.
    pub fn encode_json(num_queues: u16, existing: u8, json: &str) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(num_queues).u8(existing).u8(1).bytes(json.as_bytes());
        w.finish()
    }
}

/// Runs an input; panics on a broken invariant.
pub fn check(input: &Input) {
    let Some(mapping) = &input.mapping else {
        return;
    };
    let exists = |id: &str| {
        id.strip_prefix("io")
            .and_then(|n| n.parse::<u8>().ok())
            .is_some_and(|n| n < input.existing)
    };
    match assign_vqs(mapping, input.num_queues, exists) {
        Ok(per_queue) => {
            assert_eq!(per_queue.len(), usize::from(input.num_queues));
            for (q, id) in per_queue.iter().enumerate() {
                assert!(exists(id), "queue {q} assigned to missing IOThread {id}");
                let entry = mapping
                    .iter()
                    .find(|m| &m.iothread == id)
                    .expect("assigned IOThread is not in the mapping");
                if let Some(vqs) = entry.vqs.as_ref().filter(|v| !v.is_empty()) {
                    let q = u16::try_from(q).expect("queue index fits u16");
                    assert!(vqs.contains(&q), "queue {q} not in {id}'s explicit vqs");
                }
            }
            // Each explicit vq appears in exactly one entry.
            let mut seen = vec![0u32; usize::from(input.num_queues)];
            for m in mapping {
                for q in m.vqs.iter().flatten() {
                    let slot = seen.get_mut(usize::from(*q)).expect("vq < num-queues");
                    *slot += 1;
                }
            }
            if mapping
                .iter()
                .any(|m| m.vqs.as_ref().is_some_and(|v| !v.is_empty()))
            {
                assert!(seen.iter().all(|c| *c == 1), "explicit vqs not a partition");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Canonical cases: round-robin, explicit, and one violation of each of the six rules.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let rr = |ids: &[&str]| {
        ids.iter()
            .map(|i| IoThreadVqMapping::new(*i))
            .collect::<Vec<_>>()
    };
    let ex = |v: &[(&str, &[u16])]| {
        v.iter()
            .map(|(i, q)| IoThreadVqMapping::with_vqs(*i, q.to_vec()))
            .collect::<Vec<_>>()
    };
    vec![
        (
            "round-robin".into(),
            Input::encode(4, 2, &rr(&["io0", "io1"])),
        ),
        (
            "explicit".into(),
            Input::encode(4, 2, &ex(&[("io0", &[0, 2]), ("io1", &[1, 3])])),
        ),
        (
            "rule1-missing".into(),
            Input::encode(2, 1, &rr(&["io0", "io5"])),
        ),
        (
            "rule2-twice".into(),
            Input::encode(2, 2, &rr(&["io0", "io0"])),
        ),
        (
            "rule3-mixed".into(),
            Input::encode(
                2,
                2,
                &[
                    IoThreadVqMapping::with_vqs("io0", vec![0]),
                    IoThreadVqMapping::new("io1"),
                ],
            ),
        ),
        (
            "rule4-range".into(),
            Input::encode(2, 2, &ex(&[("io0", &[0, 2])])),
        ),
        (
            "rule5-dup".into(),
            Input::encode(2, 2, &ex(&[("io0", &[0, 1]), ("io1", &[1])])),
        ),
        (
            "rule6-uncovered".into(),
            Input::encode(3, 2, &ex(&[("io0", &[0]), ("io1", &[1])])),
        ),
        (
            "json".into(),
            Input::encode_json(
                4,
                2,
                r#"[{"iothread":"io0","vqs":[0,2]},{"iothread":"io1","vqs":[1,3]}]"#,
            ),
        ),
        (
            "json-unknown-field".into(),
            Input::encode_json(1, 1, r#"[{"iothread":"io0","x":1}]"#),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_to_their_cases_and_pass() {
        for (name, bytes) in seeds() {
            let input = Input::decode(&bytes);
            if name.starts_with("json") {
                assert_eq!(input.mapping.is_some(), name == "json", "{name}");
            } else {
                let m = input.mapping.clone().unwrap();
                assert_eq!(
                    Input::encode(input.num_queues, input.existing, &m),
                    bytes,
                    "{name}"
                );
            }
            check(&input);
        }
    }
}
