//! vmm-ref: a small reference VMM on KVM composing `aio-poll` and
//! `iothread-registry`: virtio-mmio multi-queue virtio-blk whose queues are served
//! by IOThreads, a serial console, clean exits, and a QMP monitor; and, as
//! `vmm-ref export`, a vhost-user-blk export daemon serving the same device model.
//!
//! Module map: [`config`] (CLI + JSON), [`vm`] (KVM VM, memory, boot, vCPUs),
//! [`devices`] (serial, i8042, debug-exit), [`vmm`] (composition and lifecycle),
//! [`drives`] and [`vhost_user_drives`] (virtio-blk and vhost-user-blk devices
//! on virtio-mmio),
//! [`export`] (vhost-user-blk exports), [`export_daemon`] (the `export`
//! subcommand's composition and lifecycle), [`control`] (QMP glue),
//! [`demo`] (the embedded test guest on a temporary disk), [`bus`] (the device
//! trait of both buses), [`sigbus`] (the SIGBUS guard of shared file
//! mappings: tmpfs images, front-end guest memory).
#![deny(missing_docs)]

pub mod bus;
pub mod config;
pub mod control;
pub mod demo;
pub mod devices;
pub mod drives;
pub mod export;
pub mod export_daemon;
pub mod logger;
pub mod qmp;
pub mod ratelimit;
pub mod sigbus;
pub mod signals;
pub mod vhost_user_drives;
pub mod virtio;
pub mod vm;
pub mod vmm;

use std::ffi::OsString;

use clap::Parser;

/// Exit status for configuration errors.
pub const EXIT_CONFIG_ERROR: i32 = 2;
/// Exit status for VMM failures.
pub const EXIT_FAILURE: i32 = 1;

/// Formats an error with its whole `source()` chain, joined by `": "`. A
/// cause whose text the message so far already ends with (errors that print
/// their source themselves, as linux-loader's do) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// Runs the command line `args` and returns the process exit status.
pub fn cli_main(args: impl IntoIterator<Item = OsString>) -> i32 {
    logger::init();
    let cli = match config::cli::Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help / --version: to stdout, status 0.
            let _ = e.print();
            return e.exit_code();
        }
        Err(e) => {
            // A usage error: one line, like every configuration error (clap's
            // own rendering adds a usage block and tips on further lines).
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{first} (see --help)");
            return EXIT_CONFIG_ERROR;
        }
    };
    let run = match cli.command {
        Some(config::cli::Command::Demo(d)) => return demo::main(&d),
        Some(config::cli::Command::Export(e)) => return export_daemon::main(&e),
        Some(config::cli::Command::Run(r)) => r,
        None => cli.run,
    };
    let valid = match run
        .into_config()
        .and_then(|(cfg, origin)| config::validate(cfg, &origin))
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return EXIT_CONFIG_ERROR;
        }
    };
    match vmm::run(valid) {
        Ok(status) => status,
        Err(e @ vmm::VmmError::QmpSocket(_)) => {
            eprintln!("error: {}", error_chain(&e));
            EXIT_CONFIG_ERROR
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            EXIT_FAILURE
        }
    }
}
