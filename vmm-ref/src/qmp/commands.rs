//! The typed QMP commands and the one [`Dispatcher`] that executes them.
//!
//! [`Command::parse`] turns a validated request (name + `arguments`) into a [`Command`]
//! whose arguments are `#[serde(deny_unknown_fields)]` structs, with QEMU's messages for
//! missing, unexpected and mistyped members. [`Dispatcher::dispatch`] runs it against
//! the [`QmpMachine`] and returns the `return` value (pre-serialised [`Json`], so that
//! struct field order, e.g. `query-iothreads`', is kept). What must happen *after* the
//! reply is sent (events, quitting) is described by [`Command::follow_up`].

use std::fmt::Write as _;
use std::sync::Arc;

use iothread_registry::{Error as RegistryError, IoThreadParams, IoThreadRegistry};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::config::drive_mapping;
use crate::export::{BlockExportAddArgs, BlockExportDelArgs, IoThreadChoice};
use crate::qmp::args::{parse_args, unexpected, ArgError};
use crate::qmp::error::CommandError;
use crate::qmp::event::Event;
use crate::qmp::protocol::{Json, VersionInfo};
use crate::qmp::{BlockInfo, ExportControl, QmpMachine, NO_EXPORTS};

/// Every command this server knows, as `query-commands` lists them.
pub const COMMAND_NAMES: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-status",
    "query-commands",
    "query-iothreads",
    "x-query-iothread-stats",
    "qom-get",
    "qom-set",
    "object-add",
    "object-del",
    "query-block",
    "x-drive-set-iothreads",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "human-monitor-command",
    "system_reset",
    "stop",
    "cont",
    "quit",
];

/// QOM path prefix of user-created objects (`/objects/<id>`).
pub const OBJECTS_PREFIX: &str = "/objects/";

/// The only `qom-type` `object-add` creates.
pub const IOTHREAD_TYPE: &str = "iothread";

/// Arguments of a command that takes none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// `qmp_capabilities` arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitiesArgs {
    /// Capabilities to enable; this server offers none.
    #[serde(default)]
    pub enable: Vec<String>,
}

/// `qom-get` arguments.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QomGetArgs {
    /// Object path, `/objects/<id>`.
    pub path: String,
    /// Property name.
    pub property: String,
}

/// `qom-set` arguments.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QomSetArgs {
    /// Object path, `/objects/<id>`.
    pub path: String,
    /// Property name.
    pub property: String,
    /// New value; its type depends on the property (all IOThread properties are
    /// integers).
    pub value: Value,
}

/// `object-add` arguments for `qom-type: iothread` (QEMU's `IothreadProperties`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ObjectAddArgs {
    /// Object type; only `iothread`.
    pub qom_type: String,
    /// Object id.
    pub id: String,
    /// `poll-max-ns`.
    pub poll_max_ns: Option<i64>,
    /// `poll-grow`.
    pub poll_grow: Option<i64>,
    /// `poll-shrink`.
    pub poll_shrink: Option<i64>,
    /// `poll-weight`.
    pub poll_weight: Option<i64>,
    /// `aio-max-batch`.
    pub aio_max_batch: Option<i64>,
    /// `poll-algorithm` (extension, as on the command line): `weighted` or
    /// `classic`.
    pub poll_algorithm: Option<aio_poll::PollAlgorithm>,
}

/// `object-del` arguments.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectDelArgs {
    /// Object id.
    pub id: String,
}

/// `x-query-iothread-stats` arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IothreadStatsArgs {
    /// Only this IOThread (default: all, in creation order).
    pub id: Option<String>,
}

/// `x-drive-set-iothreads` arguments: drive `id` and its new IOThreads, given like
/// at start-up (exactly one of `iothread` and `iothread-vq-mapping`). The mapping
/// is QEMU's list of `{"iothread": ..., "vqs": [...]}` objects, or a list of
/// IOThread names served round-robin.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DriveSetIothreadsArgs {
    /// Drive id.
    pub id: String,
    /// One IOThread for every queue.
    pub iothread: Option<String>,
    /// Per-queue IOThreads.
    pub iothread_vq_mapping: Option<VqMappingList>,
}

