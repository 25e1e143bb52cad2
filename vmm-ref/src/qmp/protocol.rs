//! The QMP wire protocol (QEMU `docs/interop/qmp-spec.rst`), without any I/O.
//!
//! * [`JsonStreamDecoder`] splits a byte stream into JSON texts the way QEMU's
//!   `json-streamer` does: by balancing `{}`/`[]` outside strings, not by lines, so a
//!   client may send several objects on one line or one object across many lines.
//! * [`parse_request`] validates one decoded value as a request
//!   (`{"execute": "...", "arguments": {...}, "id": any}`) with QEMU's messages.
//! * [`encode_return`], [`encode_error`] and [`encode_greeting`] produce the replies,
//!   each terminated by `"\r\n"` as QEMU does.
//!
//! # Limits
//!
//! * One JSON message (from its first byte to its closing bracket) may be at most
//!   [`MAX_MESSAGE_SIZE`] bytes (1 MiB; QEMU allows a 64 MiB token, but no QMP request
//!   needs more than a few KiB). A longer message gets one
//!   `"JSON message size limit exceeded"` error as soon as the limit is crossed; the
//!   rest of it is skipped *without being buffered* (the decoder keeps only its bracket
//!   depth and string state) and decoding resumes after its closing bracket, so a
//!   100 MiB line costs CPU time to scan but never 100 MiB of memory.
//! * Nesting deeper than [`MAX_NESTING`] is refused the same way (serde_json's own
//!   recursion limit is 128).
//! * A `0xFF` byte, which never occurs in UTF-8, resets the decoder (QMP's documented way
//!   for a client to get the parser back into a clean state); a partially received
//!   message is then discarded with an error.
//!
//! Malformed JSON inside a balanced message yields one `"JSON parse error, ..."` error and
//! the decoder continues with the next byte after the message: it always resynchronises
//! at the end of the offending message.

use std::collections::VecDeque;
use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::qmp::error::CommandError;

/// Largest accepted JSON message in bytes (see the module documentation).
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Deepest accepted nesting of objects and arrays.
pub const MAX_NESTING: usize = 64;

/// Why a chunk of input could not be turned into a JSON value.
#[derive(Debug)]
pub enum DecodeError {
    /// A complete message was not valid JSON.
    Parse(serde_json::Error),
    /// The message grew beyond the size limit (its rest is being skipped).
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The message nested deeper than [`MAX_NESTING`] (its rest is being skipped).
    TooDeep,
    /// A closing bracket without an opening one.
    UnexpectedClose(u8),
    /// A `0xFF` reset byte arrived in the middle of a message.
    Reset,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Parse(e) => write!(f, "JSON parse error, {e}"),
            DecodeError::TooLarge { limit } => {
                write!(f, "JSON message size limit exceeded ({limit} bytes)")
            }
            DecodeError::TooDeep => {
                write!(f, "JSON nesting depth limit exceeded ({MAX_NESTING})")
            }
            DecodeError::UnexpectedClose(c) => {
                write!(f, "JSON parse error, stray '{}'", char::from(*c))
            }
            DecodeError::Reset => f.write_str("JSON parse error, message discarded by 0xFF reset"),
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Parse(e) => Some(e),
            _ => None,
        }
    }
}

impl From<&DecodeError> for CommandError {
    fn from(err: &DecodeError) -> Self {
        CommandError::generic(err.to_string())
    }
}

/// Streaming splitter of a byte stream into JSON values (see the module documentation).
#[derive(Debug)]
pub struct JsonStreamDecoder {
    /// Bytes of the message being received (empty while skipping).
    buf: Vec<u8>,
    /// Open objects + arrays of the current message.
    depth: usize,
    /// Inside a string literal.
    in_string: bool,
    /// The previous string byte was a backslash.
    escape: bool,
    /// Inside a top-level scalar (number, literal) that ends at a delimiter.
    in_scalar: bool,
    /// Skipping the rest of an oversized or too deep message.
    skipping: bool,
    /// Size limit of one message.
    limit: usize,
    /// Values and errors decoded but not yet taken.
    ready: VecDeque<Result<Value, DecodeError>>,
}

impl Default for JsonStreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamDecoder {
    /// A decoder with the default [`MAX_MESSAGE_SIZE`].
    pub fn new() -> Self {
        Self::with_limit(MAX_MESSAGE_SIZE)
    }

