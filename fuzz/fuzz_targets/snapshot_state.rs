//! Feeds arbitrary bytes to the snapshot state decoder, as a damaged or
//! hostile snapshot directory would: once as a whole state file (header,
//! checksum, payload), and once as a payload behind a valid header, so the
//! JSON document and every part's validation are reached too. Decoding and
//! validating must return errors, never panic or allocate without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot::Persist;

fn check(snap: &vmm::VmSnapshot) {
    let _ = snap.check_fits(&snap.config);
    for vcpu in &snap.vcpus {
        let _ = vcpu.validate();
        let _ = vcpu.saved_cpuid();
    }
    let _ = snap.vm.validate();
    let legacy = &snap.devices.legacy;
    let _ = devices::pci::PciRoot::restore((), &legacy.pci);
    let _ = devices::cmos::Cmos::restore(Box::new(|| 0), &legacy.cmos);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(snap) = snapshot::format::decode::<vmm::VmSnapshot>(data) {
        check(&snap);
    }
    if let Ok(snap) = serde_json::from_slice::<vmm::VmSnapshot>(data) {
        let file = snapshot::format::encode(&snap).expect("a decoded state encodes");
        let again: vmm::VmSnapshot =
            snapshot::format::decode(&file).expect("an encoded state decodes");
        assert_eq!(again, snap, "a state survives a round trip");
        check(&snap);
    }
});
