// Test addresses and sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

use super::*;

const RAM: u64 = 1 << 20;
const DESC: u64 = 0x1000;
const BUF: u64 = 0x2000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
}

fn device() -> FwCfg {
    let mut d = FwCfg::new(mem());
    d.set_item(key::NB_CPUS, 2u16.to_le_bytes().to_vec())
        .unwrap();
    d.add_file("etc/zeta", b"last".to_vec(), false).unwrap();
    d.add_file("etc/alpha", vec![7u8; 300], false).unwrap();
    d.add_file("etc/vmgenid_addr", vec![0u8; 8], true).unwrap();
    d
}

fn select(d: &mut FwCfg, key: u16) {
    d.write(FW_CFG_PORT, 0, &key.to_le_bytes());
}

fn read_port(d: &mut FwCfg, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    // One byte at a time, as firmware does, and a wide read once.
    let (first, rest) = out.split_at_mut(n.min(1));
    d.read(FW_CFG_PORT, DATA_OFFSET, first);
    for chunk in rest.chunks_mut(4) {
        d.read(FW_CFG_PORT, DATA_OFFSET, chunk);
    }
    out
}

/// Starts a DMA transfer described at `DESC`, returning the control word
/// the device left there.
fn dma(d: &mut FwCfg, control: u32, length: u32, address: u64) -> u32 {
    let mut desc = [0u8; 16];
    desc[..4].copy_from_slice(&control.to_be_bytes());
    desc[4..8].copy_from_slice(&length.to_be_bytes());
    desc[8..].copy_from_slice(&address.to_be_bytes());
    d.mem.write_slice(&desc, GuestAddress(DESC)).unwrap();
    d.write(FW_CFG_PORT, DMA_OFFSET, &0u32.to_be_bytes());
    d.write(FW_CFG_PORT, DMA_OFFSET + 4, &(DESC as u32).to_be_bytes());
    let mut c = [0u8; 4];
    d.mem.read_slice(&mut c, GuestAddress(DESC)).unwrap();
    u32::from_be_bytes(c)
}