    /// A decoder accepting messages of at most `limit` bytes (at least 2).
    pub fn with_limit(limit: usize) -> Self {
        JsonStreamDecoder {
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escape: false,
            in_scalar: false,
            skipping: false,
            limit: limit.max(2),
            ready: VecDeque::new(),
        }
    }

    /// True while no message is partially received.
    pub fn is_idle(&self) -> bool {
        self.depth == 0 && !self.in_string && !self.in_scalar && !self.skipping
    }

    /// Number of decoded values/errors waiting in [`JsonStreamDecoder::next_value`].
    pub fn pending(&self) -> usize {
        self.ready.len()
    }

    /// Take the next decoded value (or decode error), in stream order.
    pub fn next_value(&mut self) -> Option<Result<Value, DecodeError>> {
        self.ready.pop_front()
    }

    /// Feed bytes; complete values become available through
    /// [`JsonStreamDecoder::next_value`].
    pub fn feed(&mut self, data: &[u8]) {
        let mut rest = data;
        while let Some((&byte, tail)) = rest.split_first() {
            let run = self.plain_run(rest);
            if run > 0 {
                self.push_run(&rest[..run]);
                rest = &rest[run..];
            } else {
                self.step(byte);
                rest = tail;
            }
        }
    }

    /// How many leading bytes of `data` [`Self::step`] would only append to the
    /// message, changing no state: the body of a string up to a quote, backslash,
    /// control character or `0xFF`; the rest of a top-level scalar up to a
    /// delimiter or `0xFF`; inside an object or array, everything up to a bracket,
    /// quote or `0xFF`. `feed` appends such runs in one piece (found with a table
    /// lookup per byte) and steps through the rest byte by byte; the result is the
    /// same as stepping through all of it.
    fn plain_run(&self, data: &[u8]) -> usize {
        let stop = if self.in_string {
            if self.escape {
                return 0;
            }
            &STRING_STOPS
        } else if self.in_scalar {
            &SCALAR_STOPS
        } else if self.depth > 0 {
            &CONTAINER_STOPS
        } else {
            return 0;
        };
        data.iter()
            .position(|&b| stop[usize::from(b)])
            .unwrap_or(data.len())
    }

    /// Appends `run` to the message, or, when it does not fit, reports
    /// `TooLarge` (the same outcome as appending its bytes one by one: the limit
    /// is crossed inside the run exactly when the run does not fit).
    fn push_run(&mut self, run: &[u8]) {
        if self.skipping {
            return;
        }
        if self.buf.len().saturating_add(run.len()) > self.limit {
            // Report once, then only track the structure until the message ends.
            self.buf = Vec::new();
            self.skipping = true;
            self.ready
                .push_back(Err(DecodeError::TooLarge { limit: self.limit }));
            return;
        }
        self.buf.extend_from_slice(run);
    }

    /// Feed bytes one at a time through the state machine, without the run fast
    /// path of [`JsonStreamDecoder::feed`]: the reference the fast path is
    /// checked against (unit tests, the `qmp_parse` fuzz target). Same results.
    pub fn feed_bytewise(&mut self, data: &[u8]) {
        for &byte in data {
            self.step(byte);
        }
    }

    fn reset_state(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.in_scalar = false;
        self.skipping = false;
    }

    fn push(&mut self, byte: u8) {
        self.push_run(std::slice::from_ref(&byte));
    }

