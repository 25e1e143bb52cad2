//! A small strict parser for QEMU-style option strings: `key=value,key=value`,
//! an optional implied first key (`iothread,id=io0` = `qom-type=iothread,id=io0`),
//! `,,` for a literal comma inside a value. Unknown and duplicate keys are errors.

/// Why an option string or one of its values was rejected.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    /// A part without `=` where a `key=value` was expected.
    #[error("expected key=value, got '{0}'")]
    Syntax(String),
    /// An empty key (`=x`, `a=1,,`).
    #[error("empty option name in '{0}'")]
    EmptyKey(String),
    /// A key nobody asked for.
    #[error("unknown option '{0}'")]
    UnknownKey(String),
    /// A key given twice.
    #[error("option '{0}' given twice")]
    DuplicateKey(String),
    /// A required key is missing.
    #[error("missing required option '{0}'")]
    Missing(&'static str),
    /// A value of the wrong form.
    #[error("invalid value '{value}' for '{key}': expected {expected}")]
    InvalidValue {
        /// The option.
        key: String,
        /// The rejected value.
        value: String,
        /// What was expected.
        expected: String,
    },
}

/// Parsed `key=value` pairs, consumed by typed getters; [`KeyVals::finish`]
/// rejects whatever was not consumed.
#[derive(Debug)]
pub struct KeyVals {
    entries: Vec<(String, String)>,
}

fn split_unescaped(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

impl KeyVals {
    /// Parses `s`. If `implied` is given, a first part without `=` is its value.
    pub fn parse(s: &str, implied: Option<&str>) -> Result<KeyVals, OptionError> {
        let mut entries: Vec<(String, String)> = Vec::new();
        for (i, part) in split_unescaped(s).into_iter().enumerate() {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => match implied {
                    Some(k) if i == 0 && !part.is_empty() => (k.to_owned(), part),
                    _ => return Err(OptionError::Syntax(part)),
                },
            };
            if key.is_empty() {
                return Err(OptionError::EmptyKey(s.to_owned()));
            }
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(OptionError::DuplicateKey(key));
            }
            entries.push((key, value));
        }
        Ok(KeyVals { entries })
    }

    /// Looks at a value without consuming it.
    pub fn peek(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Removes and returns a string value.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let pos = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(pos).1)
    }

    /// A required string value.
    pub fn take_required(&mut self, key: &'static str) -> Result<String, OptionError> {
        self.take(key).ok_or(OptionError::Missing(key))
    }

    /// Removes a value and converts it with `parse`.
    pub fn take_with<T>(
        &mut self,
        key: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, OptionError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match parse(&v) {
                Some(t) => Ok(Some(t)),
                None => Err(OptionError::InvalidValue {
                    key: key.to_owned(),
                    value: v,
                    expected: expected.to_owned(),
                }),
            },
        }
    }

    /// An `on/off/true/false` value.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, OptionError> {
        self.take_with(key, "on, off, true or false", parse_bool)
    }

    /// An integer value (decimal, or hex with `0x`).
    pub fn take_int<T: TryFrom<i128>>(&mut self, key: &str) -> Result<Option<T>, OptionError> {
        let expected = format!("an integer in range for {}", std::any::type_name::<T>());
        self.take_with(key, &expected, |v| {
            parse_int(v).and_then(|i| T::try_from(i).ok())
        })
    }

    /// A size with an optional K/M/G/T suffix (powers of 1024).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>, OptionError> {
        self.take_with(key, "a size like 4096, 64K, 256M or 1G", parse_size)
    }

    /// Fails with the first key that was not consumed.
    pub fn finish(self) -> Result<(), OptionError> {
        match self.entries.into_iter().next() {
            Some((k, _)) => Err(OptionError::UnknownKey(k)),
            None => Ok(()),
        }
    }
}

/// `on/off/true/false` (QEMU's boolean spellings).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" => Some(true),
        "off" | "false" => Some(false),
        _ => None,
    }
}

/// A decimal or `0x` hexadecimal integer, optionally negative.
pub fn parse_int(v: &str) -> Option<i128> {
    let (neg, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v),
    };
    let magnitude = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) if !hex.is_empty() && !hex.starts_with('+') => {
            i128::from_str_radix(hex, 16).ok()?
        }
        _ if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse::<i128>().ok()?
        }
        _ => return None,
    };
    Some(if neg { -magnitude } else { magnitude })
}

