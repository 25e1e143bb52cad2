//! vhost-user-blk front-end devices in QEMU's vocabulary:
//! `--chardev socket,id=c0,path=/run/vhost.sock` names the back-end's socket,
//! `--device vhost-user-blk,id=vu0,chardev=c0[,num-queues=N][,queue-size=N][,reconnect=SECONDS]`
//! puts a virtio-blk device served by that back-end on virtio-mmio. The JSON
//! config has the same objects under `chardevs` and `devices`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::keyval::{KeyVals, OptionError};
use super::{ConfigError, InvalidOption, Origin, MAX_NUM_QUEUES, MAX_QUEUE_SIZE};

/// Default queue size of a vhost-user-blk device (QEMU's `queue-size` default).
pub const DEFAULT_VHOST_USER_QUEUE_SIZE: u16 = 128;
/// Largest accepted `reconnect=` interval, in seconds.
pub const MAX_RECONNECT_SECS: u32 = 3600;

/// The chardev back-ends vmm-ref knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChardevBackend {
    /// A Unix stream socket vmm-ref connects to (QEMU `-chardev socket` as a client).
    Socket,
}

/// `--chardev socket,id=ID,path=PATH`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ChardevConfig {
    /// Always `socket`.
    pub backend: ChardevBackend,
    /// Chardev id (devices refer to it with `chardev=`).
    pub id: String,
    /// The Unix socket the back-end listens on.
    pub path: PathBuf,
}

/// The device types `--device` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceDriver {
    /// A virtio-blk device whose queues an external vhost-user back-end serves.
    #[serde(rename = "vhost-user-blk")]
    VhostUserBlk,
}

fn default_num_queues() -> u16 {
    1
}

fn default_queue_size() -> u16 {
    DEFAULT_VHOST_USER_QUEUE_SIZE
}

/// `--device vhost-user-blk,id=ID,chardev=ID[,num-queues=N][,queue-size=N][,reconnect=SECONDS]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeviceConfig {
    /// Always `vhost-user-blk`.
    pub driver: DeviceDriver,
    /// Device id (QOM path `/machine/peripheral/<id>`).
    pub id: String,
    /// The `--chardev` of the back-end.
    pub chardev: String,
    /// Number of request queues the guest gets (the back-end must serve at least as many).
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    /// Size of each virtqueue (power of two).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Seconds between reconnection attempts after the back-end went away;
    /// absent or 0: no reconnection (the queues stay stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<u32>,
}

/// A vhost-user-blk device after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidVhostUserBlk {
    /// Device id.
    pub id: String,
    /// Chardev id.
    pub chardev: String,
    /// Back-end socket.
    pub socket: PathBuf,
    /// Number of queues.
    pub num_queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Reconnection interval (`None`: no reconnection).
    pub reconnect: Option<Duration>,
}

fn parse_error(label: String, e: OptionError) -> ConfigError {
    ConfigError::Option {
        option: label,
        source: InvalidOption::Parse(e),
    }
}

/// Parses `--chardev socket,id=c0,path=/run/vhost.sock`.
pub fn parse_chardev(s: &str) -> Result<ChardevConfig, ConfigError> {
    let mut kv =
        KeyVals::parse(s, Some("backend")).map_err(|e| parse_error(format!("--chardev {s}"), e))?;
    let label = match kv.peek("id") {
        Some(id) => format!("--chardev id={id}"),
        None => format!("--chardev {s}"),
    };
    let inner = || -> Result<ChardevConfig, OptionError> {
        let backend = kv.take_required("backend")?;
        if backend != "socket" {
            return Err(OptionError::InvalidValue {
                key: "backend".into(),
                value: backend,
                expected: "socket (the only chardev type vmm-ref supports)".into(),
            });
        }
        let c = ChardevConfig {
            backend: ChardevBackend::Socket,
            id: kv.take_required("id")?,
            path: kv.take_required("path")?.into(),
        };
        kv.finish()?;
        Ok(c)
    };
    inner().map_err(|e| parse_error(label, e))
}