/// `x-drive-set-iothreads`' `iothread-vq-mapping`: a list of IOThread names
/// (round-robin) or of `{"iothread", "vqs"}` objects; one name is the
/// `iothread` member's job. Anything but a list is "Invalid parameter type
/// ..., expected: array"; a list of anything else names the two forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VqMappingList(pub IoThreadChoice);

/// The forms [`VqMappingList`] takes, as its error says.
const VQ_MAPPING_LIST_FORMS: &str =
    "expected a list of IOThread names or a list of {\"iothread\": ..., \"vqs\": [...]} objects";

impl<'de> Deserialize<'de> for VqMappingList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(deserializer)? {
            Value::Array(items) => match IoThreadChoice::from_list(items) {
                Some(choice) => choice.map(VqMappingList).map_err(D::Error::custom),
                None => Err(D::Error::custom(VQ_MAPPING_LIST_FORMS)),
            },
            other => Err(D::Error::invalid_type(unexpected(&other), &"array")),
        }
    }
}

/// `human-monitor-command` arguments.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HmpArgs {
    /// The HMP command line, e.g. `info iothreads`.
    pub command_line: String,
    /// Accepted for compatibility, ignored (HMP commands here are not per-CPU).
    pub cpu_index: Option<i64>,
}

/// A parsed QMP command.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// `qmp_capabilities`: leave capabilities negotiation mode.
    QmpCapabilities(CapabilitiesArgs),
    /// `query-version`.
    QueryVersion,
    /// `query-status`.
    QueryStatus,
    /// `query-commands`.
    QueryCommands,
    /// `query-iothreads`.
    QueryIothreads,
    /// `x-query-iothread-stats` (extension): each IOThread's event-loop statistics,
    /// including the polling parameters the loop actually applies.
    XQueryIothreadStats(IothreadStatsArgs),
    /// `qom-get`.
    QomGet(QomGetArgs),
    /// `qom-set`.
    QomSet(QomSetArgs),
    /// `object-add` (iothread).
    ObjectAdd(ObjectAddArgs),
    /// `object-del`.
    ObjectDel(ObjectDelArgs),
    /// `query-block`.
    QueryBlock,
    /// `x-drive-set-iothreads` (extension, after QEMU's `x-blockdev-set-iothread`):
    /// move a running drive's queues to other IOThreads.
    XDriveSetIothreads(DriveSetIothreadsArgs),
    /// `block-export-add` (type `vhost-user-blk`).
    BlockExportAdd(BlockExportAddArgs),
    /// `block-export-del`.
    BlockExportDel(BlockExportDelArgs),
    /// `query-block-exports`.
    QueryBlockExports,
    /// `human-monitor-command`.
    HumanMonitorCommand(HmpArgs),
    /// `system_reset`.
    SystemReset,
    /// `stop`: stop the vCPUs (`STOP` event when they were running).
    Stop,
    /// `cont`: run stopped vCPUs again (`RESUME` event when they were stopped).
    Cont,
    /// `quit`.
    Quit,
}

/// What the server does after a command's successful reply was queued.
#[derive(Clone, Debug, PartialEq)]
pub enum FollowUp {
    /// Nothing.
    None,
    /// Broadcast this event.
    Event(Event),
    /// Broadcast this event (`SHUTDOWN`), flush, then call [`QmpMachine::quit`].
    Quit(Event),
}

fn no_args(args: Option<Map<String, Value>>) -> Result<(), ArgError> {
    parse_args::<NoArgs>(args).map(|_| ())
}

