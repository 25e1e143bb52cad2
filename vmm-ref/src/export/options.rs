//! Export options in QEMU's vocabulary: the command line
//! (`--export vhost-user-blk,id=e0,node-name=d0,addr=unix:/path,...`,
//! `--drive id=d0,file=disk.img,...`) and QMP `block-export-add` arguments,
//! both parsed into one [`ExportSpec`].

use std::path::PathBuf;

use iothread_registry::{assign_vqs, IoThreadVqMapping};
use serde::{Deserialize, Serialize};

use crate::config::keyval::{KeyVals, OptionError as KeyValError};
use crate::config::{check_sun_path, SocketPathError};
use crate::virtio::block::lock::LockMode;

/// The only export type implemented.
pub const EXPORT_TYPE: &str = "vhost-user-blk";

/// Default `num-queues` (QEMU's default for vhost-user-blk exports).
pub const DEFAULT_NUM_QUEUES: u16 = 1;

/// Bad export or drive options.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// `key=value` syntax error or unknown key.
    #[error("{what}: {msg}")]
    Syntax {
        /// "--export" or "--drive".
        what: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A required option is missing.
    #[error("{what}: parameter '{key}' is missing")]
    Missing {
        /// "--export", "--drive" or "block-export-add".
        what: &'static str,
        /// The missing key.
        key: &'static str,
    },
    /// A value is out of range or of the wrong kind.
    #[error("parameter '{key}' {msg}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// The IOThread mapping is invalid.
    #[error("invalid IOThread assignment")]
    Mapping(#[source] iothread_registry::Error),
    /// The `key=value` string itself (shared parser with `vmm-ref run`).
    #[error(transparent)]
    KeyVal(#[from] KeyValError),
    /// The socket path does not fit in a `sockaddr_un`.
    #[error(transparent)]
    SocketPath(SocketPathError),
    /// The export id is not an identifier (QEMU: "Invalid block export id").
    #[error("invalid block export id: {0}")]
    InvalidId(iothread_registry::Error),
}

/// Which IOThreads serve the queues.
///
/// In JSON: a string (one IOThread), a list of strings (round-robin) or a list
/// of `{"iothread", "vqs"}` objects. Anything else is refused naming the forms
/// (`expected an IOThread name, a list of IOThread names or a list of
/// {"iothread": ..., "vqs": [...]} objects`); an object list's own errors
/// (unknown member, missing `iothread`) are passed on as they are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum IoThreadChoice {
    /// One IOThread for every queue (`iothread=io0`).
    Single(String),
    /// Several IOThreads, queues assigned round-robin (QEMU 9's
    /// `iothread: [..]` / our `iothread-vq-mapping=io0:io1` shorthand).
    List(Vec<String>),
    /// QEMU's full `iothread-vq-mapping` list.
    Mapping(Vec<IoThreadVqMapping>),
}

impl<'de> Deserialize<'de> for IoThreadChoice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        use serde_json::Value;

        const FORMS: &str = "expected an IOThread name, a list of IOThread names or a list of \
                             {\"iothread\": ..., \"vqs\": [...]} objects";
        match Value::deserialize(deserializer)? {
            Value::String(id) => Ok(IoThreadChoice::Single(id)),
            Value::Array(items) => match IoThreadChoice::from_list(items) {
                Some(choice) => choice.map_err(D::Error::custom),
                None => Err(D::Error::custom(FORMS)),
            },
            _ => Err(D::Error::custom(FORMS)),
        }
    }
}

impl IoThreadChoice {
    /// A JSON list as [`IoThreadChoice::List`] (all strings) or
    /// [`IoThreadChoice::Mapping`] (all objects, with their own errors);
    /// `None` for any other list.
    pub(crate) fn from_list(
        items: Vec<serde_json::Value>,
    ) -> Option<Result<IoThreadChoice, serde_json::Error>> {
        use serde_json::Value;
        if items.iter().all(Value::is_string) {
            let ids = items.into_iter().filter_map(|v| match v {
                Value::String(id) => Some(id),
                _ => None,
            });
            return Some(Ok(IoThreadChoice::List(ids.collect())));
        }
        if items.iter().all(Value::is_object) {
            let mapping = items.into_iter().map(serde_json::from_value);
            return Some(
                mapping
                    .collect::<Result<_, _>>()
                    .map(IoThreadChoice::Mapping),
            );
        }
        None
    }

