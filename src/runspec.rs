//! `RunSpec`: the contract both isolations consume. Built from the image config and the `run` flags.
