//! Socket round trips for every command and error path, and hostile clients.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use serde_json::{json, Value};

use crate::qmp::commands::COMMAND_NAMES;
use crate::qmp::test_util::{error_of, FakeMachine, TempDir, TestClient, FAKE_HOLDER};
use crate::qmp::{QmpError, QmpServer, QmpServerConfig, RunStatus};

struct Fixture {
    machine: Arc<FakeMachine>,
    server: QmpServer,
    _dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self::with_config(QmpServerConfig::default())
    }

    fn with_config(config: QmpServerConfig) -> Self {
        let dir = TempDir::new("srv");
        let machine = FakeMachine::new();
        let server =
            QmpServer::start_with_config(&dir.path().join("qmp.sock"), machine.clone(), config)
                .expect("start server");
        Fixture {
            machine,
            server,
            _dir: dir,
        }
    }

    fn client(&self) -> TestClient {
        TestClient::negotiated(self.server.path())
    }
}

#[test]
fn greeting_and_capabilities_negotiation() {
    let f = Fixture::new();
    let (mut c, greeting) = TestClient::connect(f.server.path());
    let qmp = &greeting["QMP"];
    assert_eq!(qmp["capabilities"], json!([]));
    assert!(qmp["version"]["qemu"]["micro"].is_u64());
    assert!(qmp["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("vmm-ref"));

    let reply = c.request(&json!({"execute": "query-status", "id": 1}));
    assert_eq!(
        reply,
        json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1})
    );
    assert_eq!(
        c.err("qmp_capabilities", Some(json!({"enable": ["oob"]}))),
        (
            "GenericError".into(),
            "Capability 'oob' not available".into()
        )
    );
    assert_eq!(
        c.err("qmp_capabilities", Some(json!({"foo": 1}))).1,
        "Parameter 'foo' is unexpected"
    );
    let reply = c.request(&json!({"execute": "qmp_capabilities", "id": "neg"}));
    assert_eq!(reply, json!({"return": {}, "id": "neg"}));
    assert_eq!(
        c.err("qmp_capabilities", None),
        (
            "CommandNotFound".into(),
            "Capabilities negotiation is already complete, command ignored".into()
        )
    );
}

#[test]
fn query_version_status_commands() {
    let f = Fixture::new();
    let mut c = f.client();
    let v = c.ok("query-version", None);
    assert!(v["qemu"]["major"].is_u64() && v["qemu"]["minor"].is_u64());
    assert!(v["package"].as_str().unwrap().starts_with("vmm-ref "));

    assert_eq!(
        c.ok("query-status", None),
        json!({"status": "running", "running": true})
    );
    *f.machine.status.lock().unwrap() = RunStatus::Paused;
    assert_eq!(
        c.ok("query-status", None),
        json!({"status": "paused", "running": false})
    );

    let cmds = c.ok("query-commands", None);
    let names: Vec<&str> = cmds
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, COMMAND_NAMES);
    assert_eq!(
        c.err("query-status", Some(json!({"verbose": true}))),
        (
            "GenericError".into(),
            "Parameter 'verbose' is unexpected".into()
        )
    );
}

#[test]
fn query_iothreads_is_the_registry_json_verbatim() {
    let f = Fixture::new();
    let mut c = f.client();
    c.send_raw(b"{\"execute\": \"query-iothreads\"}\n");
    let line = c.read_line();
    let expected = crate::qmp::protocol::Json::new(&f.machine.registry_ref().query_iothreads());
    let expected = expected.as_str();
    assert_eq!(line, format!("{{\"return\": {expected}}}\r\n"));
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        v["return"],
        serde_json::to_value(f.machine.registry_ref().query_iothreads()).unwrap()
    );
    let io0 = &v["return"][0];
    assert_eq!(io0["id"], "io0");
    assert_eq!(
        io0["holders"],
        json!([{"type": "qom-object", "qom-path": FAKE_HOLDER}])
    );
    assert_eq!(io0["poll-weight"], 3);
    assert!(io0["thread-id"].as_i64().unwrap() > 0);
    assert_eq!(v["return"][1]["holders"], json!([]));
    // Field order as QEMU emits it.
    let order = [
        "\"id\"",
        "\"thread-id\"",
        "\"holders\"",
        "\"poll-max-ns\"",
        "\"poll-grow\"",
        "\"poll-shrink\"",
        "\"poll-weight\"",
        "\"aio-max-batch\"",
    ];
    let pos: Vec<usize> = order.iter().map(|k| line.find(k).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{line}");
}

impl FakeMachine {
    fn registry_ref(&self) -> &iothread_registry::IoThreadRegistry {
        crate::qmp::QmpMachine::registry(self)
    }
}

