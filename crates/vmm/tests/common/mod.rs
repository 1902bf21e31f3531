//! Helpers shared by the vmm crate's KVM tests.
#![allow(dead_code)] // each test binary uses a different subset

use hypervisor::kvm::KvmHypervisor;

/// A test that cannot run here: prints `SKIPPED: why`, or fails when the
/// environment variable `require` is 1 (as CI sets it).
pub fn skip(require: &str, why: &str) {
    if std::env::var(require).as_deref() == Ok("1") {
        panic!("{why}, but {require}=1 requires this test to run");
    }
    eprintln!("SKIPPED: {why} (set {require}=1 to make this a failure)");
}

/// KVM, or a skip (a failure when HOSTVISOR_REQUIRE_KVM=1).
pub fn kvm() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(hv) => Some(hv),
        Err(e) => {
            skip(
                "HOSTVISOR_REQUIRE_KVM",
                &format!("KVM is unusable here: {e}"),
            );
            None
        }
    }
}
