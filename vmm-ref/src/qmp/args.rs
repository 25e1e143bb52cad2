//! Deserialising a request's `arguments` object into a typed command struct with
//! QEMU's error messages.
//!
//! serde_json's own errors do not say which member was wrong ("invalid type: string,
//! expected i64"), QEMU's do ("Invalid parameter type for 'poll-weight', expected:
//! integer"). [`parse_args`] runs the derived `Deserialize` of a
//! `#[serde(deny_unknown_fields)]` struct over a map deserializer that knows the member
//! being deserialised, so every error names it:
//!
//! | case | message |
//! | --- | --- |
//! | missing member | `Parameter 'id' is missing` |
//! | unknown member | `Parameter 'foo' is unexpected` |
//! | wrong JSON type | `Invalid parameter type for 'id', expected: string` |
//! | enum value | `Parameter 'x' does not accept value 'y'` |

use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::qmp::error::CommandError;

/// An argument error, displayed with QEMU's wording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ArgError {
    /// A required member is absent.
    Missing(String),
    /// A member the command does not have.
    Unexpected(String),
    /// A member of the wrong JSON type; `expected` is a QAPI type name.
    InvalidType { name: String, expected: String },
    /// A string member whose value is not one of the accepted ones.
    InvalidValue { name: String, value: String },
    /// Anything else.
    Other(String),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Missing(name) => write!(f, "Parameter '{name}' is missing"),
            ArgError::Unexpected(name) => write!(f, "Parameter '{name}' is unexpected"),
            ArgError::InvalidType { name, expected } => {
                write!(
                    f,
                    "Invalid parameter type for '{name}', expected: {expected}"
                )
            }
            ArgError::InvalidValue { name, value } => {
                write!(f, "Parameter '{name}' does not accept value '{value}'")
            }
            ArgError::Other(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for ArgError {}

impl de::Error for ArgError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ArgError::Other(msg.to_string())
    }

    fn missing_field(field: &'static str) -> Self {
        ArgError::Missing(field.to_string())
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        ArgError::Unexpected(field.to_string())
    }
}

impl From<ArgError> for CommandError {
    fn from(err: ArgError) -> Self {
        CommandError::generic(err.to_string())
    }
}

/// Map a serde type description ("i64", "a string", "struct X") to a QAPI type name.
pub(crate) fn qapi_type_name(expected: &str) -> String {
    let e = expected.trim();
    let has = |needle: &str| e.contains(needle);
    let name = if [
        "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64", "integer",
    ]
    .iter()
    .any(|t| has(t))
    {
        "integer"
    } else if has("bool") {
        "boolean"
    } else if e == "string or map" || has("enum") {
        // serde_json's expectation for an enum given anything but a string or
        // an object; QAPI enums are strings.
        "string"
    } else if has("struct") || has("map") {
        "object"
    } else if has("str") {
        "string"
    } else if has("sequence") || has("array") {
        "array"
    } else if has("f32") || has("f64") || has("number") {
        "number"
    } else {
        e
    };
    name.to_string()
}

/// Extract the text between the first pair of backticks.
fn backticked(msg: &str) -> Option<&str> {
    let start = msg.find('`')? + 1;
    let len = msg.get(start..)?.find('`')?;
    msg.get(start..start + len)
}

/// Turn a serde_json error about member `name` into an [`ArgError`].
fn from_member_error(name: &str, err: &serde_json::Error) -> ArgError {
    let msg = err.to_string();
    if msg.starts_with("invalid type:") {
        let expected = msg.rsplit(", expected ").next().unwrap_or("");
        return ArgError::InvalidType {
            name: name.to_string(),
            expected: qapi_type_name(expected),
        };
    }
    if msg.starts_with("unknown variant") {
        if let Some(value) = backticked(&msg) {
            return ArgError::InvalidValue {
                name: name.to_string(),
                value: value.to_string(),
            };
        }
    }
    if msg.starts_with("unknown field") {
        if let Some(field) = backticked(&msg) {
            return ArgError::Unexpected(format!("{name}.{field}"));
        }
    }
    if msg.starts_with("missing field") {
        if let Some(field) = backticked(&msg) {
            return ArgError::Missing(format!("{name}.{field}"));
        }
    }
    ArgError::Other(format!("Parameter '{name}': {msg}"))
}

