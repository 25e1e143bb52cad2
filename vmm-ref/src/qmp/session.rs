//! One client's protocol state, without I/O: bytes in, encoded replies and follow-up
//! actions out. The server owns one [`Session`] per connection; a fuzz target can drive
//! it directly with arbitrary bytes and a fake machine.
//!
//! Capabilities negotiation (QMP spec 4.2): until `qmp_capabilities` succeeded, every
//! other command is answered with `CommandNotFound` "Expecting capabilities negotiation
//! with 'qmp_capabilities'"; afterwards `qmp_capabilities` itself is refused with
//! "Capabilities negotiation is already complete, command ignored".

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::qmp::commands::{Command, Dispatcher, FollowUp};
use crate::qmp::error::CommandError;
use crate::qmp::protocol::{
    encode_error, encode_greeting, encode_return, parse_request, JsonStreamDecoder,
};

/// One step of output, in the order the server must perform them.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Bytes for this client (a reply).
    Reply(Vec<u8>),
    /// An action after the reply (event broadcast, quit).
    FollowUp(FollowUp),
}

/// A client's decoder and negotiation state.
#[derive(Debug)]
pub struct Session {
    decoder: JsonStreamDecoder,
    negotiated: bool,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A fresh session in capabilities negotiation mode.
    pub fn new() -> Self {
        Self::with_decoder(JsonStreamDecoder::new())
    }

    /// A session using `decoder` (e.g. with another size limit).
    pub fn with_decoder(decoder: JsonStreamDecoder) -> Self {
        Session {
            decoder,
            negotiated: false,
        }
    }

    /// The greeting to send first.
    pub fn greeting(dispatcher: &Dispatcher) -> Vec<u8> {
        encode_greeting(dispatcher.version())
    }

    /// True once `qmp_capabilities` succeeded: the client then receives events.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Feed received bytes; then call [`Session::process_next`] until it returns `None`.
    pub fn feed(&mut self, data: &[u8]) {
        self.decoder.feed(data);
    }

    /// True if decoded messages wait for [`Session::process_next`].
    pub fn has_pending(&self) -> bool {
        self.decoder.pending() > 0
    }

    /// Handle the next decoded message, if any: its reply, then any follow-up.
    pub fn process_next(&mut self, dispatcher: &Dispatcher) -> Option<Vec<Output>> {
        let decoded = self.decoder.next_value()?;
        let value = match decoded {
            Ok(value) => value,
            Err(err) => {
                return Some(vec![Output::Reply(encode_error(
                    &CommandError::from(&err),
                    None,
                ))])
            }
        };
        let request = match parse_request(value) {
            Ok(request) => request,
            Err(err) => {
                return Some(vec![Output::Reply(encode_error(
                    &err.error,
                    err.id.as_ref(),
                ))])
            }
        };
        let id = request.id;
        let reply_err = |e: &CommandError| vec![Output::Reply(encode_error(e, id.as_ref()))];
        if !self.negotiated && request.execute != "qmp_capabilities" {
            return Some(reply_err(&CommandError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )));
        }
        if self.negotiated && request.execute == "qmp_capabilities" {
            return Some(reply_err(&CommandError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            )));
        }
        let cmd = match Command::parse(&request.execute, request.arguments) {
            Ok(cmd) => cmd,
            Err(e) => return Some(reply_err(&e)),
        };
        // A panicking machine must not take the monitor thread down with it.
        let result =
            catch_unwind(AssertUnwindSafe(|| dispatcher.dispatch(&cmd))).unwrap_or_else(|_| {
                log::error!("qmp: command {} panicked", cmd.name());
                Err(CommandError::generic(format!(
                    "internal error: command '{}' panicked",
                    cmd.name()
                )))
            });
        match result {
            Ok(ret) => {
                if matches!(cmd, Command::QmpCapabilities(_)) {
                    self.negotiated = true;
                }
                let mut out = vec![Output::Reply(encode_return(&ret, id.as_ref()))];
                match cmd.follow_up() {
                    FollowUp::None => {}
                    other => out.push(Output::FollowUp(other)),
                }
                Some(out)
            }
            Err(e) => Some(reply_err(&e)),
        }
    }
}
