// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Register classes and the page's dirty bit set.

use core::fmt;

/// A class of registers on the page that shares one dirty bit.
///
/// The hypervisor consumes a class at the next dispatch only if its bit is set in
/// `hv_vp_register_page::dirty`; a page write without the bit is silently lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegisterClass {
    /// The 16 general purpose registers (`HV_X64_REGISTER_CLASS_GENERAL`, bit 0).
    General,
    /// RIP (`HV_X64_REGISTER_CLASS_IP`, bit 1).
    Ip,
    /// xmm0..xmm5 (`HV_X64_REGISTER_CLASS_XMM`, bit 2).
    Xmm,
    /// es cs ss ds fs gs (`HV_X64_REGISTER_CLASS_SEGMENT`, bit 3).
    Segment,
    /// RFLAGS (`HV_X64_REGISTER_CLASS_FLAGS`, bit 4).
    Flags,
}

impl RegisterClass {
    /// All classes, in bit order.
    pub const ALL: [RegisterClass; 5] = [
        RegisterClass::General,
        RegisterClass::Ip,
        RegisterClass::Xmm,
        RegisterClass::Segment,
        RegisterClass::Flags,
    ];

    /// Bit number of the class in the `dirty` field.
    pub const fn bit(self) -> u32 {
        match self {
            RegisterClass::General => 0,
            RegisterClass::Ip => 1,
            RegisterClass::Xmm => 2,
            RegisterClass::Segment => 3,
            RegisterClass::Flags => 4,
        }
    }

    /// Mask of the class in the `dirty` field.
    pub const fn mask(self) -> u32 {
        1 << self.bit()
    }
}

impl fmt::Display for RegisterClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            RegisterClass::General => "general",
            RegisterClass::Ip => "ip",
            RegisterClass::Xmm => "xmm",
            RegisterClass::Segment => "segment",
            RegisterClass::Flags => "flags",
        };
        f.write_str(name)
    }
}

/// A set of [`RegisterClass`]es, as stored in the page's `dirty` field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirtyClasses(u32);

impl DirtyClasses {
    /// Mask of all bits that name a known class.
    pub const KNOWN_MASK: u32 = 0b1_1111;

    /// The empty set.
    pub const fn empty() -> Self {
        DirtyClasses(0)
    }

    /// Wraps a raw `dirty` value (unknown bits are kept, see [`DirtyClasses::bits`]).
    pub const fn from_bits(bits: u32) -> Self {
        DirtyClasses(bits)
    }

    /// The raw value.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether `class` is in the set.
    pub const fn contains(self, class: RegisterClass) -> bool {
        self.0 & class.mask() != 0
    }

    /// Adds `class` to the set.
    pub fn insert(&mut self, class: RegisterClass) {
        self.0 |= class.mask();
    }

    /// Removes `class` from the set.
    pub fn remove(&mut self, class: RegisterClass) {
        self.0 &= !class.mask();
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Iterates over the known classes in the set.
    pub fn iter(self) -> impl Iterator<Item = RegisterClass> {
        RegisterClass::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }
}

impl FromIterator<RegisterClass> for DirtyClasses {
    fn from_iter<I: IntoIterator<Item = RegisterClass>>(iter: I) -> Self {
        let mut set = DirtyClasses::empty();
        for class in iter {
            set.insert(class);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_bits_match_bindings() {
        assert_eq!(
            RegisterClass::General.bit(),
            mshv_bindings::HV_X64_REGISTER_CLASS_GENERAL
        );
        assert_eq!(
            RegisterClass::Ip.bit(),
            mshv_bindings::HV_X64_REGISTER_CLASS_IP
        );
        assert_eq!(
            RegisterClass::Xmm.bit(),
            mshv_bindings::HV_X64_REGISTER_CLASS_XMM
        );
        assert_eq!(
            RegisterClass::Segment.bit(),
            mshv_bindings::HV_X64_REGISTER_CLASS_SEGMENT
        );
        assert_eq!(
            RegisterClass::Flags.bit(),
            mshv_bindings::HV_X64_REGISTER_CLASS_FLAGS
        );
        let all: DirtyClasses = RegisterClass::ALL.into_iter().collect();
        assert_eq!(all.bits(), DirtyClasses::KNOWN_MASK);
    }

    #[test]
    fn set_operations() {
        let mut set = DirtyClasses::empty();
        assert!(set.is_empty());
        set.insert(RegisterClass::Xmm);
        set.insert(RegisterClass::Flags);
        assert!(set.contains(RegisterClass::Xmm));
        assert!(!set.contains(RegisterClass::Ip));
        assert_eq!(set.bits(), 0b1_0100);
        set.remove(RegisterClass::Xmm);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![RegisterClass::Flags]);
    }
}