/// What a JSON value is, for serde's "invalid type: X, expected Y" (serde_json
/// keeps its own version private).
pub(crate) fn unexpected(value: &Value) -> de::Unexpected<'_> {
    match value {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(_) => de::Unexpected::Other("number"),
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

/// Deserialise `args` (absent = `{}`) into `T`, with QEMU's messages.
pub(crate) fn parse_args<T: DeserializeOwned>(
    args: Option<Map<String, Value>>,
) -> Result<T, ArgError> {
    T::deserialize(ArgsDeserializer {
        map: args.unwrap_or_default(),
    })
}

struct ArgsDeserializer {
    map: Map<String, Value>,
}

impl<'de> de::Deserializer<'de> for ArgsDeserializer {
    type Error = ArgError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        visitor.visit_map(ArgsAccess {
            iter: self.map.into_iter(),
            pending: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct ArgsAccess {
    iter: serde_json::map::IntoIter,
    pending: Option<(String, Value)>,
}

impl<'de> MapAccess<'de> for ArgsAccess {
    type Error = ArgError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ArgError> {
        let Some((name, value)) = self.iter.next() else {
            return Ok(None);
        };
        let key = seed.deserialize(IntoDeserializer::<ArgError>::into_deserializer(
            name.clone(),
        ))?;
        self.pending = Some((name, value));
        Ok(Some(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ArgError> {
        let (name, value) = self
            .pending
            .take()
            .ok_or_else(|| ArgError::Other("argument value without a name".to_string()))?;
        seed.deserialize(MemberValue(value))
            .map_err(|e| from_member_error(&name, &e))
    }
}

/// A member's JSON value as the member's `Deserialize` sees it: exactly the
/// value, except that `null` does not make an optional member absent. QAPI has
/// no null for optional members (QEMU: `"poll-max-ns": null` is "Invalid
/// parameter type for 'poll-max-ns', expected: integer"), so the member's
/// own type gets the null and refuses it. Members of type `any` (`Value`)
/// still take it.
struct MemberValue(Value);

macro_rules! forward_to_value {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, serde_json::Error> {
                self.0.$method(visitor)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for MemberValue {
    type Error = serde_json::Error;

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        // Present, whatever the value: the member's own type decides, still
        // through this wrapper (an optional enum refuses serde's map form too).
        visitor.visit_some(self)
    }

    forward_to_value! {
        deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
        deserialize_i64 deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32
        deserialize_u64 deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char
        deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
        deserialize_unit deserialize_seq deserialize_map deserialize_identifier
        deserialize_ignored_any
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_newtype_struct(name, visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple(len, visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple_struct(name, len, visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_struct(name, fields, visitor)
    }

    /// QAPI enums are strings: serde's `{"variant": null}` form is refused.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        if let Value::String(_) = self.0 {
            return self.0.deserialize_enum(name, variants, visitor);
        }
        Err(de::Error::invalid_type(unexpected(&self.0), &"string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Sample {
        id: String,
        poll_weight: Option<i64>,
        #[serde(default)]
        list: Vec<String>,
        kind: Option<Kind>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum Kind {
        Iothread,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}

    fn parse(v: Value) -> Result<Sample, String> {
        let Value::Object(map) = v else { panic!() };
        parse_args::<Sample>(Some(map)).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_valid_arguments() {
        assert_eq!(
            parse(json!({"id": "io0", "poll-weight": 5, "list": ["a"], "kind": "iothread"})),
            Ok(Sample {
                id: "io0".into(),
                poll_weight: Some(5),
                list: vec!["a".into()],
                kind: Some(Kind::Iothread)
            })
        );
        assert_eq!(parse(json!({"id": "x"})).unwrap().poll_weight, None);
        assert!(parse_args::<Empty>(None).is_ok());
    }

    #[test]
    fn qemu_messages() {
        assert_eq!(parse(json!({})), Err("Parameter 'id' is missing".into()));
        assert_eq!(
            parse(json!({"id": "x", "foo": 1})),
            Err("Parameter 'foo' is unexpected".into())
        );
        assert_eq!(
            parse(json!({"id": "x", "poll-weight": "5"})),
            Err("Invalid parameter type for 'poll-weight', expected: integer".into())
        );
        assert_eq!(
            parse(json!({"id": 3})),
            Err("Invalid parameter type for 'id', expected: string".into())
        );
        assert_eq!(
            parse(json!({"id": "x", "list": "a"})),
            Err("Invalid parameter type for 'list', expected: array".into())
        );
        assert_eq!(
            parse(json!({"id": "x", "kind": "memory"})),
            Err("Parameter 'kind' does not accept value 'memory'".into())
        );
        // null is not "absent" for an optional member, whatever its type.
        assert_eq!(
            parse(json!({"id": "x", "poll-weight": null})),
            Err("Invalid parameter type for 'poll-weight', expected: integer".into())
        );
        assert_eq!(
            parse(json!({"id": "x", "list": null})),
            Err("Invalid parameter type for 'list', expected: array".into())
        );
        assert!(parse(json!({"id": "x", "kind": null})).is_err());
        // An enum is a string, not serde's {"variant": null}.
        for bad in [
            json!(1),
            json!({"iothread": null}),
            json!({}),
            json!(["iothread"]),
        ] {
            assert_eq!(
                parse(json!({"id": "x", "kind": bad})),
                Err("Invalid parameter type for 'kind', expected: string".into())
            );
        }
        assert_eq!(
            parse(json!({"id": null})),
            Err("Invalid parameter type for 'id', expected: string".into())
        );
        let mut map = Map::new();
        map.insert("x".into(), json!(1));
        assert_eq!(
            parse_args::<Empty>(Some(map)).unwrap_err().to_string(),
            "Parameter 'x' is unexpected"
        );
    }

    #[test]
    fn type_names() {
        assert_eq!(qapi_type_name("i64"), "integer");
        assert_eq!(qapi_type_name("a boolean"), "boolean");
        assert_eq!(qapi_type_name("a string"), "string");
        assert_eq!(qapi_type_name("struct Foo"), "object");
        assert_eq!(qapi_type_name("string or map"), "string");
        assert_eq!(qapi_type_name("a sequence"), "array");
        assert_eq!(qapi_type_name("something"), "something");
    }
}
