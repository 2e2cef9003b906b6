//! Device servers and small helpers for ringvm's integration tests.
//!
//! * [`vfio_user_dev`]: a PCI function served over a vfio-user socket, with
//!   misbehaving variants for bad-input tests (see README.md).
//! * [`vhost_user_script`]: a scripted vhost-user-blk backend that records
//!   what a front-end sends and can lie in its answers.

pub mod vfio_user_dev;
pub mod vhost_user_script;

/// Whether tests that need KVM can run. Without a usable /dev/kvm they fail
/// under `CI=true` and are skipped (with a note) elsewhere.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "/dev/kvm is not usable and CI=true: KVM tests must run"
        );
        eprintln!("skipping: /dev/kvm is not usable");
    }
    ok
}