    /// The current message ended: parse it (unless it was being skipped).
    fn finish(&mut self) {
        if self.skipping {
            self.skipping = false;
        } else {
            let result = parse_value(&self.buf).map_err(DecodeError::Parse);
            self.ready.push_back(result);
        }
        // Keep a modest allocation around, drop big ones.
        if self.buf.capacity() > 64 * 1024 {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }

    fn step(&mut self, byte: u8) {
        if byte == 0xFF {
            if !self.is_idle() && !self.skipping {
                self.ready.push_back(Err(DecodeError::Reset));
            }
            self.reset_state();
            return;
        }
        if self.in_string {
            self.push(byte);
            if byte < 0x20 {
                // JSON strings cannot hold a raw control character (QEMU's lexer
                // fails on it too): the message is malformed. Report it now and
                // start afresh after the byte, so that a stray quote costs the
                // rest of its line, not every message after it.
                self.finish();
                self.reset_state();
                return;
            }
            if self.escape {
                self.escape = false;
            } else if byte == b'\\' {
                self.escape = true;
            } else if byte == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.finish();
                }
            }
            return;
        }
        if self.in_scalar {
            if is_delimiter(byte) {
                self.in_scalar = false;
                self.finish();
                // The delimiter itself starts the next token.
                self.step(byte);
            } else {
                self.push(byte);
            }
            return;
        }
        match byte {
            b'{' | b'[' => {
                if self.depth >= MAX_NESTING && !self.skipping {
                    self.buf = Vec::new();
                    self.skipping = true;
                    self.ready.push_back(Err(DecodeError::TooDeep));
                }
                // Saturating: a skipped message may nest without bound.
                self.depth = self.depth.saturating_add(1);
                self.push(byte);
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    self.ready
                        .push_back(Err(DecodeError::UnexpectedClose(byte)));
                    return;
                }
                self.push(byte);
                self.depth -= 1;
                if self.depth == 0 {
                    self.finish();
                }
            }
            b'"' => {
                self.in_string = true;
                self.push(byte);
            }
            b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => {}
            _ => {
                if self.depth == 0 {
                    self.in_scalar = true;
                }
                self.push(byte);
            }
        }
    }
}

/// Parses one JSON text into a [`Value`] as `serde_json::from_slice` does,
/// except that an object naming a key twice is an error ("duplicate key"), as
/// in QEMU's parser: `serde_json` would keep the last one, so that
/// `{"execute": "query-status", "execute": "quit"}` would run `quit` past
/// anything that looked at the first.
pub fn parse_value(text: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = serde::de::DeserializeSeed::deserialize(UniqueKeys, &mut de)?;
    de.end()?;
    Ok(value)
}

/// A [`Value`] visitor refusing duplicate object keys (see [`parse_value`]).
#[derive(Clone, Copy)]
struct UniqueKeys;

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // Finite: serde_json's parser refuses what does not fit an f64.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key '{key}'"
                )));
            }
            let value = map.next_value_seed(self)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

const fn is_delimiter(byte: u8) -> bool {
    matches!(
        byte,
        b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':'
    )
}

/// Where a run of plain bytes is being looked for (see `plain_run`).
#[derive(Clone, Copy)]
enum RunKind {
    String,
    Scalar,
    Container,
}

/// The bytes `step` treats specially inside a string: the closing quote, a
/// backslash, a control character or the reset byte.
static STRING_STOPS: [bool; 256] = byte_table(RunKind::String);

/// The bytes `step` treats specially inside a top-level scalar: a delimiter
/// or the reset byte.
static SCALAR_STOPS: [bool; 256] = byte_table(RunKind::Scalar);

/// The bytes `step` treats specially inside an object or array: brackets, a
/// quote or the reset byte.
static CONTAINER_STOPS: [bool; 256] = byte_table(RunKind::Container);

const fn byte_table(kind: RunKind) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b == 0xFF
            || match kind {
                RunKind::String => matches!(b, b'"' | b'\\' | 0x00..=0x1F),
                RunKind::Scalar => is_delimiter(b),
                RunKind::Container => matches!(b, b'{' | b'[' | b'}' | b']' | b'"'),
            };
        i += 1;
    }
    t
}

/// A validated QMP request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The command name (`execute`).
    pub execute: String,
    /// The `arguments` object, if present.
    pub arguments: Option<Map<String, Value>>,
    /// The `id` member (any JSON value), echoed in the reply.
    pub id: Option<Value>,
}

/// A request that failed validation; `id` is echoed if the input had one.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestError {
    /// The request's `id`, if it was an object with one.
    pub id: Option<Value>,
    /// The error to reply with.
    pub error: CommandError,
}

