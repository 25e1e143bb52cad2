// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! IOThread parameters: aio-poll's [`PollParams`] plus what only an IOThread has
//! (`aio-max-batch`). Defaults, range checks and messages of the polling parameters
//! are aio-poll's; this module adds the one parameter aio-poll does not know and,
//! with the `qemu` feature, the QEMU property-name API (`qom-set`/`qom-get`).

use aio_poll::{ParamError, PollAlgorithm, PollParams};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Default `aio-max-batch`: 0 lets the AIO engine choose.
pub const DEFAULT_AIO_MAX_BATCH: i64 = 0;

/// `aio-max-batch` as QEMU names it (also in its error message).
const AIO_MAX_BATCH: &str = "aio-max-batch";

/// Creation and run-time parameters of an IOThread (QEMU's `iothread` properties):
/// the event loop's [`PollParams`] and `aio-max-batch`.
///
/// `#[non_exhaustive]`: start from [`IoThreadParams::default`] (QEMU's defaults) and
/// use the builders, or assign the public fields of an existing value.
///
/// ```
/// use iothread_registry::aio_poll::PollParams;
/// use iothread_registry::IoThreadParams;
///
/// let p = IoThreadParams::default()
///     .with_poll(PollParams::default().with_max_ns(0))
///     .with_aio_max_batch(32);
/// let effective = p.validate().unwrap();
/// assert_eq!((effective.poll.max_ns, effective.aio_max_batch), (0, 32));
/// // One set of checks and messages, aio-poll's (QEMU's wording):
/// let bad = IoThreadParams::default().with_poll(PollParams::default().with_weight(64));
/// assert_eq!(bad.validate().unwrap_err().to_string(), "poll-weight value must be in range [0, 63]");
/// ```
///
/// JSON uses QEMU's property names (flat, as `object-add` takes them); missing fields
/// take their defaults and unknown fields are rejected:
///
/// ```
/// use iothread_registry::IoThreadParams;
/// let p: IoThreadParams = serde_json::from_str(r#"{"poll-max-ns": 0, "poll-weight": 4}"#).unwrap();
/// assert_eq!((p.poll.max_ns, p.poll.weight, p.poll.grow), (0, 4, 2));
/// assert!(serde_json::from_str::<IoThreadParams>(r#"{"poll-max": 1}"#).is_err());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Wire", into = "Wire")]
#[non_exhaustive]
pub struct IoThreadParams {
    /// `poll-max-ns`, `poll-grow`, `poll-shrink`, `poll-weight` and the
    /// `poll-algorithm` extension: the event loop's parameters.
    pub poll: PollParams,
    /// `aio-max-batch`: largest AIO batch, 0 lets the engine choose.
    pub aio_max_batch: i64,
}

impl IoThreadParams {
    /// Parameters with these polling parameters and the default `aio-max-batch`.
    pub fn new(poll: PollParams) -> Self {
        IoThreadParams {
            poll,
            aio_max_batch: DEFAULT_AIO_MAX_BATCH,
        }
    }

    /// Builder: sets the polling parameters.
    pub fn with_poll(mut self, poll: PollParams) -> Self {
        self.poll = poll;
        self
    }

    /// Builder: sets `aio-max-batch`.
    pub fn with_aio_max_batch(mut self, aio_max_batch: i64) -> Self {
        self.aio_max_batch = aio_max_batch;
        self
    }

    /// Validates every parameter (in QEMU's property order: the polling parameters,
    /// then `aio-max-batch`) and returns the values actually used: aio-poll's
    /// effective [`PollParams`] (0 for grow, shrink and weight selects the default);
    /// `aio-max-batch` 0 (engine default) stays 0.
    pub fn validate(&self) -> Result<IoThreadParams> {
        Ok(IoThreadParams {
            poll: self.poll.validate()?,
            aio_max_batch: ParamError::check(AIO_MAX_BATCH, self.aio_max_batch, i64::MAX)?,
        })
    }

