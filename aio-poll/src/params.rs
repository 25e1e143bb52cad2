// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adaptive polling parameters (QEMU's `poll-max-ns`, `poll-grow`, `poll-shrink`,
//! `poll-weight`) and the algorithm selector.

use std::fmt;
use std::str::FromStr;

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default `poll-max-ns` (IOThread default on POSIX hosts).
pub const DEFAULT_MAX_NS: i64 = 32768;
/// Default `poll-grow` (also used when 0 is written).
pub const DEFAULT_GROW: i64 = 2;
/// Default `poll-shrink` (also used when 0 is written).
pub const DEFAULT_SHRINK: i64 = 2;
/// Default `poll-weight` (also used when 0 is written).
pub const DEFAULT_WEIGHT: i64 = 3;
/// Largest accepted `poll-weight` (a shift count on an `i64`).
pub const MAX_WEIGHT: i64 = 63;

/// Which adaptive polling algorithm the context uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum PollAlgorithm {
    /// QEMU 10.x per-handler grow/shrink (design note §2).
    Classic,
    /// The 2026 weighted-interval algorithm (design note §3). The default.
    #[default]
    Weighted,
}

impl fmt::Display for PollAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PollAlgorithm::Classic => "classic",
            PollAlgorithm::Weighted => "weighted",
        })
    }
}

impl FromStr for PollAlgorithm {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "classic" => Ok(PollAlgorithm::Classic),
            "weighted" => Ok(PollAlgorithm::Weighted),
            _ => Err(Error::UnknownAlgorithm(s.to_string())),
        }
    }
}

/// A polling parameter outside its range, reported with QEMU's message
/// `"<name> value must be in range [<min>, <max>]"` (e.g. `poll-weight value must be
/// in range [0, 63]`), which a QMP front end can forward unchanged.
///
/// ```
/// use aio_poll::{ParamError, PollParams};
/// let e = PollParams::default().with_weight(64).validate().unwrap_err();
/// assert_eq!(e.to_string(), "poll-weight value must be in range [0, 63]");
/// // The same check and message for a parameter of another crate:
/// let e = ParamError::check("aio-max-batch", -1, i64::MAX).unwrap_err();
/// assert_eq!(e.to_string(), "aio-max-batch value must be in range [0, 9223372036854775807]");
/// assert_eq!((e.name(), e.value(), e.min(), e.max()), ("aio-max-batch", -1, 0, i64::MAX));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name} value must be in range [{min}, {max}]")]
pub struct ParamError {
    name: &'static str,
    value: i64,
    min: i64,
    max: i64,
}

impl ParamError {
    /// Checks that `value` of parameter `name` is in `0..=max` (QEMU rejects negative
    /// values of every IOThread property); returns the value.
    pub fn check(name: &'static str, value: i64, max: i64) -> std::result::Result<i64, ParamError> {
        if (0..=max).contains(&value) {
            Ok(value)
        } else {
            Err(ParamError {
                name,
                value,
                min: 0,
                max,
            })
        }
    }

    /// QEMU name of the parameter, e.g. `poll-weight`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The rejected value.
    pub fn value(&self) -> i64 {
        self.value
    }

    /// Smallest accepted value.
    pub fn min(&self) -> i64 {
        self.min
    }

    /// Largest accepted value.
    pub fn max(&self) -> i64 {
        self.max
    }
}

/// Adaptive polling parameters, `i64` like QEMU's properties.
///
/// `max_ns == 0` disables userspace polling entirely. Writing 0 to `grow`,
/// `shrink` or `weight` selects the default; [`PollParams::validate`] returns
/// the *effective* values, which is what the context stores and reports.
///
/// The struct is `#[non_exhaustive]` so that it can grow: build it from
/// [`PollParams::default`] (QEMU's IOThread defaults) with the `with_*` builders,
/// or assign the public fields of an existing value.
///
/// ```
/// use aio_poll::{PollAlgorithm, PollParams};
/// let p = PollParams::default()
///     .with_max_ns(100_000)
///     .with_weight(0) // 0 selects the default
///     .with_algorithm(PollAlgorithm::Classic);
/// let effective = p.validate().unwrap();
/// assert_eq!((effective.max_ns, effective.weight), (100_000, 3));
/// assert_eq!(
///     PollParams::default().with_max_ns(-1).validate().unwrap_err().to_string(),
///     "poll-max-ns value must be in range [0, 9223372036854775807]"
/// );
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[non_exhaustive]
pub struct PollParams {
    /// Upper bound of the polling window in ns (`poll-max-ns`).
    pub max_ns: i64,
    /// Growth factor (`poll-grow`).
    pub grow: i64,
    /// Shrink divisor (`poll-shrink`).
    pub shrink: i64,
    /// EWMA weight of the weighted algorithm, alpha = 2^-weight (`poll-weight`).
    pub weight: i64,
    /// The algorithm.
    pub algorithm: PollAlgorithm,
}

impl Default for PollParams {
    fn default() -> Self {
        PollParams {
            max_ns: DEFAULT_MAX_NS,
            grow: DEFAULT_GROW,
            shrink: DEFAULT_SHRINK,
            weight: DEFAULT_WEIGHT,
            algorithm: PollAlgorithm::Weighted,
        }
    }
}