/// Validate a decoded JSON value as a QMP request, with QEMU's
/// (`qmp_dispatch_check_obj`) messages. `exec-oob` is refused: this server offers no
/// out-of-band capability.
pub fn parse_request(value: Value) -> Result<Request, RequestError> {
    let Value::Object(mut obj) = value else {
        return Err(RequestError {
            id: None,
            error: CommandError::generic("QMP input must be a JSON object"),
        });
    };
    let id = obj.remove("id");
    let fail = |id: Option<Value>, desc: String| RequestError {
        id,
        error: CommandError::generic(desc),
    };
    let mut execute = None;
    let mut arguments = None;
    for (name, member) in obj {
        match name.as_str() {
            "execute" => match member {
                Value::String(s) => execute = Some(s),
                _ => {
                    return Err(fail(
                        id,
                        "QMP input member 'execute' must be a string".to_string(),
                    ))
                }
            },
            "arguments" => match member {
                Value::Object(map) => arguments = Some(map),
                _ => {
                    return Err(fail(
                        id,
                        "QMP input member 'arguments' must be an object".to_string(),
                    ))
                }
            },
            _ => return Err(fail(id, format!("QMP input member '{name}' is unexpected"))),
        }
    }
    match execute {
        Some(execute) => Ok(Request {
            execute,
            arguments,
            id,
        }),
        None => Err(fail(id, "QMP input lacks member 'execute'".to_string())),
    }
}

/// Pre-serialised JSON text, so that replies keep the field order of the structs they
/// were made from (a `serde_json::Value` object would sort its keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Json(String);

/// serde_json formatter writing QEMU's style: `{"a": 1, "b": [1, 2]}` (a space after
/// every `:` and `,`, no newlines).
struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

impl Json {
    /// Serialise `value` in QEMU's style.
    pub fn new<T: Serialize + ?Sized>(value: &T) -> Self {
        let mut out = Vec::with_capacity(128);
        let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
        match value.serialize(&mut ser).map(|()| String::from_utf8(out)) {
            Ok(Ok(text)) => Json(text),
            // Serialising our own types (derived Serialize, string keys) cannot fail and
            // serde_json writes UTF-8; keep a valid JSON fallback rather than panicking.
            Ok(Err(e)) => {
                log::error!("qmp: reply is not UTF-8: {e}");
                Json::empty_object()
            }
            Err(e) => {
                log::error!("qmp: cannot serialise a reply: {e}");
                Json::empty_object()
            }
        }
    }

    /// The empty object `{}`.
    pub fn empty_object() -> Self {
        Json("{}".to_string())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn push_id(out: &mut String, id: Option<&Value>) {
    if let Some(id) = id {
        out.push_str(", \"id\": ");
        out.push_str(Json::new(id).as_str());
    }
}

/// `{"return": RET, "id": ID}\r\n`.
pub fn encode_return(ret: &Json, id: Option<&Value>) -> Vec<u8> {
    let mut out = String::with_capacity(ret.as_str().len() + 32);
    out.push_str("{\"return\": ");
    out.push_str(ret.as_str());
    push_id(&mut out, id);
    out.push_str("}\r\n");
    out.into_bytes()
}

/// `{"error": {"class": ..., "desc": ...}, "id": ID}\r\n`.
pub fn encode_error(error: &CommandError, id: Option<&Value>) -> Vec<u8> {
    let mut out = String::from("{\"error\": ");
    out.push_str(Json::new(error).as_str());
    push_id(&mut out, id);
    out.push_str("}\r\n");
    out.into_bytes()
}

/// `{"qemu": {"micro", "minor", "major"}, "package"}` as in `query-version` and the
/// greeting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// Version triple.
    pub qemu: VersionTriple,
    /// Free-form package string.
    pub package: String,
}

/// `{"micro": .., "minor": .., "major": ..}` (QEMU's field order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VersionTriple {
    /// Micro version.
    pub micro: u32,
    /// Minor version.
    pub minor: u32,
    /// Major version.
    pub major: u32,
}