fn guest(d: &FwCfg, at: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    d.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

/// The directory as a firmware parses it: (size, key, name).
fn directory(d: &mut FwCfg) -> Vec<(u32, u16, String)> {
    select(d, key::FILE_DIR);
    let count = u32::from_be_bytes(read_port(d, 4).try_into().unwrap());
    (0..count)
        .map(|_| {
            let e = read_port(d, 64);
            let size = u32::from_be_bytes(e[..4].try_into().unwrap());
            let key = u16::from_be_bytes([e[4], e[5]]);
            let end = e[8..].iter().position(|&c| c == 0).unwrap();
            (
                size,
                key,
                String::from_utf8(e[8..8 + end].to_vec()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn firmware_finds_the_signature_the_features_and_dma() {
    let mut d = device();
    select(&mut d, key::SIGNATURE);
    assert_eq!(read_port(&mut d, 4), b"QEMU");
    select(&mut d, key::ID);
    let id = u32::from_le_bytes(read_port(&mut d, 4).try_into().unwrap());
    assert_eq!(id, FEATURE_TRADITIONAL | FEATURE_DMA);
    let mut sig = [0u8; 8];
    d.read(FW_CFG_PORT, DMA_OFFSET, &mut sig[..4]);
    d.read(FW_CFG_PORT, DMA_OFFSET + 4, &mut sig[4..]);
    assert_eq!(&sig, b"QEMU CFG");
    select(&mut d, key::NB_CPUS);
    assert_eq!(read_port(&mut d, 2), [2, 0]);
    // Past the end, and an unknown key: zeros.
    assert_eq!(read_port(&mut d, 3), [0, 0, 0]);
    select(&mut d, 0x1234);
    assert_eq!(read_port(&mut d, 2), [0, 0]);
}

#[test]
fn the_directory_lists_files_by_name_and_reads_them() {
    let mut d = device();
    let dir = directory(&mut d);
    let names: Vec<&str> = dir.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(names, ["etc/alpha", "etc/vmgenid_addr", "etc/zeta"]);
    assert_eq!(dir[0].0, 300);
    assert_eq!(dir[2].0, 4);
    select(&mut d, dir[2].1);
    assert_eq!(read_port(&mut d, 4), b"last");
    assert_eq!(d.file("etc/alpha"), Some(&[7u8; 300][..]));
    assert_eq!(d.file("nope"), None);
}

#[test]
fn dma_selects_skips_reads_and_pads_with_zeros() {
    let mut d = device();
    let key = directory(&mut d)[2].1;
    d.mem.write_slice(&[0xee; 16], GuestAddress(BUF)).unwrap();
    let ctl = (u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP;
    assert_eq!(dma(&mut d, ctl, 1, 0), 0);
    // The rest of "last" and zeros past its end.
    assert_eq!(dma(&mut d, DMA_CTL_READ, 8, BUF), 0);
    assert_eq!(guest(&d, BUF, 9), b"ast\0\0\0\0\0\xee");
    // The port reader continues where DMA left off (offset 9: zeros).
    assert_eq!(read_port(&mut d, 1), [0]);
}

#[test]
fn the_guest_writes_only_writable_files_and_within_them() {
    let mut d = device();
    let dir = directory(&mut d);
    let (alpha, addr) = (dir[0].1, dir[1].1);
    d.mem
        .write_slice(&0x7f12_3000u64.to_le_bytes(), GuestAddress(BUF))
        .unwrap();
    let write = |k: u16| (u32::from(k) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE;
    assert_eq!(dma(&mut d, write(addr), 8, BUF), 0);
    assert_eq!(
        d.file("etc/vmgenid_addr"),
        Some(&0x7f12_3000u64.to_le_bytes()[..])
    );
    // Past its end, into a read-only file, into no file: errors, nothing
    // changes.
    assert_eq!(dma(&mut d, write(addr), 9, BUF), DMA_CTL_ERROR);
    assert_eq!(dma(&mut d, write(alpha), 4, BUF), DMA_CTL_ERROR);
    assert_eq!(dma(&mut d, write(0x4321), 4, BUF), DMA_CTL_ERROR);
    assert_eq!(d.file("etc/alpha"), Some(&[7u8; 300][..]));
    assert_eq!(
        d.file("etc/vmgenid_addr"),
        Some(&0x7f12_3000u64.to_le_bytes()[..])
    );
}

#[test]
fn hostile_dma_fails_the_request_and_nothing_else() {
    let mut d = device();
    let key = directory(&mut d)[1].1;
    let read = (u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
    // A target beyond RAM, one that wraps, one that runs off the end, the
    // largest length: errors, and no allocation of that size.
    assert_eq!(dma(&mut d, read, 16, RAM + 0x1000), DMA_CTL_ERROR);
    assert_eq!(dma(&mut d, read, 16, u64::MAX - 4), DMA_CTL_ERROR);
    assert_eq!(dma(&mut d, read, 0x2000, RAM - 0x1000), DMA_CTL_ERROR);
    assert_eq!(dma(&mut d, read, u32::MAX, BUF), DMA_CTL_ERROR);
    // A large read inside RAM is zeros past the item, in bounded pieces.
    assert_eq!(dma(&mut d, read, 0x8_0000, 0x8_0000), 0);
    assert!(guest(&d, 0x8_0000 + 8, 0x8_0000 - 8)
        .iter()
        .all(|&b| b == 0));
    // A descriptor outside RAM: nothing to run or answer.
    d.write(FW_CFG_PORT, DMA_OFFSET, &1u32.to_be_bytes());
    d.write(FW_CFG_PORT, DMA_OFFSET + 4, &0u32.to_be_bytes());
    // Odd widths and offsets are ignored; the device still answers.
    d.write(FW_CFG_PORT, 0, &[1]);
    d.write(FW_CFG_PORT, 3, &[1, 2, 3, 4]);
    d.write(FW_CFG_PORT, DMA_OFFSET + 4, &[1, 2]);
    select(&mut d, key::SIGNATURE);
    assert_eq!(read_port(&mut d, 4), b"QEMU");
}

#[test]
fn random_port_traffic_never_panics() {
    let mut d = device();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..100_000 {
        let r = next();
        let offset = r % FW_CFG_PORT_LEN;
        let width = [1usize, 2, 4, 8][(r >> 8) as usize % 4];
        let bytes = (r >> 16).to_le_bytes();
        if r & (1 << 60) != 0 {
            d.write(FW_CFG_PORT, offset, &bytes[..width]);
        } else {
            let mut buf = [0u8; 8];
            d.read(FW_CFG_PORT, offset, &mut buf[..width]);
        }
        if r & 0xff == 0 {
            // Now and then a random descriptor in RAM.
            let desc = next().to_le_bytes();
            d.mem.write_slice(&desc, GuestAddress(DESC)).unwrap();
            d.mem
                .write_slice(&next().to_le_bytes(), GuestAddress(DESC + 8))
                .unwrap();
            d.write(FW_CFG_PORT, DMA_OFFSET, &0u32.to_be_bytes());
            d.write(FW_CFG_PORT, DMA_OFFSET + 4, &(DESC as u32).to_be_bytes());
        }
    }
}

#[test]
fn bad_items_are_refused() {
    let mut d = device();
    assert_eq!(
        d.add_file("etc/alpha", vec![], false),
        Err(FwCfgError::Duplicate("etc/alpha".into()))
    );
    let long = "n".repeat(FILE_NAME_LEN);
    assert_eq!(
        d.add_file(&long, vec![], false),
        Err(FwCfgError::BadName(long.clone()))
    );
    assert_eq!(
        d.add_file("", vec![], false),
        Err(FwCfgError::BadName(String::new()))
    );
    for k in [key::SIGNATURE, key::ID, key::FILE_DIR, key::FILE_FIRST + 5] {
        assert_eq!(d.set_item(k, vec![1]), Err(FwCfgError::Reserved(k)));
    }
    let mut full = FwCfg::new(mem());
    for i in 0..MAX_FILES {
        full.add_file(&format!("f{i}"), vec![], false).unwrap();
    }
    assert_eq!(
        full.add_file("one-more", vec![], false),
        Err(FwCfgError::TooManyFiles)
    );
}

#[test]
fn state_round_trips_with_what_the_guest_wrote() {
    let mut d = device();
    let dir = directory(&mut d);
    d.mem.write_slice(&[9u8; 8], GuestAddress(BUF)).unwrap();
    let write = (u32::from(dir[1].1) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE;
    assert_eq!(dma(&mut d, write, 8, BUF), 0);
    select(&mut d, dir[0].1);
    read_port(&mut d, 5);
    d.write(FW_CFG_PORT, DMA_OFFSET, &0x1234u32.to_be_bytes());

    let saved = d.save();
    let json = serde_json::to_vec(&saved).unwrap();
    let state: FwCfgState = serde_json::from_slice(&json).unwrap();
    let mut restored = FwCfg::restore(device(), &state).unwrap();
    assert_eq!(restored.save(), saved);
    assert_eq!(restored.file("etc/vmgenid_addr"), Some(&[9u8; 8][..]));
    // The reader continues at byte 5 of etc/alpha.
    assert_eq!(read_port(&mut restored, 1), [7]);
    assert_eq!(restored.offset, 6);
}

#[test]
fn a_state_of_another_machine_is_refused() {
    let saved = device().save();
    let mut other = FwCfg::new(mem());
    other.add_file("etc/zeta", b"last".to_vec(), false).unwrap();
    assert!(matches!(
        FwCfg::restore(other, &saved),
        Err(FwCfgStateError::Files { .. })
    ));
    let mut bad = saved.clone();
    bad.written.insert("etc/vmgenid_addr".into(), vec![0; 9]);
    assert_eq!(
        FwCfg::restore(device(), &bad).err(),
        Some(FwCfgStateError::Written("etc/vmgenid_addr".into()))
    );
    let mut bad = saved;
    bad.written.insert("etc/alpha".into(), vec![0; 300]);
    assert_eq!(
        FwCfg::restore(device(), &bad).err(),
        Some(FwCfgStateError::Written("etc/alpha".into()))
    );
}