impl Command {
    /// Parse command `name` with `arguments`. Unknown names give QEMU's
    /// `CommandNotFound` "The command NAME has not been found".
    pub fn parse(name: &str, args: Option<Map<String, Value>>) -> Result<Command, CommandError> {
        let cmd = match name {
            "qmp_capabilities" => Command::QmpCapabilities(parse_args(args)?),
            "query-version" => no_args(args).map(|()| Command::QueryVersion)?,
            "query-status" => no_args(args).map(|()| Command::QueryStatus)?,
            "query-commands" => no_args(args).map(|()| Command::QueryCommands)?,
            "query-iothreads" => no_args(args).map(|()| Command::QueryIothreads)?,
            "x-query-iothread-stats" => Command::XQueryIothreadStats(parse_args(args)?),
            "qom-get" => Command::QomGet(parse_args(args)?),
            "qom-set" => Command::QomSet(parse_args(args)?),
            "object-add" => {
                // QEMU checks the union discriminator before the other members.
                match args.as_ref().and_then(|a| a.get("qom-type")) {
                    Some(Value::String(t)) if t != IOTHREAD_TYPE => {
                        return Err(CommandError::generic(format!(
                            "Parameter 'qom-type' does not accept value '{t}' \
                             (vmm-ref only creates '{IOTHREAD_TYPE}' objects)"
                        )))
                    }
                    _ => Command::ObjectAdd(parse_args(args)?),
                }
            }
            "object-del" => Command::ObjectDel(parse_args(args)?),
            "query-block" => no_args(args).map(|()| Command::QueryBlock)?,
            "x-drive-set-iothreads" => Command::XDriveSetIothreads(parse_args(args)?),
            "block-export-add" => {
                // As QEMU: the union discriminator first.
                match args.as_ref().and_then(|a| a.get("type")) {
                    Some(Value::String(t)) if t != crate::export::options::EXPORT_TYPE => {
                        return Err(CommandError::generic(format!(
                            "Parameter 'type' does not accept value '{t}' \
                             (vmm-ref only exports '{}')",
                            crate::export::options::EXPORT_TYPE
                        )))
                    }
                    _ => Command::BlockExportAdd(parse_args(args)?),
                }
            }
            "block-export-del" => Command::BlockExportDel(parse_args(args)?),
            "query-block-exports" => no_args(args).map(|()| Command::QueryBlockExports)?,
            "human-monitor-command" => Command::HumanMonitorCommand(parse_args(args)?),
            "system_reset" => no_args(args).map(|()| Command::SystemReset)?,
            "stop" => no_args(args).map(|()| Command::Stop)?,
            "cont" => no_args(args).map(|()| Command::Cont)?,
            "quit" => no_args(args).map(|()| Command::Quit)?,
            _ => {
                return Err(CommandError::command_not_found(format!(
                    "The command {name} has not been found"
                )))
            }
        };
        Ok(cmd)
    }

    /// The command's QMP name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::QmpCapabilities(_) => "qmp_capabilities",
            Command::QueryVersion => "query-version",
            Command::QueryStatus => "query-status",
            Command::QueryCommands => "query-commands",
            Command::QueryIothreads => "query-iothreads",
            Command::XQueryIothreadStats(_) => "x-query-iothread-stats",
            Command::QomGet(_) => "qom-get",
            Command::QomSet(_) => "qom-set",
            Command::ObjectAdd(_) => "object-add",
            Command::ObjectDel(_) => "object-del",
            Command::QueryBlock => "query-block",
            Command::XDriveSetIothreads(_) => "x-drive-set-iothreads",
            Command::BlockExportAdd(_) => "block-export-add",
            Command::BlockExportDel(_) => "block-export-del",
            Command::QueryBlockExports => "query-block-exports",
            Command::HumanMonitorCommand(_) => "human-monitor-command",
            Command::SystemReset => "system_reset",
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::Quit => "quit",
        }
    }

    /// What happens after this command's successful reply (events are stamped now).
    pub fn follow_up(&self) -> FollowUp {
        match self {
            Command::SystemReset => FollowUp::Event(Event::new(
                "RESET",
                json!({"guest": false, "reason": "host-qmp-system-reset"}),
            )),
            Command::BlockExportDel(args) => {
                FollowUp::Event(Event::new("BLOCK_EXPORT_DELETED", json!({"id": args.id})))
            }
            Command::Quit => FollowUp::Quit(Event::new(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            )),
            _ => FollowUp::None,
        }
    }
}

/// `query-status` reply.
#[derive(Serialize)]
struct StatusInfo {
    status: &'static str,
    running: bool,
}

/// `query-commands` element.
#[derive(Serialize)]
struct CommandInfo {
    name: &'static str,
}

/// Resolve `/objects/<id>` to an existing IOThread id.
fn resolve_object<'a>(registry: &IoThreadRegistry, path: &'a str) -> Result<&'a str, CommandError> {
    match path.strip_prefix(OBJECTS_PREFIX) {
        Some(id) if !id.is_empty() && !id.contains('/') && registry.contains(id) => Ok(id),
        _ => Err(CommandError::device_not_found(format!(
            "Device '{path}' not found"
        ))),
    }
}

fn registry_error(err: RegistryError) -> CommandError {
    CommandError::from_error(&err)
}

