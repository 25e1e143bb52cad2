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

/// Adaptive polling parameters, `i64` like QEMU's properties.
///
/// `max_ns == 0` disables userspace polling entirely. Writing 0 to `grow`,
/// `shrink` or `weight` selects the default; [`PollParams::validate`] returns
/// the *effective* values, which is what the context stores and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
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

fn non_negative(name: &'static str, value: i64) -> Result<i64> {
    if value < 0 {
        return Err(Error::InvalidParam {
            name,
            value,
            reason: format!("value {value} rejected: value must be in range [0, INT64_MAX]"),
        });
    }
    Ok(value)
}

fn or_default(value: i64, default: i64) -> i64 {
    if value == 0 {
        default
    } else {
        value
    }
}

impl PollParams {
    /// Polling disabled (`max_ns = 0`), other values default.
    pub fn disabled() -> Self {
        PollParams {
            max_ns: 0,
            ..PollParams::default()
        }
    }

    /// Checks the values and returns the effective parameters.
    ///
    /// Negative values are rejected with "value must be in range [0, INT64_MAX]",
    /// a weight above 63 with "value N out of range [0, 63]". Zero in `grow`,
    /// `shrink` or `weight` is replaced by the default.
    pub fn validate(self) -> Result<PollParams> {
        let max_ns = non_negative("poll-max-ns", self.max_ns)?;
        let grow = non_negative("poll-grow", self.grow)?;
        let shrink = non_negative("poll-shrink", self.shrink)?;
        let weight = non_negative("poll-weight", self.weight)?;
        if weight > MAX_WEIGHT {
            return Err(Error::InvalidParam {
                name: "poll-weight",
                value: weight,
                reason: format!("value {weight} out of range [0, {MAX_WEIGHT}]"),
            });
        }
        Ok(PollParams {
            max_ns,
            grow: or_default(grow, DEFAULT_GROW),
            shrink: or_default(shrink, DEFAULT_SHRINK),
            weight: or_default(weight, DEFAULT_WEIGHT),
            algorithm: self.algorithm,
        })
    }

    /// Builder: sets `max_ns`.
    pub fn with_max_ns(mut self, max_ns: i64) -> Self {
        self.max_ns = max_ns;
        self
    }

    /// Builder: sets the algorithm.
    pub fn with_algorithm(mut self, algorithm: PollAlgorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Builder: sets the weight.
    pub fn with_weight(mut self, weight: i64) -> Self {
        self.weight = weight;
        self
    }

    /// Builder: sets grow and shrink.
    pub fn with_grow_shrink(mut self, grow: i64, shrink: i64) -> Self {
        self.grow = grow;
        self.shrink = shrink;
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
        assert_eq!(e.to_string(), "poll-weight: value 64 out of range [0, 63]");
    }

    #[test]
    fn negatives_rejected() {
        for (p, name) in [
            (PollParams::default().with_max_ns(-1), "poll-max-ns"),
            (PollParams::default().with_grow_shrink(-2, 2), "poll-grow"),
            (
                PollParams::default().with_grow_shrink(2, i64::MIN),
                "poll-shrink",
            ),
            (PollParams::default().with_weight(-3), "poll-weight"),
        ] {
            let msg = p.validate().unwrap_err().to_string();
            assert!(msg.starts_with(name), "{msg}");
            assert!(
                msg.contains("value must be in range [0, INT64_MAX]"),
                "{msg}"
            );
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
