//! `vmm-ref export`: the configuration of the vhost-user-blk export daemon,
//! checked before any IOThread, file handle or socket is created.
//!
//! The option strings are parsed by their owners: `--object` by
//! [`cli::parse_object`](super::cli::parse_object) (the same as `vmm-ref run`),
//! `--drive` and `--export` by [`DriveSpec::parse_cli`] and
//! [`ExportSpec::parse_cli`] of the [`export`](crate::export) module. The
//! checks an export needs against the others ([`check_export`]) are shared
//! with QMP `block-export-add`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use iothread_registry::IoThreadParams;

use super::cli::{parse_object, ExportArgs};
use super::{
    check_image_file, check_qmp, check_socket_path, lock_image, validate_objects, ConfigError,
    ImageIdentity, InvalidOption, Origin, QmpAddr, SocketPathError,
};
use crate::export::{DriveSpec, ExportConfig, ExportSpec};
use crate::virtio::block::backend::BlockEngine;
use crate::virtio::block::lock::ImageLock;

/// A configuration of `vmm-ref export` that passed [`validate`]. It holds
/// the image locks of the exports to start.
#[derive(Debug)]
pub struct ValidExportConfig {
    /// IOThreads to create, in order, with their parameters.
    pub iothreads: Vec<(String, IoThreadParams)>,
    /// The drives (block nodes) exports may refer to, also later through QMP.
    pub drives: Vec<DriveSpec>,
    /// The exports to start, in order.
    pub exports: Vec<ExportConfig>,
    /// `image_locks[i]`: the lock on the image of `exports[i]`, taken during
    /// validation so that a conflict is a configuration error; handed to the
    /// export when it starts ([`crate::export::Export::start_locked`]).
    pub image_locks: Vec<Option<ImageLock>>,
    /// `--qmp unix:/path`.
    pub qmp: Option<QmpAddr>,
}

/// Why an export cannot be added next to the ones already configured or
/// running (command line and QMP `block-export-add` alike).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportConflict {
    /// Another export has this id (QEMU's message).
    #[error("Block export id '{0}' is already in use")]
    DuplicateId(String),
    /// Another export listens on this socket.
    #[error("socket '{path}' is already used by export '{other}'")]
    SocketOfExport {
        /// The socket.
        path: PathBuf,
        /// The export using it.
        other: String,
    },
    /// The QMP monitor listens on this socket.
    #[error("socket '{0}' is the QMP monitor's")]
    SocketOfQmp(PathBuf),
    /// A writable export of a drive that is already exported, or any export
    /// of a drive that already has a writable export.
    #[error(
        "drive '{drive}' is already exported by '{other}' (only read-only exports may share a drive)"
    )]
    SharedDrive {
        /// The drive.
        drive: String,
        /// The export of it.
        other: String,
    },
    /// The socket path is unusable (no directory, not a socket, in use).
    #[error(transparent)]
    SocketPath(SocketPathError),
}

/// The path with its directory resolved (symlinks, `..`), for comparing
/// socket paths; the path itself when the directory cannot be resolved.
fn canonical_socket(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => path.to_owned(),
    }
}

/// Checks that export `new` can run next to `existing` (configured or
/// running exports) and the QMP monitor on `qmp`: unique id and socket, no
/// writable sharing of a drive, and a usable socket path (its directory
/// exists; nothing but a stale socket is there).
pub fn check_export(
    new: &ExportConfig,
    existing: &[&ExportConfig],
    qmp: Option<&Path>,
) -> Result<(), ExportConflict> {
    let socket = canonical_socket(&new.socket);
    for other in existing {
        if other.id == new.id {
            return Err(ExportConflict::DuplicateId(new.id.clone()));
        }
        if canonical_socket(&other.socket) == socket {
            return Err(ExportConflict::SocketOfExport {
                path: new.socket.clone(),
                other: other.id.clone(),
            });
        }
        if other.node_name == new.node_name && !(other.readonly && new.readonly) {
            return Err(ExportConflict::SharedDrive {
                drive: new.node_name.clone(),
                other: other.id.clone(),
            });
        }
    }
    if qmp.is_some_and(|q| canonical_socket(q) == socket) {
        return Err(ExportConflict::SocketOfQmp(new.socket.clone()));
    }
    check_socket_path(&new.socket).map_err(ExportConflict::SocketPath)
}

/// `--flag id=X` when the option string has an `id=`, else `--flag <s>`.
fn label(flag: &str, s: &str) -> String {
    match s.split(',').find_map(|p| p.strip_prefix("id=")) {
        Some(id) => format!("{flag} id={id}"),
        None => format!("{flag} {s}"),
    }
}

