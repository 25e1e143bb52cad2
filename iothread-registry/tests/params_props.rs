// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Parameter properties: set/get round trip, garbage names and values rejected.

use iothread_registry::{Error, IoThreadParams, Property};
use proptest::prelude::*;

fn property() -> impl Strategy<Value = Property> {
    proptest::sample::select(Property::ALL.to_vec())
}

proptest! {
    #[test]
    fn set_get_round_trip(p in property(), v in 0i64..=i64::MAX) {
        let v = if p == Property::PollWeight { v % 64 } else { v };
        let mut params = IoThreadParams::default();
        params.set(p, v).unwrap();
        prop_assert_eq!(params.get(p), v);
        let effective = params.validate().unwrap();
        let expect = match (p, v) {
            (Property::PollGrow | Property::PollShrink, 0) => 2,
            (Property::PollWeight, 0) => 3,
            _ => v,
        };
        prop_assert_eq!(effective.get(p), expect);
        // Other properties keep their defaults.
        for other in Property::ALL.into_iter().filter(|o| *o != p) {
            prop_assert_eq!(effective.get(other), IoThreadParams::default().get(other));
        }
    }

    #[test]
    fn negative_values_rejected(p in property(), v in i64::MIN..0) {
        let mut params = IoThreadParams::default();
        let err = params.set(p, v).unwrap_err();
        let is_invalid_value = matches!(&err, Error::InvalidValue(e) if e.name() == p.name() && e.value() == v);
        prop_assert!(is_invalid_value);
        prop_assert_eq!(params, IoThreadParams::default());
    }

    #[test]
    fn weight_above_63_rejected(v in 64i64..=i64::MAX) {
        let err = IoThreadParams::default().set(Property::PollWeight, v).unwrap_err();
        prop_assert_eq!(err.to_string(), "poll-weight value must be in range [0, 63]");
    }

    #[test]
    fn garbage_names_rejected(name in "\\PC{0,20}") {
        prop_assume!(!Property::ALL.iter().any(|p| p.name() == name));
        let err = name.parse::<Property>().unwrap_err();
        prop_assert_eq!(err.to_string(), format!("Property 'iothread.{name}' not found"));
    }
}
