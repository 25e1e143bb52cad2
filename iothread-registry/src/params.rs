//! IOThread parameters (QEMU's `iothread` object properties) and their validation.

use std::fmt;
use std::str::FromStr;

use aio_poll::PollAlgorithm;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default `poll-max-ns` (QEMU: 32768 ns, from 2016 NVMe measurements).
pub const DEFAULT_POLL_MAX_NS: i64 = 32768;
/// Default `poll-grow` factor, also used when 0 is given.
pub const DEFAULT_POLL_GROW: i64 = 2;
/// Default `poll-shrink` divisor, also used when 0 is given.
pub const DEFAULT_POLL_SHRINK: i64 = 2;
/// Default `poll-weight` shift, also used when 0 is given.
pub const DEFAULT_POLL_WEIGHT: i64 = 3;
/// Largest accepted `poll-weight` (it is a shift of a 64-bit value).
pub const MAX_POLL_WEIGHT: i64 = 63;
/// Default `aio-max-batch`: 0 lets the AIO engine choose.
pub const DEFAULT_AIO_MAX_BATCH: i64 = 0;

/// The integer properties of an IOThread, by their QEMU names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
            Property::AioMaxBatch => "aio-max-batch",
        }
    }

    /// Largest accepted value.
    pub fn max(self) -> i64 {
        match self {
            Property::PollWeight => MAX_POLL_WEIGHT,
            _ => i64::MAX,
        }
    }

    /// Checks one value for this property (QEMU: negative values are rejected with
    /// `"<name> value must be in range [0, <max>]"`).
    pub fn check(self, value: i64) -> Result<()> {
        if (0..=self.max()).contains(&value) {
            Ok(())
        } else {
            Err(Error::InvalidValue {
                property: self.name(),
                value,
                min: 0,
                max: self.max(),
            })
        }
    }
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Property {
    type Err = Error;

    fn from_str(name: &str) -> Result<Property> {
        Property::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| Error::InvalidProperty {
                name: name.to_owned(),
            })
    }
}

/// Creation and run-time parameters of an IOThread (QEMU's `iothread` properties).
///
/// JSON uses QEMU's property names; missing fields take their defaults and unknown
/// fields are rejected:
///
/// ```
/// use iothread_registry::IoThreadParams;
/// let p: IoThreadParams = serde_json::from_str(r#"{"poll-max-ns": 0, "poll-weight": 4}"#).unwrap();
/// assert_eq!(p.poll_max_ns, 0);
/// assert_eq!(p.poll_weight, 4);
/// assert_eq!(p.poll_grow, 2);
/// assert!(serde_json::from_str::<IoThreadParams>(r#"{"poll-max": 1}"#).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct IoThreadParams {
    /// `poll-max-ns`: longest busy-poll in ns, 0 disables polling.
    pub poll_max_ns: i64,
    /// `poll-grow`: poll time growth factor, 0 selects the default (2).
    pub poll_grow: i64,
    /// `poll-shrink`: poll time shrink divisor, 0 selects the default (2).
    pub poll_shrink: i64,
    /// `poll-weight`: weight shift in 0..=63, 0 selects the default (3).
    pub poll_weight: i64,
    /// `aio-max-batch`: largest AIO batch, 0 lets the engine choose.
    pub aio_max_batch: i64,
    /// `poll-algorithm` (extension): adaptive polling algorithm, default weighted.
    pub poll_algorithm: PollAlgorithm,
}

impl Default for IoThreadParams {
    fn default() -> Self {
        IoThreadParams {
            poll_max_ns: DEFAULT_POLL_MAX_NS,
            poll_grow: DEFAULT_POLL_GROW,
            poll_shrink: DEFAULT_POLL_SHRINK,
            poll_weight: DEFAULT_POLL_WEIGHT,
            aio_max_batch: DEFAULT_AIO_MAX_BATCH,
            poll_algorithm: PollAlgorithm::default(),
        }
    }
}

impl IoThreadParams {
    /// Reads one integer property.
    pub fn get(&self, property: Property) -> i64 {
        match property {
            Property::PollMaxNs => self.poll_max_ns,
            Property::PollGrow => self.poll_grow,
            Property::PollShrink => self.poll_shrink,
            Property::PollWeight => self.poll_weight,
            Property::AioMaxBatch => self.aio_max_batch,
        }
    }

