//! Host-side networking shared by both isolations: bridge, IPAM, NAT, published ports, taps and veths.
