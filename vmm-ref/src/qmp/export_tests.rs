//! The block export commands through a [`Session`] and the [`Dispatcher`]:
//! argument parsing with QEMU's messages, routing to the machine's
//! [`ExportControl`], the `BLOCK_EXPORT_DELETED` follow-up, and machines
//! without exports (VM mode). The real exports are exercised by
//! `tests/export_cli.rs`.

use std::sync::{Arc, Mutex};

use iothread_registry::IoThreadRegistry;
use serde_json::{json, Value};

use crate::export::options::SocketAddress;
use crate::export::{BlockExportAddArgs, BlockExportDelArgs, BlockExportRemoveMode};
use crate::qmp::session::{Output, Session};
use crate::qmp::test_util::FakeMachine;
use crate::qmp::{
    BlockExportInfo, BlockInfo, CommandError, Dispatcher, ExportControl, FollowUp, QmpMachine,
    RunStatus, NO_EXPORTS,
};

/// A machine whose export control records the requests.
#[derive(Default)]
struct ExportMachine {
    registry: IoThreadRegistry,
    added: Mutex<Vec<BlockExportAddArgs>>,
    deleted: Mutex<Vec<BlockExportDelArgs>>,
}

impl QmpMachine for ExportMachine {
    fn status(&self) -> RunStatus {
        RunStatus::Running
    }
    fn system_reset(&self) -> Result<(), String> {
        Err("no reset".into())
    }
    fn quit(&self) {}
    fn query_block(&self) -> Vec<BlockInfo> {
        Vec::new()
    }
    fn registry(&self) -> &IoThreadRegistry {
        &self.registry
    }
    fn exports(&self) -> Option<&dyn ExportControl> {
        Some(self)
    }
}

impl ExportControl for ExportMachine {
    fn add(&self, args: BlockExportAddArgs) -> Result<(), CommandError> {
        let mut added = self.added.lock().unwrap();
        if added.iter().any(|a| a.id == args.id) {
            return Err(CommandError::generic(format!(
                "Block export id '{}' is already in use",
                args.id
            )));
        }
        added.push(args);
        Ok(())
    }
    fn del(&self, args: &BlockExportDelArgs) -> Result<(), CommandError> {
        let mut added = self.added.lock().unwrap();
        let pos = added
            .iter()
            .position(|a| a.id == args.id)
            .ok_or_else(|| CommandError::generic(format!("Export '{}' is not found", args.id)))?;
        added.remove(pos);
        self.deleted.lock().unwrap().push(args.clone());
        Ok(())
    }
    fn query(&self) -> Vec<BlockExportInfo> {
        self.added
            .lock()
            .unwrap()
            .iter()
            .map(|a| BlockExportInfo {
                kind: a.kind.clone(),
                id: a.id.clone(),
                node_name: a.node_name.clone(),
                shutting_down: false,
                addr: a.addr.clone(),
                num_queues: a.num_queues.unwrap_or(1),
                iothreads: Vec::new(),
                writable: a.writable.unwrap_or(true),
                connected: false,
            })
            .collect()
    }
}

/// One negotiated session over `machine`.
struct Client {
    session: Session,
    dispatcher: Dispatcher,
}

impl Client {
    fn new(machine: Arc<dyn QmpMachine>) -> Client {
        let mut c = Client {
            session: Session::new(),
            dispatcher: Dispatcher::new(machine),
        };
        let (reply, _) = c.run(json!({"execute": "qmp_capabilities"}));
        assert_eq!(reply, json!({"return": {}}));
        c
    }

    /// Sends `request`; returns the reply and the follow-up, if any.
    fn run(&mut self, request: Value) -> (Value, Option<FollowUp>) {
        self.session.feed(format!("{request}\n").as_bytes());
        let outputs = self
            .session
            .process_next(&self.dispatcher)
            .expect("a reply");
        let mut reply = None;
        let mut follow = None;
        for o in outputs {
            match o {
                Output::Reply(bytes) => reply = Some(serde_json::from_slice(&bytes).unwrap()),
                Output::FollowUp(f) => follow = Some(f),
            }
        }
        (reply.expect("reply"), follow)
    }

    fn error(&mut self, request: Value) -> (String, String) {
        let (reply, follow) = self.run(request.clone());
        assert!(follow.is_none(), "{request}: no follow-up on errors");
        let e = &reply["error"];
        assert!(e.is_object(), "{request}: {reply}");
        (
            e["class"].as_str().unwrap().to_owned(),
            e["desc"].as_str().unwrap().to_owned(),
        )
    }
}

fn add_request(extra: Value) -> Value {
    let mut args = json!({
        "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
        "addr": {"type": "unix", "path": "/tmp/e0.sock"}, "iothread": "io0"
    });
    for (k, v) in extra.as_object().unwrap() {
        args[k] = v.clone();
    }
    json!({"execute": "block-export-add", "arguments": args})
}

