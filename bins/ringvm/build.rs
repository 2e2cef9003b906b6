//! Builds the built-in guest (tests/guest) for x86_64-unknown-none and
//! hands its ELF to the binary through OUT_DIR.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest
        .join("../../tests/guest")
        .canonicalize()
        .expect("tests/guest exists");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    // Fuzz targets use the library (the API) only, under a nightly
    // toolchain that need not have the bare-metal target: no guest.
    if env::var_os("CARGO_CFG_FUZZING").is_some() {
        std::fs::write(out.join("ringvm-guest.elf"), b"").expect("writing the empty guest");
        return;
    }
    let target_dir = out.join("guest-target");
    for p in [
        "src",
        "Cargo.toml",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's flags and wrappers (clippy, coverage, sanitizers)
    // are for the host binary, not the bare-metal guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the built-in guest");
    assert!(
        status.success(),
        "building the built-in guest failed; is the x86_64-unknown-none target installed? \
         (rustup target add x86_64-unknown-none)"
    );
    let elf = target_dir.join("x86_64-unknown-none/release/ringvm-guest");
    std::fs::copy(&elf, out.join("ringvm-guest.elf")).expect("copying the guest ELF");
}
