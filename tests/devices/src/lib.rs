//! Device servers for ringvm's integration tests.
//!
//! * [`vfio_user_dev`]: a PCI function served over a vfio-user socket, with
//!   misbehaving variants for bad-input tests (see README.md).

pub mod vfio_user_dev;
