//! virtio-vsock (in progress, issue 7): the packet format and the
//! per-connection state machine with credit-based flow control. The device
//! (queues, the host-side Unix-socket muxer in Firecracker's style) is
//! built on these next.

pub mod connection;
pub mod packet;
