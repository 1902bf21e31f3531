//! What a guest resumed from a snapshot or cloned is told: fresh random
//! bytes for its kernel's pool (`Reseed`) and, for a clone, a new hostname
//! and machine id (`SetIdentity`). Without a vmgenid device (hostvisor has
//! no ACPI yet) this is how two guests resumed from one snapshot stop
//! sharing RNG state and identity.
//!
//! The checks here run at both ends: the client refuses to send what the
//! agent would refuse, and the agent checks again (it never trusts a
//! frame). The guest-side operations take their paths as arguments so the
//! tests run the real code on scratch files.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::Reseeded;

/// The most bytes one `Reseed` carries (the kernel's input pool is 256
/// bits; more only costs a bigger frame).
pub const MAX_SEED: usize = 512;

/// How many bytes the client sends in a `Reseed`.
pub const SEED_LEN: usize = 64;

/// The longest hostname (the kernel's `__NEW_UTS_LEN`).
pub const MAX_HOSTNAME: usize = 64;

/// The guest's random device.
pub const URANDOM: &str = "/dev/urandom";

/// The guest's machine id file.
pub const MACHINE_ID: &str = "/etc/machine-id";

/// `RNDADDENTROPY`, `_IOW('R', 0x03, int[2])`: add bytes to the input
/// pool and credit entropy for them (needs `CAP_SYS_ADMIN`).
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;

/// `RNDRESEEDCRNG`, `_IO('R', 0x07)`: reseed the CRNG from the input pool
/// now (Linux 4.17 and later; needs `CAP_SYS_ADMIN`).
const RNDRESEEDCRNG: libc::Ioctl = 0x0000_5207;