#[test]
fn qom_get_and_set_live_properties() {
    let f = Fixture::new();
    let mut c = f.client();
    let path = json!("/objects/io1");
    for (prop, default) in [
        ("poll-max-ns", 32768),
        ("poll-grow", 2),
        ("poll-shrink", 2),
        ("poll-weight", 3),
        ("aio-max-batch", 0),
    ] {
        assert_eq!(
            c.ok("qom-get", Some(json!({"path": path, "property": prop}))),
            json!(default),
            "{prop}"
        );
    }
    for (prop, value) in [
        ("poll-max-ns", 100000),
        ("poll-grow", 4),
        ("poll-shrink", 8),
        ("poll-weight", 5),
        ("aio-max-batch", 16),
    ] {
        assert_eq!(
            c.ok(
                "qom-set",
                Some(json!({"path": path, "property": prop, "value": value}))
            ),
            json!({})
        );
        assert_eq!(
            c.ok("qom-get", Some(json!({"path": path, "property": prop}))),
            json!(value)
        );
        assert_eq!(
            f.machine.registry_ref().get_property("io1", prop).unwrap(),
            value
        );
    }
    let threads = c.ok("query-iothreads", None);
    assert_eq!(threads[1]["poll-weight"], 5);
    assert_eq!(threads[1]["poll-max-ns"], 100000);
    // The IOThread's loop applies the new parameters (visible in its statistics) on
    // its next iteration: poll a bounded number of times.
    let mut applied = Value::Null;
    for _ in 0..6000 {
        let stats = c.ok("x-query-iothread-stats", Some(json!({"id": "io1"})));
        applied = stats[0]["poll"]["params"].clone();
        if applied["weight"] == 5 && applied["max_ns"] == 100000 {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(applied["weight"], 5, "{applied}");
    assert_eq!(applied["grow"], 4, "{applied}");
    assert_eq!(
        c.ok("qom-get", Some(json!({"path": path, "property": "type"}))),
        json!("iothread")
    );
}

#[test]
fn iothread_stats() {
    let f = Fixture::new();
    let mut c = f.client();
    let all = c.ok("x-query-iothread-stats", None);
    let ids: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["io0", "io1"]);
    assert!(all[0]["thread-id"].as_i64().unwrap() > 0);
    assert!(all[0]["poll"]["iterations"].is_u64());
    assert_eq!(
        c.err("x-query-iothread-stats", Some(json!({"id": "nope"})))
            .1,
        "Cannot find iothread nope"
    );
    assert_eq!(
        c.err("x-query-iothread-stats", Some(json!({"ids": []}))).1,
        "Parameter 'ids' is unexpected"
    );
}

#[test]
fn qom_error_paths() {
    let f = Fixture::new();
    let mut c = f.client();
    let err = |c: &mut TestClient, name: &str, args: Value| c.err(name, Some(args));
    assert_eq!(
        err(
            &mut c,
            "qom-get",
            json!({"path": "/objects/nope", "property": "poll-weight"})
        ),
        (
            "DeviceNotFound".into(),
            "Device '/objects/nope' not found".into()
        )
    );
    assert_eq!(
        err(
            &mut c,
            "qom-set",
            json!({"path": "/machine", "property": "x", "value": 1})
        ),
        (
            "DeviceNotFound".into(),
            "Device '/machine' not found".into()
        )
    );
    assert_eq!(
        err(
            &mut c,
            "qom-get",
            json!({"path": "/objects/io0", "property": "foo"})
        )
        .1,
        "Property 'iothread.foo' not found"
    );
    assert_eq!(
        err(
            &mut c,
            "qom-set",
            json!({"path": "/objects/io0", "property": "foo", "value": "x"})
        )
        .1,
        "Property 'iothread.foo' not found"
    );
    assert_eq!(
        err(
            &mut c,
            "qom-set",
            json!({"path": "/objects/io0", "property": "poll-weight", "value": "5"})
        ),
        (
            "GenericError".into(),
            "Invalid parameter type for 'poll-weight', expected: integer".into()
        )
    );
    assert_eq!(
        err(
            &mut c,
            "qom-set",
            json!({"path": "/objects/io0", "property": "poll-weight", "value": 1.5})
        )
        .1,
        "Invalid parameter type for 'poll-weight', expected: integer"
    );
    assert_eq!(
        err(
            &mut c,
            "qom-set",
            json!({"path": "/objects/io0", "property": "poll-weight", "value": 64})
        )
        .1,
        "poll-weight value must be in range [0, 63]"
    );
    assert_eq!(
        err(
            &mut c,
            "qom-set",
            json!({"path": "/objects/io0", "property": "poll-max-ns", "value": -1})
        )
        .1,
        format!("poll-max-ns value must be in range [0, {}]", i64::MAX)
    );
    assert_eq!(
        err(
            &mut c,
            "qom-set",
            json!({"path": "/objects/io0", "property": "poll-max-ns", "value": u64::MAX})
        )
        .1,
        format!("Parameter 'poll-max-ns' value {} is out of range", u64::MAX)
    );
    assert_eq!(
        err(
            &mut c,
            "qom-set",
            json!({"path": "/objects/io0", "property": "type", "value": 1})
        )
        .1,
        "Property 'iothread.type' is read-only"
    );
    assert_eq!(
        err(
            &mut c,
            "qom-set",
            json!({"path": "/objects/io0", "property": "poll-weight"})
        )
        .1,
        "Parameter 'value' is missing"
    );
    assert_eq!(
        err(
            &mut c,
            "qom-get",
            json!({"path": 7, "property": "poll-weight"})
        )
        .1,
        "Invalid parameter type for 'path', expected: string"
    );
    assert_eq!(
        err(
            &mut c,
            "qom-get",
            json!({"path": "/objects/io0", "property": "x", "extra": 1})
        )
        .1,
        "Parameter 'extra' is unexpected"
    );
    // Nothing changed.
    assert_eq!(
        f.machine
            .registry_ref()
            .get_property("io0", "poll-weight")
            .unwrap(),
        3
    );
}

#[test]
fn object_add_takes_the_poll_algorithm_like_the_command_line() {
    let f = Fixture::new();
    let mut c = f.client();
    let algorithm = |id: &str| f.machine.registry_ref().params(id).unwrap().poll.algorithm;
    assert_eq!(
        c.ok(
            "object-add",
            Some(json!({"qom-type": "iothread", "id": "io2", "poll-algorithm": "classic"}))
        ),
        json!({})
    );
    assert_eq!(algorithm("io2"), aio_poll::PollAlgorithm::Classic);
    c.ok(
        "object-add",
        Some(json!({"qom-type": "iothread", "id": "io3", "poll-algorithm": "weighted"})),
    );
    assert_eq!(algorithm("io3"), aio_poll::PollAlgorithm::Weighted);
    assert_eq!(
        c.err(
            "object-add",
            Some(json!({"qom-type": "iothread", "id": "io4", "poll-algorithm": "fast"}))
        )
        .1,
        "Parameter 'poll-algorithm' does not accept value 'fast'"
    );
    for bad in [
        json!(1),
        json!({"classic": null}),
        json!(null),
        json!(["classic"]),
    ] {
        assert_eq!(
            c.err(
                "object-add",
                Some(json!({"qom-type": "iothread", "id": "io4", "poll-algorithm": bad}))
            )
            .1,
            "Invalid parameter type for 'poll-algorithm', expected: string"
        );
    }
    assert!(!f.machine.registry_ref().contains("io4"));
    // HMP's object_add, as the command line spells it.
    assert_eq!(
        c.ok(
            "human-monitor-command",
            Some(json!({"command-line": "object_add iothread,id=io5,poll-algorithm=classic"}))
        ),
        json!("")
    );
    assert_eq!(algorithm("io5"), aio_poll::PollAlgorithm::Classic);
}

#[test]
fn drive_set_iothreads_takes_a_list_of_names_or_of_mapping_objects() {
    let parse = |args: Value| {
        let Value::Object(map) = args else { panic!() };
        crate::qmp::commands::Command::parse("x-drive-set-iothreads", Some(map)).map_err(|e| e.desc)
    };
    assert!(parse(json!({"id": "d0", "iothread-vq-mapping": ["io0", "io1"]})).is_ok());
    assert!(parse(json!({"id": "d0", "iothread-vq-mapping": [{"iothread": "io0"}]})).is_ok());
    assert!(parse(json!({"id": "d0", "iothread": "io0"})).is_ok());
    for bad in [
        json!("io0"),
        json!(null),
        json!(7),
        json!({"iothread": "io0"}),
    ] {
        assert_eq!(
            parse(json!({"id": "d0", "iothread-vq-mapping": bad})),
            Err("Invalid parameter type for 'iothread-vq-mapping', expected: array".into())
        );
    }
    // vqs: a list when present.
    assert!(parse(json!({
        "id": "d0",
        "iothread-vq-mapping": [{"iothread": "io0", "vqs": null}]
    }))
    .is_err());
    let forms = "Parameter 'iothread-vq-mapping': expected a list of \
                 IOThread names or a list of {\"iothread\": ..., \"vqs\": [...]} objects";
    for bad in [
        json!([["io0"]]),
        json!(["io0", {"iothread": "io1"}]),
        json!([null]),
        json!([1]),
    ] {
        assert_eq!(
            parse(json!({"id": "d0", "iothread-vq-mapping": bad})),
            Err(forms.into())
        );
    }
    assert_eq!(
        parse(json!({"id": "d0", "iothread-vq-mapping": [{"iothread": "io0", "vq": [1]}]})),
        Err("Parameter 'iothread-vq-mapping.vq' is unexpected".into())
    );
    assert_eq!(
        parse(json!({"id": "d0", "iothread-vq-mapping": [{"vqs": [1]}]})),
        Err("Parameter 'iothread-vq-mapping.iothread' is missing".into())
    );
}

/// Events a machine emits while a command runs follow that command's reply,
/// before the next command's, however many commands one write carries; and a
/// flood of them is not dropped (the event channel holds 4096).
#[test]
fn events_emitted_by_a_command_follow_its_reply() {
    let f = Fixture::new();
    *f.machine.events.lock().unwrap() = Some(f.server.events());
    let mut c = f.client();
    let mut watcher = f.client();
    c.send_raw(
        b"{\"execute\":\"stop\",\"id\":0}{\"execute\":\"query-status\",\"id\":1}\
          {\"execute\":\"cont\",\"id\":2}{\"execute\":\"query-status\",\"id\":3}\n",
    );
    let order: Vec<Value> = (0..6)
        .map(|_| {
            let m = c.read_msg();
            m.get("event").cloned().unwrap_or_else(|| m["id"].clone())
        })
        .collect();
    assert_eq!(
        order,
        [
            json!(0),
            json!("STOP"),
            json!(1),
            json!(2),
            json!("RESUME"),
            json!(3)
        ]
    );
    // 5000 stop/cont pairs in one write, then a query: every event arrives,
    // at every client.
    let mut flood = Vec::new();
    for _ in 0..5000 {
        flood.extend_from_slice(b"{\"execute\":\"stop\"}{\"execute\":\"cont\"}");
    }
    flood.extend_from_slice(b"{\"execute\":\"query-status\",\"id\":\"end\"}\n");
    c.send_raw(&flood);
    let mut events = 0;
    loop {
        let m = c.read_msg();
        if m.get("event").is_some() {
            events += 1;
        } else if m["id"] == "end" {
            break;
        }
    }
    // The last RESUME follows the last cont's reply, before the query's.
    assert_eq!(events, 10_000);
    let mut seen = 0;
    while seen < 10_002 {
        let m = watcher.read_msg();
        assert!(m.get("event").is_some(), "{m}");
        seen += 1;
    }
}

#[test]
fn stop_and_cont_reach_the_machine_by_qmp_and_hmp() {
    let f = Fixture::new();
    let mut c = f.client();
    let status = |c: &mut TestClient| c.ok("query-status", None);
    assert_eq!(c.ok("stop", None), json!({}));
    assert_eq!(
        status(&mut c),
        json!({"status": "paused", "running": false})
    );
    assert_eq!(c.ok("stop", None), json!({}), "stopping twice succeeds");
    assert_eq!(c.ok("cont", None), json!({}));
    assert_eq!(
        status(&mut c),
        json!({"status": "running", "running": true})
    );
    assert_eq!(
        c.err("stop", Some(json!({"force": true}))).1,
        "Parameter 'force' is unexpected"
    );
    let hmp = |c: &mut TestClient, line: &str| {
        c.ok("human-monitor-command", Some(json!({"command-line": line})))
    };
    assert_eq!(hmp(&mut c, "stop"), json!(""));
    assert_eq!(hmp(&mut c, "info status"), json!("VM status: paused\n"));
    assert_eq!(hmp(&mut c, "c"), json!(""));
    assert_eq!(hmp(&mut c, "info status"), json!("VM status: running\n"));
    // The machine's refusal is the command's error.
    *f.machine.status.lock().unwrap() = RunStatus::Shutdown;
    assert_eq!(c.err("cont", None).1, "the fake machine is shutdown");
    assert_eq!(
        hmp(&mut c, "stop"),
        json!("Error: the fake machine is shutdown\n")
    );
}

#[test]
fn object_add_and_del() {
    let f = Fixture::new();
    let mut c = f.client();
    assert_eq!(
        c.ok(
            "object-add",
            Some(json!({"qom-type": "iothread", "id": "io2", "poll-max-ns": 0, "poll-weight": 2}))
        ),
        json!({})
    );
    let threads = c.ok("query-iothreads", None);
    let io2 = &threads[2];
    assert_eq!(io2["id"], "io2");
    assert_eq!(io2["poll-max-ns"], 0);
    assert_eq!(io2["poll-weight"], 2);
    assert_eq!(io2["poll-grow"], 2);
    assert!(f.machine.registry_ref().contains("io2"));

    let (class, desc) = c.err(
        "object-add",
        Some(json!({"qom-type": "iothread", "id": "io2"})),
    );
    assert_eq!(class, "GenericError");
    assert!(
        desc.contains("io2") && desc.contains("already exists"),
        "{desc}"
    );
    assert_eq!(
        c.err(
            "object-add",
            Some(json!({"qom-type": "memory-backend-ram", "id": "m", "size": 1}))
        )
        .1,
        "Parameter 'qom-type' does not accept value 'memory-backend-ram' \
         (vmm-ref only creates 'iothread' objects)"
    );
    assert_eq!(
        c.err(
            "object-add",
            Some(json!({"qom-type": "iothread", "id": "io3", "foo": 1}))
        )
        .1,
        "Parameter 'foo' is unexpected"
    );
    assert_eq!(
        c.err("object-add", Some(json!({"qom-type": "iothread"}))).1,
        "Parameter 'id' is missing"
    );
    assert_eq!(
        c.err("object-add", Some(json!({"id": "io3"}))).1,
        "Parameter 'qom-type' is missing"
    );
    assert_eq!(
        c.err(
            "object-add",
            Some(json!({"qom-type": "iothread", "id": "io3", "poll-weight": "x"}))
        )
        .1,
        "Invalid parameter type for 'poll-weight', expected: integer"
    );
    assert_eq!(
        c.err(
            "object-add",
            Some(json!({"qom-type": "iothread", "id": "io3", "poll-weight": 99}))
        )
        .1,
        "poll-weight value must be in range [0, 63]"
    );
    let (_, desc) = c.err(
        "object-add",
        Some(json!({"qom-type": "iothread", "id": "3io"})),
    );
    assert!(
        desc.starts_with("Parameter 'id' expects an identifier"),
        "{desc}"
    );
    assert!(!f.machine.registry_ref().contains("io3"));

    assert_eq!(c.ok("object-del", Some(json!({"id": "io2"}))), json!({}));
    assert!(!f.machine.registry_ref().contains("io2"));
    assert_eq!(
        c.err("object-del", Some(json!({"id": "io2"}))).1,
        "object 'io2' not found"
    );
    assert_eq!(c.err("object-del", None).1, "Parameter 'id' is missing");

    // Refused while held, naming the holder; allowed once released.
    let (class, desc) = c.err("object-del", Some(json!({"id": "io0"})));
    assert_eq!(class, "GenericError");
    assert_eq!(
        desc,
        format!("IOThread 'io0' is in use by qom-object {FAKE_HOLDER}")
    );
    assert!(f.machine.registry_ref().contains("io0"));
    f.machine.guards.lock().unwrap().clear();
    assert_eq!(c.ok("object-del", Some(json!({"id": "io0"}))), json!({}));
}

#[test]
fn query_block_and_hmp() {
    let f = Fixture::new();
    let mut c = f.client();
    let blocks = c.ok("query-block", None);
    assert_eq!(blocks[0]["device"], "blk0");
    assert_eq!(blocks[0]["read-only"], false);
    assert_eq!(blocks[0]["num-queues"], 2);
    assert_eq!(
        blocks[0]["queues"],
        json!([
            {"queue": 0, "iothread": "io0", "requests": 0, "notifications": 0, "interrupts": 0, "errors": 0},
            {"queue": 1, "iothread": "io0", "requests": 0, "notifications": 0, "interrupts": 0, "errors": 0}
        ])
    );

    let hmp = |c: &mut TestClient, line: &str| {
        c.ok("human-monitor-command", Some(json!({"command-line": line})))
            .as_str()
            .unwrap()
            .to_string()
    };
    let text = hmp(&mut c, "info iothreads");
    assert_eq!(text, f.machine.registry_ref().info_iothreads());
    assert!(text.starts_with("io0:\n"), "{text}");
    assert!(text.contains("poll-weight=3"), "{text}");
    assert!(text.contains(FAKE_HOLDER), "{text}");
    assert_eq!(hmp(&mut c, "info status"), "VM status: running\n");
    assert!(hmp(&mut c, "info version").contains("vmm-ref"));
    assert!(hmp(&mut c, "info block").contains("/tmp/fake-disk.img"));
    assert!(hmp(&mut c, "help").contains("info"));
    assert!(hmp(&mut c, "info").contains("info iothreads"));
    assert_eq!(
        hmp(&mut c, "frobnicate now"),
        "unknown command: 'frobnicate now'\n"
    );
    assert_eq!(
        hmp(&mut c, "info nothing"),
        "unknown command: 'info nothing'\n"
    );
    assert_eq!(hmp(&mut c, "   "), "");

    // QOM and object commands, via the same typed parsing as their QMP twins.
    assert_eq!(hmp(&mut c, "qom-get /objects/io1 poll-weight"), "3\n");
    assert_eq!(hmp(&mut c, "qom-set /objects/io1 poll-weight 6"), "");
    assert_eq!(
        f.machine
            .registry_ref()
            .get_property("io1", "poll-weight")
            .unwrap(),
        6
    );
    assert_eq!(
        hmp(&mut c, "qom-set /objects/io1 poll-weight six"),
        "Error: Invalid parameter type for 'poll-weight', expected: integer\n"
    );
    assert_eq!(
        hmp(&mut c, "qom-get /objects/nope poll-weight"),
        "Error: Device '/objects/nope' not found\n"
    );
    assert_eq!(
        hmp(&mut c, "qom-set /objects/io1"),
        "Usage: qom-set path property value\n"
    );
    assert_eq!(hmp(&mut c, "object_add iothread,id=io5,poll-max-ns=0"), "");
    assert_eq!(
        f.machine
            .registry_ref()
            .get_property("io5", "poll-max-ns")
            .unwrap(),
        0
    );
    assert_eq!(hmp(&mut c, "object_add qom-type=iothread,id=io6"), "");
    assert_eq!(
        hmp(&mut c, "object_add iothread,id=9"),
        "Error: Parameter 'id' expects an identifier: '9' must start with a letter\n"
    );
    assert_eq!(
        hmp(&mut c, "object_add iothread,id=io7,bogus=1"),
        "Error: Parameter 'bogus' is unexpected\n"
    );
    assert_eq!(
        hmp(&mut c, "object_add iothread,id=io7,id=io8"),
        "Error: Parameter 'id' given twice\n"
    );
    assert_eq!(
        hmp(&mut c, "object_add iothread,,id=io7"),
        "Error: Invalid object option ''\n"
    );
    assert_eq!(
        hmp(&mut c, "object_add iothread"),
        "Error: Parameter 'id' is missing\n"
    );
    assert_eq!(hmp(&mut c, "object_del io5"), "");
    assert_eq!(hmp(&mut c, "object_del io6"), "");
    assert!(!f.machine.registry_ref().contains("io5"));
    assert_eq!(
        hmp(&mut c, "object_del io0"),
        format!("Error: IOThread 'io0' is in use by qom-object {FAKE_HOLDER}\n")
    );
    assert_eq!(
        c.ok(
            "human-monitor-command",
            Some(json!({"command-line": "info status", "cpu-index": 0}))
        ),
        json!("VM status: running\n")
    );
    assert_eq!(
        c.err("human-monitor-command", None).1,
        "Parameter 'command-line' is missing"
    );
    assert_eq!(
        c.err(
            "human-monitor-command",
            Some(json!({"command-line": ["info"]}))
        )
        .1,
        "Invalid parameter type for 'command-line', expected: string"
    );
}

#[test]
fn system_reset_emits_reset_event_to_every_client() {
    let f = Fixture::new();
    let mut a = f.client();
    let mut b = f.client();
    // A client still negotiating receives no events.
    let (mut pre, _) = TestClient::connect(f.server.path());
    let reply = a.request(&json!({"execute": "system_reset", "id": 9}));
    assert_eq!(reply, json!({"return": {}, "id": 9}));
    assert_eq!(f.machine.resets.load(Ordering::SeqCst), 1);
    for c in [&mut a, &mut b] {
        let ev = c.next_event();
        assert_eq!(ev["event"], "RESET");
        assert_eq!(
            ev["data"],
            json!({"guest": false, "reason": "host-qmp-system-reset"})
        );
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }
    // The pre-negotiation client's next message is its own reply, not the event.
    assert_eq!(
        pre.request(&json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );

    f.machine.fail_reset.store(true, Ordering::SeqCst);
    assert_eq!(
        a.err("system_reset", None),
        (
            "GenericError".into(),
            "reset refused by the fake machine".into()
        )
    );
    // No RESET for the failed reset: the next message after a command is its reply.
    assert_eq!(a.ok("query-status", None)["status"], "running");
    assert!(a.events.is_empty(), "{:?}", a.events);
}

#[test]
fn quit_replies_then_shutdown_event_then_quits() {
    let f = Fixture::new();
    let mut a = f.client();
    let mut b = f.client();
    a.send_raw(b"{\"execute\": \"quit\", \"id\": \"q\"}");
    assert_eq!(a.read_msg(), json!({"return": {}, "id": "q"}));
    let ev = a.read_msg();
    assert_eq!(ev["event"], "SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(b.next_event()["event"], "SHUTDOWN");
    // quit() runs right after the event was queued and flushed.
    let deadline = std::time::Instant::now() + crate::qmp::test_util::IO_TIMEOUT;
    while f.machine.quits.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(f.machine.quits.load(Ordering::SeqCst), 1);
}

#[test]
fn events_from_the_vmm_reach_negotiated_clients() {
    let f = Fixture::new();
    let mut a = f.client();
    let events = f.server.events();
    let emitter = thread::spawn(move || {
        events.emit("STOP", Value::Null);
        events.emit("DEVICE_DELETED", json!({"device": "blk1", "path": "/x"}));
    });
    emitter.join().unwrap();
    let stop = a.next_event();
    assert_eq!(stop["event"], "STOP");
    assert!(stop.get("data").is_none());
    let dd = a.next_event();
    assert_eq!(dd["data"]["device"], "blk1");
}

#[test]
fn protocol_errors_get_replies_and_the_session_recovers() {
    let f = Fixture::new();
    let mut c = f.client();
    let cases: &[(&[u8], &str)] = &[
        (b"[1, 2]", "QMP input must be a JSON object"),
        (
            b"{\"execute\": 1, \"id\": 5}",
            "QMP input member 'execute' must be a string",
        ),
        (
            b"{\"arguments\": {}, \"id\": 5}",
            "QMP input lacks member 'execute'",
        ),
        (
            b"{\"execute\": \"query-status\", \"arguments\": 3, \"id\": 5}",
            "QMP input member 'arguments' must be an object",
        ),
        (
            b"{\"exec-oob\": \"query-status\", \"id\": 5}",
            "QMP input member 'exec-oob' is unexpected",
        ),
        (
            b"{\"execute\": \"query-status\", \"bogus\": 1, \"id\": 5}",
            "QMP input member 'bogus' is unexpected",
        ),
    ];
    for (input, desc) in cases {
        c.send_raw(input);
        let reply = c.read_reply();
        assert_eq!(
            error_of(&reply),
            ("GenericError".to_string(), desc.to_string())
        );
        if input.starts_with(b"{") {
            assert_eq!(reply["id"], 5, "id echoed for {desc}");
        }
    }
    let reply = c.request(&json!({"execute": "no-such-command", "id": [1]}));
    assert_eq!(
        reply,
        json!({"error": {"class": "CommandNotFound",
            "desc": "The command no-such-command has not been found"}, "id": [1]})
    );

    // Malformed JSON: one error, then the decoder resynchronises.
    c.send_raw(b"{\"execute\": query-status}\n{\"execute\": \"query-status\", \"id\": 1}\n");
    let (class, desc) = error_of(&c.read_reply());
    assert_eq!(class, "GenericError");
    assert!(desc.starts_with("JSON parse error, "), "{desc}");
    assert_eq!(c.read_reply()["id"], 1);
    c.send_raw(b"}");
    assert_eq!(error_of(&c.read_reply()).1, "JSON parse error, stray '}'");

    // Several requests on one line, one request across lines and writes.
    c.send_raw(b"{\"execute\":\"query-status\",\"id\":1}{\"execute\":\"query-version\",\"id\":2}");
    assert_eq!(c.read_reply()["id"], 1);
    assert_eq!(c.read_reply()["id"], 2);
    c.send_raw(b"{\"execute\":\n");
    c.send_raw(b"  \"query-status\",\n \"id\"");
    c.send_raw(b": 3}\n");
    assert_eq!(c.read_reply()["return"]["running"], true);

    // 0xFF resets a half-sent request.
    c.send_raw(b"{\"execute\": \"quit");
    c.send_raw(&[0xFF]);
    c.send_raw(b"{\"execute\": \"query-status\", \"id\": 4}");
    assert_eq!(
        error_of(&c.read_reply()).1,
        "JSON parse error, message discarded by 0xFF reset"
    );
    assert_eq!(c.read_reply()["id"], 4);
    assert_eq!(f.machine.quits.load(Ordering::SeqCst), 0);
}

#[test]
fn a_100_mib_line_gets_an_error_and_others_keep_being_served() {
    let f = Fixture::new();
    let mut big = f.client();
    let mut writer = big.writer.try_clone().unwrap();
    let sender = thread::spawn(move || {
        writer
            .write_all(b"{\"execute\": \"query-status\", \"arguments\": {\"x\": \"")
            .unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            writer.write_all(&chunk).unwrap();
        }
        writer
            .write_all(b"\"}}\n{\"execute\": \"query-version\", \"id\": \"after\"}\n")
            .unwrap();
    });
    // Another client is served while the big line streams in.
    let mut other = f.client();
    for i in 0..20 {
        let reply = other.request(&json!({"execute": "query-status", "id": i}));
        assert_eq!(reply["id"], i);
    }
    let (class, desc) = error_of(&big.read_reply());
    assert_eq!(class, "GenericError");
    assert_eq!(desc, "JSON message size limit exceeded (1048576 bytes)");
    sender.join().unwrap();
    // The same connection recovers after the oversized message.
    let reply = big.read_reply();
    assert_eq!(reply["id"], "after");
    assert!(reply["return"]["qemu"].is_object());
    assert_eq!(other.ok("query-status", None)["status"], "running");
}

#[test]
fn a_client_that_never_reads_is_dropped_alone() {
    let f = Fixture::with_config(QmpServerConfig {
        max_output_queue: 64 * 1024,
        ..QmpServerConfig::default()
    });
    let mut lazy = f.client();
    let mut active: Vec<TestClient> = (0..3).map(|_| f.client()).collect();
    let events = f.server.events();
    let batches = 40;
    let per_batch = 500;
    for batch in 0..batches {
        for n in 0..per_batch {
            events.emit(
                "FLOOD",
                json!({"batch": batch, "n": n, "pad": "x".repeat(64)}),
            );
        }
        // The active clients read everything, in order, and are never dropped.
        for c in active.iter_mut() {
            for n in 0..per_batch {
                let ev = c.next_event();
                assert_eq!(ev["data"]["batch"], batch);
                assert_eq!(ev["data"]["n"], n);
            }
        }
    }
    assert_eq!(events.dropped(), 0);
    for c in active.iter_mut() {
        assert_eq!(c.ok("query-status", None)["running"], true);
    }
    // The lazy client got some events, then was disconnected.
    let mut received = Vec::new();
    lazy.reader.read_to_end(&mut received).unwrap();
    let count = received
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert!(count > 0 && count < batches * per_batch, "{count}");
}

#[test]
fn clients_disconnecting_mid_command_are_cleaned_up() {
    let f = Fixture::new();
    for _ in 0..10 {
        // Half a request, then gone.
        let mut c = f.client();
        c.send_raw(b"{\"execute\": \"query-st");
        drop(c);
        // A whole request, gone before the reply.
        let mut c = f.client();
        c.send_raw(b"{\"execute\": \"query-iothreads\"}");
        drop(c);
        // Gone before negotiation.
        let (c, _) = TestClient::connect(f.server.path());
        drop(c);
        // Raw connect/close without reading the greeting.
        drop(UnixStream::connect(f.server.path()).unwrap());
    }
    // Half-closed writer still gets its reply.
    let mut c = f.client();
    c.send_raw(b"{\"execute\": \"query-status\", \"id\": 1}");
    c.writer.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.read_reply()["id"], 1);
    let mut rest = Vec::new();
    c.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // Everything still works, including for 16 new clients (the limit): the dropped
    // ones were removed.
    let mut many: Vec<TestClient> = (0..16).map(|_| f.client()).collect();
    for c in many.iter_mut() {
        assert_eq!(c.ok("query-status", None)["running"], true);
    }
}

#[test]
fn several_clients_at_once() {
    let f = Fixture::new();
    let path = f.server.path().to_path_buf();
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let path = path.clone();
            thread::spawn(move || {
                let mut c = TestClient::negotiated(&path);
                for i in 0..50 {
                    let id = json!({"worker": w, "i": i});
                    let reply = match i % 3 {
                        0 => c.request(&json!({"execute": "query-status", "id": id})),
                        1 => c.request(&json!({"execute": "query-iothreads", "id": id})),
                        _ => c.request(&json!({"execute": "qom-get", "id": id,
                            "arguments": {"path": "/objects/io1", "property": "poll-grow"}})),
                    };
                    assert_eq!(reply["id"], id);
                    assert!(reply.get("return").is_some(), "{reply}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn too_many_clients_are_refused() {
    let f = Fixture::with_config(QmpServerConfig {
        max_clients: 2,
        ..QmpServerConfig::default()
    });
    let mut a = f.client();
    let _b = f.client();
    assert_eq!(
        refused_with(f.server.path()),
        json!({"error": {"class": "GenericError",
            "desc": "too many QMP clients (at most 2); closing the connection"}})
    );
    assert_eq!(a.ok("query-status", None)["running"], true);
}

/// Connections that closed before the server accepted them (a burst of
/// connect-and-close probes, queued behind a slow command) do not take the
/// slots of the live clients queued after them.
#[test]
fn clients_that_closed_before_accept_do_not_hold_slots() {
    let f = Fixture::with_config(QmpServerConfig {
        max_clients: 4,
        ..QmpServerConfig::default()
    });
    let mut a = f.client();
    let (release, gate) = std::sync::mpsc::channel();
    *f.machine.reset_gate.lock().unwrap() = Some(gate);
    a.send_raw(b"{\"execute\": \"system_reset\"}\n");
    // Give the worker time to take the command and block in it, so that the
    // probes and `b` wait in the listen backlog and are accepted in one batch.
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..8 {
        drop(UnixStream::connect(f.server.path()).unwrap());
    }
    let (mut b, _greeting) = std::thread::scope(|s| {
        let b = s.spawn(|| TestClient::connect(f.server.path()));
        std::thread::sleep(std::time::Duration::from_millis(200));
        release.send(()).unwrap();
        b.join().unwrap()
    });
    assert_eq!(a.read_msg(), json!({"return": {}}));
    assert_eq!(b.ok("qmp_capabilities", None), json!({}));
    assert_eq!(b.ok("query-status", None)["running"], true);
}

/// Connects, expects one message and then EOF; returns the message.
fn refused_with(path: &std::path::Path) -> Value {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(crate::qmp::test_util::IO_TIMEOUT))
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let lines: Vec<&str> = buf.lines().collect();
    assert_eq!(lines.len(), 1, "one message, then the close: {buf:?}");
    serde_json::from_str(lines[0]).unwrap()
}

/// Clients that connect and never negotiate cannot lock management out:
/// past the negotiation timeout each gets an error and is disconnected, the
/// slots free up; a negotiated client stays however idle it is.
#[test]
fn clients_that_never_negotiate_are_disconnected() {
    let f = Fixture::with_config(QmpServerConfig {
        max_clients: 4,
        negotiation_timeout: Some(std::time::Duration::from_millis(300)),
        ..QmpServerConfig::default()
    });
    let mut manager = f.client();
    // Three idlers fill the other slots; each read its greeting.
    let mut idlers: Vec<TestClient> = (0..3)
        .map(|_| TestClient::connect(f.server.path()).0)
        .collect();
    for idler in &mut idlers {
        let msg = idler.read_msg();
        assert_eq!(
            msg,
            json!({"error": {"class": "GenericError",
                "desc": "QMP capabilities negotiation did not complete within 300ms; closing the connection"}})
        );
        let mut rest = String::new();
        idler.reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "", "closed after the error");
    }
    // The slots are free again, and the negotiated client was not touched.
    let mut late = f.client();
    assert_eq!(late.ok("query-status", None)["running"], true);
    assert_eq!(manager.ok("query-status", None)["running"], true);
}

#[test]
fn null_is_refused_for_every_integer_member() {
    let f = Fixture::new();
    let mut c = f.client();
    let export = json!({"type": "vhost-user-blk", "id": "e0", "node-name": "d0",
        "addr": {"type": "unix", "path": "/tmp/e0.sock"}, "iothread": "io0"});
    let cases: [(&str, Value, &[&str]); 4] = [
        (
            "object-add",
            json!({"qom-type": "iothread", "id": "io9"}),
            &[
                "poll-max-ns",
                "poll-grow",
                "poll-shrink",
                "poll-weight",
                "aio-max-batch",
            ],
        ),
        (
            "block-export-add",
            export,
            &["num-queues", "logical-block-size"],
        ),
        (
            "human-monitor-command",
            json!({"command-line": "info iothreads"}),
            &["cpu-index"],
        ),
        (
            "qom-set",
            json!({"path": "/objects/io1", "property": "poll-max-ns"}),
            &["value"],
        ),
    ];
    for (cmd, base, members) in cases {
        for member in members {
            let mut args = base.clone();
            args[*member] = Value::Null;
            let err = c.err(cmd, Some(args.clone()));
            let want = if *member == "value" {
                "Invalid parameter type for 'poll-max-ns', expected: integer".to_owned()
            } else {
                format!("Invalid parameter type for '{member}', expected: integer")
            };
            assert_eq!(err, ("GenericError".to_owned(), want), "{cmd} {args}");
        }
    }
    // Nothing was created or changed.
    let threads = c.ok("query-iothreads", None);
    assert_eq!(threads.as_array().unwrap().len(), 2, "{threads}");
}

#[test]
fn a_panicking_machine_does_not_kill_the_monitor() {
    let f = Fixture::new();
    let mut c = f.client();
    f.machine.panic_on_status.store(true, Ordering::SeqCst);
    assert_eq!(
        c.err("query-status", None).1,
        "internal error: command 'query-status' panicked"
    );
    f.machine.panic_on_status.store(false, Ordering::SeqCst);
    assert_eq!(c.ok("query-status", None)["running"], true);
}

#[test]
fn socket_file_mode_stale_socket_and_cleanup() {
    let dir = TempDir::new("sockfile");
    let path = dir.path().join("qmp.sock");
    let machine = FakeMachine::new();

    // A stale socket (no listener) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = QmpServer::start(&path, machine.clone()).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A live one is not.
    match QmpServer::start(&path, machine.clone()) {
        Err(QmpError::InUse { .. }) => {}
        other => panic!("expected InUse, got {other:?}"),
    }
    let mut c = TestClient::negotiated(&path);
    drop(server);
    assert!(!path.exists(), "socket not removed on drop");
    // The connection was closed by the server.
    let mut rest = Vec::new();
    c.reader.read_to_end(&mut rest).unwrap();

    // A regular file is never clobbered.
    std::fs::write(&path, b"precious").unwrap();
    match QmpServer::start(&path, machine.clone()) {
        Err(QmpError::NotASocket { .. }) => {}
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn dropping_the_server_inside_quit_does_not_deadlock() {
    use crate::qmp::QmpMachine;
    use std::sync::Mutex;

    struct Dropper {
        inner: Arc<FakeMachine>,
        server: Mutex<Option<QmpServer>>,
    }
    impl QmpMachine for Dropper {
        fn status(&self) -> RunStatus {
            self.inner.status()
        }
        fn system_reset(&self) -> Result<(), String> {
            self.inner.system_reset()
        }
        fn quit(&self) {
            drop(self.server.lock().unwrap().take());
        }
        fn query_block(&self) -> Vec<crate::qmp::BlockInfo> {
            self.inner.query_block()
        }
        fn registry(&self) -> &iothread_registry::IoThreadRegistry {
            self.inner.registry()
        }
    }
    let dir = TempDir::new("dropper");
    let path = dir.path().join("qmp.sock");
    let machine = Arc::new(Dropper {
        inner: FakeMachine::new(),
        server: Mutex::new(None),
    });
    let server = QmpServer::start(&path, machine.clone()).unwrap();
    *machine.server.lock().unwrap() = Some(server);
    let mut c = TestClient::negotiated(&path);
    assert_eq!(c.ok("quit", None), json!({}));
    assert_eq!(c.next_event()["event"], "SHUTDOWN");
    let mut rest = Vec::new();
    c.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

mod session {
    use super::*;
    use crate::qmp::commands::Dispatcher;
    use crate::qmp::session::{Output, Session};
    use proptest::prelude::*;

    fn replies(outputs: Vec<Output>) -> Vec<Value> {
        outputs
            .into_iter()
            .filter_map(|o| match o {
                Output::Reply(b) => Some(serde_json::from_slice(&b).unwrap()),
                Output::FollowUp(_) => None,
            })
            .collect()
    }

    #[test]
    fn session_without_sockets() {
        let machine = FakeMachine::new();
        let d = Dispatcher::new(machine);
        let mut s = Session::new();
        s.feed(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"system_reset\",\"id\":1}");
        assert_eq!(
            replies(s.process_next(&d).unwrap()),
            vec![json!({"return": {}})]
        );
        assert!(s.negotiated());
        let out = s.process_next(&d).unwrap();
        assert!(matches!(
            out.last(),
            Some(Output::FollowUp(crate::qmp::FollowUp::Event(e))) if e.event == "RESET"
        ));
        assert_eq!(replies(out), vec![json!({"return": {}, "id": 1})]);
        assert!(s.process_next(&d).is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn arbitrary_bytes_into_a_session_never_panic(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            prefix in proptest::prelude::any::<bool>(),
        ) {
            let machine = FakeMachine::new();
            let d = Dispatcher::new(machine);
            let mut s = Session::new();
            if prefix {
                s.feed(b"{\"execute\":\"qmp_capabilities\"}");
            }
            s.feed(&data);
            while let Some(out) = s.process_next(&d) {
                for o in out {
                    if let Output::Reply(b) = o {
                        let v: Value = serde_json::from_slice(&b).unwrap();
                        proptest::prop_assert!(v.get("return").is_some() || v.get("error").is_some());
                    }
                }
            }
        }

        #[test]
        fn arbitrary_requests_never_panic(
            name in proptest::sample::select(COMMAND_NAMES),
            key in "[a-z-]{1,12}",
            val in proptest::prop_oneof![
                proptest::prelude::any::<i64>().prop_map(|n| json!(n)),
                "[ -~]{0,12}".prop_map(|s| json!(s)),
                proptest::prelude::Just(json!(null)),
                proptest::prelude::Just(json!([1, "a"])),
                proptest::prelude::Just(json!({"a": 1})),
            ],
        ) {
            let machine = FakeMachine::new();
            let d = Dispatcher::new(machine);
            let mut args = serde_json::Map::new();
            args.insert(key, val);
            // Never quit/reset-loop a fake: just parse and dispatch.
            if let Ok(cmd) = crate::qmp::Command::parse(name, Some(args)) {
                let _ = d.dispatch(&cmd);
            }
        }
    }
}
