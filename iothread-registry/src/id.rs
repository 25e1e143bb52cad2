// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Object id validation (QEMU's `id_wellformed()`).

use crate::error::{Error, IdError, Result};

/// Checks that `id` is a well-formed object id, like QEMU's `id_wellformed()`:
/// an ASCII letter first, then ASCII letters, digits, `-`, `.` or `_`.
///
/// ```
/// use iothread_registry::validate_id;
/// assert!(validate_id("iothread0").is_ok());
/// assert!(validate_id("io.pool-1_a").is_ok());
/// assert!(validate_id("0io").is_err());
/// assert!(validate_id("io thread").is_err());
/// ```
pub fn validate_id(id: &str) -> Result<()> {
    let reject = |reason| {
        Err(Error::InvalidId {
            id: id.to_owned(),
            reason,
        })
    };
    let mut chars = id.char_indices();
    match chars.next() {
        None => return reject(IdError::Empty),
        Some((_, c)) if !c.is_ascii_alphabetic() => return reject(IdError::FirstNotLetter),
        Some(_) => {}
    }
    for (offset, c) in chars {
        if !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
            return reject(IdError::BadChar { offset });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(id: &str) -> IdError {
        match validate_id(id) {
            Err(Error::InvalidId { reason, .. }) => reason,
            other => panic!("expected InvalidId for {id:?}, got {other:?}"),
        }
    }

    #[test]
    fn accepts_well_formed_ids() {
        for id in ["a", "iothread0", "IO-1.x_y", "z9"] {
            assert!(validate_id(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn rejects_malformed_ids() {
        assert_eq!(reason(""), IdError::Empty);
        assert_eq!(reason("1io"), IdError::FirstNotLetter);
        assert_eq!(reason("_io"), IdError::FirstNotLetter);
        assert_eq!(reason("-io"), IdError::FirstNotLetter);
        assert_eq!(reason("éio"), IdError::FirstNotLetter);
        assert_eq!(reason("io thread"), IdError::BadChar { offset: 2 });
        assert_eq!(reason("io/0"), IdError::BadChar { offset: 2 });
        assert_eq!(reason("ioé"), IdError::BadChar { offset: 2 });
        assert_eq!(reason("io\n"), IdError::BadChar { offset: 2 });
    }

    #[test]
    fn message_names_the_id() {
        let msg = validate_id("9x").unwrap_err().to_string();
        assert_eq!(
            msg,
            "Parameter 'id' expects an identifier: '9x' must start with a letter"
        );
    }
}