    /// `aio-max-batch` as the event loop takes it (negative values count as 0, the
    /// engine default; validated values are never negative).
    pub(crate) fn max_batch(&self) -> u64 {
        u64::try_from(self.aio_max_batch).unwrap_or(0)
    }
}

/// The flat JSON shape (QEMU's property names).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
struct Wire {
    poll_max_ns: i64,
    poll_grow: i64,
    poll_shrink: i64,
    poll_weight: i64,
    aio_max_batch: i64,
    poll_algorithm: PollAlgorithm,
}

impl Default for Wire {
    fn default() -> Self {
        IoThreadParams::default().into()
    }
}

impl From<IoThreadParams> for Wire {
    fn from(p: IoThreadParams) -> Self {
        Wire {
            poll_max_ns: p.poll.max_ns,
            poll_grow: p.poll.grow,
            poll_shrink: p.poll.shrink,
            poll_weight: p.poll.weight,
            aio_max_batch: p.aio_max_batch,
            poll_algorithm: p.poll.algorithm,
        }
    }
}

impl From<Wire> for IoThreadParams {
    fn from(w: Wire) -> Self {
        IoThreadParams::new(
            PollParams::default()
                .with_max_ns(w.poll_max_ns)
                .with_grow_shrink(w.poll_grow, w.poll_shrink)
                .with_weight(w.poll_weight)
                .with_algorithm(w.poll_algorithm),
        )
        .with_aio_max_batch(w.aio_max_batch)
    }
}

#[cfg(feature = "qemu")]
pub use property::Property;

/// The QEMU property-name API (`qom-set /objects/<id> <name> <value>`).
#[cfg(feature = "qemu")]
mod property {
    use std::fmt;
    use std::str::FromStr;

    use aio_poll::{ParamError, MAX_WEIGHT};

    use super::{IoThreadParams, AIO_MAX_BATCH};
    use crate::error::{Error, Result};