/// Why a seed, hostname or machine id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("a seed of {0} bytes: between 1 and {MAX_SEED} are accepted")]
    SeedSize(usize),
    #[error("hostname {0:?}: {1}")]
    Hostname(String, &'static str),
    #[error("machine id {0:?}: {1}")]
    MachineId(String, &'static str),
}

/// Shows at most 80 characters of what was sent, in errors.
fn shown(text: &str) -> String {
    text.chars().take(80).collect()
}

/// Checks a seed's size.
pub fn check_seed(seed: &[u8]) -> Result<(), IdentityError> {
    if seed.is_empty() || seed.len() > MAX_SEED {
        return Err(IdentityError::SeedSize(seed.len()));
    }
    Ok(())
}

/// Checks a hostname: 1 to [`MAX_HOSTNAME`] of `[A-Za-z0-9-]`, not
/// starting or ending with `-` (one DNS label).
pub fn check_hostname(name: &str) -> Result<(), IdentityError> {
    let bad = |why| Err(IdentityError::Hostname(shown(name), why));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_HOSTNAME {
        return bad("longer than 64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return bad("only letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("must not start or end with '-'");
    }
    Ok(())
}

/// Checks a machine id: 32 lowercase hex digits, not all zero (as
/// machine-id(5) has it).
pub fn check_machine_id(id: &str) -> Result<(), IdentityError> {
    let bad = |why| Err(IdentityError::MachineId(shown(id), why));
    if id.len() != 32 {
        return bad("must be 32 hex digits");
    }
    if !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return bad("only lowercase hex digits are allowed");
    }
    if id.bytes().all(|b| b == b'0') {
        return bad("must not be all zero");
    }
    Ok(())
}

impl crate::Identity {
    /// Checks every part that is set.
    pub fn check(&self) -> Result<(), IdentityError> {
        if let Some(name) = &self.hostname {
            check_hostname(name)?;
        }
        if let Some(id) = &self.machine_id {
            check_machine_id(id)?;
        }
        Ok(())
    }
}

/// Fills `buf` from the host's CSPRNG (getrandom(2), waiting for the pool
/// if the host just booted).
pub fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => done += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// A new random machine id (from the host's CSPRNG), for a clone.
pub fn new_machine_id() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    host_random(&mut b)?;
    // Never all zero: that is "no id" (practically impossible anyway).
    b[0] |= 1;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Guest side: mixes `seed` into the kernel's pool through `urandom`
/// (the guest's [`URANDOM`]): `RNDADDENTROPY` credits it as entropy, and
/// `RNDRESEEDCRNG` then reseeds the CRNG at once (crediting alone does
/// not, once the kernel's pool is ready). If the kernel refuses the ioctl
/// (no `CAP_SYS_ADMIN`, or not a random device), the bytes are written
/// instead, which mixes them in without credit.
pub fn mix_into_pool(urandom: &Path, seed: &[u8]) -> std::io::Result<Reseeded> {
    check_seed(seed).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new().write(true).open(urandom)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = vec![0u32; 2 + seed.len().div_ceil(4)];
    // At most MAX_SEED (512) bytes: these fit in an int.
    info[0] = (seed.len() * 8) as u32;
    info[1] = seed.len() as u32;
    for (word, chunk) in info[2..].iter_mut().zip(seed.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(b);
    }
    let fd = file.as_raw_fd();
    // SAFETY: `info` is a rand_pool_info whose buffer holds `buf_size`
    // bytes; the kernel only reads it, during the call.
    let credited = unsafe { libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) } == 0;
    if !credited {
        file.write_all(seed)?;
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let crng_reseeded = unsafe { libc::ioctl(fd, RNDRESEEDCRNG) } == 0;
    info.fill(0);
    Ok(Reseeded {
        bytes: seed.len() as u32,
        credited,
        crng_reseeded,
    })
}

/// Guest side: sets the kernel's hostname (sethostname(2), in the
/// caller's UTS namespace) after checking it.
pub fn set_hostname(name: &str) -> std::io::Result<()> {
    check_hostname(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is valid for `name.len()` bytes, which the kernel
    // copies (it needs no NUL terminator).
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Guest side: writes `id` and a newline to `path` (the guest's
/// [`MACHINE_ID`]) after checking it: into a new file beside it (mode
/// 0o444, as systemd makes it), flushed, then renamed over it, so a crash
/// leaves the old id or the new one, never a torn file.
pub fn write_machine_id(path: &Path, id: &str) -> std::io::Result<()> {
    check_machine_id(id).map_err(std::io::Error::other)?;
    let (mut file, tmp) = crate::create_beside(path, 0o444)?;
    let written = file
        .write_all(format!("{id}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn hostnames_are_checked() {
        for good in ["a", "clone-2", "VM01", &"x".repeat(64), "0"] {
            check_hostname(good).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "-",
            "a.b",
            "a b",
            "a_b",
            "é",
            "a\0b",
            "a\n",
            &"x".repeat(65),
        ] {
            let e = check_hostname(bad).unwrap_err();
            assert!(matches!(e, IdentityError::Hostname(..)), "{bad:?}: {e}");
        }
        // A huge name is shown cut short in the error.
        let e = check_hostname(&"é".repeat(10_000)).unwrap_err().to_string();
        assert!(e.len() < 300, "{e}");
    }

    #[test]
    fn machine_ids_are_checked() {
        check_machine_id("0123456789abcdef0123456789abcdef").unwrap();
        for bad in [
            "",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef0123456789abcde\n",
            "00000000000000000000000000000000",
            "0123456789abcdef0123456789abcdé",
        ] {
            let e = check_machine_id(bad).unwrap_err();
            assert!(matches!(e, IdentityError::MachineId(..)), "{bad:?}: {e}");
        }
        let a = new_machine_id().unwrap();
        let b = new_machine_id().unwrap();
        check_machine_id(&a).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn identities_check_every_part_set() {
        Identity::default().check().unwrap();
        let good = Identity {
            hostname: Some("clone".into()),
            machine_id: Some(new_machine_id().unwrap()),
        };
        good.check().unwrap();
        let bad_name = Identity {
            hostname: Some("bad name".into()),
            ..good.clone()
        };
        assert!(matches!(bad_name.check(), Err(IdentityError::Hostname(..))));
        let bad_id = Identity {
            machine_id: Some("xyz".into()),
            ..good
        };
        assert!(matches!(bad_id.check(), Err(IdentityError::MachineId(..))));
    }

    #[test]
    fn seeds_are_bounded() {
        assert_eq!(check_seed(&[]), Err(IdentityError::SeedSize(0)));
        check_seed(&[1]).unwrap();
        check_seed(&[1; MAX_SEED]).unwrap();
        assert_eq!(
            check_seed(&[1; MAX_SEED + 1]),
            Err(IdentityError::SeedSize(MAX_SEED + 1))
        );
        let mut a = [0u8; SEED_LEN];
        let mut b = [0u8; SEED_LEN];
        host_random(&mut a).unwrap();
        host_random(&mut b).unwrap();
        assert_ne!(a, b);
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hv-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_pool_that_refuses_the_ioctl_gets_the_bytes_written() {
        // A plain file is not a random device: the ioctls fail (ENOTTY)
        // and the bytes are written, uncredited.
        let dir = scratch("pool");
        let pool = dir.join("urandom");
        std::fs::write(&pool, b"").unwrap();
        let seed: Vec<u8> = (0..61u8).collect();
        let r = mix_into_pool(&pool, &seed).unwrap();
        assert_eq!(
            r,
            Reseeded {
                bytes: 61,
                credited: false,
                crng_reseeded: false
            }
        );
        assert_eq!(std::fs::read(&pool).unwrap(), seed);
        // Bad sizes never reach the pool.
        assert!(mix_into_pool(&pool, &[]).is_err());
        assert!(mix_into_pool(&pool, &[0; MAX_SEED + 1]).is_err());
        assert_eq!(std::fs::read(&pool).unwrap(), seed);
        assert!(mix_into_pool(&dir.join("missing"), &seed).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whether this process has `CAP_SYS_ADMIN` (bit 21 of `CapEff`).
    fn sys_admin() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                u64::from_str_radix(hex.trim(), 16).ok()
            })
            .is_some_and(|caps| caps & (1 << 21) != 0)
    }

    #[test]
    fn the_real_pool_takes_a_seed() {
        // With CAP_SYS_ADMIN both ioctls work (which checks their
        // numbers); without, the bytes are written. The seed is real
        // randomness from the host's own pool, so crediting it is honest.
        let mut seed = [0u8; SEED_LEN];
        host_random(&mut seed).unwrap();
        let r = mix_into_pool(Path::new(URANDOM), &seed).unwrap();
        assert_eq!(r.bytes, SEED_LEN as u32);
        let admin = sys_admin();
        assert_eq!((r.credited, r.crng_reseeded), (admin, admin));
    }

    #[test]
    fn machine_ids_replace_the_file_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mid");
        let path = dir.join("machine-id");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        let id = new_machine_id().unwrap();
        write_machine_id(&path, &id).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{id}\n"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "{mode:o}");
        // A bad id changes nothing; a missing directory is an error; no
        // temporary file is left behind.
        assert!(write_machine_id(&path, "not-an-id").is_err());
        assert!(write_machine_id(&dir.join("no/such"), &id).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{id}\n"));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
