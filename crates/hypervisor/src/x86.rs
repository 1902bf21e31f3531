//! Architectural bits of x86 control registers and RFLAGS, defined once
//! for the platform setup (`arch`) and the instruction assists.

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_LA57: u64 = 1 << 12;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

pub const RFLAGS_CF: u64 = 1 << 0;
pub const RFLAGS_PF: u64 = 1 << 2;
pub const RFLAGS_AF: u64 = 1 << 4;
pub const RFLAGS_ZF: u64 = 1 << 6;
pub const RFLAGS_SF: u64 = 1 << 7;
pub const RFLAGS_TF: u64 = 1 << 8;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RFLAGS_OF: u64 = 1 << 11;
pub const RFLAGS_NT: u64 = 1 << 14;
pub const RFLAGS_RF: u64 = 1 << 16;
pub const RFLAGS_VM: u64 = 1 << 17;
pub const RFLAGS_AC: u64 = 1 << 18;
