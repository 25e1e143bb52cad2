//! `qmp_parse`: vmm-ref's QMP parsers alone — the streaming JSON decoder
//! ([`JsonStreamDecoder`]), request validation ([`parse_request`]) and typed command
//! parsing ([`Command::parse`]) — without a session, machine or dispatcher.
//!
//! The `qmp` target runs the same bytes through the whole session against a real
//! IOThread registry, so an input that adds and deletes IOThreads creates and joins
//! real threads: a few hundred executions per second. This target checks the parsing
//! half of that path at parser speed (thousands of times more inputs per hour), so the
//! decoder and the argument parsing get the depth of search the dispatcher target
//! cannot give them.
//!
//! Format: the `qmp` target's ([`crate::qmp::Input`]; it shares its seeds).
//!
//! Invariants: nothing panics; every decoded value survives a round trip (serialised
//! and decoded again, it is the same value; floats within a few ULPs, see [`same`]); a
//! request that validates parses to a command with the same name or to an error; every
//! error (decode, request, command) has a non-empty description.
//!
//! Not checked here: that the decoder's fast path (`feed`) gives what its
//! byte-at-a-time reference (`feed_bytewise`) gives. That is a property of each
//! (state, byte) pair, a finite domain, so vmm-ref's unit test
//! `plain_bytes_are_exactly_what_step_only_appends` proves it by enumerating every
//! pair, and a proptest checks `feed` against `feed_bytewise` over split reads and
//! limits. Running the reference on every input here cost a quarter of the
//! target's time and could find nothing the enumeration does not rule out.

use std::fmt::{self, Write};

use serde_json::Value;
use vmm_ref::qmp::protocol::{parse_request, DecodeError, JsonStreamDecoder};
use vmm_ref::qmp::Command;

use crate::qmp::{Input, LIMIT};

const CAPABILITIES: &[u8] = b"{\"execute\": \"qmp_capabilities\"}";

/// Takes every decoded value and error out of `d`; checks that each error
/// describes itself.
fn drain(d: &mut JsonStreamDecoder, out: &mut Vec<Result<Value, DecodeError>>) {
    while let Some(r) = d.next_value() {
        if let Err(e) = &r {
            assert!(has_description(e), "empty decode error description: {e:?}");
        }
        out.push(r);
    }
}

/// Whether `e` formats to a non-empty text; stops formatting at the first byte.
fn has_description(e: &impl fmt::Display) -> bool {
    struct FirstByte;
    impl Write for FirstByte {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            // An error ends the formatting: one byte is all this needs to see.
            if s.is_empty() {
                Ok(())
            } else {
                Err(fmt::Error)
            }
        }
    }
    write!(FirstByte, "{e}").is_err()
}

fn decode_all(stream: &[u8], chunk: usize) -> Vec<Result<Value, DecodeError>> {
    let mut d = JsonStreamDecoder::with_limit(LIMIT);
    let mut out = Vec::new();
    for c in stream.chunks(chunk.max(1)) {
        d.feed(c);
        drain(&mut d, &mut out);
    }
    out
}

/// Runs one input (see the module documentation).
pub fn check(input: &Input) {
    let mut stream = Vec::with_capacity(CAPABILITIES.len() + input.data.len());
    if input.negotiate {
        stream.extend_from_slice(CAPABILITIES);
    }
    stream.extend_from_slice(&input.data);

    for item in decode_all(&stream, input.chunk) {
        let Ok(value) = item else { continue };
        round_trip(&value);
        check_request(value);
    }
}

/// A decoded value, serialised and fed to a fresh decoder, decodes to itself.
fn round_trip(value: &Value) {
    let mut text = serde_json::to_vec(value).expect("a Value serialises");
    // A top-level number or literal ends at a delimiter.
    text.push(b'\n');
    let mut d = JsonStreamDecoder::with_limit(text.len().max(LIMIT));
    d.feed(&text);
    let mut out = Vec::new();
    drain(&mut d, &mut out);
    let text = String::from_utf8_lossy(&text);
    assert_eq!(out.len(), 1, "round trip of {text}: {out:?}");
    match &out[0] {
        Ok(again) => assert!(same(value, again), "round trip of {text}: {again}"),
        Err(e) => panic!("round trip of {text}: {e}"),
    }
}

/// Structural equality, with floats equal within a few ULPs: serde_json's default
/// float parser (the `float_roundtrip` feature is off) is not correctly rounded for
/// long mantissas, so `6666…6` (70 digits) parses one ULP away from what its
/// shortest printed form parses to. Integers and everything else compare exactly.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
                }
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn check_request(value: Value) {
    let object_id = value.as_object().and_then(|o| o.get("id").cloned());
    match parse_request(value) {
        Ok(req) => {
            assert_eq!(req.id, object_id, "request id not the input's");
            match Command::parse(&req.execute, req.arguments) {
                Ok(cmd) => assert_eq!(cmd.name(), req.execute, "parsed command renamed"),
                Err(e) => assert!(!e.desc.is_empty(), "empty error for {}", req.execute),
            }
        }
        Err(e) => {
            assert!(!e.error.desc.is_empty(), "empty request error");
            assert_eq!(e.id, object_id, "request error lost the id");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_seeds_pass() {
        for (_, bytes) in crate::qmp::seeds() {
            check(&Input::decode(&bytes));
        }
        check(&Input::decode(&[]));
        check(&Input::decode(&[0xFF, 0xFF, b'{']));
        check(&Input::decode(
            b"\x02 1 2.5e3 \"s\" [true, null] {\"id\": 7, \"execute\": 1}\n",
        ));
    }

    #[test]
    fn long_mantissa_round_trips_within_ulps() {
        // Found by this target: 70 digits of 6 parse one ULP away from the parse of
        // their shortest printed form.
        check(&Input::decode(
            format!("\x00 {} ", "6".repeat(70)).as_bytes(),
        ));
    }

    #[test]
    fn descriptions() {
        struct Empty;
        impl fmt::Display for Empty {
            fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
                Ok(())
            }
        }
        assert!(!has_description(&Empty));
        assert!(has_description(&DecodeError::Reset));
    }

    #[test]
    fn same_tells_values_apart() {
        use serde_json::json;
        assert!(same(&json!({"a": [1, 2.5]}), &json!({"a": [1, 2.5]})));
        assert!(!same(&json!({"a": [1, 2.5]}), &json!({"a": [1, 2.6]})));
        assert!(!same(&json!(1), &json!(2)));
        assert!(!same(&json!({"a": 1}), &json!({"b": 1})));
        assert!(same(
            &json!(6.6666666666666674e69),
            &json!(6.666666666666667e69)
        ));
    }
}
