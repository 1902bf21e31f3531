//! The NoCloud seed's files — `user-data`, `meta-data` and
//! `network-config` — and the checks on what the user hands in for them
//! (ssh public keys, a hostname, their own user-data).
//!
//! Every value is written as a double-quoted YAML scalar through a JSON
//! encoder: JSON strings are valid YAML (1.1 and 1.2) double-quoted
//! scalars, so no key comment or hostname can change the documents'
//! structure.

use std::io::Read;
use std::path::Path;

/// Largest ssh public key file read (a key line is under 1 KiB; a file of
/// several keys stays far below this).
const MAX_KEY_FILE: u64 = 64 << 10;
/// Largest user-data file taken (cloud-init's own limit is the seed's).
pub const MAX_USER_DATA: u64 = 16 << 20;

/// A clear, one-line reason an input was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InputError(pub String);

fn q(s: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

/// Reads at most `max` bytes of `path`, refusing larger files.
fn read_limited(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, InputError> {
    let fail = |e: std::io::Error| InputError(format!("{what} {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(fail)?;
    if file.metadata().map_err(fail)?.is_dir() {
        return Err(InputError(format!(
            "{what} {}: is a directory",
            path.display()
        )));
    }
    let mut data = Vec::new();
    file.take(max + 1).read_to_end(&mut data).map_err(fail)?;
    if data.len() as u64 > max {
        return Err(InputError(format!(
            "{what} {}: larger than {max} bytes",
            path.display()
        )));
    }
    Ok(data)
}

/// Key types OpenSSH writes into `.pub` files.
fn is_key_type(t: &str) -> bool {
    t.starts_with("ssh-")
        || t.starts_with("ecdsa-sha2-")
        || t.starts_with("sk-ssh-")
        || t.starts_with("sk-ecdsa-sha2-")
}

/// The public keys in one `.pub` (or authorized_keys-style) file, one a
/// line, checked to look like OpenSSH public keys.
pub fn read_ssh_keys(path: &Path) -> Result<Vec<String>, InputError> {
    let data = read_limited(path, MAX_KEY_FILE, "--ssh-key")?;
    let bad = |why: &str| InputError(format!("--ssh-key {}: {why}", path.display()));
    let text = String::from_utf8(data).map_err(|_| bad("not a text file"))?;
    if text.contains("PRIVATE KEY") {
        return Err(bad(
            "this is a private key; give its public half (the .pub file)",
        ));
    }
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
            return Err(bad(
                "not an ssh public key (expected `TYPE BASE64 [COMMENT]`)",
            ));
        };
        let base64 = blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
        if !is_key_type(kind) || !base64 {
            return Err(bad(
                "not an ssh public key (expected a line like `ssh-ed25519 AAAA... comment`)",
            ));
        }
        keys.push(line.to_string());
    }
    if keys.is_empty() {
        return Err(bad("holds no ssh public key"));
    }
    Ok(keys)
}

/// The first bytes cloud-init recognises user data by (anything else it
/// ignores, silently): a cloud-config document, a script, a MIME
/// multipart archive, or the other part types it handles.
const USER_DATA_STARTS: &[&str] = &[
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#cloud-config-archive",
    "#part-handler",
    "## template: jinja",
];

/// True for the header block of a MIME multipart message.
fn is_mime_multipart(text: &[u8]) -> bool {
    let head = String::from_utf8_lossy(&text[..text.len().min(4096)]).to_ascii_lowercase();
    let first = head.lines().next().unwrap_or("");
    (first.starts_with("content-type:") || first.starts_with("mime-version:"))
        && head
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .any(|l| l.starts_with("content-type:") && l.contains("multipart/"))
}

/// Reads `--user-data FILE`, checked to be something cloud-init acts on.
pub fn read_user_data(path: &Path) -> Result<Vec<u8>, InputError> {
    let data = read_limited(path, MAX_USER_DATA, "--user-data")?;
    // gzip: cloud-init decompresses it first.
    let gzip = data.starts_with(&[0x1f, 0x8b]);
    let known = USER_DATA_STARTS
        .iter()
        .any(|s| data.starts_with(s.as_bytes()));
    if !gzip && !known && !is_mime_multipart(&data) {
        return Err(InputError(format!(
            "--user-data {}: not cloud-init user data (it must start with #cloud-config, #! for a script, or a MIME multipart header; cloud-init ignores anything else)",
            path.display()
        )));
    }
    Ok(data)
}

/// Checks a hostname: dot-separated labels of letters, digits and '-'
/// (not at either end), each at most 63 characters, 253 in all.
pub fn check_hostname(h: &str) -> Result<(), InputError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if h.is_empty() || h.len() > 253 || !h.split('.').all(label_ok) {
        return Err(InputError(format!(
            "--hostname `{h}` is not a valid hostname: use letters, digits and '-' (not first or last), up to 63 per dot-separated part"
        )));
    }
    Ok(())
}

/// The hostname a VM named `name` gets: its name, made a valid hostname
/// ('_' becomes '-'; each part cut to 63 characters).
pub fn hostname_for(name: &str) -> String {
    name.replace('_', "-")
        .split('.')
        .map(|l| l.chars().take(63).collect::<String>())
        .map(|l| l.trim_matches('-').to_string())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

/// The user the generated user-data creates: the host user's login name,
/// as Lima does (so `ssh HOST` needs no `user@`), or `hostvisor` when
/// that is root or not a name every distribution accepts.
pub fn default_user(login: Option<&str>) -> String {
    match login {
        Some(u)
            if u != "root"
                && !u.is_empty()
                && u.len() <= 32
                && u.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && u.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-')
                }) =>
        {
            u.to_string()
        }
        _ => "hostvisor".to_string(),
    }
}

