//! `vmm-ref`: command-line entry point. Everything lives in the library.

fn main() {
    std::process::exit(vmm_ref::cli_main(std::env::args_os()));
}