/// A byte count: plain digits, or digits with a `K`, `M`, `G` or `T` suffix (either
/// case, powers of 1024, an optional trailing `B` or `iB`).
pub fn parse_size(v: &str) -> Option<u64> {
    let t = v.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .or_else(|| t.strip_suffix(['B', 'b']))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 10),
        'm' | 'M' => (&t[..t.len() - 1], 20),
        'g' | 'G' => (&t[..t.len() - 1], 30),
        't' | 'T' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_implied_key_and_pairs() {
        let mut kv = KeyVals::parse("iothread,id=io0,poll-max-ns=0", Some("qom-type")).unwrap();
        assert_eq!(kv.take("qom-type").as_deref(), Some("iothread"));
        assert_eq!(kv.take_required("id").unwrap(), "io0");
        assert_eq!(kv.take_int::<i64>("poll-max-ns").unwrap(), Some(0));
        kv.finish().unwrap();
    }

    #[test]
    fn double_comma_escapes() {
        let mut kv = KeyVals::parse("file=a,,b.img,id=x", None).unwrap();
        assert_eq!(kv.take("file").as_deref(), Some("a,b.img"));
        assert_eq!(kv.take("id").as_deref(), Some("x"));
    }

    #[test]
    fn rejects_unknown_duplicate_and_bare() {
        let kv = KeyVals::parse("id=d0,foo=1", None).unwrap();
        let mut kv2 = kv;
        kv2.take("id");
        assert_eq!(
            kv2.finish().unwrap_err().to_string(),
            "unknown option 'foo'"
        );
        assert_eq!(
            KeyVals::parse("id=a,id=b", None).unwrap_err().to_string(),
            "option 'id' given twice"
        );
        assert!(matches!(
            KeyVals::parse("id=a,readonly", None),
            Err(OptionError::Syntax(_))
        ));
        assert!(matches!(
            KeyVals::parse("iothread", None),
            Err(OptionError::Syntax(_))
        ));
        assert!(matches!(
            KeyVals::parse("=x", None),
            Err(OptionError::EmptyKey(_))
        ));
        assert!(matches!(
            KeyVals::parse("", None),
            Err(OptionError::Syntax(_))
        ));
        assert!(matches!(
            KeyVals::parse("a=1,", None),
            Err(OptionError::Syntax(_))
        ));
    }

    #[test]
    fn booleans() {
        for (s, b) in [
            ("on", true),
            ("true", true),
            ("off", false),
            ("false", false),
        ] {
            assert_eq!(parse_bool(s), Some(b));
        }
        for s in ["yes", "1", "", "ON"] {
            assert_eq!(parse_bool(s), None);
        }
        let mut kv = KeyVals::parse("readonly=maybe", None).unwrap();
        let e = kv.take_bool("readonly").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid value 'maybe' for 'readonly': expected on, off, true or false"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("256m"), Some(256 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        for bad in [
            "",
            "M",
            "-1M",
            "1.5G",
            "12X",
            "99999999999999999999",
            "16777216T",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn integers() {
        assert_eq!(parse_int("42"), Some(42));
        assert_eq!(parse_int("-3"), Some(-3));
        assert_eq!(parse_int("0x10"), Some(16));
        for bad in ["", "-", "0x", "1e3", "+5", "0x+1", " 1"] {
            assert_eq!(parse_int(bad), None, "{bad}");
        }
        let mut kv = KeyVals::parse("num-queues=70000", None).unwrap();
        assert!(kv.take_int::<u16>("num-queues").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,64}") {
            let _ = KeyVals::parse(&s, Some("k"));
            let _ = parse_size(&s);
            let _ = parse_int(&s);
        }

        #[test]
        fn roundtrip_simple_pairs(keys in proptest::collection::btree_set("[a-z][a-z-]{0,8}", 1..5),
                                  val in "[a-z0-9,./]{0,12}") {
            let s = keys.iter().map(|k| format!("{k}={}", val.replace(',', ",,"))).collect::<Vec<_>>().join(",");
            let mut kv = KeyVals::parse(&s, None).unwrap();
            for k in &keys {
                proptest::prop_assert_eq!(kv.take(k), Some(val.clone()));
            }
            proptest::prop_assert!(kv.finish().is_ok());
        }
    }
}