    /// The integer properties of an IOThread, by their QEMU names (feature `qemu`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub enum Property {
        /// `poll-max-ns`: longest busy-poll in ns, 0 disables polling.
        PollMaxNs,
        /// `poll-grow`: factor by which the poll time grows (0 = default).
        PollGrow,
        /// `poll-shrink`: divisor by which the poll time shrinks (0 = default).
        PollShrink,
        /// `poll-weight`: weight shift of the newest interval, 0..=63 (0 = default).
        PollWeight,
        /// `aio-max-batch`: largest AIO submission batch (0 = engine default).
        AioMaxBatch,
    }

    impl Property {
        /// All properties, in the order QEMU lists them.
        pub const ALL: [Property; 5] = [
            Property::PollMaxNs,
            Property::PollGrow,
            Property::PollShrink,
            Property::PollWeight,
            Property::AioMaxBatch,
        ];

        /// The property name as used by `qom-set`/`qom-get` and `query-iothreads`.
        pub fn name(self) -> &'static str {
            match self {
                Property::PollMaxNs => "poll-max-ns",
                Property::PollGrow => "poll-grow",
                Property::PollShrink => "poll-shrink",
                Property::PollWeight => "poll-weight",
                Property::AioMaxBatch => AIO_MAX_BATCH,
            }
        }

        /// Largest accepted value.
        pub fn max(self) -> i64 {
            match self {
                Property::PollWeight => MAX_WEIGHT,
                _ => i64::MAX,
            }
        }

        /// Checks one value for this property with aio-poll's rule and message
        /// (`"<name> value must be in range [0, <max>]"`).
        pub fn check(self, value: i64) -> Result<()> {
            ParamError::check(self.name(), value, self.max())?;
            Ok(())
        }
    }

    impl fmt::Display for Property {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.name())
        }
    }

    impl FromStr for Property {
        type Err = Error;

        /// QEMU's message for an unknown name: `Property 'iothread.<name>' not found`.
        fn from_str(name: &str) -> Result<Property> {
            Property::ALL
                .into_iter()
                .find(|p| p.name() == name)
                .ok_or_else(|| Error::InvalidProperty {
                    name: name.to_owned(),
                })
        }
    }

    impl IoThreadParams {
        /// Reads one property (feature `qemu`).
        pub fn get(&self, property: Property) -> i64 {
            match property {
                Property::PollMaxNs => self.poll.max_ns,
                Property::PollGrow => self.poll.grow,
                Property::PollShrink => self.poll.shrink,
                Property::PollWeight => self.poll.weight,
                Property::AioMaxBatch => self.aio_max_batch,
            }
        }

        /// Sets one property after checking its range; `self` is unchanged on error
        /// (feature `qemu`).
        pub fn set(&mut self, property: Property, value: i64) -> Result<()> {
            property.check(value)?;
            let field = match property {
                Property::PollMaxNs => &mut self.poll.max_ns,
                Property::PollGrow => &mut self.poll.grow,
                Property::PollShrink => &mut self.poll.shrink,
                Property::PollWeight => &mut self.poll.weight,
                Property::AioMaxBatch => &mut self.aio_max_batch,
            };
            *field = value;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_aio_polls_plus_batch() {
        let p = IoThreadParams::default();
        assert_eq!(p.poll, PollParams::default());
        assert_eq!(p.aio_max_batch, 0);
        assert_eq!(p.validate().unwrap(), p);
    }

    #[test]
    fn aio_max_batch_uses_the_shared_message() {
        let err = IoThreadParams::default()
            .with_aio_max_batch(-1)
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "aio-max-batch value must be in range [0, 9223372036854775807]"
        );
        // Polling parameters are checked first (QEMU's property order).
        let err = IoThreadParams::default()
            .with_poll(PollParams::default().with_max_ns(-5))
            .with_aio_max_batch(-1)
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "poll-max-ns value must be in range [0, 9223372036854775807]"
        );
    }

    #[test]
    fn zero_selects_default() {
        let p = IoThreadParams::new(
            PollParams::disabled()
                .with_grow_shrink(0, 0)
                .with_weight(0)
                .with_algorithm(PollAlgorithm::Classic),
        );
        let e = p.validate().unwrap();
        assert_eq!(
            (e.poll.max_ns, e.poll.grow, e.poll.shrink, e.poll.weight),
            (0, 2, 2, 3)
        );
        assert_eq!(e.poll.algorithm, PollAlgorithm::Classic);
    }

    #[cfg(feature = "qemu")]
    #[test]
    fn property_api() {
        for property in Property::ALL {
            assert_eq!(property.name().parse::<Property>().unwrap(), property);
            let mut p = IoThreadParams::default();
            let err = p.set(property, -1).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{} value must be in range [0, {}]",
                    property.name(),
                    property.max()
                )
            );
            assert_eq!(p, IoThreadParams::default(), "unchanged after error");
            p.set(property, 7).unwrap();
            assert_eq!(p.get(property), 7);
        }
        let mut p = IoThreadParams::default();
        p.set(Property::PollWeight, 63).unwrap();
        assert!(p.set(Property::PollWeight, 64).is_err());
        assert_eq!(p.poll.weight, 63);
        let err = "poll_max_ns".parse::<Property>().unwrap_err();
        assert_eq!(err.to_string(), "Property 'iothread.poll_max_ns' not found");
        assert!("".parse::<Property>().is_err());
        assert!("POLL-MAX-NS".parse::<Property>().is_err());
    }

    #[test]
    fn serde_uses_qemu_names() {
        let json = serde_json::to_string(&IoThreadParams::default()).unwrap();
        assert_eq!(
            json,
            r#"{"poll-max-ns":32768,"poll-grow":2,"poll-shrink":2,"poll-weight":3,"aio-max-batch":0,"poll-algorithm":"weighted"}"#
        );
        let p: IoThreadParams = serde_json::from_str(r#"{"aio-max-batch":16}"#).unwrap();
        assert_eq!(p.aio_max_batch, 16);
        assert_eq!(p.poll.max_ns, 32768);
        assert!(serde_json::from_str::<IoThreadParams>(r#"{"max_ns":1}"#).is_err());
    }
}