/// Parses and checks every option of `vmm-ref export`.
pub fn validate(args: &ExportArgs) -> Result<ValidExportConfig, ConfigError> {
    let objects = args
        .objects
        .iter()
        .map(|o| parse_object(o))
        .collect::<Result<Vec<_>, _>>()?;
    let (iothreads, object_ids) = validate_objects(&objects, &Origin::Cli)?;

    let mut drives: Vec<DriveSpec> = Vec::new();
    let mut files: Vec<(ImageIdentity, bool, String)> = Vec::new();
    for raw in &args.drives {
        let d = DriveSpec::parse_cli(raw)
            .map_err(|e| ConfigError::option(label("--drive", raw), InvalidOption::Export(e)))?;
        let lbl = format!("--drive id={}", d.id);
        iothread_registry::validate_id(&d.id)
            .map_err(|e| ConfigError::msg(lbl.clone(), format!("invalid drive id: {e}")))?;
        if object_ids.contains(&d.id) || drives.iter().any(|o| o.id == d.id) {
            return Err(ConfigError::msg(lbl, format!("duplicate id '{}'", d.id)));
        }
        // Checked for every drive, also those only exported later through QMP.
        if let Some(aio) = &d.aio {
            aio.parse::<BlockEngine>()
                .map_err(|msg| ConfigError::msg(lbl.clone(), format!("aio={aio}: {msg}")))?;
        }
        check_image_file(&lbl, &d.file, d.readonly, d.direct)?;
        let image = ImageIdentity::of(&d.file);
        if let Some((_, _, other)) = files
            .iter()
            .find(|(i, ro, _)| *i == image && !(*ro && d.readonly))
        {
            return Err(ConfigError::msg(
                lbl,
                format!(
                    "'{}' is already used by drive '{other}' (only read-only drives may share an image)",
                    d.file.display()
                ),
            ));
        }
        files.push((image, d.readonly, d.id.clone()));
        drives.push(d);
    }

    let qmp = match &args.qmp {
        None => None,
        Some(q) => {
            let addr =
                QmpAddr::try_from(q.clone()).map_err(|msg| ConfigError::msg("--qmp", msg))?;
            check_qmp("--qmp".to_owned(), &addr)?;
            Some(addr)
        }
    };
    let qmp_path = qmp.as_ref().map(|QmpAddr::Unix(p)| p.as_path());

    let ids: HashSet<&str> = object_ids.iter().map(String::as_str).collect();
    let mut exports: Vec<ExportConfig> = Vec::new();
    let mut image_locks = Vec::new();
    for raw in &args.exports {
        let spec = ExportSpec::parse_cli(raw)
            .map_err(|e| ConfigError::option(label("--export", raw), InvalidOption::Export(e)))?;
        let lbl = format!("--export id={}", spec.id);
        let drive = drives
            .iter()
            .find(|d| d.id == spec.node_name)
            .ok_or_else(|| {
                ConfigError::msg(
                    lbl.clone(),
                    format!("node-name '{}': no --drive with this id", spec.node_name),
                )
            })?;
        let cfg = ExportConfig::from_spec(&spec, drive, |id| ids.contains(id))
            .map_err(|e| ConfigError::option(lbl.clone(), InvalidOption::ExportConfig(e)))?;
        let existing: Vec<&ExportConfig> = exports.iter().collect();
        check_export(&cfg, &existing, qmp_path)
            .map_err(|e| ConfigError::option(lbl.clone(), InvalidOption::ExportConflict(e)))?;
        image_locks.push(lock_image(&lbl, &cfg.file, cfg.readonly, cfg.locking)?);
        exports.push(cfg);
    }
    if exports.is_empty() && qmp.is_none() {
        return Err(ConfigError::msg(
            "--export",
            "at least one --export is required (or --qmp, to add exports with block-export-add)",
        ));
    }
    Ok(ValidExportConfig {
        iothreads,
        drives,
        exports,
        image_locks,
        qmp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(e: &dyn std::error::Error) -> String {
        crate::error_chain(e)
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir()
                .join(format!("vmm-ref-cfgexport-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("disk.img"), vec![0u8; 1 << 16]).unwrap();
            Dir(p)
        }
        fn path(&self, name: &str) -> String {
            self.0.join(name).to_str().unwrap().to_owned()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn args(d: &Dir, drives: &[String], exports: &[String], qmp: Option<String>) -> ExportArgs {
        let _ = d;
        ExportArgs {
            drives: drives.to_vec(),
            objects: vec!["iothread,id=io0".into(), "iothread,id=io1".into()],
            exports: exports.to_vec(),
            qmp,
        }
    }

    #[test]
    fn valid_configuration() {
        let d = Dir::new("ok");
        let drive = format!("id=d0,file={}", d.path("disk.img"));
        let export = format!(
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:{},num-queues=3,iothread-vq-mapping=io0:io1",
            d.path("e0.sock")
        );
        let v = validate(&args(
            &d,
            &[drive.clone() + ",aio=threads"],
            &[export],
            None,
        ))
        .unwrap();
        assert_eq!(v.exports[0].engine, BlockEngine::Sync);
        assert_eq!(v.iothreads.len(), 2);
        assert_eq!(v.exports.len(), 1);
        assert_eq!(v.exports[0].queue_iothreads, vec!["io0", "io1", "io0"]);
        assert!(!v.exports[0].readonly);
        // QMP only: exports come later.
        let drive = format!("id=d0,file={},readonly=on", d.path("disk.img"));
        let qmp = format!("unix:{}", d.path("qmp.sock"));
        let v = validate(&args(&d, &[drive], &[], Some(qmp))).unwrap();
        assert!(v.exports.is_empty() && v.drives[0].readonly);
    }

    #[test]
    fn errors_name_the_option() {
        let d = Dir::new("err");
        let img = d.path("disk.img");
        let sock = d.path("e0.sock");
        let drive = format!("id=d0,file={img}");
        let exp = |extra: &str| {
            format!("vhost-user-blk,id=e0,node-name=d0,addr=unix:{sock},iothread=io0{extra}")
        };
        type Case<'a> = (Vec<String>, Vec<String>, Option<String>, &'a str);
        let cases: Vec<Case> = vec![
            (
                vec![drive.clone()],
                vec![exp(",bogus=1")],
                None,
                "--export id=e0: unknown option 'bogus'",
            ),
            (
                vec![drive.clone()],
                vec![exp(",num-queues=0")],
                None,
                "--export id=e0: parameter 'num-queues' must be between 1 and 64",
            ),
            (
                vec![drive.clone()],
                vec![exp(",num-queues=65")],
                None,
                "--export id=e0: parameter 'num-queues' must be between 1 and 64",
            ),
            (
                vec![drive.clone()],
                vec![exp("").replace("io0", "io9")],
                None,
                "--export id=e0: invalid export options: invalid IOThread assignment",
            ),
            (
                vec![drive.clone()],
                vec![exp("").replace("node-name=d0", "node-name=d1")],
                None,
                "--export id=e0: node-name 'd1': no --drive with this id",
            ),
            (
                vec![format!("id=d0,file={img},readonly=on")],
                vec![exp(",writable=on")],
                None,
                "--export id=e0: drive 'd0' is read-only",
            ),
            (
                vec![drive.clone()],
                vec![exp(""), exp("").replace("id=e0", "id=e1")],
                None,
                "--export id=e1: socket '",
            ),
            (
                vec![drive.clone()],
                vec![
                    exp(""),
                    exp("")
                        .replace("id=e0", "id=e1")
                        .replace("e0.sock", "e1.sock"),
                ],
                None,
                "--export id=e1: drive 'd0' is already exported by 'e0'",
            ),
            (
                vec![drive.clone()],
                vec![exp("")],
                Some(format!("unix:{sock}")),
                "is the QMP monitor's",
            ),
            (
                vec![drive.clone()],
                vec![exp("").replace(&sock, &img)],
                None,
                "exists and is not a socket",
            ),
            (
                vec![drive.clone()],
                vec![exp("").replace(&sock, "/nonexistent-dir/e0.sock")],
                None,
                "directory '/nonexistent-dir' does not exist",
            ),
            (
                vec![format!("id=d0,file={img},aio=native")],
                vec![],
                Some("unix:/tmp/q.sock".into()),
                "--drive id=d0: aio=native: invalid engine 'native' (expected auto, io_uring or sync)",
            ),
            (
                vec![format!("id=d0,file={}", d.path("missing.img"))],
                vec![],
                Some("unix:/tmp/q.sock".into()),
                "--drive id=d0: cannot open",
            ),
            (
                vec![format!("id=io0,file={img}")],
                vec![],
                Some("unix:/tmp/q.sock".into()),
                "--drive id=io0: duplicate id 'io0'",
            ),
            (
                vec![format!("id=d0,file={img},direct")],
                vec![],
                None,
                "--drive id=d0: expected key=value, got 'direct'",
            ),
            (
                vec![drive.clone()],
                vec![],
                None,
                "--export: at least one --export is required",
            ),
            (
                vec![drive.clone()],
                vec![],
                Some("tcp:1".into()),
                "--qmp: expected unix:/path",
            ),
        ];
        for (drives, exports, qmp, want) in cases {
            let e = validate(&args(&d, &drives, &exports, qmp)).unwrap_err();
            let got = chain(&e);
            assert!(
                got.contains(want),
                "{exports:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn live_sockets_are_not_replaced() {
        let d = Dir::new("live");
        let sock = d.path("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let drive = format!("id=d0,file={}", d.path("disk.img"));
        let export = format!("vhost-user-blk,id=e0,node-name=d0,addr=unix:{sock},iothread=io0");
        let e = chain(
            &validate(&args(
                &d,
                std::slice::from_ref(&drive),
                std::slice::from_ref(&export),
                None,
            ))
            .unwrap_err(),
        );
        assert!(e.contains("is in use by a running server"), "{e}");
        // A stale one (nobody listening) is fine.
        drop(_listener);
        assert!(validate(&args(&d, &[drive], &[export], None)).is_ok());
    }
}