#[test]
fn export_commands_reach_the_export_control() {
    let machine = Arc::new(ExportMachine::default());
    let mut c = Client::new(machine.clone());
    let (reply, follow) = c.run(add_request(json!({"num-queues": 2, "writable": true})));
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(follow, None);
    {
        let added = machine.added.lock().unwrap();
        assert_eq!(added.len(), 1);
        assert_eq!(added[0].num_queues, Some(2));
        assert_eq!(
            added[0].addr,
            SocketAddress::Unix {
                path: "/tmp/e0.sock".into()
            }
        );
    }
    let (reply, _) = c.run(json!({"execute": "query-block-exports"}));
    assert_eq!(
        reply,
        json!({"return": [{
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0", "shutting-down": false,
            "addr": {"type": "unix", "path": "/tmp/e0.sock"}, "num-queues": 2,
            "iothreads": [], "writable": true, "connected": false
        }]})
    );
    // The machine's errors are passed on.
    assert_eq!(
        c.error(add_request(json!({}))),
        (
            "GenericError".into(),
            "Block export id 'e0' is already in use".into()
        )
    );
    let (reply, follow) =
        c.run(json!({"execute": "block-export-del", "arguments": {"id": "e0", "mode": "hard"}}));
    assert_eq!(reply, json!({"return": {}}));
    match follow {
        Some(FollowUp::Event(ev)) => {
            let v: Value = serde_json::from_slice(&ev.encode()).unwrap();
            assert_eq!(v["event"], "BLOCK_EXPORT_DELETED");
            assert_eq!(v["data"], json!({"id": "e0"}));
        }
        other => panic!("want BLOCK_EXPORT_DELETED, got {other:?}"),
    }
    assert_eq!(
        machine.deleted.lock().unwrap()[0].mode,
        BlockExportRemoveMode::Hard
    );
    assert_eq!(
        c.error(json!({"execute": "block-export-del", "arguments": {"id": "e0"}})),
        ("GenericError".into(), "Export 'e0' is not found".into())
    );
    let (reply, _) = c.run(json!({"execute": "query-block-exports"}));
    assert_eq!(reply, json!({"return": []}));
}

#[test]
fn export_arguments_get_qemu_messages() {
    let machine = Arc::new(ExportMachine::default());
    let mut c = Client::new(machine.clone());
    let cases = [
        (
            add_request(json!({"type": "nbd"})),
            "Parameter 'type' does not accept value 'nbd' (vmm-ref only exports 'vhost-user-blk')",
        ),
        (
            add_request(json!({"bogus": 1})),
            "Parameter 'bogus' is unexpected",
        ),
        (
            add_request(json!({"num-queues": "2"})),
            "Invalid parameter type for 'num-queues', expected: integer",
        ),
        (
            add_request(json!({"addr": {"type": "inet", "host": "x"}})),
            "Parameter 'addr' does not accept value 'inet'",
        ),
        (
            add_request(json!({"writable": "yes"})),
            "Invalid parameter type for 'writable', expected: boolean",
        ),
        (
            json!({"execute": "block-export-add", "arguments": {"type": "vhost-user-blk"}}),
            "is missing",
        ),
        (
            json!({"execute": "block-export-del", "arguments": {"id": "e0", "mode": "soft"}}),
            "Parameter 'mode' does not accept value 'soft'",
        ),
        (
            json!({"execute": "block-export-del"}),
            "Parameter 'id' is missing",
        ),
        (
            json!({"execute": "query-block-exports", "arguments": {"x": 1}}),
            "Parameter 'x' is unexpected",
        ),
    ];
    for (request, want) in cases {
        let (class, desc) = c.error(request.clone());
        assert_eq!(class, "GenericError", "{request}");
        assert!(
            desc.contains(want),
            "{request}: got {desc:?}, want {want:?}"
        );
    }
    assert!(machine.added.lock().unwrap().is_empty());
    assert!(machine.deleted.lock().unwrap().is_empty());
}

#[test]
fn machines_without_exports_refuse_clearly() {
    let mut c = Client::new(FakeMachine::new());
    assert_eq!(
        c.error(add_request(json!({}))),
        ("GenericError".into(), NO_EXPORTS.into())
    );
    assert_eq!(
        c.error(json!({"execute": "block-export-del", "arguments": {"id": "e0"}})),
        ("GenericError".into(), NO_EXPORTS.into())
    );
    // Listing is harmless: there are none.
    let (reply, _) = c.run(json!({"execute": "query-block-exports"}));
    assert_eq!(reply, json!({"return": []}));
}