fn or_default(value: i64, default: i64) -> i64 {
    if value == 0 {
        default
    } else {
        value
    }
}

impl PollParams {
    /// QEMU's IOThread defaults (same as [`PollParams::default`]).
    pub fn new() -> Self {
        PollParams::default()
    }

    /// Polling disabled (`max_ns = 0`), other values default.
    pub fn disabled() -> Self {
        PollParams::default().with_max_ns(0)
    }

    /// Checks the values (in QEMU's property order) and returns the effective
    /// parameters.
    ///
    /// Every value must be in `[0, INT64_MAX]`, `weight` in `[0, 63]`
    /// ([`ParamError`] carries QEMU's message). Zero in `grow`, `shrink` or `weight`
    /// is replaced by the default.
    pub fn validate(self) -> std::result::Result<PollParams, ParamError> {
        let max_ns = ParamError::check("poll-max-ns", self.max_ns, i64::MAX)?;
        let grow = ParamError::check("poll-grow", self.grow, i64::MAX)?;
        let shrink = ParamError::check("poll-shrink", self.shrink, i64::MAX)?;
        let weight = ParamError::check("poll-weight", self.weight, MAX_WEIGHT)?;
        Ok(PollParams {
            max_ns,
            grow: or_default(grow, DEFAULT_GROW),
            shrink: or_default(shrink, DEFAULT_SHRINK),
            weight: or_default(weight, DEFAULT_WEIGHT),
            algorithm: self.algorithm,
        })
    }

    /// Builder: sets `max_ns` (`poll-max-ns`).
    pub fn with_max_ns(mut self, max_ns: i64) -> Self {
        self.max_ns = max_ns;
        self
    }

    /// Builder: sets `grow` (`poll-grow`).
    pub fn with_grow(mut self, grow: i64) -> Self {
        self.grow = grow;
        self
    }

    /// Builder: sets `shrink` (`poll-shrink`).
    pub fn with_shrink(mut self, shrink: i64) -> Self {
        self.shrink = shrink;
        self
    }

    /// Builder: sets grow and shrink.
    pub fn with_grow_shrink(self, grow: i64, shrink: i64) -> Self {
        self.with_grow(grow).with_shrink(shrink)
    }

    /// Builder: sets the weight (`poll-weight`).
    pub fn with_weight(mut self, weight: i64) -> Self {
        self.weight = weight;
        self
    }

    /// Builder: sets the algorithm.
    pub fn with_algorithm(mut self, algorithm: PollAlgorithm) -> Self {
        self.algorithm = algorithm;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qemu_iothread_defaults() {
        let p = PollParams::default();
        assert_eq!((p.max_ns, p.grow, p.shrink, p.weight), (32768, 2, 2, 3));
        assert_eq!(p.algorithm, PollAlgorithm::Weighted);
        assert_eq!(p.validate().unwrap(), p);
    }

    #[test]
    fn zero_selects_default() {
        let p = PollParams {
            max_ns: 0,
            grow: 0,
            shrink: 0,
            weight: 0,
            algorithm: PollAlgorithm::Classic,
        }
        .validate()
        .unwrap();
        assert_eq!((p.max_ns, p.grow, p.shrink, p.weight), (0, 2, 2, 3));
    }

    #[test]
    fn weight_range() {
        assert_eq!(
            PollParams::default()
                .with_weight(63)
                .validate()
                .unwrap()
                .weight,
            63
        );
        let e = PollParams::default()
            .with_weight(64)
            .validate()
            .unwrap_err();
        assert_eq!(e.to_string(), "poll-weight value must be in range [0, 63]");
    }

    #[test]
    fn negatives_rejected() {
        for (p, name, max) in [
            (
                PollParams::default().with_max_ns(-1),
                "poll-max-ns",
                i64::MAX,
            ),
            (
                PollParams::default().with_grow_shrink(-2, 2),
                "poll-grow",
                i64::MAX,
            ),
            (
                PollParams::default().with_grow_shrink(2, i64::MIN),
                "poll-shrink",
                i64::MAX,
            ),
            (PollParams::default().with_weight(-3), "poll-weight", 63),
        ] {
            let msg = p.validate().unwrap_err().to_string();
            assert_eq!(msg, format!("{name} value must be in range [0, {max}]"));
        }
    }

    #[test]
    fn algorithm_parse_and_display() {
        assert_eq!(
            "classic".parse::<PollAlgorithm>().unwrap(),
            PollAlgorithm::Classic
        );
        assert_eq!(
            "Weighted".parse::<PollAlgorithm>().unwrap(),
            PollAlgorithm::Weighted
        );
        assert_eq!(PollAlgorithm::Classic.to_string(), "classic");
        assert!("fast".parse::<PollAlgorithm>().is_err());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serde_round_trip() {
        let json = serde_json::to_string(&PollParams::default()).unwrap();
        assert!(json.contains("\"weighted\""), "{json}");
        let back: PollParams = serde_json::from_str(&json).unwrap();
        assert_eq!(back, PollParams::default());
    }
}
