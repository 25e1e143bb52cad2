//! Writes every target's seed corpus: `FUZZ_SEED_DIR=seeds cargo test` (ci/fuzz.sh does).

use std::path::Path;

/// A target's seeds: (file name, input).
pub type Seeds = Vec<(String, Vec<u8>)>;

/// All seed sets, by fuzz target name.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("poll_algorithm", crate::poll_algorithm::seeds()),
        ("iothread_mapping", crate::iothread_mapping::seeds()),
        ("regpage", crate::regpage::seeds()),
        ("qmp", crate::qmp::seeds()),
        ("qmp_parse", crate::qmp::seeds()),
        ("virtio_blk_request", crate::virtio_blk_request::seeds()),
        ("virtio_mmio", crate::virtio_mmio::seeds()),
        ("vhost_user", crate::vhost_user::seeds()),
    ]
}

/// Writes `dir/<target>/<name>` for every seed.
pub fn write_all(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for (target, seeds) in all() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        for (name, bytes) in seeds {
            std::fs::write(d.join(name), bytes)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn write_seed_corpora_when_asked() {
        let all = super::all();
        assert!(all.iter().all(|(_, s)| !s.is_empty()));
        if let Some(dir) = std::env::var_os("FUZZ_SEED_DIR") {
            let n = super::write_all(std::path::Path::new(&dir)).expect("write seeds");
            assert_eq!(n, all.iter().map(|(_, s)| s.len()).sum::<usize>());
        }
    }
}