impl VersionInfo {
    /// This program's version (from its Cargo package version).
    pub fn current() -> Self {
        let num = |s: &str| s.parse::<u32>().unwrap_or(0);
        VersionInfo {
            qemu: VersionTriple {
                micro: num(env!("CARGO_PKG_VERSION_PATCH")),
                minor: num(env!("CARGO_PKG_VERSION_MINOR")),
                major: num(env!("CARGO_PKG_VERSION_MAJOR")),
            },
            package: format!("vmm-ref {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

#[derive(Serialize)]
struct Greeting<'a> {
    #[serde(rename = "QMP")]
    qmp: GreetingBody<'a>,
}

#[derive(Serialize)]
struct GreetingBody<'a> {
    version: &'a VersionInfo,
    capabilities: [&'a str; 0],
}

/// `{"QMP": {"version": {...}, "capabilities": []}}\r\n`.
pub fn encode_greeting(version: &VersionInfo) -> Vec<u8> {
    let mut out = Json::new(&Greeting {
        qmp: GreetingBody {
            version,
            capabilities: [],
        },
    })
    .0;
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn outcome(d: &mut JsonStreamDecoder) -> (Vec<Result<Value, String>>, bool) {
        (decode_all(d), d.is_idle())
    }

    /// Bytes that exercise every state: JSON structure, escapes, delimiters,
    /// resets, and runs long enough to cross a small limit.
    fn json_ish() -> impl Strategy<Value = Vec<u8>> {
        let token = prop_oneof![
            Just(b"{".to_vec()),
            Just(b"}".to_vec()),
            Just(b"[".to_vec()),
            Just(b"]".to_vec()),
            Just(b"\"".to_vec()),
            Just(b"\\".to_vec()),
            Just(b":".to_vec()),
            Just(b",".to_vec()),
            Just(b" ".to_vec()),
            Just(b"\n".to_vec()),
            Just(vec![0xFF]),
            Just(b"true".to_vec()),
            Just(b"12.5e3".to_vec()),
            proptest::collection::vec(b'a'..=b'z', 0..40),
            proptest::collection::vec(any::<u8>(), 0..8),
        ];
        proptest::collection::vec(token, 0..40).prop_map(|t| t.concat())
    }

    #[test]
    fn a_message_of_exactly_the_limit_fits() {
        // 8 bytes with the quotes: fits a limit of 8; one more byte does not.
        // (`feed` and `feed_bytewise` share the limit check, so the proptest
        // below cannot catch an off-by-one in it: this pins it.)
        for bytewise in [false, true] {
            let mut d = JsonStreamDecoder::with_limit(8);
            let text = b"\"abcdef\" \"abcdefg\" {\"a\":1234} ";
            if bytewise {
                d.feed_bytewise(text);
            } else {
                d.feed(text);
            }
            let (items, idle) = outcome(&mut d);
            assert_eq!(
                items,
                vec![
                    Ok(json!("abcdef")),
                    Err("JSON message size limit exceeded (8 bytes)".to_string()),
                    Err("JSON message size limit exceeded (8 bytes)".to_string()),
                ],
                "bytewise={bytewise}"
            );
            assert!(idle);
        }
    }

    proptest! {
        /// The run fast path of `feed` gives exactly what stepping byte by byte
        /// gives, however the input is split into reads and whatever the limit.
        #[test]
        fn feed_matches_bytewise(data in json_ish(), chunk in 1usize..64, limit in 2usize..96) {
            let mut fast = JsonStreamDecoder::with_limit(limit);
            for c in data.chunks(chunk) {
                fast.feed(c);
            }
            let mut slow = JsonStreamDecoder::with_limit(limit);
            slow.feed_bytewise(&data);
            prop_assert_eq!(outcome(&mut fast), outcome(&mut slow));
        }
    }

    /// Every decoder state `step` can be in, as far as `plain_run`, `push_run`
    /// and `step` tell states apart (buffer fill relative to a limit of 8 included).
    fn every_state() -> Vec<JsonStreamDecoder> {
        const LIMIT: usize = 8;
        let mut states = Vec::new();
        // (in_string, escape, in_scalar): escape only inside a string, a
        // top-level scalar only outside one and at depth 0.
        for (in_string, escape, in_scalar) in [
            (false, false, false),
            (true, false, false),
            (true, true, false),
            (false, false, true),
        ] {
            for depth in [0, 1, 2, MAX_NESTING - 1, MAX_NESTING, MAX_NESTING + 1] {
                if in_scalar && depth > 0 {
                    continue;
                }
                for skipping in [false, true] {
                    for fill in [0, 1, LIMIT - 1, LIMIT] {
                        let mut d = JsonStreamDecoder::with_limit(LIMIT);
                        d.in_string = in_string;
                        d.escape = escape;
                        d.in_scalar = in_scalar;
                        d.depth = depth;
                        d.skipping = skipping;
                        if !skipping {
                            d.buf = vec![b'x'; fill];
                        }
                        states.push(d);
                    }
                }
            }
        }
        states
    }

    /// The fast path of `feed`, proven by enumeration rather than sampled: in
    /// every state, each byte `plain_run` counts as plain does to the decoder
    /// exactly what `step` does with it, and leaves every field `plain_run`
    /// reads unchanged, so a whole run appended by `push_run` is the same as
    /// stepping through it; and `push_run` of a run equals pushing its bytes one by
    /// one at every fill level. (The `qmp_parse` fuzz target relies on this
    /// instead of running a byte-at-a-time reference on every input.)
    #[test]
    fn plain_bytes_are_exactly_what_step_only_appends() {
        let mut plain = 0;
        for state in every_state() {
            let before = format!("{state:?}");
            for byte in 0..=u8::MAX {
                let mut d = clone_state(&state);
                if d.plain_run(&[byte]) == 0 {
                    continue;
                }
                plain += 1;
                let mut stepped = clone_state(&state);
                stepped.step(byte);
                d.push_run(&[byte]);
                assert_eq!(
                    format!("{d:?}"),
                    format!("{stepped:?}"),
                    "byte {byte:#04x} in state {before}"
                );
                let key = |d: &JsonStreamDecoder| (d.in_string, d.escape, d.in_scalar, d.depth);
                assert_eq!(
                    key(&stepped),
                    key(&state),
                    "byte {byte:#04x} changed state {before}"
                );
            }
            for len in 1..=3 {
                let run = vec![b'y'; len];
                let mut whole = clone_state(&state);
                whole.push_run(&run);
                let mut single = clone_state(&state);
                for b in &run {
                    single.push_run(std::slice::from_ref(b));
                }
                assert_eq!(
                    format!("{whole:?}"),
                    format!("{single:?}"),
                    "run of {len} in {before}"
                );
            }
        }
        // Strings, scalars and containers each have plain bytes: the test is not vacuous.
        assert!(plain > 1000, "{plain}");
    }

    fn clone_state(d: &JsonStreamDecoder) -> JsonStreamDecoder {
        JsonStreamDecoder {
            buf: d.buf.clone(),
            depth: d.depth,
            in_string: d.in_string,
            escape: d.escape,
            in_scalar: d.in_scalar,
            skipping: d.skipping,
            limit: d.limit,
            ready: VecDeque::new(),
        }
    }

    fn decode_all(d: &mut JsonStreamDecoder) -> Vec<Result<Value, String>> {
        std::iter::from_fn(|| d.next_value())
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
    }

    #[test]
    fn splits_several_objects_on_one_line() {
        let mut d = JsonStreamDecoder::new();
        d.feed(b"{\"a\": 1}{\"b\": [1, {\"c\": \"}\"}]}  {\"d\":\"\\\"{\"}\n");
        assert_eq!(
            decode_all(&mut d),
            vec![
                Ok(json!({"a": 1})),
                Ok(json!({"b": [1, {"c": "}"}]})),
                Ok(json!({"d": "\"{"}))
            ]
        );
        assert!(d.is_idle());
    }

    #[test]
    fn one_object_across_lines_and_chunks() {
        let text = b"{\n \"execute\":\n \"query-status\",\n \"id\": [1, 2]\n}\n";
        let mut d = JsonStreamDecoder::new();
        for chunk in text.chunks(3) {
            d.feed(chunk);
        }
        assert_eq!(
            decode_all(&mut d),
            vec![Ok(json!({"execute": "query-status", "id": [1, 2]}))]
        );
    }

    #[test]
    fn top_level_scalars_and_strings() {
        let mut d = JsonStreamDecoder::new();
        d.feed(b"123 true \"x y\" nul");
        let got = decode_all(&mut d);
        assert_eq!(got, vec![Ok(json!(123)), Ok(json!(true)), Ok(json!("x y"))]);
        // "nul" waits for a delimiter, then fails to parse.
        d.feed(b"\n");
        let got = decode_all(&mut d);
        assert_eq!(got.len(), 1);
        assert!(got[0].as_ref().unwrap_err().starts_with("JSON parse error"));
    }

    #[test]
    fn a_stray_quote_costs_the_rest_of_its_line_only() {
        // A string cannot hold a raw control character: the newline ends the
        // malformed run (as QEMU's lexer does), so the next line is a request
        // again instead of the inside of a string.
        let line = b"{\"execute\":\"query-status\"}\n";
        for chunk in [1, 7, 4096] {
            let mut d = JsonStreamDecoder::new();
            let mut text = b"\"".to_vec();
            text.extend_from_slice(line);
            text.extend_from_slice(line);
            for c in text.chunks(chunk) {
                d.feed(c);
            }
            let got = decode_all(&mut d);
            assert_eq!(
                got.last(),
                Some(&Ok(json!({"execute": "query-status"}))),
                "{got:?}"
            );
            assert!(d.is_idle());
            assert!(
                got.iter()
                    .any(|r| r.as_ref().is_err_and(|e| e.contains("control character"))),
                "{got:?}"
            );
        }
        // Inside an object too; a tab is a control character as well.
        let mut d = JsonStreamDecoder::new();
        d.feed(b"{\"a\": \"x\ty\"}\n{\"b\": 1}\n");
        let got = decode_all(&mut d);
        assert!(got[0]
            .as_ref()
            .unwrap_err()
            .starts_with("JSON parse error, control character"));
        assert_eq!(got.last(), Some(&Ok(json!({"b": 1}))), "{got:?}");
        // Escaped, they are fine.
        let mut d = JsonStreamDecoder::new();
        d.feed(b"\"x\\ty\\n\" ");
        assert_eq!(decode_all(&mut d), vec![Ok(json!("x\ty\n"))]);
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let mut d = JsonStreamDecoder::new();
        d.feed(
            br#"{"execute": "query-status", "execute": "quit"}
                {"execute": "x", "arguments": {"a": [{"b": 1, "b": 2}]}}
                {"execute": "query-status", "arguments": {"a": {"b": 1}, "b": {"b": 2}}}"#,
        );
        let got = decode_all(&mut d);
        assert_eq!(got.len(), 3, "{got:?}");
        for e in &got[..2] {
            let e = e.as_ref().unwrap_err();
            assert!(e.starts_with("JSON parse error, duplicate key"), "{e}");
        }
        assert!(got[0].as_ref().unwrap_err().contains("'execute'"));
        assert_eq!(
            got[2],
            Ok(json!({"execute": "query-status", "arguments": {"a": {"b": 1}, "b": {"b": 2}}}))
        );
        // Everything else parses as serde_json parses it.
        for text in [
            "1",
            "-0",
            "1.5e300",
            "18446744073709551615",
            "-9223372036854775808",
            "\"\\u00e9\"",
            "null",
            "[true, false, [], {}]",
            "{\"\": 0}",
        ] {
            assert_eq!(
                parse_value(text.as_bytes()).unwrap(),
                serde_json::from_str::<Value>(text).unwrap(),
                "{text}"
            );
        }
        assert!(parse_value(b"[1] x").is_err(), "trailing characters");
    }

    #[test]
    fn malformed_json_resynchronises() {
        let mut d = JsonStreamDecoder::new();
        d.feed(b"{\"execute\": foo} ] {\"execute\": \"quit\"}");
        let got = decode_all(&mut d);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0]
            .as_ref()
            .unwrap_err()
            .starts_with("JSON parse error, "));
        assert_eq!(got[1], Err("JSON parse error, stray ']'".to_string()));
        assert_eq!(got[2], Ok(json!({"execute": "quit"})));
    }

    #[test]
    fn oversized_message_is_skipped_without_buffering() {
        let mut d = JsonStreamDecoder::with_limit(64);
        d.feed(b"{\"execute\": \"x\", \"arguments\": {\"s\": \"");
        let chunk = vec![b'a'; 4096];
        for _ in 0..256 {
            d.feed(&chunk);
            assert!(
                d.buf.capacity() <= 128,
                "decoder buffered a skipped message"
            );
        }
        d.feed(b"}\"}}");
        d.feed(b"{\"execute\": \"quit\"}");
        assert_eq!(
            decode_all(&mut d),
            vec![
                Err("JSON message size limit exceeded (64 bytes)".to_string()),
                Ok(json!({"execute": "quit"}))
            ]
        );
    }

    #[test]
    fn oversized_bare_token_is_skipped() {
        let mut d = JsonStreamDecoder::with_limit(16);
        d.feed(&[b'7'; 1000]);
        d.feed(b" 5");
        d.feed(b" ");
        assert_eq!(
            decode_all(&mut d),
            vec![
                Err("JSON message size limit exceeded (16 bytes)".to_string()),
                Ok(json!(5))
            ]
        );
    }

    #[test]
    fn nesting_limit() {
        let mut d = JsonStreamDecoder::new();
        let deep = "[".repeat(1000) + &"]".repeat(1000);
        d.feed(deep.as_bytes());
        d.feed(b"{}");
        assert_eq!(
            decode_all(&mut d),
            vec![
                Err(format!("JSON nesting depth limit exceeded ({MAX_NESTING})")),
                Ok(json!({}))
            ]
        );
        let ok = "[".repeat(MAX_NESTING) + &"]".repeat(MAX_NESTING);
        d.feed(ok.as_bytes());
        assert!(matches!(d.next_value(), Some(Ok(_))));
    }

    #[test]
    fn ff_byte_resets() {
        let mut d = JsonStreamDecoder::new();
        d.feed(b"{\"execute\": \"qu");
        d.feed(&[0xFF]);
        d.feed(b"{\"execute\": \"quit\"}");
        assert_eq!(
            decode_all(&mut d),
            vec![
                Err("JSON parse error, message discarded by 0xFF reset".to_string()),
                Ok(json!({"execute": "quit"}))
            ]
        );
        d.feed(&[0xFF, 0xFF]);
        assert!(d.next_value().is_none());
    }

    #[test]
    fn invalid_utf8_is_a_parse_error() {
        let mut d = JsonStreamDecoder::new();
        d.feed(b"{\"a\": \"\xC3\x28\"}");
        assert!(matches!(d.next_value(), Some(Err(DecodeError::Parse(_)))));
    }

    #[test]
    fn request_validation_messages() {
        let err = |v: Value| parse_request(v).unwrap_err();
        assert_eq!(
            err(json!([1])).error.desc,
            "QMP input must be a JSON object"
        );
        assert_eq!(
            err(json!({"execute": 1, "id": 7})),
            RequestError {
                id: Some(json!(7)),
                error: CommandError::generic("QMP input member 'execute' must be a string")
            }
        );
        assert_eq!(
            err(json!({"execute": "x", "arguments": []})).error.desc,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            err(json!({"exec-oob": "x"})).error.desc,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            err(json!({"execute": "x", "foo": 1})).error.desc,
            "QMP input member 'foo' is unexpected"
        );
        assert_eq!(
            err(json!({"id": "a"})).error.desc,
            "QMP input lacks member 'execute'"
        );
        let ok =
            parse_request(json!({"execute": "quit", "id": {"x": 1}, "arguments": {}})).unwrap();
        assert_eq!(ok.execute, "quit");
        assert_eq!(ok.id, Some(json!({"x": 1})));
        assert_eq!(ok.arguments, Some(Map::new()));
    }

    #[test]
    fn encodings() {
        let r = encode_return(&Json::empty_object(), Some(&json!("a")));
        assert_eq!(r, b"{\"return\": {}, \"id\": \"a\"}\r\n");
        let e = encode_error(&CommandError::command_not_found("nope"), None);
        assert_eq!(
            e,
            b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\r\n"
        );
        let nested = Json::new(&json!({"a": [1, {"b": null}], "c": "x, y: z"}));
        assert_eq!(
            nested.as_str(),
            r#"{"a": [1, {"b": null}], "c": "x, y: z"}"#
        );
        let g: Value = serde_json::from_slice(&encode_greeting(&VersionInfo::current())).unwrap();
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        assert!(g["QMP"]["version"]["package"]
            .as_str()
            .unwrap()
            .starts_with("vmm-ref "));
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..16)) {
            let mut d = JsonStreamDecoder::with_limit(256);
            for c in &chunks {
                d.feed(c);
                while let Some(v) = d.next_value() {
                    if let Ok(v) = v {
                        let _ = parse_request(v);
                    }
                }
                proptest::prop_assert!(d.buf.len() <= 256);
            }
        }

        #[test]
        fn json_values_roundtrip_through_any_chunking(
            values in proptest::collection::vec(arb_json(), 1..5),
            split in 1usize..17,
        ) {
            let mut text = Vec::new();
            for v in &values {
                text.extend_from_slice(serde_json::to_string(v).unwrap().as_bytes());
                text.push(b'\n');
            }
            let mut d = JsonStreamDecoder::new();
            for c in text.chunks(split) {
                d.feed(c);
            }
            let got: Vec<Value> = std::iter::from_fn(|| d.next_value()).map(|r| r.unwrap()).collect();
            proptest::prop_assert_eq!(got, values);
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(".*", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