    /// As an `iothread-vq-mapping` (a name or list of names: entries without `vqs`).
    pub fn mapping(&self) -> Vec<IoThreadVqMapping> {
        match self {
            IoThreadChoice::Single(id) => vec![IoThreadVqMapping::new(id.clone())],
            IoThreadChoice::List(ids) => ids.iter().map(IoThreadVqMapping::new).collect(),
            IoThreadChoice::Mapping(m) => m.clone(),
        }
    }
}

/// A parsed export request (command line or QMP), before the drive and the
/// IOThreads are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export id.
    pub id: String,
    /// The block node (drive id) exported.
    pub node_name: String,
    /// Unix socket path.
    pub socket: PathBuf,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// IOThreads serving the queues.
    pub iothreads: IoThreadChoice,
    /// `writable`; `None` = writable unless the drive is read-only.
    pub writable: Option<bool>,
}

impl ExportSpec {
    /// The IOThread of every queue, validated like QEMU's
    /// `iothread-vq-mapping` (`exists` says whether an IOThread id exists).
    pub fn queue_iothreads(
        &self,
        exists: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, OptionsError> {
        assign_vqs(&self.iothreads.mapping(), self.num_queues, exists)
            .map_err(OptionsError::Mapping)
    }

    /// Parses the value of `--export` (with or without a leading
    /// `type=`): `vhost-user-blk,id=e0,node-name=d0,addr=unix:/path,
    /// num-queues=N[,iothread=io0|iothread-vq-mapping=io0:io1][,writable=on|off]`.
    /// QEMU's `addr.type=unix,addr.path=/path` is accepted too.
    pub fn parse_cli(s: &str) -> Result<ExportSpec, OptionsError> {
        const WHAT: &str = "--export";
        let syntax = |msg: String| OptionsError::Syntax { what: WHAT, msg };
        let mut kv = KeyVals::parse(s, Some("type"))?;
        match kv.take_required("type")?.as_str() {
            EXPORT_TYPE => {}
            t => {
                return Err(syntax(format!(
                    "export type '{t}' is not supported (only {EXPORT_TYPE})"
                )))
            }
        }
        let id = kv.take_required("id")?;
        let node_name = kv.take_required("node-name")?;
        let socket = match (kv.take("addr"), kv.take("addr.path")) {
            (Some(a), None) => PathBuf::from(
                a.strip_prefix("unix:")
                    .ok_or_else(|| syntax(format!("addr '{a}': only unix:<path> is supported")))?,
            ),
            (None, Some(p)) => PathBuf::from(p),
            (Some(_), Some(_)) => {
                return Err(syntax(
                    "'addr' and 'addr.path' are mutually exclusive".into(),
                ))
            }
            (None, None) => {
                return Err(OptionsError::Missing {
                    what: WHAT,
                    key: "addr",
                })
            }
        };
        if let Some(t) = kv.take("addr.type").filter(|t| t != "unix") {
            return Err(syntax(format!("addr.type '{t}': only unix is supported")));
        }
        let num_queues = kv
            .take_int::<u16>("num-queues")?
            .unwrap_or(DEFAULT_NUM_QUEUES);
        let iothreads = match (kv.take("iothread"), kv.take("iothread-vq-mapping")) {
            (Some(one), None) => IoThreadChoice::Single(one),
            (None, Some(list)) => {
                IoThreadChoice::List(list.split(':').map(str::to_owned).collect())
            }
            (Some(_), Some(_)) => {
                return Err(syntax(
                    "'iothread' and 'iothread-vq-mapping' are mutually exclusive".into(),
                ))
            }
            (None, None) => {
                return Err(OptionsError::Missing {
                    what: WHAT,
                    key: "iothread",
                })
            }
        };
        let writable = kv.take_bool("writable")?;
        kv.finish()?;
        ExportSpec {
            id,
            node_name,
            socket,
            num_queues,
            iothreads,
            writable,
        }
        .validate()
    }

    fn validate(self) -> Result<ExportSpec, OptionsError> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(OptionsError::Value {
                key: "num-queues",
                msg: format!("must be between 1 and {MAX_QUEUES}"),
            });
        }
        if self.id.is_empty() || self.node_name.is_empty() {
            return Err(OptionsError::Value {
                key: "id",
                msg: "and node-name must not be empty".into(),
            });
        }
        // Drive and IOThread ids follow the same rules.
        iothread_registry::validate_id(&self.id).map_err(OptionsError::InvalidId)?;
        check_sun_path(&self.socket).map_err(OptionsError::SocketPath)?;
        Ok(self)
    }
}