/// Executes [`Command`]s against a [`QmpMachine`].
#[derive(Clone)]
pub struct Dispatcher {
    machine: Arc<dyn QmpMachine>,
    version: VersionInfo,
}

impl Dispatcher {
    /// A dispatcher for `machine`.
    pub fn new(machine: Arc<dyn QmpMachine>) -> Self {
        Dispatcher {
            machine,
            version: VersionInfo::current(),
        }
    }

    /// The machine commands run against.
    pub fn machine(&self) -> &Arc<dyn QmpMachine> {
        &self.machine
    }

    /// The version reported by the greeting and `query-version`.
    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    /// Execute `cmd`; `Ok` is the `return` value. `qmp_capabilities` only validates its
    /// arguments here: the negotiation state belongs to the
    /// [`Session`](crate::qmp::session::Session).
    pub fn dispatch(&self, cmd: &Command) -> Result<Json, CommandError> {
        match cmd {
            Command::QmpCapabilities(args) => {
                if let Some(cap) = args.enable.first() {
                    return Err(CommandError::generic(format!(
                        "Capability '{cap}' not available"
                    )));
                }
                Ok(Json::empty_object())
            }
            Command::QueryVersion => Ok(Json::new(&self.version)),
            Command::QueryStatus => {
                let status = self.machine.status();
                Ok(Json::new(&StatusInfo {
                    status: status.name(),
                    running: status == crate::qmp::RunStatus::Running,
                }))
            }
            Command::QueryCommands => {
                let list: Vec<CommandInfo> = COMMAND_NAMES
                    .iter()
                    .map(|&name| CommandInfo { name })
                    .collect();
                Ok(Json::new(&list))
            }
            Command::QueryIothreads => Ok(Json::new(&self.registry().query_iothreads())),
            Command::XQueryIothreadStats(args) => self.iothread_stats(args),
            Command::QomGet(args) => self.qom_get(args),
            Command::QomSet(args) => self.qom_set(args),
            Command::ObjectAdd(args) => self.object_add(args),
            Command::ObjectDel(args) => self.object_del(args),
            Command::QueryBlock => Ok(Json::new(&self.machine.query_block())),
            Command::XDriveSetIothreads(args) => {
                let list = args
                    .iothread_vq_mapping
                    .as_ref()
                    .map(|list| list.0.mapping());
                let mapping = drive_mapping(args.iothread.as_deref(), list.as_deref())
                    .map_err(CommandError::generic)?;
                self.machine
                    .set_drive_iothreads(&args.id, &mapping)
                    .map(|()| Json::empty_object())
            }
            Command::BlockExportAdd(args) => self
                .exports()?
                .add(args.clone())
                .map(|()| Json::empty_object()),
            Command::BlockExportDel(args) => {
                self.exports()?.del(args).map(|()| Json::empty_object())
            }
            Command::QueryBlockExports => Ok(Json::new(
                &self
                    .machine
                    .exports()
                    .map(ExportControl::query)
                    .unwrap_or_default(),
            )),
            Command::HumanMonitorCommand(args) => Ok(Json::new(&self.hmp(&args.command_line))),
            Command::SystemReset => self
                .machine
                .system_reset()
                .map(|()| Json::empty_object())
                .map_err(CommandError::generic),
            Command::Stop => self
                .machine
                .stop()
                .map(|()| Json::empty_object())
                .map_err(CommandError::generic),
            Command::Cont => self
                .machine
                .cont()
                .map(|()| Json::empty_object())
                .map_err(CommandError::generic),
            // The machine is told to quit by the server after the reply and the
            // SHUTDOWN event (see `Command::follow_up`).
            Command::Quit => Ok(Json::empty_object()),
        }
    }

    fn registry(&self) -> &IoThreadRegistry {
        self.machine.registry()
    }

    fn exports(&self) -> Result<&dyn ExportControl, CommandError> {
        self.machine
            .exports()
            .ok_or_else(|| CommandError::generic(NO_EXPORTS))
    }

    fn iothread_stats(&self, args: &IothreadStatsArgs) -> Result<Json, CommandError> {
        let registry = self.registry();
        if let Some(id) = &args.id {
            let stats = registry.stats(id).map_err(registry_error)?;
            return Ok(Json::new(&[stats]));
        }
        let mut all = Vec::new();
        for id in registry.ids() {
            match registry.stats(&id) {
                Ok(stats) => all.push(stats),
                // Deleted since `ids()`: not part of the answer any more.
                Err(RegistryError::NotFound { .. }) => {}
                Err(e) => return Err(registry_error(e)),
            }
        }
        Ok(Json::new(&all))
    }