/// Parses `--device vhost-user-blk,id=vu0,chardev=c0,...`.
pub fn parse_device(s: &str) -> Result<DeviceConfig, ConfigError> {
    let mut kv =
        KeyVals::parse(s, Some("driver")).map_err(|e| parse_error(format!("--device {s}"), e))?;
    let label = match kv.peek("id") {
        Some(id) => format!("--device id={id}"),
        None => format!("--device {s}"),
    };
    let inner = || -> Result<DeviceConfig, OptionError> {
        let driver = kv.take_required("driver")?;
        if driver != "vhost-user-blk" {
            return Err(OptionError::InvalidValue {
                key: "driver".into(),
                value: driver,
                expected: "vhost-user-blk (virtio-blk disks are given with --drive)".into(),
            });
        }
        let d = DeviceConfig {
            driver: DeviceDriver::VhostUserBlk,
            id: kv.take_required("id")?,
            chardev: kv.take_required("chardev")?,
            num_queues: kv.take_int("num-queues")?.unwrap_or(1),
            queue_size: kv
                .take_int("queue-size")?
                .unwrap_or(DEFAULT_VHOST_USER_QUEUE_SIZE),
            reconnect: kv.take_int("reconnect")?,
        };
        kv.finish()?;
        Ok(d)
    };
    inner().map_err(|e| parse_error(label, e))
}

