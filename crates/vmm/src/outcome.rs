//! How a VM run ends, and the process exit codes that follow.

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest powered off.
    PoweredOff,
    /// The guest reset the machine.
    Reset,
    /// A test guest wrote to the debug-exit port.
    DebugExit(u32),
    /// The guest crashed: a kernel panic, a triple fault, an instruction
    /// nobody could complete, an accelerator error.
    Crashed(String),
    /// The user ended the VM (`Ctrl-A x`).
    Terminated,
    /// A controller killed the VM.
    Killed,
}

/// Process exit codes of `hostvisor run`.
pub mod exit_code {
    pub const GUEST_SHUTDOWN: i32 = 0;
    pub const HOSTVISOR_ERROR: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const GUEST_CRASH: i32 = 3;
}

impl VmOutcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            VmOutcome::PoweredOff
            | VmOutcome::Reset
            | VmOutcome::Terminated
            | VmOutcome::Killed => exit_code::GUEST_SHUTDOWN,
            VmOutcome::DebugExit(0) => exit_code::GUEST_SHUTDOWN,
            VmOutcome::DebugExit(_) | VmOutcome::Crashed(_) => exit_code::GUEST_CRASH,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(VmOutcome::PoweredOff.exit_code(), 0);
        assert_eq!(VmOutcome::Reset.exit_code(), 0);
        assert_eq!(VmOutcome::DebugExit(0).exit_code(), 0);
        assert_eq!(VmOutcome::DebugExit(1).exit_code(), 3);
        assert_eq!(VmOutcome::Crashed("x".into()).exit_code(), 3);
    }
}
