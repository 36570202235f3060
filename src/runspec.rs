//! `RunSpec`: the contract both isolations consume (defined in the `rvmm-proto` crate so the guest's PID 1
//! shares it), and building it from the image config and the `run` flags.

pub use rvmm_proto::{Limits, Mount, Network, NetworkMode, PortMapping, Protocol, RunSpec, User};