/// Validates chardevs and vhost-user devices. `taken` holds the ids already
/// used by objects and drives; `drives` is the number of drives (they take
/// the first virtio-mmio slots).
pub(crate) fn validate(
    chardevs: &[ChardevConfig],
    devices: &[DeviceConfig],
    origin: &Origin,
    taken: &HashSet<String>,
    drives: usize,
) -> Result<Vec<ValidVhostUserBlk>, ConfigError> {
    let mut chardev_ids = HashSet::new();
    for (i, c) in chardevs.iter().enumerate() {
        let label = origin.label(
            format!("--chardev id={}", c.id),
            format!("chardevs[{i}] (id={})", c.id),
        );
        iothread_registry::validate_id(&c.id)
            .map_err(|e| ConfigError::msg(label.clone(), format!("invalid chardev id: {e}")))?;
        if !chardev_ids.insert(c.id.clone()) {
            return Err(ConfigError::msg(
                label,
                format!("duplicate chardev id '{}'", c.id),
            ));
        }
        if c.path.as_os_str().is_empty() {
            return Err(ConfigError::msg(label, "path must not be empty"));
        }
        super::check_sun_path(&c.path)
            .map_err(|e| ConfigError::option(label.clone(), InvalidOption::Socket(e)))?;
        // A client socket: the back-end creates it; only its directory must exist.
        if let Some(dir) = c.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(ConfigError::option(
                    label,
                    InvalidOption::Socket(super::SocketPathError::NoDirectory(dir.to_owned())),
                ));
            }
        }
    }
    let max = crate::vm::layout::MAX_VIRTIO_DEVICES;
    if drives + devices.len() > max {
        return Err(ConfigError::msg(
            origin.label("--device".into(), "devices".into()),
            format!("at most {max} virtio devices (drives and vhost-user devices) are supported"),
        ));
    }
    let mut ids = HashSet::new();
    let mut used_chardevs: Vec<(&str, &str)> = Vec::new();
    let mut valid = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let label = origin.label(
            format!("--device id={}", d.id),
            format!("devices[{i}] (id={})", d.id),
        );
        iothread_registry::validate_id(&d.id)
            .map_err(|e| ConfigError::msg(label.clone(), format!("invalid device id: {e}")))?;
        if taken.contains(&d.id) || !ids.insert(d.id.clone()) {
            return Err(ConfigError::msg(label, format!("duplicate id '{}'", d.id)));
        }
        let Some(chardev) = chardevs.iter().find(|c| c.id == d.chardev) else {
            return Err(ConfigError::msg(
                label,
                format!(
                    "chardev '{}' not found (give --chardev socket,id={},path=...)",
                    d.chardev, d.chardev
                ),
            ));
        };
        if let Some((_, other)) = used_chardevs.iter().find(|(c, _)| *c == d.chardev) {
            return Err(ConfigError::msg(
                label,
                format!(
                    "chardev '{}' is already used by device '{other}'",
                    d.chardev
                ),
            ));
        }
        used_chardevs.push((&d.chardev, &d.id));
        if d.num_queues == 0 || d.num_queues > MAX_NUM_QUEUES {
            return Err(ConfigError::msg(
                label,
                format!("num-queues must be between 1 and {MAX_NUM_QUEUES}"),
            ));
        }
        if d.queue_size < 2 || d.queue_size > MAX_QUEUE_SIZE || !d.queue_size.is_power_of_two() {
            return Err(ConfigError::msg(
                label,
                format!("queue-size must be a power of 2 between 2 and {MAX_QUEUE_SIZE}"),
            ));
        }
        let reconnect = match d.reconnect {
            None | Some(0) => None,
            Some(s) if s > MAX_RECONNECT_SECS => {
                return Err(ConfigError::msg(
                    label,
                    format!("reconnect must be between 0 and {MAX_RECONNECT_SECS} seconds"),
                ))
            }
            Some(s) => Some(Duration::from_secs(u64::from(s))),
        };
        valid.push(ValidVhostUserBlk {
            id: d.id.clone(),
            chardev: d.chardev.clone(),
            socket: chardev.path.clone(),
            num_queues: d.num_queues,
            queue_size: d.queue_size,
            reconnect,
        });
    }
    Ok(valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(e: &dyn std::error::Error) -> String {
        crate::error_chain(e)
    }

    #[test]
    fn parses_chardev_and_device() {
        let c = parse_chardev("socket,id=c0,path=/run/vhost.sock").unwrap();
        assert_eq!(
            c,
            ChardevConfig {
                backend: ChardevBackend::Socket,
                id: "c0".into(),
                path: "/run/vhost.sock".into()
            }
        );
        let d = parse_device(
            "vhost-user-blk,id=vu0,chardev=c0,num-queues=4,queue-size=256,reconnect=2",
        )
        .unwrap();
        assert_eq!(
            (
                d.id.as_str(),
                d.chardev.as_str(),
                d.num_queues,
                d.queue_size,
                d.reconnect
            ),
            ("vu0", "c0", 4, 256, Some(2))
        );
        let d = parse_device("driver=vhost-user-blk,id=vu0,chardev=c0").unwrap();
        assert_eq!((d.num_queues, d.queue_size, d.reconnect), (1, 128, None));
    }

    #[test]
    fn parse_errors_name_the_option() {
        let cases = [
            (
                parse_chardev("file,id=c0,path=x").unwrap_err(),
                "--chardev id=c0: invalid value 'file' for 'backend'",
            ),
            (
                parse_chardev("socket,id=c0").unwrap_err(),
                "--chardev id=c0: missing required option 'path'",
            ),
            (
                parse_chardev("socket,id=c0,path=x,server=on").unwrap_err(),
                "--chardev id=c0: unknown option 'server'",
            ),
            (
                parse_device("virtio-blk,id=d0,chardev=c0").unwrap_err(),
                "--device id=d0: invalid value 'virtio-blk' for 'driver'",
            ),
            (
                parse_device("vhost-user-blk,id=d0").unwrap_err(),
                "--device id=d0: missing required option 'chardev'",
            ),
            (
                parse_device("vhost-user-blk,id=d0,chardev=c0,reconnect=-1").unwrap_err(),
                "--device id=d0: invalid value '-1' for 'reconnect'",
            ),
            (
                parse_device("vhost-user-blk,id=d0,chardev=c0,bogus=1").unwrap_err(),
                "--device id=d0: unknown option 'bogus'",
            ),
        ];
        for (e, want) in cases {
            let got = chain(&e);
            assert!(got.starts_with(want), "got {got:?}, want {want:?}");
        }
    }

    fn dev(id: &str, chardev: &str) -> DeviceConfig {
        parse_device(&format!("vhost-user-blk,id={id},chardev={chardev}")).unwrap()
    }

    #[test]
    fn validation() {
        let chardevs = [
            parse_chardev("socket,id=c0,path=/tmp/a.sock").unwrap(),
            parse_chardev("socket,id=c1,path=/tmp/b.sock").unwrap(),
        ];
        let none = HashSet::new();
        let v = validate(
            &chardevs,
            &[dev("vu0", "c0"), dev("vu1", "c1")],
            &Origin::Cli,
            &none,
            0,
        )
        .unwrap();
        assert_eq!(v[1].socket, PathBuf::from("/tmp/b.sock"));
        assert_eq!(v[0].reconnect, None);

        let err = |devices: &[DeviceConfig], taken: &HashSet<String>| {
            chain(&validate(&chardevs, devices, &Origin::Cli, taken, 0).unwrap_err())
        };
        assert_eq!(
            err(&[dev("vu0", "c9")], &none),
            "--device id=vu0: chardev 'c9' not found (give --chardev socket,id=c9,path=...)"
        );
        assert_eq!(
            err(&[dev("vu0", "c0"), dev("vu1", "c0")], &none),
            "--device id=vu1: chardev 'c0' is already used by device 'vu0'"
        );
        assert_eq!(
            err(&[dev("vu0", "c0"), dev("vu0", "c1")], &none),
            "--device id=vu0: duplicate id 'vu0'"
        );
        let taken: HashSet<String> = ["d0".to_string()].into();
        assert_eq!(
            err(&[dev("d0", "c0")], &taken),
            "--device id=d0: duplicate id 'd0'"
        );
        let mut d = dev("vu0", "c0");
        d.queue_size = 100;
        assert!(err(&[d], &none).contains("queue-size must be a power of 2"));
        let mut d = dev("vu0", "c0");
        d.num_queues = 0;
        assert!(err(&[d], &none).contains("num-queues must be between 1 and 64"));
        let mut d = dev("vu0", "c0");
        d.reconnect = Some(MAX_RECONNECT_SECS + 1);
        assert!(err(&[d], &none).contains("reconnect must be between"));
        let mut d = dev("vu0", "c0");
        d.reconnect = Some(3);
        let v = validate(&chardevs, &[d], &Origin::Cli, &none, 0).unwrap();
        assert_eq!(v[0].reconnect, Some(Duration::from_secs(3)));

        let dup = [chardevs[0].clone(), chardevs[0].clone()];
        let e = chain(&validate(&dup, &[], &Origin::Cli, &none, 0).unwrap_err());
        assert_eq!(e, "--chardev id=c0: duplicate chardev id 'c0'");
        let nodir = [parse_chardev("socket,id=c0,path=/nonexistent-dir/x.sock").unwrap()];
        let e = chain(&validate(&nodir, &[], &Origin::Cli, &none, 0).unwrap_err());
        assert_eq!(
            e,
            "--chardev id=c0: directory '/nonexistent-dir' does not exist"
        );
        let long = [parse_chardev(&format!("socket,id=c0,path=/{}", "s".repeat(107))).unwrap()];
        let e = chain(&validate(&long, &[], &Origin::Cli, &none, 0).unwrap_err());
        assert_eq!(
            e,
            "--chardev id=c0: socket path is 108 bytes long; the limit is 107"
        );
        let many: Vec<DeviceConfig> = (0..2)
            .map(|i| dev(&format!("vu{i}"), &format!("c{i}")))
            .collect();
        let e = chain(
            &validate(
                &chardevs,
                &many,
                &Origin::Cli,
                &none,
                crate::vm::layout::MAX_VIRTIO_DEVICES - 1,
            )
            .unwrap_err(),
        );
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn whole_json_config_is_validated_with_json_labels() {
        let text = r#"{"kernel": "KERNEL",
            "chardevs": [{"backend": "socket", "id": "c0", "path": "/tmp/vu0.sock"}],
            "devices": [{"driver": "vhost-user-blk", "id": "vu0", "chardev": "c0",
                         "num-queues": 4, "queue-size": 256, "reconnect": 2}]}"#
            .replace("KERNEL", env!("VMM_REF_GUEST_ELF"));
        let cfg: super::super::VmConfig = serde_json::from_str(&text).unwrap();
        let origin = Origin::File("vm.json".into());
        let v = super::super::validate(cfg.clone(), &origin).unwrap();
        assert_eq!(
            v.vhost_user,
            [ValidVhostUserBlk {
                id: "vu0".into(),
                chardev: "c0".into(),
                socket: "/tmp/vu0.sock".into(),
                num_queues: 4,
                queue_size: 256,
                reconnect: Some(Duration::from_secs(2)),
            }]
        );
        let mut bad = cfg;
        bad.devices[0].chardev = "c9".into();
        let e = chain(&super::super::validate(bad, &origin).unwrap_err());
        assert!(
            e.starts_with("--config vm.json: devices[0] (id=vu0): chardev 'c9' not found"),
            "{e}"
        );
    }

    #[test]
    fn json_form() {
        let c: ChardevConfig =
            serde_json::from_str(r#"{"backend": "socket", "id": "c0", "path": "/tmp/s"}"#).unwrap();
        assert_eq!(c.id, "c0");
        let d: DeviceConfig = serde_json::from_str(
            r#"{"driver": "vhost-user-blk", "id": "vu0", "chardev": "c0", "num-queues": 2, "reconnect": 1}"#,
        )
        .unwrap();
        assert_eq!((d.num_queues, d.queue_size, d.reconnect), (2, 128, Some(1)));
        assert!(serde_json::from_str::<DeviceConfig>(
            r#"{"driver": "vhost-user-blk", "id": "vu0", "chardev": "c0", "file": "x"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<DeviceConfig>(
            r#"{"driver": "virtio-blk", "id": "vu0", "chardev": "c0"}"#
        )
        .is_err());
    }
}
