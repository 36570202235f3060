//! OCI images: references, registry client, content-addressed store, safe layer unpacking.