    /// Sets one integer property after checking its range; `self` is unchanged on error.
    pub fn set(&mut self, property: Property, value: i64) -> Result<()> {
        property.check(value)?;
        let field = match property {
            Property::PollMaxNs => &mut self.poll_max_ns,
            Property::PollGrow => &mut self.poll_grow,
            Property::PollShrink => &mut self.poll_shrink,
            Property::PollWeight => &mut self.poll_weight,
            Property::AioMaxBatch => &mut self.aio_max_batch,
        };
        *field = value;
        Ok(())
    }

    /// Validates every property (in QEMU's order) and returns the values that are
    /// actually used: 0 for `poll-grow`, `poll-shrink` and `poll-weight` is replaced by
    /// the default; `poll-max-ns` 0 (polling off) and `aio-max-batch` 0 (engine
    /// default) stay 0.
    ///
    /// ```
    /// use iothread_registry::IoThreadParams;
    /// let p = IoThreadParams { poll_grow: 0, poll_weight: 0, ..Default::default() };
    /// let e = p.validate().unwrap();
    /// assert_eq!((e.poll_grow, e.poll_weight), (2, 3));
    /// let bad = IoThreadParams { poll_weight: 64, ..Default::default() };
    /// assert_eq!(bad.validate().unwrap_err().to_string(), "poll-weight value must be in range [0, 63]");
    /// ```
    pub fn validate(&self) -> Result<IoThreadParams> {
        for property in Property::ALL {
            property.check(self.get(property))?;
        }
        let or_default = |v: i64, d: i64| if v == 0 { d } else { v };
        Ok(IoThreadParams {
            poll_max_ns: self.poll_max_ns,
            poll_grow: or_default(self.poll_grow, DEFAULT_POLL_GROW),
            poll_shrink: or_default(self.poll_shrink, DEFAULT_POLL_SHRINK),
            poll_weight: or_default(self.poll_weight, DEFAULT_POLL_WEIGHT),
            aio_max_batch: self.aio_max_batch,
            poll_algorithm: self.poll_algorithm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_qemu() {
        let p = IoThreadParams::default();
        assert_eq!(
            (
                p.poll_max_ns,
                p.poll_grow,
                p.poll_shrink,
                p.poll_weight,
                p.aio_max_batch
            ),
            (32768, 2, 2, 3, 0)
        );
        assert_eq!(p.poll_algorithm, PollAlgorithm::Weighted);
        assert_eq!(p.validate().unwrap(), p);
    }

    #[test]
    fn negative_values_rejected_with_qemu_message() {
        for property in Property::ALL {
            let mut p = IoThreadParams::default();
            let err = p.set(property, -1).unwrap_err();
            let max = if property == Property::PollWeight {
                "63".to_owned()
            } else {
                i64::MAX.to_string()
            };
            assert_eq!(
                err.to_string(),
                format!("{} value must be in range [0, {max}]", property.name())
            );
            assert_eq!(p, IoThreadParams::default(), "unchanged after error");
        }
        let err = IoThreadParams {
            poll_max_ns: -5,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "poll-max-ns value must be in range [0, 9223372036854775807]"
        );
    }

    #[test]
    fn weight_range() {
        let mut p = IoThreadParams::default();
        p.set(Property::PollWeight, 63).unwrap();
        assert_eq!(p.validate().unwrap().poll_weight, 63);
        assert!(p.set(Property::PollWeight, 64).is_err());
        assert_eq!(p.poll_weight, 63);
    }

    #[test]
    fn zero_selects_default() {
        let p = IoThreadParams {
            poll_max_ns: 0,
            poll_grow: 0,
            poll_shrink: 0,
            poll_weight: 0,
            aio_max_batch: 0,
            poll_algorithm: PollAlgorithm::Classic,
        };
        let e = p.validate().unwrap();
        assert_eq!(
            (
                e.poll_max_ns,
                e.poll_grow,
                e.poll_shrink,
                e.poll_weight,
                e.aio_max_batch
            ),
            (0, 2, 2, 3, 0)
        );
        assert_eq!(e.poll_algorithm, PollAlgorithm::Classic);
    }

    #[test]
    fn property_names() {
        for property in Property::ALL {
            assert_eq!(property.name().parse::<Property>().unwrap(), property);
        }
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
        assert_eq!(p.poll_max_ns, 32768);
    }
}