/// Largest `num-queues`: the virtio-blk device model's limit
/// ([`crate::virtio::block::MAX_QUEUES`]), which serves the export's queues
/// and refuses more when the export starts. The protocol allows more (QEMU's
/// VIRTIO_QUEUE_MAX for vhost-user-blk is 1024; one vring index fits in the
/// protocol's 8-bit fd-message field: 256), the device model does not.
pub const MAX_QUEUES: u16 = crate::virtio::block::MAX_QUEUES;

/// QMP `SocketAddress` (only the `unix` variant).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SocketAddress {
    /// A Unix socket path.
    Unix {
        /// The path.
        path: PathBuf,
    },
}

/// QMP `block-export-add` arguments (type `vhost-user-blk`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportAddArgs {
    /// Must be "vhost-user-blk".
    #[serde(rename = "type")]
    pub kind: String,
    /// Export id.
    pub id: String,
    /// Block node.
    pub node_name: String,
    /// Listening socket.
    pub addr: SocketAddress,
    /// Writable export (QEMU's default is false; ours follows the drive).
    #[serde(default)]
    pub writable: Option<bool>,
    /// Number of queues (default 1).
    #[serde(default)]
    pub num_queues: Option<u16>,
    /// One IOThread, or a list served round-robin.
    #[serde(default)]
    pub iothread: Option<IoThreadChoice>,
    /// Explicit mapping (extension, same schema as virtio-blk's).
    #[serde(default)]
    pub iothread_vq_mapping: Option<Vec<IoThreadVqMapping>>,
    /// Accepted for compatibility: exports never move between IOThreads.
    #[serde(default)]
    pub fixed_iothread: Option<bool>,
    /// Only 512 is supported.
    #[serde(default)]
    pub logical_block_size: Option<u64>,
}

impl BlockExportAddArgs {
    /// Parses QMP arguments (a JSON object).
    pub fn from_json(v: serde_json::Value) -> Result<BlockExportAddArgs, serde_json::Error> {
        serde_json::from_value(v)
    }

    /// Converts to an [`ExportSpec`].
    pub fn into_spec(self) -> Result<ExportSpec, OptionsError> {
        if self.kind != EXPORT_TYPE {
            return Err(OptionsError::Value {
                key: "type",
                msg: format!("'{}': only {EXPORT_TYPE} is supported", self.kind),
            });
        }
        if let Some(n) = self.logical_block_size.filter(|&n| n != 512) {
            return Err(OptionsError::Value {
                key: "logical-block-size",
                msg: format!("{n}: only 512 is supported"),
            });
        }
        let iothreads = match (self.iothread, self.iothread_vq_mapping) {
            (Some(_), Some(_)) => {
                return Err(OptionsError::Value {
                    key: "iothread",
                    msg: "and iothread-vq-mapping are mutually exclusive".into(),
                })
            }
            (Some(c), None) => c,
            (None, Some(m)) => IoThreadChoice::Mapping(m),
            (None, None) => {
                return Err(OptionsError::Missing {
                    what: "block-export-add",
                    key: "iothread",
                })
            }
        };
        let SocketAddress::Unix { path } = self.addr;
        ExportSpec {
            id: self.id,
            node_name: self.node_name,
            socket: path,
            num_queues: self.num_queues.unwrap_or(DEFAULT_NUM_QUEUES),
            iothreads,
            writable: self.writable,
        }
        .validate()
    }
}

/// QMP `block-export-del` removal mode (QEMU's `BlockExportRemoveMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportRemoveMode {
    /// Refuse while a front-end is connected (QEMU: "export '`id`' still in
    /// use", hint "Use mode='hard' to force client disconnect").
    #[default]
    Safe,
    /// Disconnect the front-end and remove the export.
    Hard,
}

/// QMP `block-export-del` arguments. After a removal QEMU emits the
/// `BLOCK_EXPORT_DELETED` event with `{"id": <id>}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportDelArgs {
    /// Export id.
    pub id: String,
    /// Removal mode (default safe).
    #[serde(default)]
    pub mode: BlockExportRemoveMode,
}

/// A parsed `--drive id=d0,file=disk.img[,readonly=on][,direct=on|cache.direct=on]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveSpec {
    /// Drive id (the node name exports refer to).
    pub id: String,
    /// Image file.
    pub file: PathBuf,
    /// Read-only.
    pub readonly: bool,
    /// Open with O_DIRECT (`direct=on` or QEMU's `cache.direct=on`).
    pub direct: bool,
    /// `aio=io_uring|threads|sync|auto` (None = auto: io_uring when available).
    pub aio: Option<String>,
    /// `locking=on|off|auto` (QEMU's `file` driver option; default auto).
    pub locking: LockMode,
}