/// `user-data` made by hostvisor: one user with the given keys, sudo
/// without a password, no password login.
pub fn user_data(user: &str, keys: &[String]) -> String {
    let mut s = String::from("#cloud-config\n");
    s.push_str("# Written by `hostvisor create --cloud-init`.\n");
    s.push_str("users:\n");
    s.push_str(&format!("  - name: {}\n", q(user)));
    s.push_str("    shell: \"/bin/bash\"\n");
    s.push_str("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n");
    s.push_str("    lock_passwd: true\n");
    if keys.is_empty() {
        s.push_str("    ssh_authorized_keys: []\n");
    } else {
        s.push_str("    ssh_authorized_keys:\n");
        for k in keys {
            s.push_str(&format!("      - {}\n", q(k)));
        }
    }
    s.push_str("ssh_pwauth: false\n");
    s
}

/// `meta-data`: the instance id (cloud-init runs its once-per-instance
/// modules again when it changes) and the hostname.
pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(instance_id),
        q(hostname)
    )
}

/// `network-config` (version 2): DHCP on the VM's first NIC, found by its
/// MAC address, or on the first interface named e* (eth0, ens3, enp0s3)
/// when the VM's first NIC has no fixed MAC. The document is the v2
/// mapping itself, without a top-level `network:` key: cloud-init before
/// 22.2 failed on that key in a NoCloud network-config, and every version
/// reads this form.
pub fn network_config(first_mac: Option<&str>) -> String {
    let matcher = match first_mac {
        Some(mac) => format!("macaddress: {}", q(&mac.to_ascii_lowercase())),
        None => "name: \"e*\"".to_string(),
    };
    format!("version: 2\nethernets:\n  primary:\n    match:\n      {matcher}\n    dhcp4: true\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_yaml::Value;

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap_or_else(|e| panic!("{e}:\n{s}"))
    }

    fn temp(name: &str, data: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hv-nocloud-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn user_data_is_a_cloud_config_with_the_user_and_keys() {
        let keys = vec![
            "ssh-ed25519 AAAAC3Nza me@host".to_string(),
            // A comment that would break hand-written YAML.
            "ssh-rsa AAAAB3Nz= \"quoted\": #not-a-comment {x}".to_string(),
        ];
        let text = user_data("alice", &keys);
        assert!(text.starts_with("#cloud-config\n"));
        let v = yaml(&text);
        let users = v["users"].as_sequence().unwrap();
        assert_eq!(users.len(), 1);
        let u = &users[0];
        assert_eq!(u["name"], "alice");
        assert_eq!(u["sudo"], "ALL=(ALL) NOPASSWD:ALL");
        assert_eq!(u["lock_passwd"], true);
        assert_eq!(u["shell"], "/bin/bash");
        let got: Vec<&str> = u["ssh_authorized_keys"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(got, keys);
        assert_eq!(v["ssh_pwauth"], false);
    }

    #[test]
    fn user_data_without_keys_has_an_empty_key_list() {
        let v = yaml(&user_data("hostvisor", &[]));
        assert_eq!(
            v["users"][0]["ssh_authorized_keys"]
                .as_sequence()
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn meta_data_has_the_instance_id_and_hostname() {
        let v = yaml(&meta_data("5f0c7c5e-0000-4000-8000-000000000001", "web-1"));
        assert_eq!(v["instance-id"], "5f0c7c5e-0000-4000-8000-000000000001");
        assert_eq!(v["local-hostname"], "web-1");
        assert_eq!(v.as_mapping().unwrap().len(), 2);
    }

    #[test]
    fn network_config_matches_the_first_nic_by_mac_or_name() {
        let v = yaml(&network_config(Some("52:54:00:AB:cd:01")));
        assert_eq!(v["version"], 2);
        assert!(v.get("network").is_none());
        let eths = v["ethernets"].as_mapping().unwrap();
        assert_eq!(eths.len(), 1);
        let nic = &v["ethernets"]["primary"];
        assert_eq!(nic["match"]["macaddress"], "52:54:00:ab:cd:01");
        assert_eq!(nic["dhcp4"], true);
        let v = yaml(&network_config(None));
        assert_eq!(v["ethernets"]["primary"]["match"]["name"], "e*");
        assert_eq!(v["ethernets"]["primary"]["dhcp4"], true);
    }

    #[test]
    fn ssh_keys_are_read_and_checked() {
        let ok = temp(
            "ok.pub",
            b"# mine\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@host\n\necdsa-sha2-nistp256 AAAAE2Vj= x\n",
        );
        assert_eq!(
            read_ssh_keys(&ok).unwrap(),
            [
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@host",
                "ecdsa-sha2-nistp256 AAAAE2Vj= x"
            ]
        );
        let private = temp(
            "id_ed25519",
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n",
        );
        let e = read_ssh_keys(&private).unwrap_err().0;
        assert!(e.contains("private key") && e.contains(".pub"), "{e}");
        let junk = temp("junk.pub", b"hello world\n");
        assert!(read_ssh_keys(&junk)
            .unwrap_err()
            .0
            .contains("not an ssh public key"));
        let empty = temp("empty.pub", b"\n# nothing\n");
        assert!(read_ssh_keys(&empty)
            .unwrap_err()
            .0
            .contains("no ssh public key"));
        let missing = Path::new("/nonexistent/key.pub");
        let e = read_ssh_keys(missing).unwrap_err().0;
        assert!(
            e.starts_with("--ssh-key /nonexistent/key.pub: ") && !e.contains('\n'),
            "{e}"
        );
        let big = temp("big.pub", &vec![b'a'; MAX_KEY_FILE as usize + 1]);
        assert!(read_ssh_keys(&big).unwrap_err().0.contains("larger than"));
    }

    #[test]
    fn user_data_must_be_something_cloud_init_reads() {
        for good in [
            &b"#cloud-config\nusers: []\n"[..],
            b"#!/bin/sh\necho hi\n",
            b"Content-Type: multipart/mixed; boundary=\"XX\"\nMIME-Version: 1.0\n\n--XX\n",
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=x\n\n",
            b"\x1f\x8b\x08\x00",
        ] {
            let p = temp("ud-good", good);
            assert_eq!(read_user_data(&p).unwrap(), good);
        }
        for bad in [
            &b"users: []\n"[..],
            b" #cloud-config\n",
            b"Content-Type: text/plain\n\nhello\n",
            b"",
        ] {
            let p = temp("ud-bad", bad);
            let e = read_user_data(&p).unwrap_err().0;
            assert!(
                e.contains("not cloud-init user data") && !e.contains('\n'),
                "{e}"
            );
        }
        let e = read_user_data(Path::new("/nonexistent/ud")).unwrap_err().0;
        assert!(e.starts_with("--user-data /nonexistent/ud: "), "{e}");
    }

    #[test]
    fn hostnames_are_checked_and_derived_from_vm_names() {
        for good in ["web", "web-1", "a.example.com", "x9", &"a".repeat(63)] {
            assert!(check_hostname(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a_b",
            "a..b",
            "a b",
            &"a".repeat(64),
            "a\nb",
        ] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
        assert_eq!(hostname_for("my_vm"), "my-vm");
        assert_eq!(hostname_for("db.1"), "db.1");
        assert_eq!(hostname_for(&"x".repeat(64)), "x".repeat(63));
        assert_eq!(hostname_for("a_"), "a");
        for name in ["my_vm", "a_", "9-x.y", &"x".repeat(64)] {
            check_hostname(&hostname_for(name)).unwrap();
        }
    }

    #[test]
    fn the_user_is_the_host_login_unless_root_or_unusual() {
        assert_eq!(default_user(Some("alice")), "alice");
        assert_eq!(default_user(Some("root")), "hostvisor");
        assert_eq!(default_user(Some("Alice")), "hostvisor");
        assert_eq!(default_user(Some("a b")), "hostvisor");
        assert_eq!(default_user(Some("")), "hostvisor");
        assert_eq!(default_user(None), "hostvisor");
    }
}
