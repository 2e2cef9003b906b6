//! Passes the linker script (by absolute path) to the guest binary link.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.ld");

    // Only the bare-metal target gets the custom link; a host build (used for
    // `cargo test --target <host>`) links as an ordinary test binary.
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("none") {
        return;
    }
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    // Static, non-PIE executable (ET_EXEC) even if the relocation-model
    // rustflag from .cargo/config.toml was overridden by the environment.
    println!("cargo:rustc-link-arg-bins=--no-pie");
    println!("cargo:rustc-link-arg-bins=--build-id=none");
}