impl DriveSpec {
    /// Parses the value of `--drive`.
    pub fn parse_cli(s: &str) -> Result<DriveSpec, OptionsError> {
        let mut kv = KeyVals::parse(s, None)?;
        let id = match (kv.take("id"), kv.take("node-name")) {
            (Some(id), None) | (None, Some(id)) => id,
            (Some(_), Some(_)) => {
                return Err(OptionsError::Syntax {
                    what: "--drive",
                    msg: "'id' and 'node-name' are the same option; give one".into(),
                })
            }
            (None, None) => {
                return Err(OptionsError::Missing {
                    what: "--drive",
                    key: "id",
                })
            }
        };
        let file = PathBuf::from(kv.take_required("file")?);
        let readonly = kv.take_bool("readonly")?.unwrap_or(false);
        // `direct=on` as for `vmm-ref run`, or QEMU's `cache.direct=on`.
        let direct = match (kv.take_bool("direct")?, kv.take_bool("cache.direct")?) {
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => false,
            (Some(_), Some(_)) => {
                return Err(OptionsError::Syntax {
                    what: "--drive",
                    msg: "'direct' and 'cache.direct' are the same option; give one".into(),
                })
            }
        };
        let aio = kv.take("aio");
        let locking = kv
            .take_with("locking", "on, off or auto", |v| v.parse().ok())?
            .unwrap_or_default();
        kv.finish()?;
        Ok(DriveSpec {
            id,
            file,
            readonly,
            direct,
            aio,
            locking,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cli_export_forms() {
        let s = ExportSpec::parse_cli(
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:/tmp/x.sock,num-queues=2,iothread=io0",
        )
        .unwrap();
        assert_eq!(s.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(s.num_queues, 2);
        assert_eq!(s.iothreads, IoThreadChoice::Single("io0".into()));
        assert_eq!(s.queue_iothreads(|_| true).unwrap(), vec!["io0", "io0"]);
        let s = ExportSpec::parse_cli(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/s,num-queues=3,iothread-vq-mapping=io0:io1,writable=off",
        )
        .unwrap();
        assert_eq!(
            s.queue_iothreads(|_| true).unwrap(),
            vec!["io0", "io1", "io0"]
        );
        assert_eq!(s.writable, Some(false));
        // Unknown IOThread, bad values, missing keys, other types.
        assert!(s.queue_iothreads(|id| id == "io0").is_err());
        for bad in [
            "nbd,id=e0,node-name=d0,addr=unix:/s,iothread=io0",
            "vhost-user-blk,id=e0,node-name=d0,addr=tcp:1:2,iothread=io0",
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:/s",
            "vhost-user-blk,id=e0,addr=unix:/s,iothread=io0",
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:/s,iothread=io0,num-queues=0",
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:/s,iothread=io0,num-queues=65",
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:/s,iothread=io0,num-queues=256",
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:/s,iothread=io0,num-queues=x",
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:/s,iothread=io0,bogus=1",
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:/s,iothread=io0,writable=maybe",
            "vhost-user-blk,id=e0,node-name=d0,addr.type=inet,addr.path=/s,iothread=io0",
        ] {
            assert!(ExportSpec::parse_cli(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn qmp_block_export_add() {
        let a = BlockExportAddArgs::from_json(json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
            "addr": {"type": "unix", "path": "/tmp/e0.sock"},
            "writable": true, "num-queues": 4,
            "iothread-vq-mapping": [{"iothread": "io0", "vqs": [0, 1]}, {"iothread": "io1", "vqs": [2, 3]}]
        }))
        .unwrap();
        let s = a.into_spec().unwrap();
        assert_eq!(
            s.queue_iothreads(|_| true).unwrap(),
            vec!["io0", "io0", "io1", "io1"]
        );
        let a = BlockExportAddArgs::from_json(json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
            "addr": {"type": "unix", "path": "/s"}, "iothread": ["io0", "io1"], "num-queues": 2
        }))
        .unwrap();
        assert_eq!(
            a.into_spec().unwrap().queue_iothreads(|_| true).unwrap(),
            vec!["io0", "io1"]
        );
        // Neither a name nor a list of names nor a list of mapping objects.
        for bad in [
            json!([["io0"]]),
            json!(["io0", {"iothread": "io1"}]),
            json!(3),
            json!({"iothread": "io0"}),
        ] {
            let err = BlockExportAddArgs::from_json(json!({
                "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
                "addr": {"type": "unix", "path": "/s"}, "iothread": bad
            }))
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with("expected an IOThread name, a list"),
                "{err}"
            );
        }
        let err = BlockExportAddArgs::from_json(json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
            "addr": {"type": "unix", "path": "/s"}, "iothread": [{"iothread": "io0", "vq": [0]}]
        }))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("unknown field `vq`"), "{err}");
        // The mapping member takes objects only (serde's derive took ["io0"] too).
        assert!(BlockExportAddArgs::from_json(json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
            "addr": {"type": "unix", "path": "/s"}, "iothread-vq-mapping": [["io0"]]
        }))
        .is_err());
        // Unknown fields, both iothread forms, unsupported block size.
        assert!(BlockExportAddArgs::from_json(json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
            "addr": {"type": "unix", "path": "/s"}, "iothread": "io0", "bogus": 1
        }))
        .is_err());
        let both = BlockExportAddArgs::from_json(json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
            "addr": {"type": "unix", "path": "/s"}, "iothread": "io0",
            "iothread-vq-mapping": [{"iothread": "io0"}]
        }))
        .unwrap();
        assert!(both.into_spec().is_err());
        let lbs = BlockExportAddArgs::from_json(json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
            "addr": {"type": "unix", "path": "/s"}, "iothread": "io0", "logical-block-size": 4096
        }))
        .unwrap();
        assert!(lbs.into_spec().is_err());
        // A socket path bind(2) cannot take, checked on both paths.
        let long = format!("/{}", "s".repeat(107));
        let a = BlockExportAddArgs::from_json(json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
            "addr": {"type": "unix", "path": long}, "iothread": "io0"
        }))
        .unwrap();
        let want = "socket path is 108 bytes long; the limit is 107";
        assert_eq!(a.into_spec().unwrap_err().to_string(), want);
        let cli = format!("vhost-user-blk,id=e0,node-name=d0,addr=unix:{long},iothread=io0");
        assert_eq!(ExportSpec::parse_cli(&cli).unwrap_err().to_string(), want);
        // An export id that is not an identifier (QEMU refuses these too).
        for bad in ["a b", "e0\n", "0e", "e/0"] {
            let a = BlockExportAddArgs::from_json(json!({
                "type": "vhost-user-blk", "id": bad, "node-name": "d0",
                "addr": {"type": "unix", "path": "/s"}, "iothread": "io0"
            }))
            .unwrap();
            let err = a.into_spec().unwrap_err().to_string();
            assert!(
                err.starts_with("invalid block export id: "),
                "{bad:?}: {err}"
            );
        }
        let cli = "vhost-user-blk,id=0e,node-name=d0,addr=unix:/s,iothread=io0";
        assert!(ExportSpec::parse_cli(cli).is_err());
        // More queues than the device model serves.
        let many = BlockExportAddArgs::from_json(json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0",
            "addr": {"type": "unix", "path": "/s"}, "iothread": "io0", "num-queues": 65
        }))
        .unwrap();
        assert_eq!(
            many.into_spec().unwrap_err().to_string(),
            "parameter 'num-queues' must be between 1 and 64"
        );
    }

    #[test]
    fn qmp_block_export_del() {
        let a: BlockExportDelArgs = serde_json::from_value(json!({"id": "e0"})).unwrap();
        assert_eq!(a.mode, BlockExportRemoveMode::Safe);
        let a: BlockExportDelArgs =
            serde_json::from_value(json!({"id": "e0", "mode": "hard"})).unwrap();
        assert_eq!(a.mode, BlockExportRemoveMode::Hard);
        assert!(
            serde_json::from_value::<BlockExportDelArgs>(json!({"id": "e0", "mode": "soft"}))
                .is_err()
        );
    }

    #[test]
    fn cli_drive() {
        let d = DriveSpec::parse_cli(
            "id=d0,file=/tmp/disk.img,readonly=on,cache.direct=on,aio=io_uring",
        )
        .unwrap();
        assert!(d.readonly && d.direct);
        assert_eq!(d.aio.as_deref(), Some("io_uring"));
        assert_eq!(d.locking, LockMode::Auto);
        let d = DriveSpec::parse_cli("id=d0,file=/x,locking=off").unwrap();
        assert_eq!(d.locking, LockMode::Off);
        assert!(DriveSpec::parse_cli("id=d0,file=/x,locking=maybe").is_err());
        assert!(DriveSpec::parse_cli("file=/x").is_err());
        assert!(DriveSpec::parse_cli("id=d0,file=/x,bogus=1").is_err());
        assert!(DriveSpec::parse_cli("id=d0").is_err());
    }
}
