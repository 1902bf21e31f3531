//! hostvisor's guest agent: serves the host's requests on vsock port 52.
//! Built static (no runtime dependencies) into the default guest's
//! initramfs, where /init starts it when the VM has a vsock device.

fn main() {
    keep_buffers_mapped();
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(agent::AGENT_PORT);
    if let Err(e) = agent::server::serve_vsock(port) {
        eprintln!("hostvisor-agent: cannot listen on vsock port {port}: {e}");
        std::process::exit(1);
    }
}

/// Makes large buffers come from the heap and stay mapped once used.
///
/// On nested PVM hosts (DEVELOPERS.md), when user space fills a freshly
/// mmap-ed buffer and the (emulated) guest kernel then copies from it, the
/// kernel has been seen to read stale bytes for the buffer's first cache
/// line: files uploaded into a just-booted guest had 64-byte runs of old
/// heap data at chunk starts, and downloads had broken frame headers.
/// glibc serves allocations of 128 KiB and more (every file chunk) with a
/// fresh mmap and unmaps them when freed; keeping them in the heap, never
/// trimmed, in one arena, reuses the same mapped pages. Harmless on other
/// hosts: the agent's memory stays a few MiB.
fn keep_buffers_mapped() {
    // SAFETY: mallopt only changes allocator parameters; it runs before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