    fn qom_get(&self, args: &QomGetArgs) -> Result<Json, CommandError> {
        let id = resolve_object(self.registry(), &args.path)?;
        if args.property == "type" {
            return Ok(Json::new(IOTHREAD_TYPE));
        }
        let value = self
            .registry()
            .get_property(id, &args.property)
            .map_err(registry_error)?;
        Ok(Json::new(&value))
    }

    fn qom_set(&self, args: &QomSetArgs) -> Result<Json, CommandError> {
        let id = resolve_object(self.registry(), &args.path)?;
        if args.property == "type" {
            return Err(CommandError::generic(
                "Property 'iothread.type' is read-only",
            ));
        }
        let value = match &args.value {
            Value::Number(n) if n.is_i64() => n.as_i64(),
            Value::Number(n) if n.is_u64() => {
                return Err(CommandError::generic(format!(
                    "Parameter '{}' value {n} is out of range",
                    args.property
                )))
            }
            _ => None,
        };
        let Some(value) = value else {
            // Unknown properties are reported as such whatever the value's type.
            if let Err(e) = self.registry().get_property(id, &args.property) {
                return Err(registry_error(e));
            }
            return Err(CommandError::generic(format!(
                "Invalid parameter type for '{}', expected: integer",
                args.property
            )));
        };
        self.registry()
            .set_property(id, &args.property, value)
            .map_err(registry_error)?;
        Ok(Json::empty_object())
    }

    fn object_add(&self, args: &ObjectAddArgs) -> Result<Json, CommandError> {
        if args.qom_type != IOTHREAD_TYPE {
            return Err(CommandError::generic(format!(
                "Parameter 'qom-type' does not accept value '{}'",
                args.qom_type
            )));
        }
        let mut params = IoThreadParams::default();
        let overrides = [
            (&mut params.poll.max_ns, args.poll_max_ns),
            (&mut params.poll.grow, args.poll_grow),
            (&mut params.poll.shrink, args.poll_shrink),
            (&mut params.poll.weight, args.poll_weight),
            (&mut params.aio_max_batch, args.aio_max_batch),
        ];
        for (slot, value) in overrides {
            if let Some(v) = value {
                *slot = v;
            }
        }
        if let Some(algorithm) = args.poll_algorithm {
            params.poll.algorithm = algorithm;
        }
        self.registry()
            .create(&args.id, params)
            .map_err(registry_error)?;
        Ok(Json::empty_object())
    }

    fn object_del(&self, args: &ObjectDelArgs) -> Result<Json, CommandError> {
        match self.registry().delete(&args.id) {
            Ok(()) => Ok(Json::empty_object()),
            Err(RegistryError::NotFound { .. }) => Err(CommandError::generic(format!(
                "object '{}' not found",
                args.id
            ))),
            Err(e) => Err(registry_error(e)),
        }
    }

    /// Execute an HMP command line and return its text output (HMP errors are text too,
    /// as in QEMU).
    pub fn hmp(&self, command_line: &str) -> String {
        let words: Vec<&str> = command_line.split_whitespace().collect();
        match words.as_slice() {
            [] => String::new(),
            ["help" | "?"] => HMP_HELP.to_string(),
            ["info"] | ["info", "help" | "?"] => HMP_INFO_HELP.to_string(),
            ["info", "iothreads"] => self.registry().info_iothreads(),
            ["stop"] => self.hmp_via_qmp("stop", json!({}), |_| String::new()),
            ["cont" | "c"] => self.hmp_via_qmp("cont", json!({}), |_| String::new()),
            ["info", "status"] => format!("VM status: {}\n", self.machine.status().name()),
            ["info", "version"] => {
                let q = &self.version.qemu;
                format!(
                    "{}.{}.{} ({})\n",
                    q.major, q.minor, q.micro, self.version.package
                )
            }
            ["info", "block"] => format_info_block(&self.machine.query_block()),
            ["qom-get", path, property] => self.hmp_via_qmp(
                "qom-get",
                json!({"path": path, "property": property}),
                |ret| format!("{}\n", ret.as_str()),
            ),
            ["qom-get", ..] => "Usage: qom-get path property\n".to_string(),
            ["qom-set", path, property, value] => self.hmp_via_qmp(
                "qom-set",
                json!({"path": path, "property": property, "value": hmp_value(value)}),
                |_| String::new(),
            ),
            ["qom-set", ..] => "Usage: qom-set path property value\n".to_string(),
            ["object_add", spec] => match parse_object_spec(spec) {
                Ok(args) => self.hmp_via_qmp("object-add", args, |_| String::new()),
                Err(msg) => format!("Error: {msg}\n"),
            },
            ["object_add", ..] => "Usage: object_add iothread,id=ID[,PROP=VALUE...]\n".to_string(),
            ["object_del", id] => {
                self.hmp_via_qmp("object-del", json!({"id": id}), |_| String::new())
            }
            ["object_del", ..] => "Usage: object_del id\n".to_string(),
            _ => format!("unknown command: '{}'\n", words.join(" ")),
        }
    }

