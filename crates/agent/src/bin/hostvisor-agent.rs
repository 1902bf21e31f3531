//! hostvisor's guest agent: serves the host's requests on vsock port 52.
//! Built static (no runtime dependencies) into the default guest's
//! initramfs, where /init starts it when the VM has a vsock device.

fn main() {
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(agent::AGENT_PORT);
    if let Err(e) = agent::server::serve_vsock(port) {
        eprintln!("hostvisor-agent: cannot listen on vsock port {port}: {e}");
        std::process::exit(1);
    }
}
