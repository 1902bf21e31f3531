//! hostvisor's end-to-end tests: the real binary, real guests.
//!
//! They are one test binary (each former file a module) because cargo runs
//! test binaries one after another: a binary whose last test boots alone
//! leaves the other cores idle, and nearly all of these tests' time is a
//! guest's emulated kernel keeping one core busy. In one binary the test
//! harness keeps every core busy to the end, and the suite links one
//! binary instead of twenty-one. Nothing here may change the host for
//! tests running beside it (the doctor's inaccessible /dev/kvm lives in a
//! private mount namespace; the share test only widens /dev/kvm's mode).
//!
//! A test file added to this directory must be declared below;
//! `every_test_file_is_declared` fails when one is not.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

#[path = "../common/mod.rs"]
mod common;

mod agent;
mod agent_pool;
mod balloon;
mod cgroup;
mod cli;
mod cloudinit;
mod console_input;
mod disk;
mod doctor;
mod firmware;
mod manage;
mod managed_snapshots;
mod memory;
mod net;
mod pc;
mod ratelimit;
mod restore;
mod sandbox;
mod seccomp;
mod share;
mod snapshot;

/// A file in tests/e2e that no `mod` line names would never be compiled,
/// and its tests never run.
#[test]
fn every_test_file_is_declared() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let main = std::fs::read_to_string(dir.join("main.rs")).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let Some(module) = name.strip_suffix(".rs") else {
            continue;
        };
        if module != "main" {
            assert!(
                main.lines().any(|l| l == format!("mod {module};")),
                "tests/e2e/{name} is not declared in tests/e2e/main.rs"
            );
        }
    }
}