    /// Run an HMP command as its QMP equivalent (same typed parsing and checks);
    /// errors print as HMP does: `Error: DESC`.
    fn hmp_via_qmp(&self, name: &str, args: Value, ok: impl FnOnce(&Json) -> String) -> String {
        let Value::Object(args) = args else {
            return format!("Error: internal: arguments of {name} are not an object\n");
        };
        match Command::parse(name, Some(args)).and_then(|cmd| self.dispatch(&cmd)) {
            Ok(ret) => ok(&ret),
            Err(e) => format!("Error: {}\n", e.desc),
        }
    }
}

/// An HMP value: an integer when it parses as one, else a string.
fn hmp_value(text: &str) -> Value {
    text.parse::<i64>()
        .map_or_else(|_| json!(text), |n| json!(n))
}

/// `TYPE,id=ID,KEY=VALUE...` (HMP `object_add`, as QEMU's `-object`) into `object-add`
/// arguments. `qom-type=TYPE` may be spelled out.
fn parse_object_spec(spec: &str) -> Result<Value, String> {
    let mut args = Map::new();
    for (i, item) in spec.split(',').enumerate() {
        match item.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                // Names stay strings; property values are integers when they parse.
                let value = if key == "id" || key == "qom-type" {
                    json!(value)
                } else {
                    hmp_value(value)
                };
                if args.insert(key.to_string(), value).is_some() {
                    return Err(format!("Parameter '{key}' given twice"));
                }
            }
            None if i == 0 && !item.is_empty() => {
                args.insert("qom-type".to_string(), json!(item));
            }
            _ => return Err(format!("Invalid object option '{item}'")),
        }
    }
    Ok(Value::Object(args))
}

const HMP_HELP: &str = "\
cont|c -- resume emulation
help|? -- show this help
info [subcommand] -- show various information about the system state
object_add iothread,id=ID[,PROP=VALUE...] -- create an IOThread
object_del id -- destroy an IOThread (refused while it has holders)
qom-get path property -- print an IOThread property (path /objects/ID)
qom-set path property value -- set an IOThread property (path /objects/ID)
stop -- stop emulation
";

const HMP_INFO_HELP: &str = "\
info block -- show the block devices
info iothreads -- show the IOThreads, their parameters and holders
info status -- show the current VM status (running|paused)
info version -- show the version of vmm-ref
";

/// `info block`: one block per drive.
fn format_info_block(blocks: &[BlockInfo]) -> String {
    let mut out = String::new();
    for b in blocks {
        let _ = writeln!(
            out,
            "{} ({}): {} ({}{}{})",
            b.device,
            b.qdev,
            b.file,
            b.format,
            if b.read_only { ", read-only" } else { "" },
            if b.direct { ", direct" } else { "" }
        );
        let _ = writeln!(
            out,
            "    engine={} num-queues={} queue-size={} activated={}",
            b.engine, b.num_queues, b.queue_size, b.activated
        );
        for q in &b.queues {
            let _ = writeln!(out, "    queue {}: iothread={}", q.queue, q.iothread);
        }
        if let Some(v) = &b.vhost_user {
            let _ = writeln!(
                out,
                "    vhost-user: chardev={} path={} connected={} disconnects={} reconnects={}",
                v.chardev, v.path, v.connected, v.disconnects, v.reconnects
            );
        }
    }
    out
}
